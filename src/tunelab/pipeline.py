"""Runs the stages in order and owns the tracker: compose -> validate -> identity -> stages."""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from tunelab.config.checks import validate
from tunelab.config.distributed import resolve as resolve_distributed
from tunelab import rundir
from tunelab.cache import MODEL_INPUT, CacheCorruption, StageCache, model_digests, stage_inputs, stage_key
from tunelab.config.identity import config_hash, file_sha256
from tunelab.data.sources import dataset_sha256
from tunelab.eval.report import metric_columns, report_rows
from tunelab.export.llama_cpp import log_llama_cpp_to
from tunelab.paths import RunPaths
from tunelab.records import StageRecord, write_json_atomically
from tunelab.stages import evaluate, export, prepare, train
from tunelab.tracking import Tracker

STAGES = {
    "prepare": prepare.run,
    "train": train.run,
    "export": export.run,
    "evaluate": evaluate.run,
}
console = Console()


def run(cfg: DictConfig, parent_run_id: Optional[str] = None, extra_tags: Optional[dict] = None,
        sweep_job: bool = False) -> dict:
    """Run the configured stage(s) in one tracked run; a sweep job names its parent run. A single run
    checks its config and data (prepare) before its MLflow run starts: an input error creates none. A
    sweep job does that inside its run, which then ends FAILED with the reason beside the other jobs."""
    paths = RunPaths.from_config(cfg.paths)
    stages = list(STAGES) if cfg.stage == "all" else [cfg.stage]
    tags = {"tunelab.stage": cfg.stage, "tunelab.experiment": cfg.name, "tunelab.objective": cfg.sweep.objective,
            **(extra_tags or {})}
    if not sweep_job:
        validate(cfg)  # before the run directory is claimed: a config error leaves nothing behind
    tracker = Tracker(cfg.tracking)
    results = {}
    # Before anything is written or tracked: a directory in use, or holding the user's files, is refused.
    lock = rundir.claim(paths, cfg.paths.foreign_files == "keep", " ".join(["tunelab", *sys.argv[1:]]))
    if lock.took_over:
        console.print(f"[yellow]took over the lock of {paths.run_dir}[/]: its holder "
                      f"({rundir.describe_holder(lock.took_over)}) is no longer running")
    log_llama_cpp_to(paths.state_dir / "logs" / "llama_cpp.log")  # model loads' native log lines
    try:
        start = None if sweep_job else _start(cfg, paths, stages, results)
        with tracker.run(cfg, tags, run_name=cfg.name, parent_run_id=parent_run_id):
            start = start or _start(cfg, paths, stages, results)
            identity = start["identity"]
            tracker.set_tags({"tunelab.config_hash": identity, "tunelab.dataset_sha256": start["data_hash"],
                              "mlflow.runName": f"{cfg.name}-{identity[:8]}"})
            for stage in stages:
                if stage not in results:
                    console.rule(f"[bold]{stage}")
                    with _timed(paths, results, stage):
                        results[stage] = run_stage(stage, cfg, paths, start["cache"], start["data_hash"],
                                                   start["model"], results, tracker.reporter())
                tracker.log_stage(stage, results[stage], paths, cfg)
            # each stage's wall time (seconds.<stage>): where a run spends its time, comparable across runs
            tracker.reporter().log_metrics({f"seconds.{k}": v for k, v in results.get("seconds", {}).items()}, 0)
            tracker.set_tags(_outcome_tags(paths, results))
    finally:
        lock.release()
    results["config_hash"] = identity
    results["mlflow_run_id"] = tracker.run_id
    report(cfg, paths, results)
    return results


def _start(cfg: DictConfig, paths: RunPaths, stages, results: dict) -> dict:
    """Validate, write the run's config and identity, and run prepare (the data's check) when it is one
    of the stages; returns the config hash, the dataset hash, the stage cache and the model's digests."""
    validate(cfg)  # again for a sweep job (inside its run); cheap: no file is read
    resolve_distributed(cfg)  # nproc_per_node=auto -> the device count: hashed, recorded, given to the ranks
    data_hash = dataset_sha256(cfg.dataset)  # the same identity prepare's manifest records
    identity = config_hash(cfg, data_hash)
    (paths.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (paths.run_dir / "identity.json").write_text(json.dumps({"config_hash": identity, "dataset_sha256": data_hash}))
    start = {"identity": identity, "data_hash": data_hash, "cache": StageCache(cfg.cache, paths),
             "model": _model_inputs(cfg, paths, stages)}
    if "prepare" in stages:
        console.rule("[bold]prepare")
        with _timed(paths, results, "prepare"):
            results["prepare"] = run_stage("prepare", cfg, paths, start["cache"], data_hash, start["model"], results)
    return start


@contextmanager
def _timed(paths: RunPaths, results: dict, stage: str):
    """The stage's wall time (cache lookup, verification and store included), and its steps' where it
    reports them, in results["seconds"] and <run_dir>/.tunelab/timings.json (rewritten whole)."""
    started = time.monotonic()
    yield
    results.setdefault("seconds", {})[stage] = round(time.monotonic() - started, 3)
    if stage not in results.get("reused", []):  # a stage's own steps (export: merge, convert, ...)
        steps = (results.get(stage) or {}).get("seconds") or {}
        results["seconds"].update({f"{stage}.{step}": value for step, value in steps.items()})
    write_json_atomically(paths.state_dir / "timings.json", results["seconds"])


def _model_inputs(cfg: DictConfig, paths: RunPaths, stages) -> Optional[dict]:
    """Digests of the base model's files (tokenizer; weights), when a stage that runs reads them."""
    if not any(MODEL_INPUT[stage] for stage in stages):
        return None
    from tunelab.models.source import resolve_model

    return model_digests(resolve_model(cfg.model, paths))


def run_stage(stage: str, cfg: DictConfig, paths: RunPaths, cache: StageCache, data_hash: str,
              model: Optional[dict], results: dict, reporter=None):
    """Reuse the stage's cached outputs when its key matches (every byte verified on the way), else
    run it and cache what it wrote. A damaged entry is dropped and the stage runs. train streams its
    curve to the tracked run through reporter (tracking.Reporter) while it runs."""
    inputs = stage_inputs(stage, paths, data_hash, model, cfg.eval.gpu_layers)
    key = stage_key(stage, cfg, inputs)
    hit = cache.lookup(stage, key)
    if hit is not None:
        try:
            result = cache.restore(stage, key, hit)
        except CacheCorruption as err:
            console.print(f"[bold red]{err}[/]: running {stage} again")
            results.setdefault("cache_damaged", []).append(stage)
        else:
            console.print(f"[green]reused[/] {stage} from the cache (key {key[:12]}, computed {hit['created']} "
                          f"in {hit['run_dir']}; every file verified)")
            results.setdefault("reused", []).append(stage)
            return result
    StageRecord(paths, stage).begin(key)
    result = STAGES[stage](cfg, paths, reporter=reporter) if stage == "train" else STAGES[stage](cfg, paths)
    cache.store(stage, key, result, inputs)
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
    if results.get("seconds"):
        console.print("stage seconds   " + ", ".join(f"{k} {v:,.1f}" for k, v in results["seconds"].items()))
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
        against = f" (against {verdict['reference']})" if verdict["reference"] not in (None, quant) else ""
        lines.append(f"[bold red]{quant} broke the model[/]: " + "; ".join(verdict["reasons"][quant]) + against)
    decoding = summary.get("decoding") or {}
    if "flash_attention" in decoding:
        lines.append(f"decoded with {decoding['engine']}: greedy, flash attention {decoding['flash_attention']}, "
                     f"repeat penalty {decoding['repeat_penalty']:g}, n_ctx {decoding['n_ctx']}, at most "
                     f"{decoding['max_tokens']} tokens; `tunelab serve` serves with the same settings")
    if summary.get("kl_floor_unchecked"):
        lines.append("quantization.max_kl was not checked: eval.logit_metrics=false measures no KL divergence")
    if verdict["ship"] is None:
        lines.append("[bold red]no exported file holds up: do not ship this run[/]")
    else:
        note = "" if verdict["ship"] == summary["ship"] else f" instead of {summary['ship']}"
        scores = summary["metrics"]["finetuned"][verdict["ship"]]
        base = summary["metrics"].get("base", {}).get(verdict["ship"], {}).get(headline)
        versus = f" (base model: {base:.3f})" if base is not None else ""
        lines.append(f"[bold]ship {verdict['ship']}{note}[/]: {headline} {scores[headline]:.3f}{versus}  "
                     f"{verdict.get('ship_path') or ''}")
    return "\n".join(lines)


def metrics_table(summary: dict, width: int = None) -> Table:
    """One row per (model, GGUF type), columns: metrics (headline first), logit scores, size, speed.
    Where that is wider than the terminal, the same table transposed (one row per metric)."""
    rows, columns = report_rows(summary), metric_columns(summary)
    title = f"evaluation on {summary['eval_rows']} held-out rows (ship: {summary['ship']})"
    table = Table(title=title)
    for name in ("model", "quant", *columns, "status"):
        # spaces let rich wrap a long metric name instead of cutting it
        table.add_column(_title(name), justify="left" if name in ("model", "quant") else "right",
                         style="bold" if name == summary["headline"] else None)
    for row in rows:
        table.add_row(row["model"], row["quant"], *(_fmt(name, row[name]) for name in columns), row["status"],
                      style="red" if row["status"] == "BROKEN" else None)
    unclipped = console.options.update(max_width=10**6)
    if Measurement.get(console, unclipped, table).minimum <= (width or console.width):
        return table
    transposed = Table(title=title)
    transposed.add_column("metric")
    for row in rows:
        transposed.add_column(f"{row['model']}\n{row['quant']}", justify="right",
                              style="red" if row["status"] == "BROKEN" else None)
    for name in columns:
        transposed.add_row(_title(name).replace("\n", " "), *(_fmt(name, row[name]) for row in rows),
                           style="bold" if name == summary["headline"] else None)
    transposed.add_row("status", *(row["status"] for row in rows))
    return transposed


COLUMN_TITLES = {"file_size": "size MB", "prompt_tokens_per_s": "prompt tok/s", "gen_tokens_per_s": "gen tok/s",
                 "kl_divergence": "KL vs ref", "top1_agreement": "top-1 agree", "perplexity": "ppl (ref)"}


def _title(name: str) -> str:
    return COLUMN_TITLES.get(name, name.replace("_", " "))


def _fmt(name: str, value) -> str:
    if value is None:
        return "-"
    if name == "file_size":
        return f"{value / 1e6:,.1f}"
    if name == "kl_divergence":
        return f"{value:.4g}"
    return f"{value:.3f}" if isinstance(value, float) and 0.0 <= value <= 1.0 else f"{value:,.2f}"
