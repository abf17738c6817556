"""Runs the stages in order and owns the tracker: compose -> validate -> identity -> stages."""
from __future__ import annotations

import json
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from tunelab.config.checks import validate
from tunelab.cache import StageCache, stage_key
from tunelab.config.identity import config_hash, file_sha256
from tunelab.data.sources import dataset_sha256
from tunelab.paths import RunPaths
from tunelab.stages import evaluate, export, prepare, train
from tunelab.tracking import Tracker

STAGES = {
    "prepare": prepare.run,
    "train": train.run,
    "export": export.run,
    "evaluate": evaluate.run,
}
console = Console()


def run(cfg: DictConfig, parent_run_id: Optional[str] = None, extra_tags: Optional[dict] = None) -> dict:
    """Run the configured stage(s) in one tracked run; a sweep job names its parent run."""
    paths = RunPaths.from_config(cfg.paths)
    stages = list(STAGES) if cfg.stage == "all" else [cfg.stage]
    tags = {"tunelab.stage": cfg.stage, "tunelab.experiment": cfg.name, "tunelab.objective": cfg.sweep.objective,
            **(extra_tags or {})}
    tracker = Tracker(cfg.tracking)
    results = {}
    with tracker.run(cfg, tags, run_name=cfg.name, parent_run_id=parent_run_id):
        validate(cfg)  # inside the run: a sweep job with a bad value ends FAILED with the reason
        data_hash = dataset_sha256(cfg.dataset)  # the same identity prepare's manifest records
        identity = config_hash(cfg, data_hash)
        tracker.set_tags({"tunelab.config_hash": identity, "tunelab.dataset_sha256": data_hash,
                          "mlflow.runName": f"{cfg.name}-{identity[:8]}"})
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        (paths.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (paths.run_dir / "identity.json").write_text(json.dumps({"config_hash": identity, "dataset_sha256": data_hash}))
        cache = StageCache(cfg.cache, paths)
        for stage in stages:
            console.rule(f"[bold]{stage}")
            results[stage] = run_stage(stage, cfg, paths, cache, data_hash, results)
            tracker.log_stage(stage, results[stage], paths, cfg)
        tracker.set_tags(_outcome_tags(paths, results))
    results["config_hash"] = identity
    results["mlflow_run_id"] = tracker.run_id
    report(cfg, paths, results)
    return results


def run_stage(stage: str, cfg: DictConfig, paths: RunPaths, cache: StageCache, data_hash: str, results: dict):
    """Reuse the stage's cached outputs when its key matches, else run it and cache what it wrote."""
    key = stage_key(stage, cfg, paths, data_hash)
    hit = cache.lookup(stage, key)
    if hit is not None:
        console.print(f"[green]reused[/] {stage} from the cache (key {key[:12]}, computed {hit['created']} "
                      f"in {hit['run_dir']})")
        results.setdefault("reused", []).append(stage)
        return cache.restore(stage, key, hit)
    cache.prepare_fresh(stage)
    result = STAGES[stage](cfg, paths)
    cache.store(stage, key, result)
    return result


def _outcome_tags(paths: RunPaths, results: dict) -> dict:
    tags = {"tunelab.reused_stages": ",".join(results.get("reused", [])) or "none"}
    adapter = paths.adapter_dir / "adapter_model.safetensors"
    if adapter.is_file():
        tags["tunelab.adapter_sha256"] = file_sha256(adapter)
    return tags


def objective_value(cfg: DictConfig, results: dict) -> Optional[float]:
    """The value of sweep.objective (<variant>.<quant>.<metric>) in this run's evaluation, if it ran."""
    if "evaluate" not in results:
        return None
    variant, quant, metric = cfg.sweep.objective.split(".", 2)  # checked by check_sweep
    return float(results["evaluate"]["metrics"][variant][quant][metric])


def report(cfg: DictConfig, paths: RunPaths, results: dict) -> None:
    console.rule("[bold]done")
    console.print(f"run directory   {paths.run_dir}")
    console.print(f"config hash     {results['config_hash']}")
    if results.get("reused"):
        console.print(f"reused          {', '.join(results['reused'])} (unchanged config, inputs and code)")
    if results.get("mlflow_run_id"):
        console.print(f"MLflow run      {results['mlflow_run_id']}  (mlflow ui --backend-store-uri {cfg.tracking.uri})")
    if "export" in results:
        for quant, info in results["export"]["finetuned"].items():
            console.print(f"GGUF {quant:<10} {info['path']}  ({info['bytes'] / 1e6:.1f} MB)")
    if "evaluate" in results:
        console.print(metrics_table(results["evaluate"]))
        console.print(verdict_lines(results["evaluate"]))


def verdict_lines(summary: dict) -> str:
    verdict, headline = summary["verdict"], summary["headline"]
    lines = []
    for quant in verdict["broken"]:
        lines.append(f"[bold red]{quant} broke the model[/]: its {headline} is below {verdict['floor']:.3f} "
                     f"({verdict['reference']} minus quantization.max_drop)")
    if verdict["ship"] is None:
        lines.append("[bold red]no exported file holds up: do not ship this run[/]")
    else:
        note = "" if verdict["ship"] == summary["ship"] else f" instead of {summary['ship']}"
        scores = summary["metrics"]["finetuned"][verdict["ship"]]
        base = summary["metrics"].get("base", {}).get(verdict["ship"], {}).get(headline)
        versus = f" (base model: {base:.3f})" if base is not None else ""
        lines.append(f"[bold]ship {verdict['ship']}{note}[/]: {headline} {scores[headline]:.3f}{versus}")
    return "\n".join(lines)


def metrics_table(summary: dict) -> Table:
    """One row per metric, one column per (model, GGUF type): fits a terminal."""
    metrics = summary["metrics"]
    columns = [(variant, quant) for variant, per_quant in metrics.items() for quant in per_quant]
    table = Table(title=f"evaluation on {summary['eval_rows']} held-out rows (ship: {summary['ship']})")
    table.add_column("metric")
    for variant, quant in columns:
        table.add_column(f"{variant}\n{quant}", justify="right")
    for name in metrics[columns[0][0]][columns[0][1]]:
        style = "bold" if name == summary["headline"] else None
        table.add_row(name, *(_fmt(metrics[v][q][name]) for v, q in columns), style=style)
    return table


def _fmt(value) -> str:
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return f"{value:.3f}"
    return f"{value / 1e6:,.1f} MB" if value >= 1e5 else f"{value:.2f}"
