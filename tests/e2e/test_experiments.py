"""Sweeps, cached stages, reproduction by hash and `tunelab runs`, through the real CLI on the tiny
smoke experiment, with MLflow in a temporary store (read back through a real MLflow server's REST API)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.slow


def tunelab(tmp, *args):
    """`tunelab <args> experiment=smoke` with tracking and the stage cache inside tmp."""
    cmd = [sys.executable, "-m", "tunelab", *args, "experiment=smoke", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
           f"tracking.artifact_location={tmp}/artifacts", f"cache.dir={tmp}/stages"]
    env = {**os.environ, "COLUMNS": "250"}  # a wide "terminal": tables are not cut
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def ok(done):
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def runs_of(tmp, experiment="smoke"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One tracked smoke run: what the other tests reuse, reproduce and sweep around."""
    tmp = tmp_path_factory.mktemp("lab")
    ok(tunelab(tmp, f"paths.run_dir={tmp}/first"))
    return tmp


def test_an_unchanged_rerun_reuses_every_stage_and_logs_the_same_results(lab):
    done = ok(tunelab(lab, f"paths.run_dir={lab}/first"))
    assert "reused          prepare, train, export, evaluate" in " ".join(done.stdout.split("\n"))
    client, runs = runs_of(lab)
    first, again = runs[0], runs[-1]
    assert again.data.tags["tunelab.reused_stages"] == "prepare,train,export,evaluate"
    assert again.data.tags["tunelab.config_hash"] == first.data.tags["tunelab.config_hash"]
    evals = {k: v for k, v in first.data.metrics.items() if k.startswith(("finetuned.", "base."))}
    assert evals and all(again.data.metrics[k] == v for k, v in evals.items())
    assert len(client.get_metric_history(again.info.run_id, "train.loss")) == 3


def test_changing_only_the_quantization_reruns_only_export_and_evaluate(lab):
    done = ok(tunelab(lab, f"paths.run_dir={lab}/f16", "quantization=f16"))
    assert "reused prepare" in done.stdout and "reused train" in done.stdout
    assert "reused export" not in done.stdout and "reused evaluate" not in done.stdout
    assert sorted(p.name for p in (lab / "f16/export").glob("*.gguf")) == ["model.f16.gguf"]
    _, runs = runs_of(lab)
    assert runs[-1].data.tags["tunelab.reused_stages"] == "prepare,train"


def test_reproduce_by_hash_prefix_gives_identical_adapter_and_metrics(lab):
    _, runs = runs_of(lab)
    original = runs[0]
    prefix = original.data.tags["tunelab.config_hash"][:10]
    done = ok(tunelab(lab, "reproduce", prefix, f"paths.run_dir={lab}/repro"))
    assert "adapter weights are identical" in done.stdout and "DIFFERS" not in done.stdout
    assert "reused" not in done.stdout  # it computed everything again
    _, runs = runs_of(lab)
    again, same_hash = runs[-1], [r for r in runs[:-1] if r.data.tags.get("tunelab.config_hash", "").startswith(prefix)]
    assert again.data.tags["tunelab.reproduces"] in {r.info.run_id for r in same_hash}  # the newest of them
    assert again.data.tags["tunelab.config_hash"] == original.data.tags["tunelab.config_hash"]
    assert again.data.tags["tunelab.adapter_sha256"] == original.data.tags["tunelab.adapter_sha256"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(lab):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{lab}/mlflow.db", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    yield base
    server.terminate()
    server.wait(timeout=30)


def rest(base, endpoint, body=None, **query):
    url = f"{base}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def test_a_sweep_with_a_failing_job_finishes_the_others_and_reads_back_over_rest(lab, mlflow_server):
    done = tunelab(lab, "-m", "lora.r=0,16", f"hydra.sweep.dir={lab}/sweep")
    assert done.returncode != 0
    assert "1 did not finish" in done.stderr and "lora.r=0" in done.stderr and "lora.r=0 must be >= 1" in done.stderr
    assert (lab / "sweep/1/evaluate/metrics.json").is_file() and not (lab / "sweep/0/train").exists()

    experiment = rest(mlflow_server, "experiments/get-by-name", experiment_name="smoke")["experiment"]
    ids = [experiment["experiment_id"]]
    parents = rest(mlflow_server, "runs/search", {"experiment_ids": ids,
                                                  "filter": "tags.`tunelab.kind` = 'sweep'"})["runs"]
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FAILED"
    parent_id = parents[0]["info"]["run_id"]
    children = rest(mlflow_server, "runs/search", {"experiment_ids": ids,
                                                   "filter": f"tags.mlflow.parentRunId = '{parent_id}'"})["runs"]
    by_status = {c["info"]["status"]: c for c in children}
    assert sorted(by_status) == ["FAILED", "FINISHED"]
    tags = {t["key"]: t["value"] for t in by_status["FINISHED"]["data"]["tags"]}
    assert "lora.r=16" in tags["tunelab.overrides"] and len(tags["tunelab.config_hash"]) == 64
    assert tags["tunelab.git_commit"] and tags["tunelab.version.torch"] and tags["tunelab.dataset_sha256"]
    metrics = {m["key"] for m in by_status["FINISHED"]["data"]["metrics"]}
    assert {"finetuned.q5_k_m.all_caps_rate", "base.f16.all_caps_rate", "train.loss"} <= metrics
    history = rest(mlflow_server, "metrics/get-history", run_id=by_status["FINISHED"]["info"]["run_id"],
                   metric_key="train.loss")["metrics"]
    assert [m["step"] for m in history] == [1, 2, 3]
    failed_id = by_status["FAILED"]["info"]["run_id"]
    files = rest(mlflow_server, "artifacts/list", run_id=failed_id, path="error").get("files", [])
    assert [f["path"] for f in files] == ["error/traceback.txt"]


def test_a_sweep_through_submitit_runs_each_job_in_its_own_process_and_folder(lab):
    ok(tunelab(lab, "-m", "hydra/launcher=local_processes", "quantization=default,f16",
               f"hydra.sweep.dir={lab}/submitit"))
    client, runs = runs_of(lab)
    parent = [r for r in runs if r.data.tags.get("tunelab.sweep_dir") == str(lab / "submitit")][0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and [c.info.status for c in children] == ["FINISHED"] * 2
    assert {c.data.tags["tunelab.pid"] for c in children}.isdisjoint({parent.data.tags["tunelab.pid"]})
    assert all((lab / f"submitit/{n}/evaluate/metrics.json").is_file() for n in (0, 1))


def test_the_optuna_sweeper_optimises_the_configured_eval_metric(lab):
    ok(tunelab(lab, "-m", "hydra/sweeper=tunelab_optuna", "hydra.sweeper.n_trials=2",
               "quantization=choice(default,f16)", f"hydra.sweep.dir={lab}/optuna"))
    result = yaml.safe_load((lab / "optuna/optimization_results.yaml").read_text())
    _, runs = runs_of(lab)
    parent = [r for r in runs if r.data.tags.get("tunelab.sweep_dir") == str(lab / "optuna")][0]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    values = [t.data.metrics[t.data.tags["tunelab.objective"]] for t in trials]
    assert len(trials) == 2 and result["best_value"] == max(values)


def test_runs_prints_a_sorted_table_and_hashes(lab):
    done = ok(tunelab(lab, "runs", "--metric", "train.final_loss", "--limit", "50"))
    _, runs = runs_of(lab)
    jobs = [r for r in runs if r.data.tags.get("tunelab.kind") != "sweep"]
    assert "sorted by finetuned.q5_k_m.all_caps_rate" in done.stdout and "train.final_loss" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("│ ") and line.split()[1] != "│"]  # not folded lines
    assert sorted(row.split()[1] for row in rows) == sorted(r.info.run_id[:8] for r in jobs)
    for run in jobs:
        row = next(row for row in rows if row.split()[1] == run.info.run_id[:8])
        assert run.info.status in row and run.data.tags.get("tunelab.config_hash", "")[:8] in row


def test_a_parallel_sweep_runs_its_jobs_at_once_in_worker_processes_and_compares_them(tmp_path):
    ok(tunelab(tmp_path, "-m", "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2", "training.threads=1",
               "eval.threads=1", "lora.r=4,8", f"hydra.sweep.dir={tmp_path}/sweep"))
    client, runs = runs_of(tmp_path)
    [parent] = [r for r in runs if r.data.tags.get("tunelab.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and [c.info.status for c in children] == ["FINISHED"] * 2
    assert sorted(o for c in children for o in c.data.tags["tunelab.overrides"].split() if o.startswith("lora.r=")) \
        == ["lora.r=4", "lora.r=8"]
    hashes = {c.data.tags["tunelab.config_hash"] for c in children}
    assert len(hashes) == 2 and all(len(h) == 64 for h in hashes)
    pids = {c.data.tags["tunelab.pid"] for c in children}
    assert len(pids) == 2 and parent.data.tags["tunelab.pid"] not in pids  # two worker processes
    assert max(c.info.start_time for c in children) < min(c.info.end_time for c in children)  # at once

    # The parent run compares them: a table best first, the best job's objective, a chart.
    objective = children[0].data.tags["tunelab.objective"]
    values = {c.info.run_id: c.data.metrics[objective] for c in children}
    assert parent.data.metrics[f"best.{objective}"] == max(values.values())
    assert values[parent.data.tags["tunelab.best_run_id"]] == max(values.values())
    table = json.loads(open(client.download_artifacts(parent.info.run_id, "sweep/comparison.json", str(tmp_path))).read())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [row["run_id"] for row in rows][0] == parent.data.tags["tunelab.best_run_id"]
    assert {row["run_id"]: row["objective_value"] for row in rows} == values
    assert {row["config_hash"] for row in rows} == {h[:12] for h in hashes} and {row["lora.r"] for row in rows} == {"4", "8"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} == {"plots/sweep_objective.png"}
    assert "**Sweep of 2 jobs** (0 did not finish)" in parent.data.tags["mlflow.note.content"]
