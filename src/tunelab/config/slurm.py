"""The nodes of a SLURM job, as its environment describes them: how many, which one this is, their hosts.

Multi-node training runs tunelab once per node (hydra/launcher=slurm with hydra.launcher.nodes=N and
tasks_per_node=1: submitit starts one task per node through srun; or `srun --ntasks-per-node=1 tunelab ...`
in a batch script). Node 0 runs the pipeline, the others only start their share of the training ranks
(tunelab.training.nodes). What is read, as submitit's own JobEnvironment reads it:

- SLURM_JOB_ID (with SLURM_STEP_ID and SLURM_RESTART_COUNT): which job, step and requeue this is; the
  nodes' records of one launch carry it, so a record left by an earlier job is never taken for this one.
- SLURM_JOB_NUM_NODES (or the older SLURM_NNODES): how many nodes.
- SLURM_NODEID: this node's index; node 0 is the first host of the node list.
- SLURM_JOB_NODELIST (or SLURM_NODELIST): the hosts, compressed (`gpu[01-03,07],login1`).
- SLURM_STEP_NUM_TASKS / SLURM_STEP_NUM_NODES, set inside an srun step: more tasks than nodes would
  make each task a whole tunelab, so that is refused.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import List, Mapping, Optional, Tuple

LAUNCH_ADVICE = ("tunelab runs once per node and starts each node's ranks itself: hydra.launcher.tasks_per_node=1 "
                 "(or srun --ntasks-per-node=1)")


class SlurmEnvError(ValueError):
    """The SLURM environment cannot describe this job's nodes (the message names the variable)."""


@dataclass(frozen=True)
class JobNodes:
    job: str  # job id, step and restart count: names the records of this launch
    count: int  # nodes in the job
    index: int  # this node (SLURM_NODEID)
    hosts: Tuple[str, ...]  # every node's host name, node 0 first (empty for a one-node job)

    @property
    def first_host(self) -> str:
        return self.hosts[0]


def job_nodes(env: Optional[Mapping[str, str]] = None) -> Optional[JobNodes]:
    """This process's SLURM job, or None outside SLURM (no SLURM_JOB_ID). Raises SlurmEnvError."""
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        return None
    count = _number(env, ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"), default=1, least=1)
    index = _number(env, ("SLURM_NODEID",), default=0, least=0)
    if index >= count:
        raise SlurmEnvError(f"SLURM_NODEID={index} is not a node of this job of {count} node(s)")
    _check_one_task_per_node(env)
    key = f"{job_id}.{env.get('SLURM_STEP_ID', 'batch')}.{env.get('SLURM_RESTART_COUNT', '0')}"
    return JobNodes(key, count, index, _hosts(env, count) if count > 1 else ())


def _number(env: Mapping[str, str], names: Tuple[str, ...], default: int, least: int) -> int:
    name = next((n for n in names if env.get(n)), None)
    if name is None:
        return default
    value = env[name]
    if not value.isdigit() or int(value) < least:
        raise SlurmEnvError(f"{name}={value!r} is not a whole number >= {least}")
    return int(value)


def _check_one_task_per_node(env: Mapping[str, str]) -> None:
    if "SLURM_STEP_NUM_TASKS" not in env:  # not inside an srun step (a batch script runs one process)
        return
    tasks = _number(env, ("SLURM_STEP_NUM_TASKS",), default=1, least=1)
    nodes = _number(env, ("SLURM_STEP_NUM_NODES",), default=1, least=1)
    if tasks > nodes:
        raise SlurmEnvError(f"SLURM_STEP_NUM_TASKS={tasks} on SLURM_STEP_NUM_NODES={nodes}: every task would be a "
                            f"whole tunelab; {LAUNCH_ADVICE}")


def _hosts(env: Mapping[str, str], count: int) -> Tuple[str, ...]:
    name = "SLURM_JOB_NODELIST" if env.get("SLURM_JOB_NODELIST") else "SLURM_NODELIST"
    text = env.get(name, "")
    if not text:
        raise SlurmEnvError(f"SLURM_JOB_NODELIST is not set in a SLURM job of {count} nodes: node 0's host, where "
                            "the ranks meet, is its first host")
    hosts = expand_nodelist(text, name)
    if len(hosts) != count:
        raise SlurmEnvError(f"{name}={text!r} names {len(hosts)} host(s), but the job has {count} node(s)")
    return tuple(hosts)


def expand_nodelist(text: str, name: str = "SLURM_JOB_NODELIST") -> List[str]:
    """SLURM's compressed host list (`gpu[01-03,07],login1`, `rack[1-2]-n[1-2]`) as host names, in order.
    A form this parser does not know is given to `scontrol show hostnames` where SLURM's tools are."""
    try:
        return [host for group in _top_level_groups(text) for host in _expand_group(group)]
    except ValueError as err:
        hosts = _scontrol_hostnames(text)
        if hosts is None:
            raise SlurmEnvError(f"{name}={text!r} is not a host list this parser reads ({err}), and scontrol is "
                                f"not here to expand it") from None
        return hosts


def _top_level_groups(text: str) -> List[str]:
    """Split on the commas outside brackets: `a[1,3],b` -> `a[1,3]`, `b`."""
    groups, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"unbalanced or nested brackets at character {i + 1}")
        if char == "," and depth == 0:
            groups.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("a bracket is not closed")
    groups.append(text[start:])
    if any(not group or group.isspace() for group in groups):
        raise ValueError("an empty host name")
    return groups


def _expand_group(group: str) -> List[str]:
    """`gpu[01-02]-ib[1,3]` -> every combination, in order: the bracketed ranges keep their zero padding."""
    hosts = [""]
    for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", group):
        choices = _expand_ranges(ranges) if ranges else [""]
        hosts = [host + literal + choice for host in hosts for choice in choices]
    return hosts


def _expand_ranges(ranges: str) -> List[str]:
    """`01-03,07` -> 01, 02, 03, 07 (the width of the range's first number is kept)."""
    values = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or not (high or low).isdigit() or int(low) > int(high or low):
            raise ValueError(f"[{ranges}] is not a list of numbers and ranges")
        values += [f"{n:0{len(low)}d}" for n in range(int(low), int(high or low) + 1)]
    return values


def _scontrol_hostnames(text: str) -> Optional[List[str]]:
    """`scontrol show hostnames <list>`: SLURM's own expansion, where its tools are installed."""
    if shutil.which("scontrol") is None:
        return None
    done = subprocess.run(["scontrol", "show", "hostnames", text], capture_output=True, text=True, timeout=60)
    hosts = done.stdout.split()
    return hosts if done.returncode == 0 and hosts else None
