"""Resume through the real CLI on the smoke model: kill -9 near the end, a truncated newest
checkpoint, SIGTERM (SLURM preemption), explicit paths, never. Every wait is on a condition (a
marker file, a metric in the store), with a deadline, never on timing."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

STEPS = 10
# Resumed on the CPU, the smoke training is bitwise the uninterrupted one (same adapter bytes);
# the loss is allowed this much in case a platform's kernels are not deterministic.
LOSS_TOLERANCE = 1e-6


def command(tmp: Path, *overrides):
    return [sys.executable, "-m", "tunelab", "experiment=smoke", "stage=train", f"paths.run_dir={tmp}/run",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/artifacts",
            "cache.enabled=false", f"training.max_steps={STEPS}", "training.save_steps=3", *overrides]


def tunelab(tmp: Path, *overrides):
    return subprocess.run(command(tmp, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=600)


def wait_for(condition, process, what: str, limit_s: float = 300):
    deadline = time.time() + limit_s
    while not condition():
        assert process.poll() is None, f"ended before {what}: " + process.stderr.read()[-3000:]
        assert time.time() < deadline, f"no {what} within {limit_s} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A run directory whose prepare stage has run: each test copies it."""
    tmp = tmp_path_factory.mktemp("prepared")
    done = subprocess.run(command(tmp)[:-2] + ["stage=prepare"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run"


def fresh(prepared: Path, tmp: Path) -> Path:
    shutil.copytree(prepared, tmp / "run")
    return tmp


@pytest.fixture(scope="module")
def baseline(prepared, tmp_path_factory):
    """An uninterrupted training (it leaves checkpoint-6 and checkpoint-9)."""
    tmp = fresh(prepared, tmp_path_factory.mktemp("baseline"))
    done = tunelab(tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" not in done.stderr
    return tmp


def adapter(tmp: Path) -> bytes:
    return (tmp / "run/train/adapter/adapter_model.safetensors").read_bytes()


def summary(tmp: Path) -> dict:
    return json.loads((tmp / "run/train/summary.json").read_text())


def losses(tmp: Path) -> list:
    return [json.loads(line) for line in (tmp / "run/train/loss.jsonl").read_text().splitlines()]


def marked(tmp: Path, step: int) -> Path:
    return tmp / f"run/checkpoints/checkpoint-{step}/tunelab-checkpoint.json"


def test_a_kill_at_90_percent_resumes_from_the_last_checkpoint_and_ends_as_an_uninterrupted_run(
        prepared, baseline, tmp_path):
    tmp = fresh(prepared, tmp_path)
    process = subprocess.Popen(command(tmp), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: marked(tmp, 9).is_file(), process, "complete checkpoint at step 9")
        process.kill()  # SIGKILL: no cleanup of any kind
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        process.kill()
    assert not (tmp / "run/train/summary.json").exists()  # killed while training, not after
    done = tunelab(tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from step 9 of {STEPS}: {tmp}/run/checkpoints/checkpoint-9" in done.stderr
    resumed = summary(tmp)["resumed_from"]
    assert resumed["step"] == 9 and resumed["checkpoint"] == f"{tmp}/run/checkpoints/checkpoint-9"
    assert resumed["run_id"]  # the killed run, which wrote it
    assert summary(baseline)["resumed_from"] is None
    assert [s["step"] for s in losses(tmp)] == list(range(1, STEPS + 1))  # the whole curve
    assert losses(tmp)[-1]["loss"] == pytest.approx(losses(baseline)[-1]["loss"], abs=LOSS_TOLERANCE)
    assert adapter(tmp) == adapter(baseline)  # measured: bitwise equal on the CPU
    # the mean loss over all the steps, not only those of the resumed process
    assert summary(tmp)["train_loss"] == pytest.approx(summary(baseline)["train_loss"], abs=LOSS_TOLERANCE)


def test_a_truncated_newest_checkpoint_is_skipped_and_named_for_the_previous_one(baseline, tmp_path):
    shutil.copytree(baseline / "run", tmp_path / "run")
    newest = tmp_path / "run/checkpoints/checkpoint-9/adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    done = tunelab(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"not resuming from {tmp_path}/run/checkpoints/checkpoint-9: adapter_model.safetensors has 1000 bytes"
            in done.stderr)
    assert f"resuming from step 6 of {STEPS}" in done.stderr and summary(tmp_path)["resumed_from"]["step"] == 6
    assert adapter(tmp_path) == adapter(baseline)


def mlflow_client(tmp: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")


def runs(tmp: Path):
    client = mlflow_client(tmp)
    experiment = client.get_experiment_by_name("smoke")
    found = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]) if experiment else []
    return [r for r in found if r.data.tags.get("tunelab.stage") == "train"]


def live_loss_points(tmp: Path) -> list:
    """train.loss points the running training's MLflow run already has (the store may be mid-write)."""
    try:
        found = runs(tmp)
        return mlflow_client(tmp).get_metric_history(found[0].info.run_id, "train.loss") if found else []
    except Exception:  # noqa: BLE001 - the sqlite file is being created
        return []


def test_the_loss_curve_reaches_mlflow_while_training_runs(prepared, tmp_path):
    tmp = fresh(prepared, tmp_path)
    process = subprocess.Popen(command(tmp, "training.max_steps=100000", "training.save_steps=0"), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # The store exists once training has begun (opening it sooner would race its creation).
        wait_for(lambda: (tmp / "run/train/loss.jsonl").is_file(), process, "the first training step")
        wait_for(lambda: len(live_loss_points(tmp)) >= 2, process, "train.loss in MLflow while training")
        [run] = runs(tmp)
        assert run.info.status == "RUNNING"  # nothing has ended it: the curve came while it ran
        assert {"train.learning_rate", "train.grad_norm", "train.epoch"} <= set(run.data.metrics)
    finally:
        process.kill()
        process.wait(timeout=60)


def test_sigterm_saves_a_checkpoint_ends_killed_and_the_next_run_resumes_linked_to_it(prepared, tmp_path):
    tmp = fresh(prepared, tmp_path)
    # No periodic checkpoint: the only one is the one SIGTERM makes.
    process = subprocess.Popen(command(tmp, "training.save_steps=1000"), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        # SIGTERM once the first step is logged: 9 steps are left, so it lands during training.
        wait_for(lambda: (tmp / "run/train/loss.jsonl").is_file(), process, "the first training step")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 143
        stderr = process.stderr.read()
    finally:
        process.kill()
    [killed] = runs(tmp)
    assert killed.info.status == "KILLED"
    [folder] = (tmp / "run/checkpoints").glob("checkpoint-*")
    step = int(folder.name.split("-")[1])
    assert 2 <= step < STEPS and f"saving a checkpoint at step {step}, then stopping" in stderr
    record = json.loads((folder / "tunelab-checkpoint.json").read_text())
    assert record["global_step"] == step and record["mlflow_run_id"] == killed.info.run_id
    # A KILLED run never reaches the end-of-stage logging: these points were streamed while it trained.
    killed_curve = [m.step for m in mlflow_client(tmp).get_metric_history(killed.info.run_id, "train.loss")]
    assert sorted(killed_curve) == list(range(1, step + 1))

    done = tunelab(tmp, "training.save_steps=1000")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from step {step} of {STEPS}" in done.stderr
    resumed = runs(tmp)[1]
    assert resumed.info.status == "FINISHED"
    tags = resumed.data.tags
    assert tags["tunelab.resumed_from_run"] == killed.info.run_id and tags["tunelab.resumed_from_step"] == str(step)
    assert tags["tunelab.resumed_from_checkpoint"] == str(folder)
    curve = sorted(m.step for m in mlflow_client(tmp).get_metric_history(resumed.info.run_id, "train.loss"))
    assert curve == list(range(1, STEPS + 1))  # steps before the resume step included, each once


def test_an_explicit_checkpoint_of_another_training_is_refused_and_never_starts_over(baseline, tmp_path):
    shutil.copytree(baseline / "run", tmp_path / "run")
    checkpoint = tmp_path / "run/checkpoints/checkpoint-9"
    refused = tunelab(tmp_path, f"training.resume={checkpoint}", "training.learning_rate=1e-3")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"training.resume={checkpoint}: refusing to resume from it: written by another training" in refused.stderr
    done = tunelab(tmp_path, "training.resume=never")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training.resume=never: training starts at step 0" in done.stderr and "resuming" not in done.stderr
    assert summary(tmp_path)["resumed_from"] is None and summary(tmp_path)["steps"] == STEPS
    assert adapter(tmp_path) == adapter(baseline)
