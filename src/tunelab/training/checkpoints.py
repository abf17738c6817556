"""Training checkpoints that are known to be whole: verified after each save, marked, rotated, found.

The Trainer writes `checkpoint-<step>/` (HF's format: adapter, optimizer, scheduler, RNG state,
trainer state) under the run's checkpoints folder. Only after every expected file is there, each
safetensors file parses and each torch file's zip directory is readable does this module write the
marker `tunelab-checkpoint.json` (temp file + os.replace: it exists whole or not at all), recording
the training identity, world size, global step, the MLflow run that wrote it, the time and each
file's size and sha256. A folder without a valid marker, or whose files no longer match it, is
never resumed from. Rotation deletes only marked checkpoints, and only after a newer one is marked.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from omegaconf import OmegaConf

from tunelab.config.identity import file_sha256

MARKER = "tunelab-checkpoint.json"
FORMAT = 1
# What HF's Trainer writes into every checkpoint of a PEFT model (rng_state_<rank>.pth when the
# world is larger than one process). training_args.bin and the tokenizer files come too, unchecked.
REQUIRED = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "trainer_state.json")
# training.* keys that say how to checkpoint, log or use threads: not part of what is computed, so
# changing them (e.g. resuming with training.resume=<path>) keeps the identity.
# nproc_per_node and nnodes make the world size (every rank of every node), which the identity holds as such.
NOT_IDENTITY = ("resume", "save_steps", "save_minutes", "keep_checkpoints", "logging_steps", "threads",
                "nproc_per_node", "nnodes")
_NAME = re.compile(r"checkpoint-(\d+)")


def training_identity(cfg, train_data_sha256: str, world_size: int) -> str:
    """What determines training: the train stage's config sections, the prepared data, world size."""
    sections = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in ("model", "lora", "template")}
    sections["training"] = {k: v for k, v in OmegaConf.to_container(cfg.training, resolve=True).items()
                            if k not in NOT_IDENTITY}
    if sections["training"].get("distributed") == "none":  # as the config hash: one process, as before
        sections["training"].pop("distributed")
    if sections["lora"].get("quant_storage", "") is None:
        sections["lora"].pop("quant_storage")
    payload = {"config": sections, "train_data_sha256": train_data_sha256, "world_size": world_size}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def step_of(folder: Path) -> Optional[int]:
    match = _NAME.fullmatch(folder.name)
    return int(match.group(1)) if match else None


def checkpoint_folders(root: Path) -> List[Path]:
    """checkpoint-<step> folders under root, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of, reverse=True)


def _expected(world_size: int) -> List[str]:
    rng = ["rng_state.pth"] if world_size == 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]
    return [*REQUIRED, *rng]


def _file_problem(path: Path) -> Optional[str]:
    """Why path is not a whole file of its kind (safetensors, torch zip, JSON), or None."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            # Opening checks the header against the file: every tensor's offsets inside its length
            # (a truncated file fails here; flipped bytes are the recorded sha256's job).
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path) as archive:  # torch.save's format: the directory is at the end
                archive.namelist()
        elif path.suffix == ".json":
            json.loads(path.read_text())
    except Exception as err:  # noqa: BLE001 - any failure to read means: not whole
        return f"{path.name} does not parse ({type(err).__name__}: {str(err)[:200]})"
    return None


def verify_files(folder: Path, world_size: int) -> Tuple[Optional[str], dict]:
    """(problem or None, {file: {bytes, sha256}}) for a checkpoint the Trainer has just written."""
    missing = [name for name in _expected(world_size) if not (folder / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}", {}
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER and ".tmp" not in p.name):
        problem = _file_problem(path)
        if problem:
            return problem, {}
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    state = json.loads((folder / "trainer_state.json").read_text())
    if step_of(folder) != state.get("global_step"):
        return f"trainer_state.json says step {state.get('global_step')}, the folder's name {folder.name}", {}
    return None, files


def write_marker(folder: Path, record: dict) -> None:
    tmp = folder / (MARKER + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(record, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, folder / MARKER)


def mark_complete(folder: Path, identity: str, world_size: int, run_id: Optional[str]) -> dict:
    """Verify a checkpoint the Trainer has just written and mark it complete; ValueError if it is not."""
    problem, files = verify_files(folder, world_size)
    if problem:
        raise ValueError(f"checkpoint {folder} is not whole: {problem}")
    record = {"format": FORMAT, "identity": identity, "world_size": world_size, "global_step": step_of(folder),
              "mlflow_run_id": run_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "unix_time": time.time(), "files": files}
    write_marker(folder, record)
    return record


def read_marker(folder: Path) -> Optional[dict]:
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def problem_with(folder: Path, identity: str, world_size: int) -> Optional[str]:
    """Why folder cannot be resumed from by this training (identity, world size), or None."""
    record = read_marker(folder)
    if record is None:
        return f"no valid {MARKER} (half-written: the process ended while saving it)"
    if record.get("world_size") != world_size:
        return f"written by a world of {record.get('world_size')} processes, this training has {world_size}"
    if record.get("identity") != identity:
        return (f"written by another training (identity {str(record.get('identity'))[:12]}, this one "
                f"{identity[:12]}: the model, lora, template, training settings or prepared data differ)")
    for name, recorded in record.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != recorded["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {recorded['bytes']} when it was saved"
        if file_sha256(path) != recorded["sha256"]:
            return f"{name} changed since it was saved (sha256 differs)"
    return None


@dataclass
class Choice:
    folder: Optional[Path]
    skipped: List[Tuple[Path, str]]  # newer folders passed over, each with why


def newest_usable(root: Path, identity: str, world_size: int) -> Choice:
    """The newest checkpoint this training can resume from, and the newer ones skipped (with why)."""
    skipped = []
    for folder in checkpoint_folders(root):
        problem = problem_with(folder, identity, world_size)
        if problem is None:
            return Choice(folder, skipped)
        skipped.append((folder, problem))
    return Choice(None, skipped)


def unmark(folder: Path) -> None:
    """The Trainer is about to write into folder again: until re-verified it is not complete."""
    (folder / MARKER).unlink(missing_ok=True)


def rotate(root: Path, keep: int, protect: Path) -> List[Path]:
    """Delete marked checkpoints beyond the newest `keep` (by the time their marker records), never
    `protect` (the one just verified) and never a folder without tunelab's marker. Returns them."""
    marked = [(read_marker(f) or {}, f) for f in checkpoint_folders(root) if read_marker(f) is not None]
    marked.sort(key=lambda pair: (pair[0].get("unix_time", 0.0), step_of(pair[1])), reverse=True)
    removed = []
    for _, folder in marked[keep:]:
        if folder.resolve() != protect.resolve():
            unmark(folder)  # first: a folder half-deleted by a kill is then plainly incomplete
            shutil.rmtree(folder)
            removed.append(folder)
    return removed
