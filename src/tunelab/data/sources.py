"""A dataset config -> its list of sources, and the dataset's identity (its content hash).

One notion of identity everywhere: the pipeline's config hash, the MLflow tag and prepare's
manifest all use `dataset_sha256(dataset_cfg)`: the sha256 of the sources' digests, in order
(training sources, then eval_path). A file's digest is the sha256 of its bytes, a folder's that of
its files' paths and digests; a hub dataset is identified by its id at its pinned revision.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List, Optional

from tunelab.config.identity import combine_digests, path_sha256

FILE_FORMATS = ("csv", "sharegpt", "openai", "alpaca")
FORMATS = FILE_FORMATS + ("hf_disk", "hub")


@dataclass(frozen=True)
class Source:
    format: str
    path: str
    revision: Optional[str] = None
    split: str = "train"
    system_prompt: Optional[str] = None
    user_template: str = "{prompt}"
    answer_column: str = "answer"
    rows: Optional[int] = None
    weight: Optional[float] = None

    @classmethod
    def from_config(cls, node, **changes) -> "Source":
        values = {f.name: getattr(node, f.name, f.default) for f in fields(cls)}
        return cls(**{**values, **changes})

    @property
    def label(self) -> str:
        return f"{self.path}@{self.revision}" if self.format == "hub" else str(self.path)


def training_sources(dataset_cfg) -> List[Source]:
    listed = list(getattr(dataset_cfg, "sources", None) or [])
    return [Source.from_config(s) for s in listed] if listed else [Source.from_config(dataset_cfg)]


def eval_source(dataset_cfg) -> Optional[Source]:
    if not dataset_cfg.eval_path:
        return None
    return Source.from_config(dataset_cfg, path=dataset_cfg.eval_path, rows=None, weight=None)


def all_sources(dataset_cfg) -> List[Source]:
    held_out = eval_source(dataset_cfg)
    return training_sources(dataset_cfg) + ([held_out] if held_out else [])


def hub_digest(source: Source) -> str:
    # The hub's revision is a commit: the id at that commit names the bytes without downloading them.
    return hashlib.sha256(f"hub:{source.path}@{source.revision}:{source.split}".encode()).hexdigest()


def source_digest(source: Source) -> str:
    return hub_digest(source) if source.format == "hub" else path_sha256(Path(source.path))


def dataset_sha256(dataset_cfg) -> str:
    return combine_digests(source_digest(s) for s in all_sources(dataset_cfg))
