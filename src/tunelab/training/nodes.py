"""Several nodes: what tunelab does on a node other than node 0, and what node 0 leaves behind for them.

A SLURM job of N nodes runs tunelab once per node (tunelab.config.slurm). Node 0 (the leader) runs the
pipeline as on one node: it validates, claims the run directory, owns the MLflow run, prepares, and its
train stage writes the launch record and starts the first nproc_per_node ranks (tunelab.training.launch).
Every other node (a follower) never runs the pipeline, claims nothing, tracks nothing and writes no
output: it waits for node 0's launch record of this same job (tunelab.training.rendezvous), starts its
own ranks from the config file node 0 wrote (global ranks node * nproc_per_node + local rank), watches
them and ends when they end:

- a rank here fails: the others here are killed, node-<n>.json says which rank and how (node 0 names it
  in its error, and its run ends FAILED), and this process exits 1;
- node 0's run ends first (end.json: FINISHED, FAILED or KILLED, trained or not): the ranks here are
  stopped and this process exits: 0 when node 0 finished without training on the nodes, 143 (as
  interrupted) when it was killed, else 1;
- SIGTERM here: the ranks get it and stop, with every other rank, at the step they agree on.

Waiting for the launch has a deadline (WAIT_S, or $TUNELAB_NODE_WAIT_S): node 0 prepares the data first,
and a node 0 that died by SIGKILL, or a run directory that is not shared, would leave nothing to wait for.
"""
from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional

from tunelab import runstate
from tunelab.config import slurm
from tunelab.config.errors import ConfigError
from tunelab.config.identity import file_sha256
from tunelab.paths import RunPaths
from tunelab.training import launch, rendezvous
from tunelab.training.world import World

WAIT_ENV = "TUNELAB_NODE_WAIT_S"
WAIT_S = 1800.0  # how long a node waits for node 0's launch (node 0 validates and prepares first)
LOOK_S = 1.0  # how often the shared records are read (each read is a round trip on NFS)


class NodeFailed(launch.RankFailed):
    """On a node other than 0: node 0 never launched, its run ended first, or its records do not match."""


def role() -> str:
    """'leader' (node 0 of several), 'follower' (any other node of several) or 'single'."""
    try:
        job = slurm.job_nodes()
    except slurm.SlurmEnvError:  # validation names the variable; meanwhile no node other than 0 may lead
        return "follower" if os.environ.get("SLURM_NODEID", "0") not in ("", "0") else "single"
    if job is None or job.count == 1:
        return "single"
    return "leader" if job.index == 0 else "follower"


@contextmanager
def leading(cfg):
    """On node 0 of several: however the run ends, end.json says so, and no other node waits for it."""
    job = slurm.job_nodes() if role() == "leader" else None
    if job is None:
        yield
        return
    paths = RunPaths.from_config(cfg.paths)
    status, reason = "FAILED", ""
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt as interrupt:
        status, reason = "KILLED", type(interrupt).__name__
        raise
    except BaseException as err:
        reason = f"{type(err).__name__}: {err}"
        raise
    finally:
        if paths.state_dir.is_dir():  # never made here: a folder tunelab did not claim stays as it was
            rendezvous.write(rendezvous.job_dir(paths, job.job) / rendezvous.END, {"status": status, "reason": reason})


def wait_limit() -> float:
    value = os.environ.get(WAIT_ENV)
    if value is None:
        return WAIT_S
    try:
        return float(value)
    except ValueError:
        raise ConfigError([f"{WAIT_ENV}={value!r} must be a number of seconds"]) from None


def follow(cfg) -> None:
    """This node's share of node 0's training: wait for its launch, run the ranks here until they end.
    SIGTERM raises here as it does in node 0's run (submitit's worker would otherwise only log it)."""
    with runstate.sigterm_raises():
        _follow(cfg)


def _follow(cfg) -> None:
    job = slurm.job_nodes()
    paths = RunPaths.from_config(cfg.paths)
    folder = rendezvous.job_dir(paths, job.job)
    launch.say(f"node {job.index} of {job.count} (SLURM job {job.job}): node 0 runs the pipeline; waiting for it "
               f"to launch the training ({folder / rendezvous.LAUNCH})")
    record = wait_for_launch(folder, paths, wait_limit())
    if record is None:
        launch.say("node 0's run finished without training on the nodes (no train stage ran): nothing to do here")
        return
    world = World(record["nproc_per_node"], job.count, job.index, record["master_addr"], record["master_port"])
    ranks = _start(paths, folder, world, record)
    try:
        rendezvous.write_node(folder, job.index, "running", ranks=launch.ranks_record(paths, world, ranks))
        launch.say(f"ranks {world.rank(0)}-{world.rank(world.local - 1)} of {world.size} started, meeting at "
                   f"{world.master_addr}:{world.master_port}; logs in {launch.log_path(paths, world.rank(0)).parent}")
        _watch(ranks, folder, paths, world)
    except KeyboardInterrupt:
        launch.stop_ranks(ranks)
        rendezvous.write_node(folder, job.index, "stopped")
        raise
    finally:
        launch.kill_ranks(ranks)  # no-op for those that ended; reaps every one


def _start(paths: RunPaths, folder: Path, world: World, record: dict) -> list:
    """This node's ranks, as node 0's launch record says. A record this node cannot use is reported at once
    (node-<n>.json), so that node 0 does not wait for ranks that will never come."""
    try:
        cmd = launch.rank_command(_launched_config(record), Path(record["events"]))
        cwd = _launch_dir(record)
    except NodeFailed as err:
        rendezvous.write_node(folder, world.node, "failed", reason=str(err))
        raise
    return launch.start_ranks(paths, world, cmd, record["run_id"], record["threads"], cwd=cwd)


def wait_for_launch(folder: Path, paths: RunPaths, limit_s: float) -> Optional[dict]:
    """node 0's launch record of this job; None when node 0's run finished without one (nothing was trained
    on the nodes); NodeFailed when it ended otherwise, or after limit_s without either."""
    deadline = time.monotonic() + limit_s
    while True:
        end = rendezvous.read(folder / rendezvous.END)  # first: a launch of a run that has ended is no use
        if end is not None:
            if end["status"] == "FINISHED":
                return None
            raise _ended(end, "this node started no rank")
        record = rendezvous.read(folder / rendezvous.LAUNCH)
        if record is not None:
            return record
        if time.monotonic() >= deadline:
            raise NodeFailed(
                f"node 0 did not launch the training within {limit_s:.0f} s: no {folder / rendezvous.LAUNCH}. Check "
                f"that paths.run_dir ({paths.run_dir}) is the same folder on a file system every node shares, and "
                f"node 0's log (its SLURM output): did it fail, or is it still preparing the data? "
                f"{WAIT_ENV}=<seconds> waits longer")
        time.sleep(LOOK_S)


def _launched_config(record: dict) -> Path:
    """The resolved config node 0 launched with, as it wrote it (the same bytes, or another folder)."""
    config_file = Path(record["config"])
    if not config_file.is_file() or file_sha256(config_file) != record["config_sha256"]:
        raise NodeFailed(f"{config_file} is not the config node 0 launched with (missing, or its sha256 differs): "
                         "is paths.run_dir the same shared folder on every node?")
    return config_file


def _launch_dir(record: dict) -> str:
    """node 0's working directory, where the config's relative paths (paths.cache_dir, ...) point."""
    if not Path(record["cwd"]).is_dir():
        raise NodeFailed(f"node 0 runs in {record['cwd']}, which is not a folder here: the config's relative paths "
                         "would point elsewhere on this node; start tunelab from a folder every node shares")
    return record["cwd"]


def _watch(ranks: list, folder: Path, paths: RunPaths, world: World) -> None:
    """Until the ranks here end; a failure here, or the end of node 0's run, ends them all and raises. When
    node 0's run FINISHED, the training is over: the ranks here are only exiting, and get STOP_RANKS_S to."""
    looked, end, deadline = 0.0, None, 0.0
    while True:
        codes = launch.ended_codes(ranks, world)
        failed = {r: code for r, code in codes.items() if code != 0}
        if failed:
            launch.kill_ranks(ranks)
            raise _failure(failed, folder, paths, world)
        if len(codes) == len(ranks):
            rendezvous.write_node(folder, world.node, "done")
            return
        if end is None and time.monotonic() - looked >= LOOK_S:
            looked, end = time.monotonic(), rendezvous.read(folder / rendezvous.END)
            deadline = time.monotonic() + (launch.STOP_RANKS_S if end and end["status"] == "FINISHED" else 0.0)
        if end is not None and time.monotonic() >= deadline:
            launch.stop_ranks(ranks)
            rendezvous.write_node(folder, world.node, "stopped")
            raise _ended(end, f"the ranks of node {world.node} were stopped")
        time.sleep(launch.POLL_S)


def _ended(end: dict, what_here: str) -> BaseException:
    """node 0's run has ended: this node ends the same way (KILLED: as interrupted, exit 128 + SIGTERM)."""
    message = f"node 0's run ended {end['status']} ({end['reason'] or 'see its log'}); {what_here}"
    if end["status"] == "KILLED":
        launch.say(message)
        return runstate.Terminated(message)
    return NodeFailed(message)


def _failure(failed: Dict[int, int], folder: Path, paths: RunPaths, world: World) -> BaseException:
    """What node 0 is told (node-<n>.json) and what this process raises for the ranks here that failed."""
    if all(code in launch.STOP_CODES for code in failed.values()):  # the agreed stop after a signal somewhere
        rendezvous.write_node(folder, world.node, "stopped")
        return runstate.Terminated(f"the ranks of node {world.node} stopped at the step the training agreed on")
    r = launch.first_cause(failed)
    rendezvous.write_node(folder, world.node, "failed", rank=r, code=failed[r])
    return launch.failure(r, failed[r], paths, world, socket.gethostname())
