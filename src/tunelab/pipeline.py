"""Runs the stages in order and owns the tracker: compose -> validate -> identity -> stages."""
from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from tunelab.config.checks import validate
from tunelab.config.identity import config_hash
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


def run(cfg: DictConfig) -> dict:
    validate(cfg)
    paths = RunPaths.from_config(cfg.paths)
    data_hash = dataset_sha256(cfg.dataset)  # the same identity prepare's manifest records
    identity = config_hash(cfg, data_hash)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    (paths.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (paths.run_dir / "identity.json").write_text(json.dumps({"config_hash": identity, "dataset_sha256": data_hash}))
    stages = list(STAGES) if cfg.stage == "all" else [cfg.stage]
    tags = {"tunelab.config_hash": identity, "tunelab.dataset_sha256": data_hash, "tunelab.stage": cfg.stage,
            "tunelab.experiment": cfg.name}
    tracker = Tracker(cfg.tracking)
    results = {}
    with tracker.run(cfg, tags, run_name=f"{cfg.name}-{identity[:8]}"):
        for stage in stages:
            console.rule(f"[bold]{stage}")
            results[stage] = STAGES[stage](cfg, paths)
            tracker.log_stage(stage, results[stage], paths, cfg)
    results["config_hash"] = identity
    results["mlflow_run_id"] = tracker.run_id
    report(cfg, paths, results)
    return results


def report(cfg: DictConfig, paths: RunPaths, results: dict) -> None:
    console.rule("[bold]done")
    console.print(f"run directory   {paths.run_dir}")
    console.print(f"config hash     {results['config_hash']}")
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
