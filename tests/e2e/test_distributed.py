"""training.distributed=ddp through the real CLI on the smoke model: two gloo ranks on the CPU train what
one process trains on the same global batch; rank 0 alone writes the outputs and the parent owns the one
MLflow run; resume works across the world; a rank that dies ends the run FAILED and takes the other
with it. Every wait is on a condition, with a deadline, never on timing."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import ROOT
from test_resume import wait_for  # the same condition wait as the one-process resume tests

pytestmark = pytest.mark.slow

STEPS, PER_RANK, WORLD = 4, 2, 2
# Two ranks pad and sum in other shapes than one process: float rounding only (measured ~2e-7).
ATOL = 1e-5


def command(tmp: Path, run: Path, *overrides):
    return [sys.executable, "-m", "tunelab", "experiment=smoke", "stage=train", f"paths.run_dir={run}",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/artifacts",
            "cache.enabled=false", f"training.max_steps={STEPS}", "training.save_steps=2", *overrides]


DDP = ("training.distributed=ddp", f"training.nproc_per_node={WORLD}", f"training.batch_size={PER_RANK}")


def tunelab(tmp: Path, run: Path, *overrides):
    return subprocess.run(command(tmp, run, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prepared")
    done = subprocess.run([*command(tmp, tmp / "run")[:-2], "stage=prepare", "tracking.enabled=false"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def ddp(prepared, tmp_path_factory):
    """Two ranks, 2 rows each per step, 4 steps, checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("ddp")
    shutil.copytree(prepared, tmp / "run")
    done = tunelab(tmp, tmp / "run", *DDP)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp


def losses(run: Path) -> list:
    return [json.loads(line) for line in (run / "train/loss.jsonl").read_text().splitlines()]


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "train/adapter/adapter_model.safetensors"))


def assert_same_training(run: Path, reference: Path) -> None:
    import torch

    got, want = losses(run), losses(reference)
    assert [s["step"] for s in got] == [s["step"] for s in want] == list(range(1, STEPS + 1))
    assert [s["loss"] for s in got] == pytest.approx([s["loss"] for s in want], abs=ATOL)
    a, b = adapter(run), adapter(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=ATOL), name


def test_two_ranks_train_what_one_process_trains_on_the_same_global_batch(prepared, ddp, tmp_path):
    summary = json.loads((ddp / "run/train/summary.json").read_text())
    assert summary["world_size"] == WORLD and summary["distributed"] == "ddp" and summary["steps"] == STEPS
    for r in range(WORLD):
        assert "done" in (ddp / f"run/.tunelab/logs/rank-{r}.log").read_text().splitlines()[-1]
    assert {f"rng_state_{r}.pth" for r in range(WORLD)} <= {p.name for p in (ddp / "run/checkpoints/checkpoint-4").iterdir()}
    shutil.copytree(prepared, tmp_path / "solo")
    done = tunelab(tmp_path, tmp_path / "solo", f"training.batch_size={PER_RANK * WORLD}", "tracking.enabled=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "solo/train/summary.json").read_text())["world_size"] == 1
    assert_same_training(ddp / "run", tmp_path / "solo")


def mlflow_runs(tmp: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("smoke")
    return client, client.search_runs([experiment.experiment_id]) if experiment else []


def test_rank_zero_alone_writes_the_outputs_and_the_parent_owns_the_mlflow_run(ddp):
    steps = [s["step"] for s in losses(ddp / "run")]
    assert steps == list(range(1, STEPS + 1))  # once each: rank 1 appended nothing
    client, runs = mlflow_runs(ddp)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.tags["tunelab.world_size"] == str(WORLD) and run.data.tags["tunelab.distributed"] == "ddp"
    assert run.data.tags["tunelab.pid"] not in {str(p["pid"]) for p in ranks(ddp / "run").values()}
    history = client.get_metric_history(run.info.run_id, "train.loss")
    assert sorted(m.step for m in history) == steps  # relayed from rank 0's events, once each
    rank1 = (ddp / "run/.tunelab/logs/rank-1.log").read_text()
    assert "verified" not in rank1 and "verified" in (ddp / "run/.tunelab/logs/rank-0.log").read_text()
    marker = json.loads((ddp / "run/checkpoints/checkpoint-4/tunelab-checkpoint.json").read_text())
    assert marker["world_size"] == WORLD and marker["mlflow_run_id"] == run.info.run_id


def ranks(run: Path) -> dict:
    return json.loads((run / ".tunelab/logs/ranks.json").read_text())


def test_a_ddp_training_resumes_from_its_checkpoint_on_every_rank(ddp, tmp_path):
    shutil.copytree(ddp / "run", tmp_path / "run")
    shutil.rmtree(tmp_path / "run/checkpoints/checkpoint-4")
    done = tunelab(tmp_path, tmp_path / "run", *DDP)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = f"{tmp_path}/run/checkpoints/checkpoint-2"
    logs = [(tmp_path / f"run/.tunelab/logs/rank-{r}.log").read_text() for r in range(WORLD)]
    assert f"resuming from step 2 of {STEPS}: {checkpoint}" in logs[0], logs[0][-2000:]
    assert f"resuming from step 2: {checkpoint} (rank 0 continues the curve)" in logs[1], logs[1][-2000:]
    assert json.loads((tmp_path / "run/train/summary.json").read_text())["resumed_from"]["step"] == 2
    assert_same_training(tmp_path / "run", ddp / "run")


def test_a_rank_that_dies_kills_the_other_and_ends_the_run_failed(prepared, tmp_path):
    shutil.copytree(prepared, tmp_path / "run")
    process = subprocess.Popen(command(tmp_path, tmp_path / "run", *DDP, "training.max_steps=100000",
                                       "training.save_steps=0"),
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (tmp_path / "run/train/loss.jsonl").is_file(), process, "the first training step")
        pids = {int(r): psutil.Process(info["pid"]) for r, info in ranks(tmp_path / "run").items()}
        pids[1].kill()  # SIGKILL, as the kernel's OOM killer would
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 1, stderr[-3000:]
    log = tmp_path / "run/.tunelab/logs/rank-1.log"
    assert f"training rank 1 of {WORLD} was killed by SIGKILL; the other ranks were stopped. Its log: {log}" in stderr
    assert not pids[0].is_running(), "rank 0 outlived the run"  # reaped by the launcher before it exited
    _, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "training rank 1 of 2 was killed by SIGKILL" in runs[0].data.tags["tunelab.error"]
    assert not (tmp_path / "run/train/summary.json").exists()


def test_sigterm_stops_every_rank_at_one_step_with_a_checkpoint_and_the_run_ends_killed(prepared, tmp_path):
    shutil.copytree(prepared, tmp_path / "run")
    process = subprocess.Popen(command(tmp_path, tmp_path / "run", *DDP, "training.max_steps=100000",
                                       "training.save_steps=100000", "training.save_minutes=0"),
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (tmp_path / "run/train/loss.jsonl").is_file(), process, "the first training step")
        pids = [psutil.Process(info["pid"]) for info in ranks(tmp_path / "run").values()]
        process.send_signal(signal.SIGTERM)  # to tunelab only: the ranks have their own process groups
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 143, stderr[-3000:]
    assert not any(p.is_running() for p in pids), "a rank outlived the run"
    saved = [p for p in (tmp_path / "run/checkpoints").glob("checkpoint-*") if (p / "tunelab-checkpoint.json").is_file()]
    assert len(saved) == 1, stderr[-3000:]  # the interrupt's save, agreed by both ranks at one step
    marker = json.loads((saved[0] / "tunelab-checkpoint.json").read_text())
    assert marker["world_size"] == WORLD and {f"rng_state_{r}.pth" for r in range(WORLD)} <= set(marker["files"])
    _, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "KILLED"
