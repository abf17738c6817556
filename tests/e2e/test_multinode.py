"""Two SLURM nodes simulated on this machine: two tunelab processes with the environment a SLURM task gets
on each node of one job (SLURM_JOB_ID, SLURM_NNODES=2, SLURM_NODEID=0/1, SLURM_JOB_NODELIST), each with
training.distributed=ddp training.nproc_per_node=1 on the smoke model. Node 0 runs the pipeline; node 1
only its rank. Together they train what one process trains on the same global batch; node 0 alone writes
the outputs and the MLflow run; a rank killed on node 1 ends both, node 0's run FAILED naming it.
No real SLURM cluster was available: the nodes share this machine's loopback and file system. Every wait
is on a condition, with a deadline."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import psutil
import pytest

from conftest import ROOT
from test_distributed import PER_RANK, STEPS, assert_same_training, command, mlflow_runs
from test_resume import wait_for

pytestmark = pytest.mark.slow

NODES = 2
# Absolute dataset paths: node 1 starts from a folder of its own (which must stay empty), and validates
# the same config node 0 does.
PER_NODE = ("training.distributed=ddp", "training.nproc_per_node=1", f"training.batch_size={PER_RANK}",
            f"dataset.path={ROOT}/data/tweets/train.csv", f"dataset.eval_path={ROOT}/data/tweets/heldout.csv")


def node_env(job: str, node: int) -> dict:
    """What SLURM gives the task of node `node` (tasks_per_node=1); the hosts are two names of this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "SLURM_JOB_ID": job, "SLURM_NNODES": str(NODES), "SLURM_NODEID": str(node),
            "SLURM_PROCID": str(node), "SLURM_JOB_NODELIST": "127.0.0.1,localhost"}


def start_nodes(tmp: Path, run: Path, *overrides):
    """Node 1 first (it waits for node 0's launch), from a folder of its own, which must stay empty."""
    job, own = uuid.uuid4().hex[:8], tmp / "node1-cwd"
    own.mkdir()
    nodes = []
    for node, cwd in ((1, own), (0, ROOT)):
        cmd = command(tmp, run, *PER_NODE, *overrides, f"hydra.run.dir={tmp}/hydra-node{node}")
        nodes.insert(0, subprocess.Popen(cmd, cwd=cwd, env=node_env(job, node), stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True))
    return job, nodes


def finish(nodes, timeout: float = 600):
    """Each node's (exit code, stderr); none outlives this."""
    try:
        return [(proc.wait(timeout=timeout), proc.stderr.read()) for proc in nodes]
    finally:
        for proc in nodes:
            proc.kill()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prepared")
    done = subprocess.run([*command(tmp, tmp / "run")[:-2], "stage=prepare", "tracking.enabled=false",
                           f"hydra.run.dir={tmp}/hydra"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def two_nodes(prepared, tmp_path_factory):
    """One rank on each of two nodes, 2 rows each per step, 4 steps, checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("nodes")
    shutil.copytree(prepared, tmp / "run")
    job, nodes = start_nodes(tmp, tmp / "run")
    pids = [proc.pid for proc in nodes]
    (code0, err0), (code1, err1) = finish(nodes)
    assert code0 == 0, err0[-3000:]
    assert code1 == 0, err1[-3000:]
    return {"tmp": tmp, "run": tmp / "run", "job": job, "pids": pids, "stderr": [err0, err1]}


def records(run: Path, job: str) -> dict:
    folder = run / ".tunelab/ranks" / f"slurm-{job}.batch.0"
    return {p.name: json.loads(p.read_text()) for p in folder.iterdir()}


def test_two_nodes_train_what_one_process_trains_on_the_same_global_batch(prepared, two_nodes, tmp_path):
    run = two_nodes["run"]
    summary = json.loads((run / "train/summary.json").read_text())
    assert (summary["world_size"], summary["nnodes"], summary["steps"]) == (NODES, NODES, STEPS)
    for r in range(NODES):
        assert "done" in (run / f".tunelab/logs/rank-{r}.log").read_text().splitlines()[-1]
    assert {f"rng_state_{r}.pth" for r in range(NODES)} <= {p.name for p in (run / "checkpoints/checkpoint-4").iterdir()}
    marker = json.loads((run / "checkpoints/checkpoint-4/tunelab-checkpoint.json").read_text())
    assert marker["world_size"] == NODES  # resume needs every rank of every node
    shutil.copytree(prepared, tmp_path / "solo")
    done = subprocess.run(command(tmp_path, tmp_path / "solo", f"training.batch_size={PER_RANK * NODES}",
                                  "tracking.enabled=false"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_training(run, tmp_path / "solo")


def test_node_zero_alone_runs_the_pipeline_and_the_mlflow_run(two_nodes):
    run, job, (pid0, pid1) = two_nodes["run"], two_nodes["job"], two_nodes["pids"]
    client, runs = mlflow_runs(two_nodes["tmp"])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    tags = runs[0].data.tags
    assert (tags["tunelab.pid"], tags["tunelab.world_size"], tags["tunelab.nnodes"]) == (str(pid0), "2", "2")
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train.loss")) == list(
        range(1, STEPS + 1))
    found = records(run, job)
    assert set(found) == {"launch.json", "node-1.json", "end.json"}
    assert found["launch.json"]["pid"] == found["end.json"]["pid"] == pid0 and found["end.json"]["status"] == "FINISHED"
    assert (found["launch.json"]["master_addr"], found["launch.json"]["nnodes"]) == ("127.0.0.1", NODES)
    assert found["node-1.json"]["pid"] == pid1 and found["node-1.json"]["state"] == "done"
    stderr1 = two_nodes["stderr"][1]
    assert "node 1 of 2" in stderr1 and "ranks 1-1 of 2 started, meeting at 127.0.0.1:" in stderr1
    assert "run directory" not in stderr1 and "config hash" not in stderr1  # no pipeline ran on node 1


def test_node_one_writes_nothing_of_its_own(two_nodes):
    """Besides its rank's log and rng state (as rank 1 writes on one node) and its record: nothing, not even in
    the folder it was started from."""
    run = two_nodes["run"]
    assert list((two_nodes["tmp"] / "node1-cwd").iterdir()) == []
    assert {p.name for p in run.iterdir()} == {".tunelab", "prepare", "train", "checkpoints", "config.yaml",
                                               "identity.json"}
    logs = {p.name for p in (run / ".tunelab/logs").iterdir()}
    assert {"rank-0.log", "rank-1.log", "ranks.json"} <= logs and not any("node" in name for name in logs)
    assert set(json.loads((run / ".tunelab/logs/ranks.json").read_text())) == {"0"}  # node 0's rank only


def test_a_rank_killed_on_node_one_ends_both_nodes_and_node_zeros_run_fails(prepared, tmp_path):
    shutil.copytree(prepared, tmp_path / "run")
    job, nodes = start_nodes(tmp_path, tmp_path / "run", "training.max_steps=100000", "training.save_steps=0")
    try:
        wait_for(lambda: (tmp_path / "run/train/loss.jsonl").is_file(), nodes[0], "the first training step")
        node1 = records(tmp_path / "run", job)["node-1.json"]
        rank0 = psutil.Process(json.loads((tmp_path / "run/.tunelab/logs/ranks.json").read_text())["0"]["pid"])
        os.kill(node1["ranks"]["1"]["pid"], signal.SIGKILL)  # as the kernel's OOM killer would
    finally:
        (code0, err0), (code1, err1) = finish(nodes)
    log = tmp_path / "run/.tunelab/logs/rank-1.log"
    blame = f"training rank 1 of 2 was killed by SIGKILL on node 1 ({node1['host']}); the other ranks were stopped."
    assert code1 == 1 and blame in err1 and f"Its log: {log}" in err1, err1[-3000:]
    assert code0 == 1 and blame in err0 and f"Its log: {log}" in err0, err0[-3000:]
    assert not rank0.is_running(), "node 0's rank outlived the run"
    _, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert blame in runs[0].data.tags["tunelab.error"]
    found = records(tmp_path / "run", job)
    assert found["node-1.json"]["state"] == "failed" and found["node-1.json"]["code"] == -signal.SIGKILL
    assert found["end.json"]["status"] == "FAILED" and "RankFailed: training rank 1 of 2" in found["end.json"]["reason"]
    assert not (tmp_path / "run/train/summary.json").exists()


def test_sigterm_to_node_zero_stops_both_nodes_at_one_step_with_a_checkpoint(prepared, tmp_path):
    """Only node 0 gets the signal (Ctrl-C on it): its rank tells node 1's in the step's agreement, both
    save their part of one checkpoint, and node 1's rank ends interrupted, not as if training had finished."""
    shutil.copytree(prepared, tmp_path / "run")
    job, nodes = start_nodes(tmp_path, tmp_path / "run", "training.max_steps=100000", "training.save_steps=100000",
                             "training.save_minutes=0")
    try:
        wait_for(lambda: (tmp_path / "run/train/loss.jsonl").is_file(), nodes[0], "the first training step")
        nodes[0].send_signal(signal.SIGTERM)
    finally:
        (code0, err0), (code1, err1) = finish(nodes)
    assert code0 == 143, err0[-3000:]
    assert code1 == 143, err1[-3000:]  # ended as interrupted, however it learnt of it first
    saved = [p for p in (tmp_path / "run/checkpoints").glob("checkpoint-*") if (p / "tunelab-checkpoint.json").is_file()]
    assert len(saved) == 1, err0[-3000:]
    marker = json.loads((saved[0] / "tunelab-checkpoint.json").read_text())
    assert marker["world_size"] == NODES and {"rng_state_0.pth", "rng_state_1.pth"} <= set(marker["files"])
    assert "stopped" in (tmp_path / "run/.tunelab/logs/rank-1.log").read_text().splitlines()[-1]
    _, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "KILLED"
    found = records(tmp_path / "run", job)
    assert found["end.json"]["status"] == "KILLED" and found["node-1.json"]["state"] == "stopped"
    assert not (tmp_path / "run/train/summary.json").exists()
