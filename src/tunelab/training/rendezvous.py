"""How the nodes of one SLURM job find each other: small JSON records on the file system they share.

All of them live in `<run_dir>/.tunelab/ranks/slurm-<job>/`, one folder per SLURM job, step and requeue
(tunelab.config.slurm), so a record an earlier job left behind is never read as this job's:

- launch.json, by node 0 once it has claimed the run directory and written the resolved config: where
  the ranks meet (MASTER_ADDR, MASTER_PORT), the ranks per node, the config file and its sha256.
- node-<n>.json, by node n once its ranks run, then again when they end: running, done, failed (which
  rank, how it ended) or stopped.
- end.json, by node 0 when its run has ended, however it ended (FINISHED, FAILED, KILLED), trained or not:
  a node still waiting or training stops instead of waiting for peers that are gone.

Each record is written to a temporary name and renamed (whole or absent, also over NFS), and read
without caching. No record says anything about liveness: a node that dies by SIGKILL writes nothing,
which is why every wait has a deadline.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Dict, List, Optional

from tunelab.paths import RunPaths

LAUNCH, END = "launch.json", "end.json"
FINAL_STATES = ("done", "failed", "stopped")


def job_dir(paths: RunPaths, job: str) -> Path:
    return paths.state_dir / "ranks" / f"slurm-{job}"


def node_file(folder: Path, node: int) -> Path:
    return folder / f"node-{node}.json"


def write(path: Path, record: dict) -> None:
    """The record, whole or not at all (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    with open(partial, "w") as handle:
        handle.write(json.dumps({**record, "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def read(path: Path) -> Optional[dict]:
    """The record, or None while it is not there."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def write_node(folder: Path, node: int, state: str, **details) -> None:
    write(node_file(folder, node), {"node": node, "state": state, **details})


def earlier_launch(folder: Path) -> Optional[str]:
    """Why node 0 must not launch into folder: one launch per job step. Records of this same step already
    there mean a second tunelab in one step (two in a batch script of several nodes), whose nodes would
    mix them up."""
    if not ((folder / LAUNCH).exists() or (folder / END).exists()):
        return None
    return (f"{folder} holds the records of an earlier tunelab of this same SLURM job step: start each multi-node "
            "tunelab as its own step (hydra/launcher=slurm, or `srun --ntasks-per-node=1 tunelab ...`)")


class Followers:
    """Node 0's view of the other nodes while its ranks train: each must report its ranks running within
    join_s of the launch, and a node whose rank failed is a failure of the whole training."""

    def __init__(self, folder: Path, nnodes: int, join_s: float, every_s: float = 1.0):
        self.folder, self.nodes, self.join_s, self.every_s = folder, range(1, nnodes), join_s, every_s
        self.launched, self.checked = time.monotonic(), 0.0
        self.reports: Dict[int, dict] = {}

    def refresh(self) -> Dict[int, dict]:
        """Every node's latest record (read at most every every_s: on NFS each read is a round trip)."""
        if time.monotonic() - self.checked >= self.every_s:
            self.checked = time.monotonic()
            for node in self.nodes:
                record = read(node_file(self.folder, node))
                if record is not None:
                    self.reports[node] = record
        return self.reports

    def failed(self) -> List[dict]:
        return [r for r in self.refresh().values() if r["state"] == "failed"]

    def missing_message(self, missing: List[int]) -> str:
        nnodes = len(self.nodes) + 1
        return (f"node(s) {', '.join(map(str, missing))} of {nnodes} did not start their ranks within "
                f"{self.join_s:.0f} s of the launch (no record in {self.folder}): tunelab must run once on every node "
                f"of the job (hydra/launcher=slurm with hydra.launcher.nodes={nnodes} and tasks_per_node=1, or `srun "
                f"--ntasks-per-node=1 tunelab ...` in a batch script), with paths.run_dir on a file system all nodes "
                f"share; each node's own log says why it did not")

    def missing(self) -> List[int]:
        """The nodes that have not reported within join_s of the launch (none before then)."""
        if time.monotonic() - self.launched < self.join_s:
            return []
        return [node for node in self.nodes if node not in self.refresh()]

    def wait_final(self, limit_s: float, poll_s: float = 0.2) -> Dict[int, dict]:
        """After node 0's ranks failed: wait, at most limit_s, until each node has said how its ranks ended
        (they lose their peer and fail soon, or had failed first: that is what the error should name)."""
        deadline = time.monotonic() + limit_s
        while True:
            self.checked = 0.0  # read now
            reports = self.refresh()
            if all(reports.get(n, {}).get("state") in FINAL_STATES for n in self.nodes) or time.monotonic() >= deadline:
                return reports
            time.sleep(poll_s)
