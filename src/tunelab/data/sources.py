"""A dataset config -> its list of sources, and the dataset's identity (its content hash).

One notion of identity everywhere: the pipeline's config hash, the MLflow tag and prepare's
manifest all use `dataset_sha256(dataset_cfg)`: the sha256 of the sources' digests, in order
(training sources, then eval_path). A file's digest is the sha256 of its bytes, a folder's that of
its files' paths and digests; a hub dataset is identified by its id at its pinned revision.
"""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import List, Optional

from tunelab.config.errors import ConfigError
from tunelab.config.identity import combine_digests, path_sha256

FILE_FORMATS = ("csv", "sharegpt", "openai", "alpaca")
FORMATS = FILE_FORMATS + ("hf_disk", "hub")
# What os.stat calls each kind of file that is neither a regular file nor a folder.
_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"))


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
    key: str = field(default="dataset.path", compare=False)  # the config key of `path`, for messages

    @classmethod
    def from_config(cls, node, **changes) -> "Source":
        values = {f.name: getattr(node, f.name, f.default) for f in fields(cls)}
        return cls(**{**values, **changes})

    @property
    def label(self) -> str:
        return f"{self.path}@{self.revision}" if self.format == "hub" else str(self.path)


def training_sources(dataset_cfg) -> List[Source]:
    listed = list(getattr(dataset_cfg, "sources", None) or [])
    if not listed:
        return [Source.from_config(dataset_cfg, key="dataset.path")]
    return [Source.from_config(s, key=f"dataset.sources[{i}].path") for i, s in enumerate(listed)]


def eval_source(dataset_cfg) -> Optional[Source]:
    if not dataset_cfg.eval_path:
        return None
    return Source.from_config(dataset_cfg, path=dataset_cfg.eval_path, rows=None, weight=None, key="dataset.eval_path")


def all_sources(dataset_cfg) -> List[Source]:
    held_out = eval_source(dataset_cfg)
    return training_sources(dataset_cfg) + ([held_out] if held_out else [])


def hub_digest(source: Source) -> str:
    # The hub's revision is a commit: the id at that commit names the bytes without downloading them.
    return hashlib.sha256(f"hub:{source.path}@{source.revision}:{source.split}".encode()).hexdigest()


def source_digest(source: Source) -> str:
    if source.format == "hub":
        return hub_digest(source)
    require_input_path(source)
    return path_sha256(Path(source.path))


def dataset_sha256(dataset_cfg) -> str:
    return combine_digests(source_digest(s) for s in all_sources(dataset_cfg))


def input_path_problem(key: str, path, fmt: str) -> Optional[str]:
    """Why `path` cannot be the input `key` of format `fmt` (a regular file; a folder for hf_disk), or None.

    Only stat, never open: opening a FIFO blocks until some writer comes, and reading /dev/zero
    never ends; both must fail before any read, as must a folder given where a file is wanted."""
    if fmt == "hub" or fmt not in FORMATS:
        return None
    where = f"{key}={str(path)!r}"
    try:
        mode = os.stat(path).st_mode  # follows symlinks: what counts is what the link points at
    except FileNotFoundError:
        wanted = "folder" if fmt == "hf_disk" else "file"
        return f"{where}: no such {wanted} (relative to {Path.cwd()})"
    except OSError as err:
        return f"{where}: cannot be read ({err.strerror}); check its permissions"
    if fmt == "hf_disk":
        if stat.S_ISDIR(mode):
            return None
        return (f"{where} is {_kind(mode)}, not a folder: format=hf_disk reads a folder written by "
                "datasets' save_to_disk; point the key at one, or set the format of the file (csv, sharegpt, ...)")
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return (f"{where} is a folder, not a file: format={fmt} reads one file; name the file inside it, "
                "or use format=hf_disk for a datasets save_to_disk folder")
    return f"{where} is {_kind(mode)}, not a regular file: format={fmt} reads a {fmt} file; point the key at one"


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def require_input_path(source: Source) -> None:
    """Raise ConfigError (exit 2) where the source's path is no input of its format: the same rule
    as validate's, for the callers that read or hash sources without it (reproduce, unit-level loads)."""
    problem = input_path_problem(source.key, source.path, source.format)
    if problem:
        raise ConfigError([problem])
