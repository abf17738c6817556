"""training.distributed: start the train stage's ranks, relay what rank 0 reports, end them all together.

The Hydra process has composed, validated and resolved the config (tunelab.config.distributed); it
writes it once, resolved, to `<run_dir>/.tunelab/ranks/config.yaml`, and every rank reads that file
(no rank composes again). Each rank is `python -m tunelab.stages.train_rank` with torchrun's
environment (MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE), so that accelerate inside TRL's Trainer joins the process group (gloo on the CPU,
NCCL on GPUs). Each rank's output goes to `<run_dir>/.tunelab/logs/rank-<r>.log`; `ranks.json` beside
them names each rank's pid and log.

Rank 0 alone writes files. What it reports (the live loss curve, tags) goes to `events.jsonl`; this
process forwards each line to its reporter, so the one MLflow run, which this process owns, gets it.

A rank that ends with a non-zero code or by a signal while others run: the others are killed (they
would wait for it in a collective) and RankFailed names the rank, how it ended and its log; the run
ends FAILED. Ctrl-C or SIGTERM here: each rank gets SIGTERM (it saves a checkpoint at the end of the
step, as a single process does), is waited for at most STOP_RANKS_S, then killed; the interrupt goes
on (the run ends KILLED). Ranks are started with tunelab.procs (each in its own process group, killed
by the kernel if this process dies), and every one is reaped before this returns.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf

from tunelab import procs
from tunelab.config.distributed import world_size
from tunelab.config.errors import ConfigError
from tunelab.paths import RunPaths
from tunelab.templates.chat import TemplateError

POLL_S = 0.1  # how often the ranks and events.jsonl are looked at
STOP_RANKS_S = 120.0  # after SIGTERM, how long ranks may take to save their checkpoint and end
LOG_TAIL = 20  # lines of a failed rank's log quoted in the error
RANK_ENV = "TUNELAB_RANK"  # set in a rank: train.run trains in the process instead of launching
# Errors a rank reports as the input's fault (exit 2, as in one process): raised again here.
INPUT_ERRORS = {"ConfigError": lambda e: ConfigError(e["problems"]), "TemplateError": lambda e: TemplateError(e["message"])}


class RankFailed(RuntimeError):
    """A rank ended with a non-zero exit code or by a signal; the other ranks were stopped."""


def rank() -> Optional[int]:
    """This process's rank when it is one of tunelab's ranks, else None."""
    value = os.environ.get(RANK_ENV)
    return int(value) if value is not None else None


def rank_dir(paths: RunPaths) -> Path:
    return paths.state_dir / "ranks"


def log_path(paths: RunPaths, r: int) -> Path:
    return paths.state_dir / "logs" / f"rank-{r}.log"


def error_path(paths: RunPaths, r: int) -> Path:
    return paths.state_dir / "logs" / f"rank-{r}.error.json"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (torchrun's way: bind to 0, read it, let it go)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_env(r: int, world: int, port: int, run_id: Optional[str], threads: Optional[int]) -> Dict[str, str]:
    """torchrun's variables for rank r of one node, plus tunelab's own."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r), "LOCAL_RANK": str(r),
           "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", RANK_ENV: str(r),
           "TUNELAB_RUN_ID": run_id or "", "PYTHONUNBUFFERED": "1"}
    if threads is None and "OMP_NUM_THREADS" not in os.environ:  # ranks share the cores, as torchrun does
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    return env


class Events:
    """events.jsonl as rank 0 appends to it: each whole line forwarded once to reporter."""

    def __init__(self, path: Path, reporter):
        self.path, self.reporter, self.offset = path, reporter, 0

    def forward(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            event = json.loads(line)
            if event["kind"] == "metrics":
                self.reporter.log_metrics(event["metrics"], event["step"])
            elif event["kind"] == "tags":
                self.reporter.set_tags(event["tags"])


def run_ranks(cfg, paths: RunPaths, reporter) -> dict:
    """Train with training.nproc_per_node ranks; returns rank 0's summary (train/summary.json)."""
    world = world_size(cfg.training)
    folder = rank_dir(paths)
    folder.mkdir(parents=True, exist_ok=True)
    log_path(paths, 0).parent.mkdir(parents=True, exist_ok=True)
    config_file, events_file = folder / "config.yaml", folder / "events.jsonl"
    config_file.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    events_file.write_text("")
    (paths.train_dir / "summary.json").unlink(missing_ok=True)
    for r in range(world):
        error_path(paths, r).unlink(missing_ok=True)
    say(f"training.distributed={cfg.training.distributed}: {world} ranks ({'NCCL' if _cuda() else 'gloo'}), logs "
        f"in {log_path(paths, 0).parent}")
    ranks = _start(paths, world, [sys.executable, "-m", "tunelab.stages.train_rank", str(config_file),
                                  str(events_file)], reporter.run_id, cfg.training.threads)
    events = Events(events_file, reporter)
    try:
        _watch(ranks, events, paths, world)
    except KeyboardInterrupt:
        _stop(ranks, events)
        raise
    finally:
        for proc in ranks:
            procs.kill_group(proc)  # no-op for the ones that have ended; reaps every one
        events.forward()
    return json.loads((paths.train_dir / "summary.json").read_text())


def _start(paths: RunPaths, world: int, cmd: List[str], run_id: Optional[str], threads) -> List[subprocess.Popen]:
    port, ranks = free_port(), []
    try:
        for r in range(world):
            with open(log_path(paths, r), "w") as log:  # the child holds its own descriptor
                ranks.append(procs.child_popen(cmd, env=rank_env(r, world, port, run_id, threads),
                                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    except BaseException:
        for proc in ranks:
            procs.kill_group(proc)
        raise
    record = {str(r): {"pid": p.pid, "log": str(log_path(paths, r))} for r, p in enumerate(ranks)}
    (paths.state_dir / "logs" / "ranks.json").write_text(json.dumps(record, indent=2))
    return ranks


def _watch(ranks: List[subprocess.Popen], events: Events, paths: RunPaths, world: int) -> None:
    """Until every rank has ended well; the first failure kills the rest and raises."""
    while True:
        events.forward()
        codes = [proc.poll() for proc in ranks]
        failed = [r for r, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            for proc in ranks:
                procs.kill_group(proc)
            raise _failure(_first_cause(failed, codes), codes[_first_cause(failed, codes)], paths, world)
        if all(code == 0 for code in codes):
            return
        time.sleep(POLL_S)


def _first_cause(failed: List[int], codes: List[Optional[int]]) -> int:
    """The rank that most likely failed first: one killed by a signal (the others then lose their peer
    and fail with a connection error), else the lowest rank that failed."""
    killed = [r for r in failed if codes[r] < 0]
    return (killed or failed)[0]


def _failure(r: int, code: int, paths: RunPaths, world: int) -> Exception:
    error = error_path(paths, r)
    if error.is_file():
        reported = json.loads(error.read_text())
        if reported.get("type") in INPUT_ERRORS:
            return INPUT_ERRORS[reported["type"]](reported)
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    log = log_path(paths, r)
    tail = _log_tail(log)
    return RankFailed(f"training rank {r} of {world} {how}; the other ranks were stopped. Its log: {log}"
                      + ("\n  " + "\n  ".join(tail) if tail else ""))


def _log_tail(log: Path) -> List[str]:
    """The last LOG_TAIL lines of a rank's log: of a progress bar (\r-separated) its last state, no blanks."""
    if not log.is_file():
        return []
    lines = [line.split("\r")[-1].rstrip() for line in log.read_bytes().decode(errors="replace").split("\n")]
    return [line for line in lines if line][-LOG_TAIL:]


def _stop(ranks: List[subprocess.Popen], events: Events) -> None:
    """SIGTERM to every rank still running; wait for them to save and end, at most STOP_RANKS_S."""
    for proc in ranks:
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    say(f"stopping {len(ranks)} ranks: each saves a checkpoint at the end of its step")
    deadline = time.monotonic() + STOP_RANKS_S
    while time.monotonic() < deadline and any(proc.poll() is None for proc in ranks):
        events.forward()
        time.sleep(POLL_S)


def say(message: str) -> None:
    print(f"tunelab: {message}", file=sys.stderr, flush=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
