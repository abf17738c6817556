"""A sweep's parent run in MLflow (`tunelab -m ...`): started when the sweep starts, the jobs nested
under it (mlflow.parentRunId), ended with their comparison when the sweep ends. With tracking.py, the
only module that imports mlflow; tunelab.sweep drives it, tunelab.sweep_results computes what it logs."""
from __future__ import annotations

import time
from typing import List

from tunelab import plots, sweep_results
from tunelab.tracking import client_for, experiment_id, origin_tags, run_summary


def start_sweep_run(tracking_cfg, run_name: str, tags: dict) -> str:
    client = client_for(tracking_cfg)
    run = client.create_run(experiment_id(client, tracking_cfg), run_name=run_name,
                            tags={**tags, **origin_tags(), "tunelab.kind": "sweep"})
    return run.info.run_id


def finish_sweep_run(tracking_cfg, parent_run_id: str, interrupted: bool) -> List[dict]:
    """End the parent run (FAILED if any job did not finish, KILLED if interrupted); returns the jobs."""
    client = client_for(tracking_cfg)
    parent = client.get_run(parent_run_id)
    jobs = [run_summary(r) for r in _child_runs(client, parent)]
    failed = [job for job in jobs if job["status"] != "FINISHED"]
    try:
        client.log_dict(parent_run_id, {"jobs": jobs}, "sweep_summary.json")
        client.set_tag(parent_run_id, "tunelab.jobs", str(len(jobs)))
        client.set_tag(parent_run_id, "tunelab.failed_jobs", str(len(failed)))
        if jobs:
            _log_sweep_results(client, parent, jobs, len(failed))
    finally:  # whatever went wrong above, the parent run does not stay RUNNING
        client.set_terminated(parent_run_id, status="KILLED" if interrupted else "FAILED" if failed else "FINISHED")
    return jobs


def _log_sweep_results(client, parent, jobs: List[dict], failed: int) -> None:
    """The jobs compared on the parent run: table, best job (tags and metric), chart, description."""
    from mlflow.entities import Metric

    run_id, direction = parent.info.run_id, parent.data.tags.get("tunelab.objective_direction", "maximize")
    table = sweep_results.comparison_table(jobs, direction)
    client.log_table(run_id, table, "sweep/comparison.json")
    client.log_figure(run_id, plots.sweep_objective_figure(table, direction), "plots/sweep_objective.png")
    client.set_tag(run_id, "mlflow.note.content", sweep_results.description(table, direction, failed))
    now = int(time.time() * 1000)
    values = [Metric("sweep.objective", value, now, int(job)) for job, value in
              zip(table["job"], table["objective_value"]) if value is not None and job.isdigit()]
    client.log_batch(run_id, metrics=values)
    best = sweep_results.best_job(jobs, direction)
    if best is None:
        return
    objective = best["tags"]["tunelab.objective"]
    client.log_metric(run_id, f"best.{objective}", sweep_results.objective_value(best))
    for key, value in {"best_run_id": best["run_id"], "best_job": best["tags"].get("tunelab.sweep_job", ""),
                       "best_config_hash": best["tags"].get("tunelab.config_hash", ""),
                       "best_overrides": best["tags"].get("tunelab.overrides", ""), "objective": objective}.items():
        client.set_tag(run_id, f"tunelab.{key}", value)


def running_jobs(tracking_cfg, parent_run_id: str) -> dict:
    """The sweep's child runs still RUNNING: run id -> the pid of the process running it."""
    client = client_for(tracking_cfg)
    runs = _child_runs(client, client.get_run(parent_run_id), "and attributes.status = 'RUNNING'")
    return {r.info.run_id: int(r.data.tags["tunelab.pid"]) for r in runs if r.data.tags.get("tunelab.pid", "").isdigit()}


def _child_runs(client, parent, extra_filter: str = ""):
    """The sweep's job runs (nested under `parent`), oldest first; extra_filter narrows them."""
    return client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent.info.run_id}' {extra_filter}".strip(),
                              order_by=["attributes.start_time ASC"], max_results=10000)
