"""One MLflow run per pipeline execution (a sweep's parent run: sweep_tracking.py, the only other
module that imports mlflow), and reading runs back from the store.

Stages write files; the pipeline hands each stage's result here, and this module decides what of
it becomes params, metrics, tags and artifacts. A run always ends FINISHED, FAILED or KILLED:
an exception logs its traceback and ends FAILED; Ctrl-C or SIGTERM end KILLED; a run left RUNNING
by a process that died (SIGKILL) is marked KILLED by the next tunelab command that opens the store.
"""
from __future__ import annotations

import json
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

from omegaconf import DictConfig, OmegaConf

from tunelab import plots, runstate
from tunelab.paths import RunPaths
from tunelab.provenance import dataset_files, git_state, package_versions


def flatten(data, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


def client_for(tracking_cfg):
    """A client on the configured store, after marking runs of dead processes KILLED."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_cfg.uri)
    client = MlflowClient(tracking_uri=tracking_cfg.uri)
    mark_stale_runs(client)
    return client


def experiment_id(client, tracking_cfg, name: Optional[str] = None) -> str:
    name = name or tracking_cfg.experiment
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_uri(tracking_cfg.artifact_location, name))


def mark_stale_runs(client) -> List[str]:
    """RUNNING runs whose process (on this host) is gone end KILLED; returns their ids."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    stale = []
    if not experiments:
        return stale
    for run in client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if "tunelab.pid" in tags and runstate.process_gone(tags.get("tunelab.host", ""), tags["tunelab.pid"],
                                                          tags.get("tunelab.pid_started", "")):
            client.set_tag(run.info.run_id, "tunelab.ended_by", f"process {tags['tunelab.pid']} was gone")
            client.set_terminated(run.info.run_id, status="KILLED")
            stale.append(run.info.run_id)
    return stale


def origin_tags(cfg=None) -> dict:
    process, git = runstate.this_process(), git_state(dataset_files(cfg))
    tags = {"tunelab.host": process["host"], "tunelab.pid": process["pid"], "tunelab.pid_started": process["started"],
            "tunelab.git_commit": git["commit"], "tunelab.git_dirty": git["dirty"]}
    tags.update({f"tunelab.version.{name}": version for name, version in package_versions().items()})
    return tags


def _log_failure(client, run_id: str) -> None:
    """The traceback as an artifact and the error as a tag; never hides the original error."""
    try:
        client.log_text(run_id, traceback.format_exc(), "error/traceback.txt")
        client.set_tag(run_id, "tunelab.error", traceback.format_exc(limit=0).strip()[-4000:])
    except Exception:  # noqa: BLE001 - the store may be the thing that failed
        pass


class Reporter:
    """What a stage may send to the tracked run while it runs (the live training curve, tags), without
    importing mlflow. run_id is None when tracking is off; then every call does nothing. A store that
    fails mid-training is reported once and not retried: the curve is also in loss.jsonl."""

    def __init__(self, run_id: Optional[str]):
        self.run_id = run_id
        self._broken = False

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.run_id is None:  # untracked: mlflow may not even be installed (the bare GPU box)
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._call(lambda client: client.log_batch(
            self.run_id, metrics=[Metric(key, float(value), now, int(step)) for key, value in metrics.items()]))

    def set_tags(self, tags: dict) -> None:
        self._call(lambda client: [client.set_tag(self.run_id, key, str(value)) for key, value in tags.items()])

    def _call(self, send) -> None:
        if self.run_id is None or self._broken:
            return
        from mlflow.tracking import MlflowClient

        try:
            send(MlflowClient())
        except Exception as err:  # noqa: BLE001 - the training goes on; the run shows what it got
            self._broken = True
            print(f"tunelab: WARNING: the tracking store failed ({type(err).__name__}: {err}); "
                  "the rest of this run's live curve is in train/loss.jsonl only", flush=True)


class Tracker:
    def __init__(self, tracking_cfg):
        self.cfg = tracking_cfg
        self.run_id: Optional[str] = None

    @contextmanager
    def run(self, cfg: DictConfig, tags: dict, run_name: str, parent_run_id: Optional[str] = None):
        if not self.cfg.enabled:
            with runstate.sigterm_raises():
                yield self
            return
        import mlflow

        client = client_for(self.cfg)
        tags = {**tags, **origin_tags(cfg), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
        active = mlflow.start_run(experiment_id=experiment_id(client, self.cfg), run_name=run_name, tags=tags)
        self.run_id = active.info.run_id
        status = "FAILED"
        try:
            with runstate.sigterm_raises():
                resolved = OmegaConf.to_container(cfg, resolve=True)
                mlflow.log_params(flatten(resolved))
                mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
                yield self
            status = "FINISHED"
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (runstate.Terminated)
            status = "KILLED"
            raise
        except BaseException:
            _log_failure(client, self.run_id)
            raise
        finally:
            mlflow.end_run(status=status)

    def reporter(self) -> Reporter:
        """For a stage to stream to this run while it runs (a no-op one when tracking is off)."""
        return Reporter(self.run_id if self.cfg.enabled else None)

    def set_tags(self, tags: dict) -> None:
        if self.run_id:
            import mlflow

            mlflow.set_tags(tags)

    def log_stage(self, stage: str, result: dict, paths: RunPaths, cfg: DictConfig) -> None:
        if not self.cfg.enabled:
            return
        getattr(self, f"_log_{stage}")(result, paths, cfg)

    def _log_prepare(self, result, paths, cfg):
        import mlflow

        counts = ("rows_in", "rows_out", "rows_quarantined", "rows_trimmed", "train_rows", "eval_rows")
        mlflow.log_metrics({f"data.{key}": result[key] for key in counts if key in result})
        mlflow.set_tag("tunelab.dataset_sha256", result["dataset_sha256"])
        mlflow.log_artifact(str(paths.data_manifest), "prepare")
        quarantined = paths.prepare_dir / "quarantine.jsonl"
        if quarantined.is_file():
            mlflow.log_artifact(str(quarantined), "prepare")

    def _log_train(self, result, paths, cfg):
        import mlflow
        from mlflow.entities import Metric

        # The curve itself (train.loss, ...) was streamed while training ran (Reporter); a train
        # stage restored from the cache did not run here, so its curve is logged from loss.jsonl.
        steps = [json.loads(line) for line in paths.loss_log.read_text().splitlines()] if paths.loss_log.exists() else []
        if steps and not self._has_curve():
            from tunelab.training.callbacks import curve_metrics

            mlflow.tracking.MlflowClient().log_batch(self.run_id, metrics=[
                Metric(key, value, 0, s["step"]) for s in steps for key, value in curve_metrics(s).items()])
        if steps:
            mlflow.log_figure(plots.loss_figure(steps), "plots/train_loss.png")
        if result.get("resumed_from"):
            mlflow.log_dict(result["resumed_from"], "train/resumed_from.json")
        mlflow.set_tags({f"tunelab.{key}": str(result[key]) for key in
                         ("backend", "backend_reason", "gradient_checkpointing", "gradient_checkpointing_reason",
                          "distributed", "world_size", "nnodes")
                         if key in result})
        final = result.get("final_loss", steps[-1]["loss"] if steps else float("nan"))  # a summary from before final_loss
        mlflow.log_metrics({"train.final_loss": final, "train.mean_loss": result["train_loss"], "train.steps": result["steps"],
                            "train.runtime_s": result["train_runtime_s"] or 0.0})
        mlflow.log_artifacts(str(paths.adapter_dir), "adapter")
        mlflow.log_metric("train.eot_loss_tokens", result.get("eot_loss_tokens", 0))
        if result.get("added_tokens"):  # special tokens the template needed, added and trained
            mlflow.set_tag("tunelab.added_tokens", json.dumps(result["added_tokens"]))

    def _has_curve(self) -> bool:
        import mlflow

        return "train.loss" in mlflow.tracking.MlflowClient().get_run(self.run_id).data.metrics

    def _log_export(self, result, paths, cfg):
        import mlflow

        mlflow.log_dict(result, "export_manifest.json")
        for quant, info in result["finetuned"].items():
            mlflow.log_metric(f"gguf.{quant}.bytes", info["bytes"])
            if self.cfg.log_gguf:
                mlflow.log_artifact(info["path"], "gguf")
        for modelfile in result.get("modelfiles", {}).values():
            mlflow.log_artifact(modelfile, "ollama")

    def _log_evaluate(self, result, paths, cfg):
        import mlflow

        from tunelab.eval.report import quality_size_figure, report_rows, side_by_side

        rows = report_rows(result)
        mlflow.log_metrics({f"{row['model']}.{row['quant']}.{name}": value for row in rows
                            for name, value in row.items() if isinstance(value, (int, float))})
        verdict = result["verdict"]
        mlflow.set_tags({"tunelab.ship": str(verdict["ship"]), "tunelab.broken_quantizations": ",".join(verdict["broken"])})
        mlflow.log_table({key: [row[key] for row in rows] for key in rows[0]}, "evaluate/report.json")
        mlflow.log_figure(quality_size_figure(result), "plots/quality_vs_size.png")
        generations = [json.loads(line) for line in paths.generations_jsonl.read_text().splitlines()]
        if generations:
            mlflow.log_table(side_by_side(generations, cfg.eval.samples_to_log), "samples.json")
        mlflow.log_artifact(str(paths.metrics_json), "evaluate")
        mlflow.log_artifact(str(paths.evaluation_summary), "evaluate")


# --- reading runs back (tunelab runs, tunelab reproduce) ---

def run_summary(run) -> dict:
    return {"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
            "start_time": run.info.start_time, "experiment_id": run.info.experiment_id,
            "tags": dict(run.data.tags), "params": dict(run.data.params), "metrics": dict(run.data.metrics)}


def list_runs(tracking_cfg, experiment: str) -> List[dict]:
    """The runs of one experiment, newest first (stale RUNNING ones marked KILLED first)."""
    client = client_for(tracking_cfg)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=5000)
    return [run_summary(r) for r in runs]


def find_runs_by_hash(tracking_cfg, prefix: str) -> List[dict]:
    """Runs, in any experiment, whose config hash starts with prefix (a hex string), newest first."""
    client = client_for(tracking_cfg)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(experiments, f"tags.`tunelab.config_hash` LIKE '{prefix}%'",
                              order_by=["attributes.start_time DESC"], max_results=5000)
    return [run_summary(r) for r in runs]


def get_run(tracking_cfg, run_id: str) -> dict:
    from mlflow.tracking import MlflowClient

    return run_summary(MlflowClient(tracking_uri=tracking_cfg.uri).get_run(run_id))


def read_artifact_text(tracking_cfg, run_id: str, artifact_path: str) -> str:
    import tempfile

    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        local = MlflowClient(tracking_uri=tracking_cfg.uri).download_artifacts(run_id, artifact_path, tmp)
        return Path(local).read_text()


def _artifact_uri(location: Optional[str], experiment: str) -> Optional[str]:
    if not location:
        return None
    return (Path(location).resolve() / experiment).as_uri()
