"""Several nodes (SLURM), as the config sees them: the node list and the job read from SLURM's environment,
what is refused (naming the variable or the key), and the world size in the config hash and the checkpoint
identity."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tunelab.config import distributed, slurm
from tunelab.config.checks import ConfigError, validate
from tunelab.config.identity import config_hash
from tunelab.training import checkpoints

SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "SLURM_NODEID",
              "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_ID", "SLURM_RESTART_COUNT", "SLURM_STEP_NUM_TASKS",
              "SLURM_STEP_NUM_NODES")


@pytest.fixture
def job(monkeypatch):
    """This process as the task of one node of a SLURM job (only the variables given)."""
    for key in SLURM_KEYS:
        monkeypatch.delenv(key, raising=False)

    def _set(**variables):
        for key, value in variables.items():
            monkeypatch.setenv(key, str(value))
    return _set


@pytest.mark.parametrize("text,hosts", [
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("node7", ["node7"]),
    ("a[8-10],login1", ["a8", "a9", "a10", "login1"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("127.0.0.1,localhost", ["127.0.0.1", "localhost"]),
    ("gpu[001-002],cpu[9]", ["gpu001", "gpu002", "cpu9"]),
])
def test_compressed_node_lists_expand_in_order(text, hosts):
    assert slurm.expand_nodelist(text) == hosts


@pytest.mark.parametrize("text,why", [
    ("gpu[01-03", "a bracket is not closed"),
    ("gpu01-03]", "unbalanced or nested brackets"),
    ("gpu[3-1]", "[3-1] is not a list of numbers and ranges"),
    ("gpu[a-b]", "is not a list of numbers and ranges"),
    ("gpu1,,gpu2", "an empty host name"),
])
def test_a_node_list_this_parser_cannot_read_names_the_variable(monkeypatch, text, why):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol to ask
    with pytest.raises(slurm.SlurmEnvError) as err:
        slurm.expand_nodelist(text)
    assert str(err.value).startswith(f"SLURM_JOB_NODELIST={text!r} is not a host list this parser reads")
    assert why in str(err.value)


def test_scontrol_expands_what_the_parser_cannot(monkeypatch, tmp_path: Path):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "x1\\nx2\\n"\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert slurm.expand_nodelist("x[1-2]]") == ["x1", "x2"]


def test_the_job_as_slurm_describes_it(job):
    assert slurm.job_nodes() is None  # not a SLURM job
    job(SLURM_JOB_ID=41, SLURM_NNODES=3, SLURM_NODEID=2, SLURM_JOB_NODELIST="gpu[07-09]")
    found = slurm.job_nodes()
    assert (found.job, found.count, found.index, found.first_host) == ("41.batch.0", 3, 2, "gpu07")
    job(SLURM_JOB_NUM_NODES=2, SLURM_STEP_ID=0, SLURM_RESTART_COUNT=1, SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NODEID=1)
    found = slurm.job_nodes()  # SLURM_JOB_NUM_NODES first; a requeued job is another launch
    assert (found.job, found.count, found.hosts) == ("41.0.1", 2, ("gpu07", "gpu08"))
    job(SLURM_JOB_NUM_NODES=1, SLURM_NODEID=0)
    assert slurm.job_nodes().hosts == ()  # one node: no list needed


@pytest.mark.parametrize("variables,message", [
    ({"SLURM_NNODES": 2, "SLURM_NODEID": 2, "SLURM_JOB_NODELIST": "a,b"}, "SLURM_NODEID=2 is not a node of this job of 2"),
    ({"SLURM_NNODES": "two"}, "SLURM_NNODES='two' is not a whole number >= 1"),
    ({"SLURM_NNODES": 2, "SLURM_JOB_NODELIST": "a"}, "SLURM_JOB_NODELIST='a' names 1 host(s), but the job has 2"),
    ({"SLURM_NNODES": 2}, "SLURM_JOB_NODELIST is not set in a SLURM job of 2 nodes"),
    ({"SLURM_NNODES": 2, "SLURM_JOB_NODELIST": "a,b", "SLURM_STEP_NUM_TASKS": 4, "SLURM_STEP_NUM_NODES": 2},
     "SLURM_STEP_NUM_TASKS=4 on SLURM_STEP_NUM_NODES=2: every task would be a whole tunelab; tunelab runs once per "
     "node and starts each node's ranks itself: hydra.launcher.tasks_per_node=1"),
])
def test_an_environment_that_cannot_describe_the_nodes_is_refused(job, variables, message):
    job(SLURM_JOB_ID=7, **variables)
    with pytest.raises(slurm.SlurmEnvError) as err:
        slurm.job_nodes()
    assert str(err.value).startswith(message)


def problems(cfg):
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    return err.value.problems


def test_several_nodes_need_a_distributed_mode_and_the_count_slurm_gives(compose_cfg, job):
    job(SLURM_JOB_ID=7, SLURM_NNODES=2, SLURM_NODEID=0, SLURM_JOB_NODELIST="a,b")
    found = problems(compose_cfg())
    assert found == ["training.distributed=none on a SLURM job of 2 nodes: every node would run the whole pipeline; "
                     "set training.distributed=ddp (or fsdp) to train on all of them, or run on one node "
                     "(hydra.launcher.nodes=1)"]
    ddp = ("training.distributed=ddp", "training.nproc_per_node=1")
    assert problems(compose_cfg(*ddp, "training.nnodes=3"))[0].startswith(
        "training.nnodes=3, but this SLURM job has 2 node(s) (SLURM_JOB_NUM_NODES): run it on 3 nodes")
    validate(compose_cfg(*ddp))
    validate(compose_cfg(*ddp, "training.nnodes=2"))
    job(SLURM_NODEID=5)
    assert problems(compose_cfg(*ddp)) == ["SLURM_NODEID=5 is not a node of this job of 2 node(s)"]


def test_nnodes_outside_slurm(compose_cfg, job):
    assert problems(compose_cfg("training.distributed=ddp", "training.nproc_per_node=1", "training.nnodes=2"))[0] \
        .startswith("training.nnodes=2, but this process is not part of a SLURM job (SLURM_JOB_ID is not set)")
    assert problems(compose_cfg("training.nnodes=0"))[0].startswith("training.nnodes=0 must be auto")
    validate(compose_cfg("training.nnodes=1"))


def test_the_world_of_several_nodes_is_hashed_and_one_node_keeps_its_hash(compose_cfg, job):
    ddp = ("training.distributed=ddp", "training.nproc_per_node=2")
    one_node_before = config_hash(compose_cfg(*ddp), "d")  # as hashed before training.nnodes existed
    job(SLURM_JOB_ID=7, SLURM_NNODES=2, SLURM_NODEID=0, SLURM_JOB_NODELIST="a,b")
    two = compose_cfg(*ddp)
    distributed.resolve(two, cuda=0)
    assert (two.training.nproc_per_node, two.training.nnodes, distributed.world_size(two.training)) == (2, 2, 4)
    assert config_hash(two, "d") != one_node_before
    job(SLURM_NNODES=1, SLURM_JOB_NODELIST="a")
    one = compose_cfg(*ddp)
    distributed.resolve(one, cuda=0)
    assert one.training.nnodes == 1 and config_hash(one, "d") == one_node_before
    # A checkpoint records every rank of every node: 2 x 2 is not 1 x 2.
    assert checkpoints.training_identity(two, "d", 4) != checkpoints.training_identity(one, "d", 2)
