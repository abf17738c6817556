"""`tunelab runs [overrides] [--sort METRIC] [--asc] [--limit N] [--metric M ...]`: the runs of an
experiment in a terminal table, with their config hash, the params that differ between them and
their metrics, sorted by a metric (default: sweep.objective, best first).

The overrides pick the experiment and the store as for `tunelab`: `tunelab runs experiment=smoke`,
`tunelab runs tracking.uri=sqlite:///other.db`.
"""
from __future__ import annotations

import argparse
import math
from datetime import datetime
from typing import List

from tunelab.sweep_results import key_params


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


def render(runs: List[dict], experiment: str, sort: str, metrics: List[str]):
    from rich.table import Table

    params = key_params(runs)
    table = Table(title=f"experiment {experiment}: {len(runs)} runs, sorted by {sort}")
    for column in ("run", "status", "hash", "started", *params, *metrics):
        table.add_column(column, justify="right" if column in metrics else "left", no_wrap=column in ("run", "status", "hash", "started"))
    for run in runs:
        started = datetime.fromtimestamp(run["start_time"] / 1000).strftime("%m-%d %H:%M")
        table.add_row(run["run_id"][:8], run["status"], run["tags"].get("tunelab.config_hash", "")[:8], started,
                      *(_fmt(run["params"].get(p)) for p in params),
                      *(_fmt(run["metrics"].get(m)) for m in metrics),
                      style="bold" if run is runs[0] and run["metrics"].get(sort) is not None else None)
    return table


def main(argv: List[str]) -> int:
    from rich.console import Console

    from tunelab import tracking
    from tunelab.config.compose import compose

    args = _parser().parse_args(argv)
    cfg = compose(args.overrides)
    experiment = cfg.tracking.experiment
    runs = tracking.list_runs(cfg.tracking, experiment)
    if not args.all:
        runs = [r for r in runs if r["tags"].get("tunelab.kind") != "sweep"]
    if not runs:
        Console(stderr=True).print(f"no runs of experiment {experiment!r} in {cfg.tracking.uri}")
        return 1
    sort = args.sort or runs[0]["tags"].get("tunelab.objective") or cfg.sweep.objective
    shown = sort_runs(runs, sort, args.asc)[: args.limit]
    metrics = list(dict.fromkeys([sort, *args.metric]))
    Console().print(render(shown, experiment, sort, metrics))
    return 0
