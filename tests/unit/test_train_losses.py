"""train.final_loss is the last logged loss; the mean loss per step is train.mean_loss."""
from __future__ import annotations

import json
import math

from omegaconf import OmegaConf

from tunelab.paths import RunPaths
from tunelab.tracking import Tracker
from tunelab.training import resume

CURVE = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 0.5}, {"step": 4, "loss": 0.25}]


def _write_curve(path, curve=CURVE):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(entry) + "\n" for entry in curve))


def test_final_loss_is_the_last_logged_and_mean_loss_weights_each_window(tmp_path):
    log = tmp_path / "loss.jsonl"
    _write_curve(log)
    assert resume.final_loss(log) == 0.25
    assert resume.mean_loss(log) == (2.0 + 0.5 + 0.25 * 2) / 4
    assert math.isnan(resume.final_loss(tmp_path / "absent.jsonl"))


def _logged_metrics(tmp_path, result):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = OmegaConf.create({"enabled": True, "uri": uri, "artifact_location": str(tmp_path / "art"),
                                 "experiment": "t", "log_gguf": False})
    paths = RunPaths(tmp_path / "run", tmp_path / "cache")
    paths.adapter_dir.mkdir(parents=True)
    (paths.adapter_dir / "adapter_config.json").write_text("{}")
    _write_curve(paths.loss_log)
    tracker = Tracker(tracking)
    with tracker.run(OmegaConf.create({"name": "t"}), {}, run_name="t"):
        tracker.log_stage("train", result, paths, None)
    return MlflowClient(tracking_uri=uri).get_run(tracker.run_id).data.metrics


def test_tracking_logs_final_and_mean_loss_under_their_own_names(tmp_path):
    metrics = _logged_metrics(tmp_path, {"train_loss": 0.75, "final_loss": 0.25, "steps": 4,
                                         "train_runtime_s": 1.0})
    assert metrics["train.final_loss"] == 0.25 and metrics["train.mean_loss"] == 0.75


def test_a_cached_summary_without_final_loss_takes_it_from_the_curve(tmp_path):
    metrics = _logged_metrics(tmp_path, {"train_loss": 0.75, "steps": 4, "train_runtime_s": 1.0})
    assert metrics["train.final_loss"] == 0.25 and metrics["train.mean_loss"] == 0.75
