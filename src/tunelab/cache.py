"""A content-addressed cache of stage outputs: a stage whose inputs did not change is not run again.

A stage's key is the hash of the config sections it reads, the digest of its input files (the
dataset's bytes, or the outputs of the stage before it) and the code version (tunelab's source and
the key package versions). An entry is a copy of the stage's folder (hard links where the file
system allows), the stage's result and the digest of its outputs, under
`<cache.dir>/<stage>/<key>/`. Downstream keys use that digest, so a stage that re-runs and writes
the same bytes (e.g. a deterministic training) still lets the next stages be reused.
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

from tunelab.config.identity import file_sha256
from tunelab.paths import RunPaths
from tunelab.provenance import code_version

# The config each stage reads. Changing only `quantization` re-runs export and evaluate.
SECTIONS: Dict[str, List[str]] = {
    "prepare": ["dataset"],
    "train": ["model", "lora", "template", "training"],
    "export": ["model", "template", "quantization", "eval.evaluate_base"],
    "evaluate": ["model", "template", "quantization", "eval"],
}
# The stage outputs that later stages read: their digest is what downstream keys are made of.
OUTPUTS: Dict[str, List[str]] = {
    "prepare": ["train.jsonl", "eval.jsonl"],
    "train": ["adapter/*"],
    "export": ["model.*.gguf"],
    "evaluate": ["metrics.json", "generations.jsonl"],
}
UPSTREAM: Dict[str, List[str]] = {"prepare": [], "train": ["prepare"], "export": ["train"],
                                  "evaluate": ["prepare", "export"]}


def stage_dir(paths: RunPaths, stage: str) -> Path:
    return paths.run_dir / stage


def _marker(paths: RunPaths, stage: str) -> Path:
    return paths.run_dir / ".tunelab" / "stages" / f"{stage}.json"


def outputs_digest(folder: Path, stage: str) -> str:
    files = sorted({p for pattern in OUTPUTS[stage] for p in folder.glob(pattern) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"{folder} holds none of {OUTPUTS[stage]}: run `tunelab stage={stage}` first")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder)}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def recorded_digest(paths: RunPaths, stage: str) -> str:
    """The digest written when the stage last ran or was restored here, else computed from its files."""
    marker = _marker(paths, stage)
    if marker.is_file():
        return json.loads(marker.read_text())["digest"]
    return outputs_digest(stage_dir(paths, stage), stage)


def stage_key(stage: str, cfg, paths: RunPaths, dataset_sha256: str) -> str:
    config = {name: OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, name)}), resolve=True)["v"]
              for name in SECTIONS[stage]}
    inputs = {up: recorded_digest(paths, up) for up in UPSTREAM[stage]}
    if stage == "prepare":
        inputs["dataset"] = dataset_sha256
    payload = {"stage": stage, "config": config, "inputs": inputs, "code": code_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of src into dst (a copy where links are not possible)."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


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
        meta = self.entry(stage, key) / "entry.json"
        if not self.enabled or not meta.is_file():
            return None
        return json.loads(meta.read_text())

    def restore(self, stage: str, key: str, meta: dict) -> dict:
        """Put the cached outputs into this run directory; paths inside JSON files follow the move."""
        out = stage_dir(self.paths, stage)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stage}-", dir=self.paths.run_dir))
        _link_tree(self.entry(stage, key) / "files", tmp)
        new_run_dir = str(self.paths.run_dir)
        if meta["run_dir"] != new_run_dir:
            for path in tmp.rglob("*.json"):
                text = path.read_text()
                path.unlink()  # a new file: the cached one (a hard link) stays as it was
                path.write_text(_relocate(text, meta["run_dir"], new_run_dir))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        self._mark(stage, key, meta["digest"])
        return json.loads(_relocate(json.dumps(meta["result"]), meta["run_dir"], new_run_dir))

    def prepare_fresh(self, stage: str) -> None:
        """A stage that runs writes new files: never write through a hard link into the cache."""
        out = stage_dir(self.paths, stage)
        if out.exists():
            shutil.rmtree(out)
        _marker(self.paths, stage).unlink(missing_ok=True)

    def store(self, stage: str, key: str, result: dict) -> str:
        """Record the stage's outputs (always) and add them to the cache (when enabled); returns their digest."""
        out = stage_dir(self.paths, stage)
        digest = outputs_digest(out, stage)
        self._mark(stage, key, digest)
        if not self.enabled or self.entry(stage, key).exists():
            return digest
        (self.root / stage).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root / stage))
        _link_tree(out, tmp / "files")
        meta = {"stage": stage, "key": key, "digest": digest, "run_dir": str(self.paths.run_dir),
                "created": time.strftime("%Y-%m-%d %H:%M:%S"), "result": result}
        (tmp / "entry.json").write_text(json.dumps(meta, indent=2, default=str))
        try:
            os.replace(tmp, self.entry(stage, key))
        except OSError:  # a parallel job stored the same key first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
        return digest

    def _mark(self, stage: str, key: str, digest: str) -> None:
        marker = _marker(self.paths, stage)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"key": key, "digest": digest}))
