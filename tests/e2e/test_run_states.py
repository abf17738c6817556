"""A run ends FINISHED, FAILED or KILLED: Ctrl-C and SIGTERM in the middle of training end it KILLED,
also in the worker processes of a parallel sweep, and a run left RUNNING by a killed process is
marked KILLED by the next tunelab command."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def start_long_training(tmp):
    cmd = [sys.executable, "-m", "tunelab", "experiment=smoke", f"paths.run_dir={tmp}/run",
           f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/artifacts",
           "cache.enabled=false", "training.max_steps=100000"]
    # As from a terminal: a shell starts background jobs with SIGINT ignored, and Python keeps it so.
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    loss_log = tmp / "run/train/loss.jsonl"
    deadline = time.time() + 300
    while not (loss_log.is_file() and loss_log.read_text().strip()):  # training has taken a step
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    return process


def only_run(tmp):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert len(runs) == 1
    return runs[0]


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_in_the_middle_of_training_ends_the_run_killed(tmp_path, signum, code):
    process = start_long_training(tmp_path)
    process.send_signal(signum)
    try:
        assert process.wait(timeout=120) == code
    finally:
        process.kill()
    assert only_run(tmp_path).info.status == "KILLED"


def test_a_run_left_running_by_a_killed_process_is_marked_killed_by_the_next_command(tmp_path):
    process = start_long_training(tmp_path)
    process.kill()  # SIGKILL: no chance to end the run
    process.wait(timeout=60)
    assert only_run(tmp_path).info.status == "RUNNING"
    done = subprocess.run([sys.executable, "-m", "tunelab", "runs", "experiment=smoke",
                           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = only_run(tmp_path)
    assert run.info.status == "KILLED" and "KILLED" in done.stdout
    assert run.data.tags["tunelab.ended_by"] == f"process {process.pid} was gone"


@pytest.mark.parametrize("signum,to_group,code", [(signal.SIGTERM, False, 143), (signal.SIGINT, True, 130)],
                         ids=["sigterm-to-the-sweep", "ctrl-c-to-the-process-group"])
def test_a_signal_to_a_parallel_sweep_stops_its_workers_and_every_run_ends_killed(tmp_path, signum, to_group, code):
    import psutil
    from mlflow.tracking import MlflowClient

    cmd = [sys.executable, "-m", "tunelab", "-m", "experiment=smoke", "hydra/launcher=local_parallel",
           "hydra.launcher.n_jobs=2", "training.threads=1", "lora.r=4,8", "training.max_steps=100000",
           f"hydra.sweep.dir={tmp_path}/sweep", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
           f"tracking.artifact_location={tmp_path}/artifacts", "cache.enabled=false"]
    # A session of its own, as a terminal's foreground job: Ctrl-C goes to every process in it.
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        logs = [tmp_path / f"sweep/{job}/train/loss.jsonl" for job in (0, 1)]
        while not all(log.is_file() and log.read_text().strip() for log in logs):  # both jobs are training
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.time() < deadline, "the jobs did not start training"
            time.sleep(0.2)
        workers = psutil.Process(process.pid).children()
        os.killpg(process.pid, signum) if to_group else process.send_signal(signum)
        assert process.wait(timeout=180) == code, process.stderr.read()[-3000:]
    finally:
        process.kill()
    assert not psutil.wait_procs(workers, timeout=15)[1]  # nothing of the sweep lives on
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("tunelab.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "KILLED" and [c.info.status for c in children] == ["KILLED"] * 2
    assert {int(c.data.tags["tunelab.pid"]) for c in children} <= {w.pid for w in workers}  # ended by the workers
    assert not any("tunelab.ended_by" in c.data.tags for c in children)  # not found dead later: they ended their runs
