"""What each stage wrote into a run directory, and the proof that it is still what was written.

`<run_dir>/.tunelab/stages/<stage>.json` is written `running` before a stage touches its folder and
`complete` (with every file's size and sha256) after it finished, always whole (temp file + rename).
A folder whose record is `running` was created empty by a tunelab that did not finish: all of it is
tunelab's. A complete record lists exactly what tunelab wrote: cleaning removes those files only,
and the digest that downstream cache keys use is computed from the bytes on disk, checked against it.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from tunelab.paths import RunPaths

STAGE_DIRS = ("prepare", "train", "export", "evaluate")
# The stage outputs that later stages read: their digest is what downstream keys are made of.
OUTPUTS: Dict[str, List[str]] = {
    "prepare": ["train.jsonl", "eval.jsonl"],
    "train": ["adapter/*"],
    "export": ["model.*.gguf"],
    "evaluate": ["metrics.json", "generations.jsonl"],
}
CHUNK = 1 << 22
_verified: Dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256, hashed by this process


class IntegrityError(RuntimeError):
    """A file tunelab wrote is not what it recorded (exit 2): named, with what to do."""


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns, st.st_ino


def sha256_file(path: Path) -> str:
    """The file's sha256; a file this process hashed (or wrote while hashing) and that has not been
    touched since (same size, mtime and inode) is not read twice in one run."""
    key = _stat_key(path)
    if key in _verified:
        return _verified[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    _verified[key] = digest.hexdigest()
    return _verified[key]


def remember(path: Path, sha256: str) -> None:
    """This process just wrote `path` and hashed exactly those bytes on the way."""
    _verified[_stat_key(path)] = sha256


def hashed() -> List[list]:
    """What this process hashed, as [path, size, mtime_ns, inode, sha256] rows: a child process of the
    same run (tunelab.llama_process) hands them on, so a file untouched since is not read again."""
    return [[*key, digest] for key, digest in _verified.items()]


def adopt_hashed(rows: List[list]) -> None:
    """Take another process's hashes of this run (hashed()); each still applies only while the file's
    size, mtime and inode are the ones it was hashed with."""
    _verified.update({tuple(row[:4]): row[4] for row in rows})


def file_entries(folder: Path) -> Dict[str, dict]:
    """Every file under folder: relative path -> size and sha256."""
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def folder_sha256(folder: Path) -> str:
    """A folder's content hash from its files' relative paths and sha256 (each file read once a run)."""
    listing = {name: entry["sha256"] for name, entry in file_entries(folder).items()}
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def outputs_digest(stage: str, files: Dict[str, dict]) -> str:
    """The digest of a stage's outputs (OUTPUTS) from their recorded hashes."""
    chosen = sorted(name for name in files if any(fnmatch.fnmatchcase(name, pattern) and
                                                  name.count("/") == pattern.count("/") for pattern in OUTPUTS[stage]))
    if not chosen:
        raise FileNotFoundError(f"the {stage} stage wrote none of {OUTPUTS[stage]}: run `tunelab stage={stage}` first")
    digest = hashlib.sha256()
    for name in chosen:
        digest.update(f"{name}\0{files[name]['sha256']}\n".encode())
    return digest.hexdigest()


def write_json_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(data, indent=2, default=str))
    os.replace(partial, path)


class StageRecord:
    def __init__(self, paths: RunPaths, stage: str):
        self.paths, self.stage = paths, stage
        self.path = paths.state_dir / "stages" / f"{stage}.json"
        self.folder = paths.run_dir / stage

    def read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def complete_record(self) -> Optional[dict]:
        record = self.read()
        return record if record and record.get("status") == "complete" and "files" in record else None

    def unlisted_files(self) -> List[str]:
        """Files in the stage's folder that its record does not account for (relative to run_dir)."""
        record = self.read()
        if not self.folder.is_dir() or (record is not None and record.get("status") != "complete") \
                or (record is not None and "files" not in record):
            return []  # a folder tunelab created and did not finish (or an older tunelab's): all its own
        listed = set(record["files"]) if record else set()
        return [f"{self.stage}/{p.relative_to(self.folder).as_posix()}" for p in sorted(self.folder.rglob("*"))
                if not p.is_dir() and p.relative_to(self.folder).as_posix() not in listed]

    def begin(self, key: str) -> None:
        """Remove what tunelab wrote here before (and only that), then say the stage is running."""
        record = self.read()
        if self.folder.exists():
            if record is None or record.get("status") != "complete" or "files" not in record:
                shutil.rmtree(self.folder)  # created by a tunelab run that did not finish: its own
            else:
                self._remove_listed(record["files"])
        write_json_atomically(self.path, {"stage": self.stage, "key": key, "status": "running",
                                          "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})

    def _remove_listed(self, listed: Iterable[str]) -> None:
        unlisted = self.unlisted_files()
        if unlisted:  # checked before anything is removed: a refusal removes nothing
            raise IntegrityError(f"{self.folder} holds files tunelab did not write ({', '.join(unlisted[:5])}): "
                                 f"move them elsewhere, then run again")
        for name in listed:
            (self.folder / name).unlink(missing_ok=True)
        for folder in sorted((p for p in self.folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            folder.rmdir()  # emptied above: only listed files were in them
        self.folder.rmdir()

    def complete(self, key: str, files: Dict[str, dict]) -> str:
        """Record what the stage's folder now holds; returns the digest of its outputs."""
        digest = outputs_digest(self.stage, files)
        write_json_atomically(self.path, {"stage": self.stage, "key": key, "status": "complete", "digest": digest,
                                          "files": files, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        return digest

    def verify(self) -> Dict[str, dict]:
        """The folder's files, hashed now, if they are what the complete record lists; else IntegrityError."""
        record = self.complete_record()
        if record is None:
            raise IntegrityError(f"{self.folder} has no complete record of the {self.stage} stage (it did not "
                                 f"finish, or an older tunelab wrote it): run `tunelab stage={self.stage}` first")
        for name, expected in record["files"].items():
            path = self.folder / name
            if not path.is_file():
                raise IntegrityError(f"{self.stage}/{name}, which the {self.stage} stage wrote, is missing: "
                                     f"run `tunelab stage={self.stage}` again")
            actual = sha256_file(path)
            if actual != expected["sha256"]:
                raise IntegrityError(f"{self.stage}/{name} changed since the {self.stage} stage wrote it "
                                     f"(sha256 {actual[:12]}, recorded {expected['sha256'][:12]}): "
                                     f"run `tunelab stage={self.stage}` again")
        return record["files"]

    def verified_digest(self) -> str:
        """The digest of the stage's outputs, from the bytes on disk, checked against the record."""
        return outputs_digest(self.stage, self.verify())


def checked_gguf(info: dict, what: str) -> Path:
    """The GGUF an export manifest entry names, after checking its bytes against the recorded sha256:
    what is scored, shipped and served is exactly the file that export wrote."""
    path = Path(info["path"])
    again = "run `tunelab stage=export` again"
    if "sha256" not in info:
        raise IntegrityError(f"the export manifest records no sha256 for {what} ({path}): an older tunelab exported "
                             f"it; {again}")
    if not path.is_file():
        raise IntegrityError(f"{path} ({what}) is missing: {again}")
    actual = sha256_file(path)
    if actual != info["sha256"]:
        raise IntegrityError(f"{path} ({what}) is not the file export wrote: sha256 {actual[:16]}, recorded "
                             f"{info['sha256'][:16]} (replaced or changed after export): {again}")
    return path
