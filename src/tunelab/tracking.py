"""The only module that imports mlflow. One MLflow run per pipeline execution.

Stages write files; the pipeline hands each stage's result here, and this module decides what of
it becomes params, metrics, tags and artifacts. A run always ends FINISHED, FAILED or KILLED.
"""
from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from tunelab.paths import RunPaths


def flatten(data, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


class Tracker:
    def __init__(self, tracking_cfg):
        self.cfg = tracking_cfg
        self.run_id: Optional[str] = None

    @contextmanager
    def run(self, cfg: DictConfig, tags: dict, run_name: str):
        if not self.cfg.enabled:
            yield self
            return
        import mlflow

        mlflow.set_tracking_uri(self.cfg.uri)
        experiment = mlflow.get_experiment_by_name(self.cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(
            self.cfg.experiment, artifact_location=_artifact_uri(self.cfg.artifact_location, self.cfg.experiment))
        active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
        self.run_id = active.info.run_id
        status = "FAILED"
        try:
            resolved = OmegaConf.to_container(cfg, resolve=True)
            mlflow.log_params(flatten(resolved))
            mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            yield self
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            mlflow.end_run(status=status)

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

        steps = [json.loads(line) for line in paths.loss_log.read_text().splitlines()] if paths.loss_log.exists() else []
        metrics = [Metric("train.loss", s["loss"], 0, s["step"]) for s in steps]
        metrics += [Metric("train.learning_rate", s["learning_rate"], 0, s["step"]) for s in steps if "learning_rate" in s]
        if metrics:
            mlflow.tracking.MlflowClient().log_batch(self.run_id, metrics=metrics)
            mlflow.log_figure(_loss_figure(steps), "plots/train_loss.png")
        mlflow.set_tags({f"tunelab.{key}": str(result[key]) for key in
                         ("backend", "backend_reason", "gradient_checkpointing", "gradient_checkpointing_reason")
                         if key in result})
        mlflow.log_metrics({"train.final_loss": result["train_loss"], "train.steps": result["steps"],
                            "train.runtime_s": result["train_runtime_s"] or 0.0})
        mlflow.log_artifacts(str(paths.adapter_dir), "adapter")
        mlflow.log_metric("train.eot_loss_tokens", result.get("eot_loss_tokens", 0))
        if result.get("added_tokens"):  # special tokens the template needed, added and trained
            mlflow.set_tag("tunelab.added_tokens", json.dumps(result["added_tokens"]))

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

        flat = {f"{variant}.{quant}.{name}": value
                for variant, per_quant in result["metrics"].items()
                for quant, scores in per_quant.items() for name, value in scores.items()}
        mlflow.log_metrics(flat)
        verdict = result["verdict"]
        mlflow.set_tags({"tunelab.ship": str(verdict["ship"]), "tunelab.broken_quantizations": ",".join(verdict["broken"])})
        rows = [json.loads(line) for line in paths.generations_jsonl.read_text().splitlines()]
        per_file, keep = Counter(), []
        for row in rows:
            per_file[(row["variant"], row["quant"])] += 1
            if per_file[(row["variant"], row["quant"])] <= cfg.eval.samples_to_log:
                keep.append(row)
        if keep:
            mlflow.log_table({key: [row[key] for row in keep] for key in keep[0]}, "samples.json")
        mlflow.log_artifact(str(paths.metrics_json), "evaluate")


def _artifact_uri(location: Optional[str], experiment: str) -> Optional[str]:
    if not location:
        return None
    return (Path(location).resolve() / experiment).as_uri()


def _loss_figure(steps):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (assistant tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig
