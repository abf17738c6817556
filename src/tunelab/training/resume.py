"""training.resume: which checkpoint a training continues from, and the curve it continues.

auto: the newest complete checkpoint of this training's identity and world size, passing over (and
naming) newer ones that are half-written, corrupt or another training's; none: start over.
never: start over. A path: that checkpoint, or a ConfigError (exit 2) saying why it cannot be.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from tunelab.config.errors import ConfigError
from tunelab.training import checkpoints
from tunelab.training.callbacks import curve_metrics, say


def choose(resume: str, root: Path, identity: str, world_size: int) -> Optional[Path]:
    """The checkpoint folder to resume from, or None to start at step 0 (and say which)."""
    if resume == "never":
        say("training.resume=never: training starts at step 0")
        return None
    if resume != "auto":
        return _explicit(Path(resume), identity, world_size)
    choice = checkpoints.newest_usable(root, identity, world_size)
    for folder, why in choice.skipped:
        say(f"not resuming from {folder}: {why}")
    if choice.folder is None:
        if choice.skipped:
            say("training.resume=auto: no complete checkpoint of this training; it starts at step 0")
        return None
    return choice.folder


def _explicit(folder: Path, identity: str, world_size: int) -> Path:
    key = f"training.resume={folder}"
    if not folder.is_dir() or checkpoints.step_of(folder) is None:
        raise ConfigError([f"{key}: not a checkpoint folder (a checkpoint-<step> folder under a run's "
                           "checkpoints/ directory); use training.resume=auto to pick the newest one"])
    problem = checkpoints.problem_with(folder, identity, world_size)
    if problem:
        raise ConfigError([f"{key}: refusing to resume from it: {problem}. Use training.resume=auto (the newest "
                           "complete checkpoint of this training) or training.resume=never (start over)"])
    return folder.resolve()


def describe(folder: Path) -> dict:
    """What a resumed training records as `resumed_from`: step, checkpoint path, the run that wrote it."""
    record = checkpoints.read_marker(folder) or {}
    return {"step": checkpoints.step_of(folder), "checkpoint": str(folder), "run_id": record.get("mlflow_run_id")}


def history(folder: Path) -> list:
    """The logged training steps (trainer_state.json's log_history) up to the checkpoint's step."""
    state = json.loads((folder / "trainer_state.json").read_text())
    return [entry for entry in state.get("log_history", [])
            if "loss" in entry and entry.get("step", 0) <= state["global_step"]]


def continue_curve(folder: Path, loss_log: Path, reporter) -> dict:
    """Before a resumed training: loss.jsonl and the new tracked run get the steps it already took,
    so both curves are whole; the run is tagged with where it resumed from. Returns `resumed_from`."""
    resumed = describe(folder)
    steps = history(folder)
    with open(loss_log, "w") as handle:
        for entry in steps:
            handle.write(json.dumps(entry) + "\n")
    for entry in steps:
        reporter.log_metrics(curve_metrics(entry), entry["step"])
    reporter.set_tags({"tunelab.resumed_from_run": resumed["run_id"] or "untracked",
                       "tunelab.resumed_from_step": str(resumed["step"]),
                       "tunelab.resumed_from_checkpoint": resumed["checkpoint"]})
    total = json.loads((folder / "trainer_state.json").read_text()).get("max_steps")
    say(f"resuming from step {resumed['step']} of {total}: {folder} (written by MLflow run "
        f"{resumed['run_id'] or '(untracked)'})")
    return resumed


def final_loss(loss_log: Path) -> float:
    """The last logged training loss (the last line of loss.jsonl): train.final_loss."""
    lines = loss_log.read_text().splitlines() if loss_log.exists() else []
    return float(json.loads(lines[-1])["loss"]) if lines else float("nan")


def mean_loss(loss_log: Path) -> float:
    """The mean loss per step over the whole curve (loss.jsonl, the steps before the resume too): what
    HF's training_loss is for an uninterrupted run. A resumed Trainer's own averages only the steps it
    ran itself over all the steps, so it cannot be used."""
    steps = [json.loads(line) for line in loss_log.read_text().splitlines()]
    total, previous = 0.0, 0
    for entry in steps:  # each logged loss is the mean of its logging window
        total += entry["loss"] * (entry["step"] - previous)
        previous = entry["step"]
    return total / previous if previous else float("nan")
