"""`tunelab runs` table logic, `tunelab reproduce`'s dataset check, the sweep objective check."""
from __future__ import annotations

import pytest

from tunelab.commands.reproduce import ReproduceError, check_dataset, compare, recompose
from tunelab.commands.runs import sort_runs
from tunelab.sweep_results import key_params
from tunelab.config.checks import ConfigError, validate
from tunelab.config.identity import config_hash
from tunelab.data.sources import dataset_sha256


def run(name, metric=None, **params):
    return {"name": name, "params": {"paths.run_dir": name, **params},
            "metrics": {} if metric is None else {"m": metric}, "tags": {}}


def test_key_params_are_the_ones_that_differ_except_paths():
    runs = [run("a", 1.0, **{"lora.r": "8", "seed": "1"}), run("b", 2.0, **{"lora.r": "16", "seed": "1"})]
    assert key_params(runs) == ["lora.r"]


def test_runs_sort_best_first_and_runs_without_the_metric_last():
    runs = [run("low", 0.1), run("failed"), run("high", 0.9), run("mid", 0.5)]
    assert [r["name"] for r in sort_runs(runs, "m", ascending=False)] == ["high", "mid", "low", "failed"]
    assert [r["name"] for r in sort_runs(runs, "m", ascending=True)] == ["low", "mid", "high", "failed"]


def test_reproduce_refuses_changed_dataset_bytes_and_names_dvc(compose_cfg, tmp_path):
    cfg = compose_cfg("experiment=smoke")
    original = {"tags": {"tunelab.dataset_sha256": dataset_sha256(cfg.dataset), "tunelab.git_commit": "abc123"}}
    assert check_dataset(cfg, original) == original["tags"]["tunelab.dataset_sha256"]
    changed = tmp_path / "train.csv"
    changed.write_bytes(open(cfg.dataset.path, "rb").read() + b"topic,TWEET\n")
    cfg.dataset.path = str(changed)
    with pytest.raises(ReproduceError, match=r"dataset bytes differ.*git checkout abc123 -- <file>.dvc && dvc checkout"):
        check_dataset(cfg, original)


def test_recompose_keeps_the_recorded_config_and_this_machines_paths(compose_cfg):
    from omegaconf import OmegaConf

    original = compose_cfg("experiment=smoke", "lora.r=4", "paths.run_dir=/far/away", "tracking.experiment=exp")
    here = compose_cfg("experiment=tweets", "tracking.uri=sqlite:///here.db")
    cfg = recompose(OmegaConf.to_yaml(original, resolve=True), here, [], reuse=False)
    assert config_hash(cfg, "d") == config_hash(original, "d")
    assert cfg.lora.r == 4 and cfg.paths.run_dir == "runs/reproduce/smoke"
    assert cfg.tracking.uri == "sqlite:///here.db" and cfg.tracking.experiment == "exp"
    assert cfg.cache.enabled is False


def test_compare_flags_every_difference_but_runtime():
    a = {"metrics": {"x": 1.0, "train.runtime_s": 3.0}, "tags": {"tunelab.adapter_sha256": "aa"}}
    b = {"metrics": {"x": 1.0, "train.runtime_s": 9.0}, "tags": {"tunelab.adapter_sha256": "aa"}}
    assert compare(a, b)[1] == []
    b["metrics"]["x"], b["tags"]["tunelab.adapter_sha256"] = 2.0, "bb"
    assert compare(a, b)[1] == ["x", "adapter sha256"]


def test_sweep_objective_must_name_an_evaluated_metric(compose_cfg):
    with pytest.raises(ConfigError, match="sweep.objective's quantization='q8_0'"):
        validate(compose_cfg("experiment=smoke", "sweep.objective=finetuned.q8_0.all_caps_rate"))
    with pytest.raises(ConfigError, match="must be <variant>.<quant>.<metric>"):
        validate(compose_cfg("experiment=smoke", "sweep.objective=all_caps_rate"))


def test_recompose_names_a_config_that_no_longer_fits_the_schema(compose_cfg):
    here = compose_cfg("experiment=smoke")
    with pytest.raises(ReproduceError, match=r"(?s)does not fit this tunelab.s config schema.*full_key: lora.rr"):
        recompose("name: smoke\nlora: {rr: 4}\ntracking: {experiment: smoke}\n", here, [], reuse=False)


def test_a_sweep_job_finds_its_parent_run_in_the_sweep_folder(tmp_path):
    from tunelab import sweep

    (tmp_path / "sweep/3").mkdir(parents=True)
    assert sweep.parent_run_id(str(tmp_path / "sweep/3")) is None
    (tmp_path / "sweep" / sweep.MARKER).write_text('{"parent_run_id": "abc"}')
    assert sweep.parent_run_id(str(tmp_path / "sweep/3")) == "abc"


def test_the_sweep_summary_shows_each_jobs_own_overrides_and_error(capsys, monkeypatch):
    from tunelab import sweep

    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal, so no cell is wrapped (pytest's is 80)

    def job(num, status, r, error=""):
        return {"run_id": num, "status": status, "metrics": {"m": 0.25} if status == "FINISHED" else {},
                "tags": {"tunelab.sweep_job": num, "tunelab.overrides": f"experiment=smoke lora.r={r}",
                         "tunelab.error": error, "tunelab.objective": "m"}}

    sweep.print_summary([job("0", "FAILED", 0, "ConfigError: invalid config:\n  - lora.r=0 must be >= 1"),
                         job("1", "FINISHED", 8)], "parent")
    out = capsys.readouterr()
    assert "2 jobs, 1 did not finish" in out.err and "lora.r=0 must be >= 1" in out.err
    assert "lora.r=8" in out.err and "experiment=smoke" not in out.err  # shared overrides are left out
    assert "0.25 (best)" in out.err and "best: job 1 (maximize m), run 1" in out.err
    assert "error/traceback.txt" in out.err  # a failed job logged its traceback
    sweep.print_summary([job("0", "KILLED", 8), job("1", "FINISHED", 16)], "parent")
    killed = capsys.readouterr().err
    assert "1 did not finish" in killed and "traceback" not in killed  # a killed job has none
