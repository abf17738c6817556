"""training.distributed: start the train stage's ranks, relay what rank 0 reports, end them all together.

The Hydra process has composed, validated and resolved the config (tunelab.config.distributed); it
writes it once, resolved, to `<run_dir>/.tunelab/ranks/config.yaml`, and every rank reads that file
(no rank composes again). Each rank is `python -m tunelab.stages.train_rank` with torchrun's
environment (tunelab.training.world: MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, GROUP_RANK), so that accelerate inside TRL's Trainer joins the process group (gloo on
the CPU, NCCL on GPUs). Each rank's output goes to `<run_dir>/.tunelab/logs/rank-<r>.log`; `ranks.json`
beside them names the pid and log of each rank of this node.

Rank 0 alone writes files. What it reports (the live loss curve, tags) goes to `events.jsonl`; this
process forwards each line to its reporter, so the one MLflow run, which this process owns, gets it.

Several nodes (a SLURM job, training.nnodes > 1): this runs on node 0 only, which owns the pipeline. Its
ranks are the first nproc_per_node of the world and meet the others at node 0's host (the first of the
job's node list) on a port picked here; the other nodes start theirs from the launch record written here
(tunelab.training.rendezvous, tunelab.training.nodes). A node whose rank failed says so in its record:
that is a failure of this training as much as one of the ranks here.

A rank that ends with a non-zero code or by a signal while others run: the others are killed (they
would wait for it in a collective) and RankFailed names the rank (over several nodes, the first cause
on any of them), how it ended and its log; the run ends FAILED. Ranks that all stopped after SIGTERM
reached one of them (they agree on the step and save) end the run KILLED. Ctrl-C or SIGTERM here: each
rank gets SIGTERM (it saves a checkpoint at the end of the step, as a single process does), is waited
for at most STOP_RANKS_S, then killed; the interrupt goes on (the run ends KILLED). Ranks are started
with tunelab.procs (each in its own process group, killed by the kernel if this process dies), and
every one is reaped before this returns.
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
from typing import Callable, Dict, List, Optional

from omegaconf import OmegaConf

from tunelab import procs, runstate
from tunelab.config import slurm
from tunelab.config.distributed import local_world_size, node_count
from tunelab.config.errors import ConfigError
from tunelab.config.identity import file_sha256
from tunelab.paths import RunPaths
from tunelab.templates.chat import TemplateError
from tunelab.training import rendezvous
from tunelab.training.world import RANK_ENV, World, free_port, rank_env

POLL_S = 0.1  # how often the ranks and events.jsonl are looked at
STOP_RANKS_S = 120.0  # after SIGTERM, how long ranks may take to save their checkpoint and end
LOG_TAIL = 20  # lines of a failed rank's log quoted in the error
JOIN_S = 600.0  # several nodes: how long after the launch every other node has to start its ranks
REPORT_S = 60.0  # after a rank here failed, how long the other nodes have to say how theirs ended
# A rank's exit code after SIGTERM/SIGINT: it stopped at the step every rank agreed on, with a checkpoint.
STOP_CODES = (128 + signal.SIGTERM, 128 + signal.SIGINT)
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
    """Train with nproc_per_node ranks here (and as many on each other node); returns rank 0's summary."""
    world, job = _world(cfg)
    folder = rank_dir(paths)
    folder.mkdir(parents=True, exist_ok=True)
    log_path(paths, 0).parent.mkdir(parents=True, exist_ok=True)
    config_file, events_file = folder / "config.yaml", folder / "events.jsonl"
    config_file.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    events_file.write_text("")
    (paths.train_dir / "summary.json").unlink(missing_ok=True)
    for r in range(world.size):
        error_path(paths, r).unlink(missing_ok=True)
    followers = None
    if job is not None:  # before the ranks start: the other nodes start theirs as soon as they read it
        followers = _announce(paths, job, world, config_file, events_file, reporter.run_id, cfg.training.threads)
    say(f"training.distributed={cfg.training.distributed}: {world.size} ranks ({'NCCL' if _cuda() else 'gloo'})"
        + (f", {world.local} on each of {world.nnodes} nodes meeting at {world.master_addr}:{world.master_port}"
           if job else "") + f", logs in {log_path(paths, 0).parent}")
    ranks = start_ranks(paths, world, rank_command(config_file, events_file), reporter.run_id, cfg.training.threads)
    events = Events(events_file, reporter)
    try:
        (paths.state_dir / "logs" / "ranks.json").write_text(json.dumps(ranks_record(paths, world, ranks), indent=2))
        _watch(ranks, events, paths, world, followers)
    except KeyboardInterrupt:
        stop_ranks(ranks, events.forward)
        raise
    finally:
        kill_ranks(ranks)  # no-op for the ones that have ended; reaps every one
        events.forward()
    return json.loads((paths.train_dir / "summary.json").read_text())


def _world(cfg):
    """This node's World and, over several nodes, the SLURM job (checked by tunelab.config.distributed)."""
    local, nnodes = local_world_size(cfg.training), node_count(cfg.training)
    if nnodes == 1:
        return World(local, master_port=free_port()), None
    job = slurm.job_nodes()
    assert job is not None and job.index == 0, "only node 0 runs the pipeline (tunelab.training.nodes)"
    # The port is picked on this host, which the other nodes reach by its name in the node list.
    return World(local, nnodes, 0, job.first_host, free_port("")), job


def _announce(paths: RunPaths, job, world: World, config_file: Path, events_file: Path, run_id, threads):
    folder = rendezvous.job_dir(paths, job.job)
    earlier = rendezvous.earlier_launch(folder)
    if earlier:
        raise RankFailed(earlier)
    rendezvous.write(folder / rendezvous.LAUNCH, {
        "master_addr": world.master_addr, "master_port": world.master_port, "nnodes": world.nnodes,
        "nproc_per_node": world.local, "config": str(config_file), "config_sha256": file_sha256(config_file),
        "events": str(events_file), "run_id": run_id, "threads": threads, "cwd": os.getcwd()})
    return rendezvous.Followers(folder, world.nnodes, JOIN_S)


def rank_command(config_file: Path, events_file: Path) -> List[str]:
    return [sys.executable, "-m", "tunelab.stages.train_rank", str(config_file), str(events_file)]


def start_ranks(paths: RunPaths, world: World, cmd: List[str], run_id: Optional[str], threads,
                cwd: Optional[str] = None) -> List[subprocess.Popen]:
    """This node's ranks, each logging to rank-<global rank>.log (on a shared run directory: no two alike).
    cwd: node 0's working directory, where the config's relative paths point, for the ranks of other nodes."""
    ranks = []
    try:
        for local_rank in range(world.local):
            with open(log_path(paths, world.rank(local_rank)), "w") as log:  # the child holds its own descriptor
                ranks.append(procs.child_popen(cmd, env=rank_env(world, local_rank, run_id, threads), cwd=cwd,
                                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    except BaseException:
        kill_ranks(ranks)
        raise
    return ranks


def ranks_record(paths: RunPaths, world: World, ranks: List[subprocess.Popen]) -> dict:
    """Global rank -> its pid and log."""
    return {str(world.rank(i)): {"pid": p.pid, "log": str(log_path(paths, world.rank(i)))} for i, p in enumerate(ranks)}


def kill_ranks(ranks: List[subprocess.Popen]) -> None:
    for proc in ranks:
        procs.kill_group(proc)


def _watch(ranks: List[subprocess.Popen], events: Events, paths: RunPaths, world: World, followers) -> None:
    """Until every rank has ended well; the first failure (here or on another node) kills the rest and raises."""
    while True:
        events.forward()
        codes = ended_codes(ranks, world)
        elsewhere = followers.failed() if followers else []
        if any(code != 0 for code in codes.values()) or elsewhere:
            kill_ranks(ranks)
            raise _failure_of(codes, elsewhere, paths, world, followers)
        if len(codes) == len(ranks):
            return
        if followers and followers.missing():
            kill_ranks(ranks)
            raise RankFailed(followers.missing_message(followers.missing()))
        time.sleep(POLL_S)


def ended_codes(ranks: List[subprocess.Popen], world: World) -> Dict[int, int]:
    """Global rank -> exit code (negative: the signal) of this node's ranks that have ended."""
    return {world.rank(i): code for i, code in enumerate(proc.poll() for proc in ranks) if code is not None}


def _failure_of(codes: Dict[int, int], elsewhere: List[dict], paths: RunPaths, world: World, followers) -> Exception:
    """The error naming the rank that most likely failed first, on any node. When a rank here failed, the
    other nodes are given REPORT_S to say how theirs ended: theirs may have been the first."""
    if followers is not None and not elsewhere:
        elsewhere = [r for r in followers.wait_final(REPORT_S).values() if r["state"] == "failed"]
    for report in (r for r in elsewhere if "rank" not in r):  # a node that could not start its ranks at all
        return RankFailed(f"node {report['node']} ({report['host']}) did not start its ranks: {report['reason']}")
    failed = {r: code for r, code in codes.items() if code != 0}
    if not elsewhere and all(code in STOP_CODES for code in failed.values()):
        # Interrupted ranks that saved at the agreed step: a signal reached a rank (on another node), not us.
        return runstate.Terminated("the ranks stopped at the step they agreed on after a signal to one of them")
    hosts = {r: socket.gethostname() for r in failed}
    for report in elsewhere:
        failed[report["rank"]], hosts[report["rank"]] = report["code"], report["host"]
    r = first_cause(failed)
    return failure(r, failed[r], paths, world, hosts[r])


def first_cause(failed: Dict[int, int]) -> int:
    """The rank that most likely failed first: one killed by a signal (the others then lose their peer
    and fail with a connection error), else the lowest rank that failed."""
    killed = sorted(r for r, code in failed.items() if code < 0)
    return (killed or sorted(failed))[0]


def failure(r: int, code: int, paths: RunPaths, world: World, host: Optional[str] = None) -> Exception:
    error = error_path(paths, r)
    if error.is_file():
        reported = json.loads(error.read_text())
        if reported.get("type") in INPUT_ERRORS:
            return INPUT_ERRORS[reported["type"]](reported)
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    log = log_path(paths, r)
    tail = _log_tail(log)
    return RankFailed(f"training rank {r} of {world.size} {how}{world.where(r, host)}; the other ranks were stopped. "
                      f"Its log: {log}" + ("\n  " + "\n  ".join(tail) if tail else ""))


def _log_tail(log: Path) -> List[str]:
    """The last LOG_TAIL lines of a rank's log: of a progress bar (\r-separated) its last state, no blanks."""
    if not log.is_file():
        return []
    lines = [line.split("\r")[-1].rstrip() for line in log.read_bytes().decode(errors="replace").split("\n")]
    return [line for line in lines if line][-LOG_TAIL:]


def stop_ranks(ranks: List[subprocess.Popen], while_waiting: Callable[[], None] = lambda: None) -> None:
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
        while_waiting()
        time.sleep(POLL_S)


def say(message: str) -> None:
    print(f"tunelab: {message}", file=sys.stderr, flush=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
