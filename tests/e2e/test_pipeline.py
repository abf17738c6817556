"""All four stages on a tiny random-init Llama built locally, through the real CLI, checked on disk."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def tunelab(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "tunelab", "experiment=smoke", f"paths.run_dir={tmp_path}/run",
           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_location={tmp_path}/artifacts",
           f"cache.dir={tmp_path}/stages", *overrides]  # a fresh stage cache: every stage really runs
    env = {**os.environ, "COLUMNS": "80"}  # the terminal tables' layout (checked below) depends on width
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    done = tunelab(tmp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return tmp, done


def mlflow_runs(tmp):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("smoke")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def artifact_json(client, run_id, path, into):
    return json.loads(Path(client.download_artifacts(run_id, path, str(into))).read_text())


def test_prepare_writes_sharegpt_jsonl(smoke_run):
    tmp, _ = smoke_run
    rows = [json.loads(l) for l in (tmp / "run/prepare/train.jsonl").read_text().splitlines()]
    evals = (tmp / "run/prepare/eval.jsonl").read_text().splitlines()
    assert len(rows) > 400 and len(evals) == 4
    assert [t["from"] for t in rows[0]["conversations"]] == ["system", "human", "gpt"]


def test_train_writes_a_trained_adapter(smoke_run):
    from safetensors.torch import load_file

    tmp, _ = smoke_run
    weights = load_file(tmp / "run/train/adapter/adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b)  # lora_B starts at zero: it was trained
    losses = [json.loads(l) for l in (tmp / "run/train/loss.jsonl").read_text().splitlines()]
    assert [s["step"] for s in losses] == [1, 2, 3]


def test_export_writes_ggufs_that_llama_cpp_loads_and_answers_with(smoke_run):
    from llama_cpp import Llama

    from tunelab.export.hf_folder import gguf_metadata

    tmp, _ = smoke_run
    for quant in ("f16", "q5_k_m"):
        path = tmp / f"run/export/model.{quant}.gguf"
        meta = gguf_metadata(path)
        assert meta["eos_token_id"] == 2  # <|im_end|>, the trained end of turn
        assert "<|im_start|>" in meta["chat_template"]
        llm = Llama(model_path=str(path), n_ctx=256, verbose=False)
        out = llm.create_chat_completion([{"role": "user", "content": "The topic is: Tea"}], max_tokens=8)
        assert out["usage"]["completion_tokens"] > 0
        assert out["choices"][0]["finish_reason"] in ("stop", "length")


def test_evaluate_scores_finetuned_and_base_per_gguf(smoke_run):
    tmp, done = smoke_run
    metrics = json.loads((tmp / "run/evaluate/metrics.json").read_text())
    assert set(metrics) == {"finetuned", "base"}
    for variant in metrics.values():
        assert set(variant) == {"f16", "q5_k_m"}
        assert 0.0 <= variant["f16"]["all_caps_rate"] <= 1.0
        assert variant["f16"]["perplexity"] > 1.0 and "kl_divergence" not in variant["f16"]  # f16 is the reference
        assert variant["q5_k_m"]["kl_divergence"] >= 0.0 and 0.0 <= variant["q5_k_m"]["top1_agreement"] <= 1.0
    speed = json.loads((tmp / "run/evaluate/summary.json").read_text())["speed"]
    assert all(s["gen_tokens_per_s"] > 0 and s["prompt_tokens_per_s"] > 0 for v in speed.values() for s in v.values())
    generations = (tmp / "run/evaluate/generations.jsonl").read_text().splitlines()
    assert len(generations) == 4 * 4
    assert "all caps rate" in done.stdout and "KL vs ref" in done.stdout and "run directory" in done.stdout
    assert "ship q5_k_m" in done.stdout or "broke the model" in done.stdout


def test_mlflow_holds_one_finished_run_with_metrics_and_artifacts(smoke_run):
    tmp, _ = smoke_run
    client, runs = mlflow_runs(tmp)
    run = runs[0]
    assert run.info.status == "FINISHED"
    identity = json.loads((tmp / "run/identity.json").read_text())
    assert run.data.tags["tunelab.config_hash"] == identity["config_hash"]
    assert run.data.params["lora.r"] == "16" and run.data.params["model.source"] == "tiny"
    assert "finetuned.q5_k_m.all_caps_rate" in run.data.metrics and "base.f16.success_rate" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "train.loss")) == 3
    assert "finetuned.q5_k_m.kl_divergence" in run.data.metrics and "base.f16.gen_tokens_per_s" in run.data.metrics
    timings = json.loads((tmp / "run/.tunelab/timings.json").read_text())  # each stage's wall time
    assert [k for k in timings if "." not in k] == ["prepare", "train", "export", "evaluate"]
    assert {"export.merge", "export.convert", "export.quantize", "export.gate", "export.base"} <= set(timings)
    assert all(timings[stage] > 0 for stage in ("prepare", "train", "export", "evaluate"))
    assert 0 < timings["export.convert"] < timings["export"] and timings["export.base"] >= 0  # base: maybe cached
    assert {f"seconds.{stage}": value for stage, value in timings.items()}.items() <= run.data.metrics.items()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "samples.json", "gguf", "plots", "adapter"} <= artifacts
    assert {"plots/quality_vs_size.png", "plots/train_loss.png"} <= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    samples = artifact_json(client, run.info.run_id, "samples.json", tmp)
    assert samples["columns"] == ["prompt", "reference", "base.f16", "base.q5_k_m", "finetuned.f16", "finetuned.q5_k_m"]
    report = artifact_json(client, run.info.run_id, "evaluate/report.json", tmp)
    assert [row[:2] for row in report["data"]] == [["finetuned", "f16"], ["finetuned", "q5_k_m"], ["base", "f16"], ["base", "q5_k_m"]]
    ggufs = {a.path for a in client.list_artifacts(run.info.run_id, "gguf")}
    assert ggufs == {"gguf/model.f16.gguf", "gguf/model.q5_k_m.gguf"}


def test_a_single_stage_reruns_from_the_run_directory(smoke_run):
    tmp, _ = smoke_run
    before = (tmp / "run/evaluate/metrics.json").read_text()
    done = tunelab(tmp, "stage=evaluate")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp / "run/evaluate/metrics.json").read_text() == before  # greedy decoding: same answers
    _, runs = mlflow_runs(tmp)
    assert runs[-1].data.tags["tunelab.stage"] == "evaluate" and runs[-1].info.status == "FINISHED"


def test_a_failing_stage_ends_its_mlflow_run_failed(tmp_path):
    done = tunelab(tmp_path, "stage=export")  # nothing trained in this run directory
    assert done.returncode != 0
    assert "run `tunelab stage=train` first" in done.stderr
    _, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED"]
