"""Where a result came from: the git commit (and whether the tree was dirty), the key package
versions, and one hash of tunelab's own code (part of every stage's cache key)."""
from __future__ import annotations

import hashlib
import os
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Sequence

KEY_PACKAGES = ("tunelab", "torch", "transformers", "trl", "peft", "accelerate", "datasets",
                "llama_cpp_python", "gguf", "hydra-core", "mlflow")


def package_versions() -> Dict[str, str]:
    versions = {}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    return done.stdout.strip() if done.returncode == 0 else ""


# Untracked files here make the tree dirty: the run's own configs (beside the dataset files).
WATCHED = ("conf", "experiments")


def dataset_files(cfg) -> List[str]:
    """The local dataset paths a run reads (dataset.path, eval_path, sources[*].path; not hub ids)."""
    dataset = getattr(cfg, "dataset", None)
    if dataset is None:
        return []
    nodes = [(dataset, dataset.get("path")), (dataset, dataset.get("eval_path"))]
    nodes += [(source, source.get("path")) for source in dataset.get("sources") or []]
    return [str(path) for node, path in nodes if path and node.get("format") != "hub"]


def _untracked(watched: Sequence[str]) -> List[str]:
    """Files under `watched` (inside this repository) that git does not track and does not ignore."""
    top = _git("rev-parse", "--show-toplevel")
    if not top:
        return []
    inside = []
    for path in watched:
        full = Path(path).resolve()
        if full.exists() and (full == Path(top) or Path(top) in full.parents):
            inside.append(os.path.relpath(full))
    if not inside:
        return []
    listed = _git("status", "--porcelain", "--untracked-files=all", "--", *inside)
    return [line[3:] for line in listed.splitlines() if line.startswith("??")]


def git_state(data_files: Sequence[str] = ()) -> Dict[str, str]:
    """The commit of the current directory's repository, and whether the tree is dirty: tracked files
    differ from it, or files under conf/, experiments/ or `data_files` (the run's dataset files) are
    untracked (and not ignored: DVC-managed data is ignored, its .dvc record is tracked)."""
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = bool(commit) and bool(_git("status", "--porcelain", "--untracked-files=no")
                                      or _untracked((*WATCHED, *data_files)))
    except (OSError, subprocess.TimeoutExpired):
        commit, dirty = "", False
    return {"commit": commit or "unknown", "dirty": str(dirty).lower()}


# Modules that only start, track or report runs: editing them does not change a stage's outputs.
NOT_COMPUTING = ("cli.py", "sweep.py", "sweep_results.py", "sweep_tracking.py", "plots.py", "tracking.py", "runstate.py",
                 "commands/")


@lru_cache(maxsize=1)
def code_version() -> str:
    """tunelab's computing source files and the key package versions: a change to either invalidates
    cached stages."""
    digest = hashlib.sha256()
    package_dir = Path(__file__).resolve().parent
    for path in sorted(package_dir.rglob("*.py")):
        if str(path.relative_to(package_dir)).startswith(NOT_COMPUTING):
            continue
        digest.update(str(path.relative_to(package_dir)).encode())
        digest.update(path.read_bytes())
    for name, version in sorted(package_versions().items()):
        digest.update(f"{name}=={version}".encode())
    return digest.hexdigest()
