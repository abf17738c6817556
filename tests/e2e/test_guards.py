"""Off the happy path, through the real CLI on the smoke experiment: a NaN adapter is refused at
export naming it; a NaN score makes every file BROKEN and the run exit 3, logged; a converter
outlives no SIGKILLed tunelab. One trained run is shared; each test works on its own copy."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def command(tmp: Path, *overrides):
    return [sys.executable, "-m", "tunelab", "experiment=smoke", f"paths.run_dir={tmp}/run",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/artifacts",
            "cache.enabled=false", *overrides]


def env():
    # tests/e2e on the path: nan_metric is importable as a metric's _target_
    extra = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": extra, "COLUMNS": "200"}


def tunelab(tmp: Path, *overrides):
    return subprocess.run(command(tmp, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=900, env=env())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    for stage in ("prepare", "train"):
        done = tunelab(tmp, f"stage={stage}")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return tmp / "run"


@pytest.fixture
def run_copy(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path


def record_as_trained(run_dir: Path) -> None:
    """The train stage's record lists the adapter's new bytes: otherwise export refuses it earlier,
    as a file changed since training wrote it (tunelab.records), not for its NaN."""
    from tunelab.paths import RunPaths
    from tunelab.records import StageRecord, file_entries

    record = StageRecord(RunPaths(run_dir, run_dir), "train")
    record.complete(record.complete_record()["key"], file_entries(record.folder))


def test_a_nan_in_the_adapter_is_refused_at_export_naming_the_file(run_copy):
    from safetensors import safe_open
    from safetensors.torch import save_file

    adapter = run_copy / "run/train/adapter/adapter_model.safetensors"
    with safe_open(str(adapter), framework="pt") as handle:
        metadata, weights = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    name = sorted(k for k in weights if "lora_B" in k)[0]
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, adapter, metadata=metadata)
    record_as_trained(run_copy / "run")  # as if training itself had written the NaN
    done = tunelab(run_copy, "stage=export")
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"ExportError: the adapter {adapter} holds NaN or infinite weights in 1 tensor(s): {name} (1 of" \
           in done.stderr
    assert not list((run_copy / "run").rglob("*.gguf"))


def test_a_nan_score_breaks_every_file_nothing_ships_and_the_run_exits_3_logged(run_copy):
    metric = ["+eval.metrics.nan_rate._target_=nan_metric.nan_rate", "eval.headline=nan_rate",
              "sweep.objective=finetuned.q5_k_m.nan_rate"]
    assert tunelab(run_copy, "stage=export", *metric).returncode == 0
    done = tunelab(run_copy, "stage=evaluate", *metric)
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every fine-tuned GGUF is BROKEN, nothing to ship: f16: nan_rate is nan" in done.stderr
    assert "BROKEN" in done.stdout and "do not ship this run" in done.stdout
    verdict = json.loads((run_copy / "run/evaluate/summary.json").read_text())["verdict"]
    assert verdict["ship"] is None and verdict["broken"] == ["f16", "q5_k_m"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_copy}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id],
                              order_by=["attributes.start_time DESC"])
    assert runs[0].info.status == "FINISHED" and "finetuned.f16.all_caps_rate" in runs[0].data.metrics


# Runs tunelab's export, SIGKILLs it as soon as its converter child exists, and reports how the
# converter ended. The driver is a child subreaper (PR_SET_CHILD_SUBREAPER): the orphaned converter
# becomes its child, so waitpid tells a converter killed with tunelab from one that merely finished
# its (short) conversion on its own. Polls every 10 ms; no fixed sleeps.
DRIVER = """
import ctypes, json, os, signal, subprocess, sys, time
import psutil
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
tunelab = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
watched, found = psutil.Process(tunelab.pid), []
while not found and tunelab.poll() is None:
    try:
        found = [c.pid for c in watched.children() if "convert_hf_to_gguf.py" in " ".join(c.cmdline())]
    except psutil.Error:
        pass
    time.sleep(0.01)
if not found:
    print(json.dumps({"seen": False})); sys.exit()
tunelab.send_signal(signal.SIGKILL)
tunelab.wait()
_, status = os.waitpid(found[0], 0)  # the orphan is this process's child now
print(json.dumps({"seen": True, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                  "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}))
"""


def test_sigkill_during_conversion_kills_the_converter_too(run_copy):
    done = subprocess.run([sys.executable, "-c", DRIVER, *command(run_copy, "stage=export")], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    ended = json.loads(done.stdout.strip().splitlines()[-1])
    assert ended["seen"], "the export ended before its converter was seen"
    assert ended["signal"] == signal.SIGKILL, f"the converter outlived tunelab and ended on its own: {ended}"
    export = run_copy / "run/export"
    leftovers = [p.name for p in export.iterdir() if p.is_file()] if export.is_dir() else []
    assert all(n.endswith(".partial") for n in leftovers), leftovers  # never a .gguf, nothing that looks finished
