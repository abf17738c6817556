"""Where a node's ranks sit in the training: torchrun's environment for each of them.

One node: MASTER_ADDR=127.0.0.1 and a free port. Several nodes (a SLURM job): node 0's host, the first of
the job's node list, and a port node 0 picked; every node computes the same global ranks from its node
index, so no rank needs to ask another which one it is.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Dict, Optional

RANK_ENV = "TUNELAB_RANK"  # set in a rank: train.run trains in the process instead of launching


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on host now (torchrun's way: bind to 0, read it, let it go); "" is every interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class World:
    """Where one node's ranks sit in the training (torchrun's --nproc_per_node, --nnodes, --node_rank and
    rendezvous address): node n runs global ranks n * local ... n * local + local - 1."""

    local: int
    nnodes: int = 1
    node: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0

    @property
    def size(self) -> int:
        return self.local * self.nnodes

    def rank(self, local_rank: int) -> int:
        return self.node * self.local + local_rank

    def where(self, r: int, host: Optional[str] = None) -> str:
        """' on node n (host)' when the ranks span several nodes, else nothing."""
        if self.nnodes == 1:
            return ""
        return f" on node {r // self.local}" + (f" ({host})" if host else "")


def rank_env(world: World, local_rank: int, run_id: Optional[str], threads: Optional[int]) -> Dict[str, str]:
    """torchrun's variables for one rank of this node, plus tunelab's own."""
    r = world.rank(local_rank)
    env = {**os.environ, "MASTER_ADDR": world.master_addr, "MASTER_PORT": str(world.master_port), "RANK": str(r),
           "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world.size), "LOCAL_WORLD_SIZE": str(world.local),
           "GROUP_RANK": str(world.node), "NODE_RANK": str(world.node), "GROUP_WORLD_SIZE": str(world.nnodes),
           RANK_ENV: str(r), "TUNELAB_RUN_ID": run_id or "", "PYTHONUNBUFFERED": "1"}
    if threads is None and "OMP_NUM_THREADS" not in os.environ:  # this node's ranks share its cores, as torchrun
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world.local))
    return env
