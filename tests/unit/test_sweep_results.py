"""The sweep's parent run: jobs compared best first, the best job per sweep.objective and direction."""
from __future__ import annotations

import pytest

from tunelab import plots, sweep_results
from tunelab.config.checks import ConfigError, validate

OBJECTIVE = "finetuned.q5_k_m.all_caps_rate"


def job(num, value=None, status="FINISHED", r=8, loss=1.0):
    metrics = {"train.final_loss": loss, "base.q5_k_m.all_caps_rate": 0.1}
    if value is not None:
        metrics[OBJECTIVE] = value
    return {"run_id": f"run{num}", "status": status, "params": {"lora.r": str(r), "seed": "1", "paths.run_dir": num},
            "metrics": metrics, "tags": {"tunelab.sweep_job": str(num), "tunelab.objective": OBJECTIVE,
                                         "tunelab.config_hash": f"{num}" * 64,
                                         "tunelab.overrides": f"experiment=tweets lora.r={r}"}}


JOBS = [job(0, 0.5, r=8), job(1, None, "FAILED", r=0), job(2, 0.9, r=16, loss=0.7), job(3, 0.2, r=32)]


@pytest.mark.parametrize("direction,order", [("maximize", ["2", "0", "3", "1"]), ("minimize", ["3", "0", "2", "1"])])
def test_the_table_ranks_jobs_by_the_objective_in_its_direction_failed_last(direction, order):
    table = sweep_results.comparison_table(JOBS, direction)
    assert table["job"] == order and table["rank"] == [1, 2, 3, None]
    assert sweep_results.best_job(JOBS, direction)["tags"]["tunelab.sweep_job"] == order[0]
    by_job = {j: i for i, j in enumerate(table["job"])}
    assert table["overrides"][by_job["2"]] == "lora.r=16"  # the shared experiment=tweets left out
    assert table["lora.r"][by_job["2"]] == "16" and "seed" not in table and "paths.run_dir" not in table
    assert table["train.final_loss"][by_job["2"]] == 0.7 and table["status"][by_job["1"]] == "FAILED"
    assert table["objective_value"][by_job["1"]] is None and table["config_hash"][by_job["3"]] == "3" * 12
    assert list(table)[:6] == ["rank", "job", "status", "overrides", "objective_value", "config_hash"]
    assert list(table).index(OBJECTIVE) < list(table).index("base.q5_k_m.all_caps_rate")
    assert len({len(column) for column in table.values()}) == 1


def test_no_best_job_when_none_finished():
    assert sweep_results.best_job([job(0, None, "FAILED"), job(1, float("nan"), "KILLED")], "maximize") is None


def test_the_description_and_chart_name_every_job():
    table = sweep_results.comparison_table(JOBS, "maximize")
    text = sweep_results.description(table, "maximize", failed=1)
    assert "Sweep of 4 jobs** (1 did not finish)" in text and f"`{OBJECTIVE}`, maximize" in text
    assert "| 1 | 2 | FINISHED | `lora.r=16` | 0.9 |" in text and "| - | 1 | FAILED | `lora.r=0` | - |" in text
    fig = plots.sweep_objective_figure(table, "maximize")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["0: lora.r=8", "1: lora.r=0", "2: lora.r=16", "3: lora.r=32"]
    assert [round(p.get_height(), 3) for p in fig.axes[0].patches] == [0.5, 0.0, 0.9, 0.2]


def test_sweep_direction_must_be_maximize_or_minimize(compose_cfg):
    with pytest.raises(ConfigError, match="sweep.direction='up'"):
        validate(compose_cfg("experiment=smoke", "sweep.direction=up"))
    validate(compose_cfg("experiment=smoke", "sweep.direction=minimize"))
