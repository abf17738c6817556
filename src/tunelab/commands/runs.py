"""`tunelab runs [overrides] [--sort METRIC] [--asc] [--limit N] [--metric M ...]`: the runs of an
experiment in a terminal table, with their config hash, the params that differ between them and
their metrics, sorted by a metric (default: sweep.objective, best first). Without `experiment=`:
every experiment in the store with its runs counted by status.

The overrides pick the experiment and the store as for `tunelab`: `tunelab runs experiment=smoke`,
`tunelab runs tracking.uri=sqlite:///other.db`.
"""
from __future__ import annotations

import argparse
import math
from datetime import datetime
from typing import List

from tunelab.sweep_results import key_params

# Overrides that pick which experiment's runs are listed.
_PICKS_EXPERIMENT = ("experiment", "name", "tracking.experiment")
_STATUSES = ("FINISHED", "FAILED", "KILLED", "RUNNING")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. experiment=smoke")
    parser.add_argument("--sort", help="metric to sort by (default: the runs' sweep.objective)")
    parser.add_argument("--asc", action="store_true", help="smallest first (e.g. for a loss)")
    parser.add_argument("--metric", action="append", default=[], help="another metric column (repeatable)")
    parser.add_argument("--limit", type=int, default=30, help="at most this many runs (default 30)")
    parser.add_argument("--all", action="store_true", help="include sweep parent runs")
    return parser


def sort_runs(runs: List[dict], metric: str, ascending: bool) -> List[dict]:
    """Runs with the metric first, best first; runs without it (failed, killed) at the end."""
    def key(run):
        value = run["metrics"].get(metric)
        if value is None or math.isnan(value):
            return (1, 0.0)
        return (0, value if ascending else -value)

    return sorted(runs, key=key)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def why(run: dict) -> str:
    """What ended a run that did not finish: the error's last line (FAILED) or what killed it."""
    error = run["tags"].get("tunelab.error", "").strip()
    return error.splitlines()[-1] if error else run["tags"].get("tunelab.ended_by", "")


def render(runs: List[dict], experiment: str, sort: str, metrics: List[str]):
    from rich.table import Table

    params = key_params(runs)
    table = Table(title=f"experiment {experiment}: {len(runs)} runs, sorted by {sort}")
    for column in ("run", "status", "hash", "started"):  # never cut (min_width): params and metrics fold
        table.add_column(column, no_wrap=True, min_width=len("FINISHED") if column == "status" else len(column))
    for column in (*params, *metrics):
        table.add_column(column, justify="right" if column in metrics else "left", overflow="fold")
    for run in runs:
        started = datetime.fromtimestamp(run["start_time"] / 1000).strftime("%m-%d %H:%M")
        table.add_row(run["run_id"][:8], run["status"], run["tags"].get("tunelab.config_hash", "")[:8], started,
                      *(_fmt(run["params"].get(p)) for p in params),
                      *(_fmt(run["metrics"].get(m)) for m in metrics),
                      style="bold" if run is runs[0] and run["metrics"].get(sort) is not None else None)
    return table


def not_finished(runs: List[dict]) -> List[str]:
    """One line per listed run that did not finish: its id, status and why, printed whole under the table."""
    return [f"{run['run_id'][:8]} {run['status']}: {why(run) or '(no reason recorded)'}"
            for run in runs if run["status"] != "FINISHED"]


def picks_experiment(overrides: List[str]) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] in _PICKS_EXPERIMENT for o in overrides)


def experiment_counts(tracking_cfg, include_sweeps: bool) -> List[dict]:
    """Every experiment in the store that has runs, with its runs counted by status, newest first."""
    from mlflow.tracking import MlflowClient

    from tunelab import tracking

    client = MlflowClient(tracking_uri=tracking_cfg.uri)
    tracking.mark_stale_runs(client)
    out = []
    for experiment in client.search_experiments():
        runs = [r for r in client.search_runs([experiment.experiment_id], max_results=50000)
                if include_sweeps or r.data.tags.get("tunelab.kind") != "sweep"]
        if runs:
            counts = {status: sum(r.info.status == status for r in runs) for status in _STATUSES}
            out.append({"experiment": experiment.name, "runs": len(runs), **counts,
                        "last": max(r.info.start_time for r in runs)})
    return sorted(out, key=lambda e: -e["last"])


def render_counts(experiments: List[dict], uri: str):
    from rich.table import Table

    table = Table(title=f"{len(experiments)} experiment(s) in {uri}; "
                        "`tunelab runs experiment=<name>` lists one's runs")
    for column in ("experiment", "runs", *(s.lower() for s in _STATUSES), "last run"):
        table.add_column(column, no_wrap=True, justify="left" if column in ("experiment", "last run") else "right")
    for e in experiments:
        last = datetime.fromtimestamp(e["last"] / 1000).strftime("%Y-%m-%d %H:%M")
        table.add_row(e["experiment"], str(e["runs"]), *(str(e[s]) for s in _STATUSES), last)
    return table


def _overview(cfg, args) -> int:
    from rich.console import Console

    experiments = experiment_counts(cfg.tracking, args.all)
    if not experiments:
        Console(stderr=True).print(f"no runs in {cfg.tracking.uri}", soft_wrap=True)
        return 1
    Console().print(render_counts(experiments, cfg.tracking.uri))
    return 0


def main(argv: List[str]) -> int:
    from rich.console import Console

    from tunelab import tracking
    from tunelab.config.compose import compose

    args = _parser().parse_args(argv)
    cfg = compose(args.overrides)
    if not picks_experiment(args.overrides):
        return _overview(cfg, args)
    experiment = cfg.tracking.experiment
    runs = tracking.list_runs(cfg.tracking, experiment)
    if not args.all:
        runs = [r for r in runs if r["tags"].get("tunelab.kind") != "sweep"]
    if not runs:
        others = ", ".join(f"{e['experiment']} ({e['runs']})" for e in experiment_counts(cfg.tracking, args.all))
        Console(stderr=True).print(f"no runs of experiment {experiment!r} in {cfg.tracking.uri}"
                                   + (f"; experiments with runs: {others}" if others else ""), soft_wrap=True)
        return 1
    sort = args.sort or runs[0]["tags"].get("tunelab.objective") or cfg.sweep.objective
    shown = sort_runs(runs, sort, args.asc)[: args.limit]
    metrics = list(dict.fromkeys([sort, *args.metric]))
    console = Console()
    console.print(render(shown, experiment, sort, metrics))
    for line in not_finished(shown):
        console.print(line, soft_wrap=True, highlight=False, markup=False)
    return 0
