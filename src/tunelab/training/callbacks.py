"""The Trainer callbacks of the train stage: loss.jsonl and the live curve, and checkpointing.

Both backends train with TRL's SFTTrainer (a transformers Trainer), so these work for hf and unsloth.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from tunelab.training import checkpoints

# What HF logs per step -> the MLflow metric it becomes (the live curve).
CURVE = {"loss": "train.loss", "learning_rate": "train.learning_rate", "grad_norm": "train.grad_norm",
         "epoch": "train.epoch"}


def say(message: str) -> None:
    print(f"tunelab: {message}", file=sys.stderr, flush=True)


def curve_metrics(logs: dict) -> dict:
    return {CURVE[k]: float(v) for k, v in logs.items() if k in CURVE and isinstance(v, (int, float))
            and math.isfinite(v)}


def save_every(save_steps, max_steps: int) -> int:
    """training.save_steps as a step interval: auto = ceil(10% of the steps); 0 = never."""
    if save_steps == "auto":
        return max(1, math.ceil(0.1 * max_steps))
    return int(save_steps)


def make_callbacks(loss_log: Path, reporter, policy: Optional["CheckpointPolicy"]):
    """The train stage's callbacks (transformers is imported only here, when training runs)."""
    from transformers import TrainerCallback

    class LossLogger(TrainerCallback):
        """Each logged step: a line of loss.jsonl, and the curve to the tracker while training runs."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or not state.is_world_process_zero:
                return
            with open(loss_log, "a") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")
            reporter.log_metrics(curve_metrics(logs), state.global_step)

    class Checkpointing(TrainerCallback):
        """Decides when to save (steps, minutes, an interrupt) and verifies each save (CheckpointPolicy)."""

        def on_train_begin(self, args, state, control, **kwargs):
            policy.begin(state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            save, stop = policy.step_end(state.global_step, agree=_agree if args.world_size > 1 else None)
            control.should_save = control.should_save or save
            control.should_training_stop = control.should_training_stop or stop
            return control

        def on_save(self, args, state, control, **kwargs):
            if args.world_size > 1:  # every rank has written its part (rng_state_<rank>.pth) first
                import torch.distributed as dist

                dist.barrier()
            if state.is_world_process_zero:
                policy.saved(state.global_step)

    return [LossLogger()] + ([Checkpointing()] if policy is not None else [])


def _agree(save: bool, stop: bool):
    """(save, stop) as any rank decided: saving and stopping are collective (the Trainer gathers during a
    save), so a signal that reached one rank, or a save_minutes deadline one rank passed, counts for all."""
    import torch
    import torch.distributed as dist

    votes = torch.tensor([int(save), int(stop)], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        votes = votes.cuda()
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes[0]), bool(votes[1])


class CheckpointPolicy:
    """When to save, and what to do after a save: verify, mark complete, rotate. No transformers here,
    so it is testable without training."""

    def __init__(self, root: Path, training_cfg, identity: str, world_size: int, run_id: Optional[str], pending,
                 main: bool = True):
        self.root, self.identity, self.world_size, self.run_id = root, identity, world_size, run_id
        self.main = main  # rank 0: it says what happens and marks, unmarks and rotates the folders
        self.save_steps, self.keep = training_cfg.save_steps, training_cfg.keep_checkpoints
        self.save_s = (training_cfg.save_minutes or 0) * 60.0
        self.pending = pending  # runstate.Pending: an interrupt to save for
        self.every, self.max_steps, self.last_save = 0, 0, time.monotonic()
        self.interrupt_step: Optional[int] = None
        self.save_started = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self.save_steps != 0

    def begin(self, max_steps: int) -> None:
        self.max_steps, self.every = max_steps, save_every(self.save_steps, max_steps)
        self.last_save = time.monotonic()

    def step_end(self, step: int, agree=None):
        """(save, stop) after `step`: save on the interval, after save_minutes, and on an interrupt.
        agree(save, stop): the decision every rank takes (several processes train together)."""
        stop = bool(self.pending)
        save = self.enabled and (stop or step % self.every == 0
                                 or (self.save_s > 0 and time.monotonic() - self.last_save >= self.save_s))
        if agree is not None:
            save, stop = agree(save, stop)
            save = self.enabled and (save or stop)
        if stop and self.interrupt_step is None:
            self.interrupt_step = step
            signal = self.pending.signum if self.pending else "on another rank"
            say(f"signal {signal}: " + (f"saving a checkpoint at step {step}, then stopping" if save
                                        else "stopping (training.save_steps=0: no checkpoint)"))
        if save:
            self.save_started = time.monotonic()
            if not self.main:  # saved() runs on rank 0 only: the other ranks count from here
                self.last_save = self.save_started
        if save and self.main:
            checkpoints.unmark(self.root / f"checkpoint-{step}")  # overwritten now: not complete until verified
        return save, stop

    def saved(self, step: int) -> None:
        folder = self.root / f"checkpoint-{step}"
        try:
            checkpoints.mark_complete(folder, self.identity, self.world_size, self.run_id)
        except ValueError as err:  # left unmarked: never resumed from; the previous complete one stays
            say(f"WARNING: {err}; it will not be resumed from")
            return
        self.last_save = time.monotonic()
        removed = checkpoints.rotate(self.root, self.keep, protect=folder)
        note = f" (removed {', '.join(p.name for p in removed)})" if removed else ""
        say(f"checkpoint {folder} verified: step {step} of {self.max_steps}, saved and verified in "
            f"{self.last_save - self.save_started:.2f} s{note}")
