"""The config hash: a stable identity of what a run computes.

Canonical JSON (sorted keys) of the resolved config, without the fields that do not change the
result (where outputs go, tracking, caching, which stage runs, how often to log), plus the dataset's content hash.
A dataset file or folder is identified by its content, not by how its path is spelled: its paths are
left out (a hub id is kept: it is the identity).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf

IGNORED_KEYS = ("paths", "tracking", "stage", "hydra", "cache", "sweep")
# Fields that change what is logged, or how often a checkpoint is saved and which one training
# continues from, not what is computed (a resumed training computes what an uninterrupted one does:
# docs/resume.md).
IGNORED_FIELDS = (("training", "logging_steps"), ("eval", "samples_to_log"), ("training", "save_steps"),
                  ("training", "save_minutes"), ("training", "keep_checkpoints"), ("training", "resume"))


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: Path) -> str:
    """A folder's content hash: its files' relative paths and content hashes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def path_sha256(path: Path) -> str:
    path = Path(path)
    return folder_sha256(path) if path.is_dir() else file_sha256(path)


def combine_digests(digests: Iterable[str]) -> str:
    """The dataset's identity from its sources' digests, in order."""
    digest = hashlib.sha256()
    for part in digests:
        digest.update(part.encode())
    return digest.hexdigest()


# Stands for a local dataset path in the identity: the bytes there are in the dataset's content hash.
BY_CONTENT = "<by content: dataset_sha256>"


def _paths_by_content(dataset: dict) -> None:
    """dataset.path, dataset.eval_path and dataset.sources[*].path of local files or folders become
    BY_CONTENT (whether one is set stays visible); a hub dataset's path is its id and stays."""
    named = [(dataset, "path"), (dataset, "eval_path")]  # eval_path is read with the top-level format
    named += [(source, "path") for source in dataset.get("sources") or [] if isinstance(source, dict)]
    for node, key in named:
        if node.get("format") != "hub" and node.get(key) is not None:
            node[key] = BY_CONTENT


def identity_dict(cfg: DictConfig) -> dict:
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in IGNORED_KEYS:
        data.pop(key, None)
    for section, key in IGNORED_FIELDS + _single_process_fields(data):
        if isinstance(data.get(section), dict):
            data[section].pop(key, None)
    if isinstance(data.get("dataset"), dict):
        _paths_by_content(data["dataset"])
    return data


def _single_process_fields(data: dict) -> tuple:
    """The distributed keys where they are at their single-process defaults: one process computes the
    same whatever they say, and a run recorded before they existed keeps its hash. Under ddp/fsdp they
    stay (nproc_per_node, resolved to a number before hashing, sets the global batch), and so does nnodes
    when the ranks span several nodes (one node, or auto not yet resolved, hashes as before nnodes existed)."""
    training, lora = data.get("training") or {}, data.get("lora") or {}
    fields = ()
    if training.get("distributed", "none") == "none":
        fields += (("training", "distributed"), ("training", "nproc_per_node"))
    if training.get("distributed", "none") == "none" or training.get("nnodes", 1) in (1, "auto"):
        fields += (("training", "nnodes"),)
    if lora.get("quant_storage") is None:
        fields += (("lora", "quant_storage"),)
    return fields


def config_hash(cfg: DictConfig, data_hash: str) -> str:
    payload = {"config": identity_dict(cfg), "dataset_sha256": data_hash}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
