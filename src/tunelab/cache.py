"""A content-verified cache of stage outputs: a stage whose inputs did not change is not run again.

A stage's key is the hash of the config sections it reads, the digests of every input it reads (the
dataset's bytes; the tokenizer or the base model's files; the outputs of the stages before it, hashed
from the bytes on disk) and the code version. An entry, `<cache.dir>/<stage>/<key>/`, is a copy of
the stage's folder (never a link: a write in the run directory cannot reach it), the size and sha256
of every file, the stage's result and the digests of its inputs. Restoring copies the files back
while hashing them: an entry whose bytes differ from its record is dropped, with every entry made
from it, and the stage runs again. Entries are published whole (a temp folder renamed into place),
so concurrent writers of one key cannot leave a mixed entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf

from tunelab.paths import RunPaths
from tunelab.provenance import code_version
from tunelab.records import StageRecord, file_entries, remember, sha256_file

# The config each stage reads. Changing only `quantization` re-runs export and evaluate. prepare
# measures token lengths with the model's tokenizer and the chat template, against max_seq_length.
# train tokenizes special-token text in messages as dataset.special_tokens_in_text says.
SECTIONS: Dict[str, List[str]] = {
    "prepare": ["dataset", "model", "template", "training.max_seq_length"],
    "train": ["model", "lora", "template", "training", "dataset.special_tokens_in_text"],
    "export": ["model", "template", "quantization", "eval.evaluate_base", "eval.n_ctx", "eval.max_new_tokens"],
    "evaluate": ["model", "template", "quantization", "eval"],
}
# How often training saves checkpoints and which one it resumes from do not change what it computes
# (a resumed training ends with the uninterrupted one's bytes on the CPU: docs/resume.md).
NOT_IN_KEYS = ("training.save_steps", "training.save_minutes", "training.keep_checkpoints", "training.resume")
UPSTREAM: Dict[str, List[str]] = {"prepare": [], "train": ["prepare"], "export": ["train"],
                                  "evaluate": ["prepare", "export"]}
# Which files of the base model each stage reads: prepare only the tokenizer, the others the weights too.
MODEL_INPUT = {"prepare": "tokenizer", "train": "model", "export": "model", "evaluate": None}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class CacheCorruption(RuntimeError):
    """A stored file's bytes are not the ones recorded when it was stored."""


def model_digests(model_dir: Path) -> Dict[str, str]:
    """{"tokenizer": digest of the model folder's non-weight files, "model": of all its files}."""
    files = file_entries(model_dir)
    tokenizer = {name: f for name, f in files.items() if not name.endswith(WEIGHT_SUFFIXES)}
    return {kind: hashlib.sha256(json.dumps({n: f["sha256"] for n, f in chosen.items()}, sort_keys=True).encode())
            .hexdigest() for kind, chosen in (("tokenizer", tokenizer), ("model", files))}


def stage_inputs(stage: str, paths: RunPaths, dataset_sha256: str, model: Optional[Dict[str, str]],
                 gpu_layers: str = "auto") -> dict:
    """The digests of what the stage reads; upstream outputs are hashed from disk and checked."""
    inputs = {up: StageRecord(paths, up).verified_digest() for up in UPSTREAM[stage]}
    if stage == "prepare":
        inputs["dataset"] = dataset_sha256
    if MODEL_INPUT[stage] and model is not None:
        inputs[MODEL_INPUT[stage]] = model[MODEL_INPUT[stage]]
    if stage == "evaluate":  # CUDA kernels round differently: answers measured on one never stand for the other's
        from tunelab.eval.device import backend_name, resolve_gpu_layers

        inputs["backend"] = backend_name(resolve_gpu_layers(gpu_layers))
    if stage == "export":  # the gate checks the GGUFs through llama-server too once it is built
        from tunelab.serving.build import built_server

        inputs["llama_server"] = "built" if built_server() else "absent"
    return inputs


def stage_key(stage: str, cfg, inputs: dict) -> str:
    config = {name: OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, name)}), resolve=True)["v"]
              for name in SECTIONS[stage]}
    for dotted in NOT_IN_KEYS:
        section, field = dotted.split(".")
        if isinstance(config.get(section), dict):
            config[section].pop(field, None)
    payload = {"stage": stage, "config": config, "inputs": inputs, "code": code_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def copy_hashed(src: Path, dst: Path) -> str:
    """Copy src to dst (new bytes, never a link) and return the sha256 of the bytes that landed in dst.
    The kernel copies (copy_file_range), then dst is hashed: ~2x a plain copy, against ~7x for a
    Python read-hash-write loop (benchmarks/verify_cost.py)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(dst)
    shutil.copyfile(src, dst)
    shutil.copystat(src, dst)
    return sha256_file(dst)


def _relocate(text: str, old_run_dir: str, new_run_dir: str) -> str:
    return text.replace(json.dumps(old_run_dir)[1:-1], json.dumps(new_run_dir)[1:-1])


class StageCache:
    def __init__(self, cache_cfg, paths: RunPaths):
        self.enabled = bool(cache_cfg.enabled)
        self.root = Path(cache_cfg.dir).resolve()
        self.paths = paths

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> Optional[dict]:
        meta_path = self.entry(stage, key) / "entry.json"
        if not self.enabled or not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        if "files" not in meta:  # unreadable, or stored by a tunelab that recorded no file hashes
            self.drop(stage, key, "its entry.json records no file hashes")
            return None
        return meta

    def restore(self, stage: str, key: str, meta: dict) -> dict:
        """Put the entry's files into the run directory, verifying every byte; paths inside JSON files
        follow the move. Raises CacheCorruption (after dropping the entry) when a file is not as stored."""
        record = StageRecord(self.paths, stage)
        new_run_dir = str(self.paths.run_dir)
        result = json.loads(_relocate(json.dumps(meta["result"]), meta["run_dir"], new_run_dir))
        if self._already_here(record, key):
            return result
        scratch = self.paths.state_dir / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{stage}-", dir=scratch))
        try:
            self._copy_verified(stage, key, meta, tmp)
            if meta["run_dir"] != new_run_dir:
                for path in tmp.rglob("*.json"):
                    path.write_text(_relocate(path.read_text(), meta["run_dir"], new_run_dir))
            files = file_entries(tmp)
            record.begin(key)
            os.replace(tmp, record.folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        record.complete(key, files)
        return result

    def _already_here(self, record: StageRecord, key: str) -> bool:
        """The run directory holds this entry's outputs already, byte for byte as recorded."""
        complete = record.complete_record()
        if complete is None or complete.get("key") != key:
            return False
        try:
            record.verify()
        except Exception:  # noqa: BLE001 - changed or missing: restore it from the verified entry
            return False
        return True

    def _copy_verified(self, stage: str, key: str, meta: dict, into: Path) -> None:
        try:
            self._copy_entry_files(self.entry(stage, key) / "files", meta["files"], into)
        except CacheCorruption as err:
            dropped = self.drop(stage, key, str(err))
            raise CacheCorruption(f"the cached {stage} stage ({self.entry(stage, key)}) is damaged: {err}. "
                                  f"Dropped it and {len(dropped) - 1} entr(ies) made from it") from None

    @staticmethod
    def _copy_entry_files(files_dir: Path, recorded: Dict[str, dict], into: Path) -> None:
        try:
            stored = {p.relative_to(files_dir).as_posix() for p in files_dir.rglob("*") if not p.is_dir()}
            if stored != set(recorded):
                extra, missing = sorted(stored - set(recorded)), sorted(set(recorded) - stored)
                raise CacheCorruption(f"files {extra} not recorded, {missing} missing")
            for name, expected in recorded.items():
                if copy_hashed(files_dir / name, into / name) != expected["sha256"]:
                    raise CacheCorruption(f"{name}: its bytes are not the ones stored (sha256 differs)")
        except OSError as err:
            raise CacheCorruption(f"unreadable ({err})") from err

    def drop(self, stage: str, key: str, why: str) -> List[str]:
        """Remove an entry and, transitively, every entry whose inputs include its outputs."""
        entry = self.entry(stage, key)
        digest = None
        try:
            digest = json.loads((entry / "entry.json").read_text()).get("digest")
        except (OSError, ValueError):
            pass
        dropped = [f"{stage}/{key[:12]}"]
        if entry.exists():
            trash = entry.with_name(f".dropped-{key}-{os.getpid()}")
            os.replace(entry, trash)  # atomic: a reader sees the whole entry or none
            shutil.rmtree(trash, ignore_errors=True)
        if digest is None:
            return dropped
        for downstream, ups in UPSTREAM.items():
            if stage not in ups or not (self.root / downstream).is_dir():
                continue
            for meta_path in (self.root / downstream).glob("*/entry.json"):
                try:
                    inputs = json.loads(meta_path.read_text()).get("inputs", {})
                except (OSError, ValueError):
                    continue
                if inputs.get(stage) == digest:
                    dropped += self.drop(downstream, meta_path.parent.name, f"made from {stage}/{key[:12]}")
        return dropped

    def store(self, stage: str, key: str, result: dict, inputs: dict) -> str:
        """Record the stage's outputs in the run directory (always) and publish them as a cache entry
        (when enabled); returns the digest of the outputs."""
        record = StageRecord(self.paths, stage)
        publish = self.enabled and not self.entry(stage, key).exists()
        tmp = None
        files = None
        if publish:
            (self.root / stage).mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root / stage))
            try:
                files = _copy_out(record.folder, tmp / "files")
            except OSError:  # e.g. a full disk: the run goes on, uncached
                files = None
        digest = record.complete(key, files or file_entries(record.folder))
        try:
            if files is not None:
                meta = {"stage": stage, "key": key, "digest": digest, "inputs": inputs, "files": files,
                        "run_dir": str(self.paths.run_dir), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "result": result}
                (tmp / "entry.json").write_text(json.dumps(meta, indent=2, default=str))
                os.replace(tmp, self.entry(stage, key))
        except OSError:  # a parallel job published the same key first: theirs is as good as ours
            pass
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return digest


def _copy_out(folder: Path, into: Path) -> Dict[str, dict]:
    """Copy a stage's folder into a new cache entry; the hashes are of the bytes read (and written)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        sha = copy_hashed(path, into / name)
        files[name] = {"size": path.stat().st_size, "sha256": sha}
        remember(path, sha)  # the run directory's copy holds the same bytes, just read
    return files
