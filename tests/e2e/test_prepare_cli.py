"""prepare through the real CLI: a broken file exits non-zero naming file:line and writes nothing;
a good one records the dataset's content hash in the manifest, the config hash and MLflow."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def tunelab(*args):
    return subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_a_broken_dataset_exits_non_zero_naming_file_and_line(tmp_path):
    broken = "tests/data/broken/wrong_roles.jsonl"
    done = tunelab("experiment=smoke", "stage=prepare", "tracking=off", "dataset.format=sharegpt",
                   f"dataset.path={broken}", "dataset.eval_path=null", f"paths.run_dir={tmp_path}/run")
    assert done.returncode == 2
    assert f"{broken}:1: unknown role 'robot'" in done.stderr and f"{broken}:6: wrong role order" in done.stderr
    assert not (tmp_path / "run/prepare").exists()


def test_the_dataset_hash_is_one_identity_in_manifest_config_hash_and_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    done = tunelab("experiment=smoke", "stage=prepare", f"paths.run_dir={tmp_path}/run",
                   f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_location={tmp_path}/artifacts")
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "run/prepare/manifest.json").read_text())
    identity = json.loads((tmp_path / "run/identity.json").read_text())
    assert manifest["dataset_sha256"] == identity["dataset_sha256"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])[0]
    assert run.data.tags["tunelab.dataset_sha256"] == manifest["dataset_sha256"]
    assert run.data.metrics["data.rows_in"] == manifest["rows_in"] == 535
    assert run.data.metrics["data.rows_out"] == manifest["rows_out"] and run.data.metrics["data.rows_quarantined"] == 0
