"""What a sweep's parent run shows: its jobs compared in one table, the best job by sweep.objective.

Pure functions over the job summaries that sweep_tracking.finish_sweep_run reads back from MLflow (no
MLflow here): a column table (logged as an MLflow table artifact), the best job, a Markdown
description for the parent run's page (the chart of the objective per job: tunelab.plots).
"""
from __future__ import annotations

import math
from typing import List, Optional

# Metrics of every job that the comparison table shows, besides the objective and the key params.
_TABLE_METRICS = ("train.final_loss", "train.runtime_s")
_EVAL_PREFIXES = ("finetuned.", "base.")
# Params that say where things went, not what was computed: never "key params".
_NOT_KEY = ("paths.", "tracking.", "cache.", "sweep.", "stage")


def key_params(runs: List[dict], limit: int = 6) -> List[str]:
    """The params whose values differ between the runs: what a comparison is about."""
    names = sorted({name for run in runs for name in run["params"] if not name.startswith(_NOT_KEY)})
    varying = [n for n in names if len({run["params"].get(n) for run in runs}) > 1]
    return varying[:limit]


def objective_value(job: dict) -> Optional[float]:
    """The job's value of its own sweep.objective (tag tunelab.objective), None if it has none."""
    value = job.get("metrics", {}).get(job["tags"].get("tunelab.objective", ""))
    return None if value is None or math.isnan(value) else float(value)


def own_overrides(jobs: List[dict]) -> List[str]:
    """Each job's overrides without those every job shares (e.g. experiment=tweets)."""
    overrides = [job["tags"].get("tunelab.overrides", "").split() for job in jobs]
    shared = set.intersection(*map(set, overrides)) if len(jobs) > 1 else set()
    return [" ".join(o for o in own if o not in shared) or "(none)" for own in overrides]


def ranked(jobs: List[dict], direction: str) -> List[dict]:
    """Jobs best first by their objective; jobs without a value (failed, killed) last, in job order."""
    sign = -1.0 if direction == "maximize" else 1.0

    def key(job):
        value = objective_value(job)
        return (1, 0.0) if value is None else (0, sign * value)

    return sorted(jobs, key=key)


def best_job(jobs: List[dict], direction: str) -> Optional[dict]:
    ordered = ranked(jobs, direction)
    return ordered[0] if ordered and objective_value(ordered[0]) is not None else None


def comparison_table(jobs: List[dict], direction: str) -> dict:
    """Columns (name -> values, one per job, best first): what tells the jobs apart and how they did."""
    ordered = ranked(jobs, direction)
    overrides = dict(zip((j["run_id"] for j in jobs), own_overrides(jobs)))
    params = key_params(jobs)
    metrics = sorted({m for j in jobs for m in j["metrics"] if m.startswith(_EVAL_PREFIXES)},
                     key=lambda m: (not m.startswith("finetuned."), m))  # the fine-tuned models first
    metrics = [m for m in _TABLE_METRICS if any(m in j["metrics"] for j in jobs)] + metrics
    names = ["rank", "job", "status", "overrides", "objective_value", "config_hash", *params, *metrics,
             "objective", "run_id"]  # what tells the jobs apart first; long, repeated values last
    columns = {name: [] for name in names}
    for rank, job in enumerate(ordered, 1):
        value = objective_value(job)
        row = {"rank": rank if value is not None else None, "job": job["tags"].get("tunelab.sweep_job", "?"),
               "status": job["status"], "overrides": overrides[job["run_id"]],
               "objective": job["tags"].get("tunelab.objective", ""), "objective_value": value,
               "config_hash": job["tags"].get("tunelab.config_hash", "")[:12], "run_id": job["run_id"],
               **{p: job["params"].get(p) for p in params}, **{m: job["metrics"].get(m) for m in metrics}}
        for name, cell in row.items():
            columns[name].append(cell)
    return columns


def description(table: dict, direction: str, failed: int) -> str:
    """Markdown for the parent run's page in the MLflow UI (its Description)."""
    rows = len(table["job"])
    lines = [f"**Sweep of {rows} job{'s' * (rows != 1)}** ({failed} did not finish); objective: "
             f"`{table['objective'][0] if rows else '-'}`, {direction}.", "",
             "| rank | job | status | overrides | objective | config hash |", "|---|---|---|---|---|---|"]
    for i in range(rows):
        value = table["objective_value"][i]
        lines.append(f"| {table['rank'][i] or '-'} | {table['job'][i]} | {table['status'][i]} | "
                     f"`{table['overrides'][i]}` | {'-' if value is None else f'{value:.4g}'} | "
                     f"`{table['config_hash'][i]}` |")
    lines += ["", "Full table: artifact `sweep/comparison.json`; chart: `plots/sweep_objective.png`."]
    return "\n".join(lines)
