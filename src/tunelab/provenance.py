"""Where a result came from: the git commit (and whether the tree was dirty), the key package
versions, and one hash of tunelab's own code (part of every stage's cache key)."""
from __future__ import annotations

import hashlib
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Dict

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


def git_state() -> Dict[str, str]:
    """The commit of the current directory's repository, and whether tracked files differ from it."""
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else False
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
