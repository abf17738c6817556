"""The run logs what the template contract did in training: added special tokens, end-of-turn loss."""
from __future__ import annotations

import json

from omegaconf import OmegaConf

from tunelab.paths import RunPaths
from tunelab.tracking import Tracker


def test_added_special_tokens_and_end_of_turn_loss_are_logged(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = OmegaConf.create({"enabled": True, "uri": uri, "artifact_location": str(tmp_path / "art"),
                                 "experiment": "t", "log_gguf": False})
    paths = RunPaths(tmp_path / "run", tmp_path / "cache")
    paths.adapter_dir.mkdir(parents=True)
    (paths.adapter_dir / "adapter_config.json").write_text("{}")
    paths.loss_log.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    result = {"train_loss": 2.0, "steps": 1, "train_runtime_s": 1.0, "eot_loss_tokens": 495,
              "added_tokens": {"<|end|>": 49155}}
    tracker = Tracker(tracking)
    with tracker.run(OmegaConf.create({"name": "t"}), {}, run_name="t"):
        tracker.log_stage("train", result, paths, None)
    run = MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    assert json.loads(run.data.tags["tunelab.added_tokens"]) == {"<|end|>": 49155}
    assert run.data.metrics["train.eot_loss_tokens"] == 495
