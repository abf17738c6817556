"""Sweeps (`tunelab -m ...`): one MLflow parent run per sweep, every job a child run under it.

A Hydra callback (tunelab/conf/config.yaml, hydra.callbacks) starts the parent run when the sweep starts
and leaves its id in the sweep directory, where every job finds it, whichever launcher ran the job
(in this process, in joblib workers, or as submitit/SLURM jobs on a shared file system). When the
sweep ends, normally or because a job failed (Hydra then exits before its end callback) or was
interrupted, `finish` ends the parent run and prints what failed.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tunelab import runstate, sweep_results, sweep_tracking

MARKER = ".tunelab-sweep.json"
_active: dict = {}  # the sweep this process started: its tracking config and parent run id
_started: list = []  # not empty in the process that started a sweep (not in its workers)


def started_here() -> bool:
    """True in the process that runs the sweep; False in a worker process running its jobs."""
    return bool(_started)


class MlflowSweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _started.append(True)
        if not config.tracking.enabled:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        tracking_cfg = OmegaConf.create(OmegaConf.to_container(config.tracking, resolve=True))
        arguments = " ".join(config.hydra.overrides.task)
        run_id = sweep_tracking.start_sweep_run(tracking_cfg, run_name=f"{config.name}-sweep-{sweep_dir.name}", tags={
            "tunelab.experiment": config.name, "tunelab.sweep_dir": str(sweep_dir),
            "tunelab.sweep_arguments": arguments or "(none)", "tunelab.objective_direction": config.sweep.direction})
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / MARKER).write_text(json.dumps({"parent_run_id": run_id}))
        _active.update(tracking=tracking_cfg, run_id=run_id, direction=config.sweep.direction)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        finish(interrupted=False)


def stop_jobs(signum: int) -> None:
    """What the sweep process does on Ctrl-C/SIGTERM before it stops: send SIGTERM to the processes
    (joblib workers, submitit's local jobs) whose jobs' runs are RUNNING, and wait, at most
    runstate.STOP_CHILDREN_S, until those runs have ended (the workers then wait to be killed)."""
    import psutil

    if not _active:  # untracked: no runs to wait for; the workers exit when interrupted
        runstate.stop_children(signum)
        return
    descendants = {child.pid for child in psutil.Process().children(recursive=True)}
    running = {run_id: pid for run_id, pid in sweep_tracking.running_jobs(_active["tracking"], _active["run_id"]).items()
               if pid in descendants}
    for pid in set(running.values()):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + runstate.STOP_CHILDREN_S
    while running and time.monotonic() < deadline:
        time.sleep(0.5)
        still = sweep_tracking.running_jobs(_active["tracking"], _active["run_id"])
        running = {run_id: pid for run_id, pid in running.items() if run_id in still and psutil.pid_exists(pid)}


def parent_run_id(job_output_dir: str) -> Optional[str]:
    """The parent run of the sweep a job belongs to: the marker in a folder above the job's folder."""
    for folder in list(Path(job_output_dir).resolve().parents)[:3]:
        if (folder / MARKER).is_file():
            return json.loads((folder / MARKER).read_text())["parent_run_id"]
    return None


def finish(interrupted: bool) -> None:
    """End the sweep this process started (if any) and print a summary of its jobs."""
    if not _active:
        return
    tracking_cfg, run_id, direction = _active.pop("tracking"), _active.pop("run_id"), _active.pop("direction")
    jobs = sweep_tracking.finish_sweep_run(tracking_cfg, run_id, interrupted)
    print_summary(jobs, run_id, direction)


def print_summary(jobs: List[dict], parent_run_id: str, direction: str = "maximize") -> None:
    from rich.console import Console
    from rich.table import Table

    failed = [job for job in jobs if job["status"] != "FINISHED"]
    best = sweep_results.best_job(jobs, direction)
    table = Table(title=f"sweep {parent_run_id}: {len(jobs)} jobs, {len(failed)} did not finish")
    for column in ("job", "status", "config hash", "overrides", "objective", "error"):
        table.add_column(column)
    for job, own in zip(jobs, sweep_results.own_overrides(jobs)):
        tags, value = job["tags"], sweep_results.objective_value(job)
        error = " ".join(tags.get("tunelab.error", "").split())  # the exception's type and message, one line
        table.add_row(tags.get("tunelab.sweep_job", "?"), job["status"], tags.get("tunelab.config_hash", "")[:12],
                      own, "-" if value is None else f"{value:.4g}" + (" (best)" if job is best else ""), error[:200],
                      style="red" if job["status"] != "FINISHED" else "bold" if job is best else None)
    Console(stderr=bool(failed)).print(table)
    if best is not None:
        Console(stderr=bool(failed)).print(f"best: job {best['tags'].get('tunelab.sweep_job')} ({direction} "
                                           f"{best['tags']['tunelab.objective']}), run {best['run_id']}")
    if any(job["status"] == "FAILED" for job in jobs):
        Console(stderr=True).print("[bold red]failed jobs keep their traceback in MLflow: artifact "
                                   "error/traceback.txt of each run above[/]")
