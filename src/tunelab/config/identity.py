"""The config hash: a stable identity of what a run computes.

Canonical JSON (sorted keys) of the resolved config, without the fields that do not change the
result (where outputs go, tracking, which stage runs), plus the dataset's content hash.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf

IGNORED_KEYS = ("paths", "tracking", "stage", "hydra")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_hash(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(file_sha256(Path(path)).encode())
    return digest.hexdigest()


def identity_dict(cfg: DictConfig) -> dict:
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in IGNORED_KEYS:
        data.pop(key, None)
    return data


def config_hash(cfg: DictConfig, data_hash: str) -> str:
    payload = {"config": identity_dict(cfg), "dataset_sha256": data_hash}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
