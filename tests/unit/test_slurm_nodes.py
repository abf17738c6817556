"""Several nodes (SLURM), the parts that need no training: each rank's torchrun environment on node n, who
leads, the records by which the nodes meet, and how a node other than 0 watches its ranks (real processes
that sleep stand for them)."""
from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from test_slurm_config import job  # noqa: F401 - the fixture: this process as one node's task of a SLURM job
from tunelab import procs
from tunelab.config.checks import ConfigError
from tunelab.paths import RunPaths
from tunelab.training import launch, nodes, rendezvous
from tunelab.training.world import World, rank_env


def test_ranks_of_node_one_get_global_ranks_and_node_zeros_address():
    world = World(local=2, nnodes=3, node=1, master_addr="gpu07", master_port=29400)
    env = rank_env(world, 1, "run1", None)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                                "MASTER_ADDR", "MASTER_PORT", "TUNELAB_RANK")} == {
        "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
        "NODE_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "29400", "TUNELAB_RANK": "3"}
    assert world.where(5, "gpu09") == " on node 2 (gpu09)" and World(2).where(1) == ""


def test_only_node_zero_of_several_leads(job):
    assert nodes.role() == "single"
    job(SLURM_JOB_ID=7, SLURM_NNODES=2, SLURM_NODEID=1, SLURM_JOB_NODELIST="a,b")
    assert nodes.role() == "follower"
    job(SLURM_NODEID=0)
    assert nodes.role() == "leader"
    job(SLURM_NNODES=1, SLURM_JOB_NODELIST="a")
    assert nodes.role() == "single"
    job(SLURM_NNODES=2, SLURM_NODEID=1, SLURM_JOB_NODELIST="a")  # broken: still never a second pipeline
    assert nodes.role() == "follower"


def paths_in(tmp_path: Path) -> RunPaths:
    return RunPaths(tmp_path / "run", tmp_path / "cache")


def test_a_follower_waits_for_its_own_jobs_launch_only(tmp_path: Path):
    paths = paths_in(tmp_path)
    stale = rendezvous.job_dir(paths, "6.batch.0")
    rendezvous.write(stale / rendezvous.LAUNCH, {"master_addr": "old"})  # an earlier job's: never read
    rendezvous.write(stale / rendezvous.END, {"status": "FAILED", "reason": "old"})
    folder = rendezvous.job_dir(paths, "7.batch.0")
    started = time.monotonic()
    with pytest.raises(nodes.NodeFailed) as err:
        nodes.wait_for_launch(folder, paths, limit_s=0)
    assert time.monotonic() - started < 5
    assert str(err.value).startswith(f"node 0 did not launch the training within 0 s: no {folder / 'launch.json'}. "
                                     f"Check that paths.run_dir ({paths.run_dir}) is the same folder on a file system "
                                     "every node shares, and node 0's log")
    assert "TUNELAB_NODE_WAIT_S=<seconds> waits longer" in str(err.value)
    rendezvous.write(folder / rendezvous.LAUNCH, {"master_addr": "gpu07"})
    assert nodes.wait_for_launch(folder, paths, limit_s=0)["master_addr"] == "gpu07"


def test_a_follower_does_not_wait_for_a_run_that_has_ended(tmp_path: Path):
    paths = paths_in(tmp_path)
    folder = rendezvous.job_dir(paths, "7.batch.0")
    rendezvous.write(folder / rendezvous.END, {"status": "FINISHED", "reason": ""})
    assert nodes.wait_for_launch(folder, paths, limit_s=60) is None  # node 0 trained nothing on the nodes
    rendezvous.write(folder / rendezvous.LAUNCH, {"master_addr": "gpu07"})
    rendezvous.write(folder / rendezvous.END, {"status": "FAILED", "reason": "RankFailed: rank 0 exited with code 1"})
    with pytest.raises(nodes.NodeFailed, match=r"^node 0's run ended FAILED \(RankFailed: rank 0 exited with code 1\); "
                                               "this node started no rank"):
        nodes.wait_for_launch(folder, paths, limit_s=60)
    rendezvous.write(folder / rendezvous.END, {"status": "KILLED", "reason": "Terminated"})
    with pytest.raises(KeyboardInterrupt, match=r"^node 0's run ended KILLED \(Terminated\)"):
        nodes.wait_for_launch(folder, paths, limit_s=60)  # ends as interrupted too (exit 143)


def test_the_wait_limit_is_a_number_of_seconds(monkeypatch):
    monkeypatch.setenv(nodes.WAIT_ENV, "soon")
    with pytest.raises(ConfigError, match="TUNELAB_NODE_WAIT_S='soon' must be a number of seconds"):
        nodes.wait_limit()
    monkeypatch.setenv(nodes.WAIT_ENV, "90")
    assert nodes.wait_limit() == 90.0


def test_node_zero_says_how_its_run_ended_only_in_a_folder_it_owns(tmp_path: Path, job):
    job(SLURM_JOB_ID=7, SLURM_NNODES=2, SLURM_NODEID=0, SLURM_JOB_NODELIST="a,b")
    cfg = OmegaConf.create({"paths": {"run_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache")}})
    with pytest.raises(ValueError):
        with nodes.leading(cfg):
            raise ValueError("no such data")
    assert not (tmp_path / "run").exists()  # unclaimed: nothing made there
    paths = paths_in(tmp_path)
    paths.state_dir.mkdir(parents=True)
    end = rendezvous.job_dir(paths, "7.batch.0") / rendezvous.END
    with pytest.raises(ValueError):
        with nodes.leading(cfg):
            raise ValueError("no such data")
    assert (rendezvous.read(end)["status"], rendezvous.read(end)["reason"]) == ("FAILED", "ValueError: no such data")
    with pytest.raises(KeyboardInterrupt):
        with nodes.leading(cfg):
            raise KeyboardInterrupt
    assert rendezvous.read(end)["status"] == "KILLED"
    with nodes.leading(cfg):
        pass
    assert rendezvous.read(end)["status"] == "FINISHED" and rendezvous.read(end)["pid"] == os.getpid()


def test_records_are_whole_or_absent(tmp_path: Path):
    path = tmp_path / "f" / "node-1.json"
    assert rendezvous.read(path) is None
    rendezvous.write_node(path.parent, 1, "failed", rank=3, code=-9)
    assert {k: rendezvous.read(path)[k] for k in ("node", "state", "rank", "code")} == {
        "node": 1, "state": "failed", "rank": 3, "code": -9}
    assert [p.name for p in path.parent.iterdir()] == ["node-1.json"]  # no temporary file left


def test_node_zero_refuses_a_second_launch_in_one_job_step(tmp_path: Path):
    folder = rendezvous.job_dir(paths_in(tmp_path), "7.batch.0")
    assert rendezvous.earlier_launch(folder) is None
    rendezvous.write(folder / rendezvous.END, {"status": "FINISHED", "reason": ""})
    assert rendezvous.earlier_launch(folder).startswith(f"{folder} holds the records of an earlier tunelab of this "
                                                        "same SLURM job step")


def test_node_zero_hears_of_failed_and_missing_nodes(tmp_path: Path):
    folder = tmp_path / "job"
    followers = rendezvous.Followers(folder, nnodes=3, join_s=3600, every_s=0)
    assert followers.failed() == [] and followers.missing() == []  # not yet due
    rendezvous.write_node(folder, 2, "failed", rank=5, code=-9)
    assert [(r["rank"], r["code"]) for r in followers.failed()] == [(5, -9)]
    followers.join_s = 0
    assert followers.missing() == [1]
    assert followers.missing_message([1]).startswith("node(s) 1 of 3 did not start their ranks within 0 s of the launch")
    rendezvous.write_node(folder, 1, "done")
    assert set(followers.wait_final(limit_s=0)) == {1, 2}


def test_the_first_cause_across_nodes_is_the_rank_killed_by_a_signal(tmp_path: Path):
    world = World(local=1, nnodes=2)
    failed = {0: 1, 1: -9}  # rank 0 lost its peer; rank 1 (node 1) was killed
    r = launch.first_cause(failed)
    err = launch.failure(r, failed[r], paths_in(tmp_path), world, "gpu08")
    assert str(err).startswith("training rank 1 of 2 was killed by SIGKILL on node 1 (gpu08); the other ranks were "
                               "stopped. Its log: ")


def test_ranks_that_stopped_together_after_a_signal_elsewhere_end_the_run_killed(tmp_path: Path):
    world = World(local=2)
    err = launch._failure_of({0: 143, 1: 143}, [], paths_in(tmp_path), world, None)
    assert isinstance(err, KeyboardInterrupt)
    assert isinstance(launch._failure_of({0: 143, 1: 1}, [], paths_in(tmp_path), world, None), launch.RankFailed)


def test_the_launch_record_names_node_zeros_config(tmp_path: Path):
    config = tmp_path / "config.yaml"
    config.write_text("a: 1\n")
    record = {"config": str(config), "config_sha256": "0" * 64}
    with pytest.raises(nodes.NodeFailed, match="is not the config node 0 launched with"):
        nodes._launched_config(record)
    record["config_sha256"] = hashlib.sha256(b"a: 1\n").hexdigest()
    assert nodes._launched_config(record) == config


def test_a_node_that_cannot_use_the_launch_record_tells_node_zero_at_once(tmp_path: Path):
    paths, folder = paths_in(tmp_path), tmp_path / "job"
    record = {"config": str(tmp_path / "missing.yaml"), "config_sha256": "0" * 64, "events": "e", "cwd": str(tmp_path)}
    with pytest.raises(nodes.NodeFailed):
        nodes._start(paths, folder, World(1, 2, 1), record)
    followers = rendezvous.Followers(folder, nnodes=2, join_s=3600, every_s=0)
    err = launch._failure_of({}, followers.failed(), paths, World(1, 2), followers)
    assert isinstance(err, launch.RankFailed) and str(err).startswith(
        f"node 1 ({os.uname().nodename}) did not start its ranks: {tmp_path / 'missing.yaml'} is not the config node 0 "
        "launched with")


def sleeping_ranks(n: int, seconds: float = 60) -> list:
    return [procs.child_popen([sys.executable, "-c", f"import time; time.sleep({seconds})"]) for _ in range(n)]


def test_a_rank_that_dies_on_a_node_ends_its_other_ranks_and_is_reported(tmp_path: Path):
    paths, folder = paths_in(tmp_path), tmp_path / "job"
    ranks = sleeping_ranks(2)
    ranks[1].kill()
    ranks[1].wait()
    with pytest.raises(launch.RankFailed, match=r"^training rank 3 of 4 was killed by SIGKILL on node 1 \("):
        nodes._watch(ranks, folder, paths, World(local=2, nnodes=2, node=1))
    assert ranks[0].poll() is not None  # killed and reaped
    record = rendezvous.read(rendezvous.node_file(folder, 1))
    assert (record["state"], record["rank"], record["code"]) == ("failed", 3, -signal.SIGKILL)


def test_a_node_stops_its_ranks_when_node_zeros_run_has_failed(tmp_path: Path):
    paths, folder = paths_in(tmp_path), tmp_path / "job"
    rendezvous.write(folder / rendezvous.END, {"status": "FAILED", "reason": "RankFailed: rank 0 exited with code 1"})
    ranks = sleeping_ranks(1)
    with pytest.raises(nodes.NodeFailed, match=r"^node 0's run ended FAILED \(RankFailed: rank 0 exited with code 1\); "
                                               "the ranks of node 1 were stopped"):
        nodes._watch(ranks, folder, paths, World(local=1, nnodes=2, node=1))
    assert ranks[0].poll() == -signal.SIGTERM and rendezvous.read(rendezvous.node_file(folder, 1))["state"] == "stopped"


def test_ranks_still_exiting_after_node_zero_finished_are_left_to_end(tmp_path: Path):
    paths, folder = paths_in(tmp_path), tmp_path / "job"
    rendezvous.write(folder / rendezvous.END, {"status": "FINISHED", "reason": ""})
    ranks = sleeping_ranks(1, seconds=2)  # still running when the record is read: not stopped, it ends by itself
    nodes._watch(ranks, folder, paths, World(local=1, nnodes=2, node=1))
    assert ranks[0].poll() == 0 and rendezvous.read(rendezvous.node_file(folder, 1))["state"] == "done"
