"""The corpus of broken inputs (tests/data/broken/cases.yaml) through the prepare stage.

Strict (default): each case fails naming exactly its problems as file:line + reason, and writes
nothing. Quarantine: each invalid row is dropped with a record naming it, and the counts add up;
whole-file problems still fail.
"""
from __future__ import annotations

import json

import pytest
import yaml

from tunelab.config.checks import validate
from tunelab.config.schema import SourceConfig
from tunelab.data.formats import DataError
from tunelab.paths import RunPaths
from tunelab.stages import prepare
from conftest import ROOT

BROKEN = ROOT / "tests/data/broken"
CASES = yaml.safe_load((BROKEN / "cases.yaml").read_text())
HELDOUT = ROOT / "data/tweets/heldout.csv"


def expected(case):
    return [f"{BROKEN}/{line}" for line in case["expect"]]


def base_cfg(compose_cfg, tmp_path, case):
    overrides = [f"{k}={v}" for k, v in case.get("overrides", {}).items()]
    cfg = compose_cfg("experiment=smoke", f"paths.run_dir={tmp_path}/run", "dataset.max_eval_rows=null",
                      "dataset.eval_fraction=0.5", *overrides)
    return cfg, RunPaths.from_config(cfg.paths)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_broken_input_fails_naming_every_problem_and_writes_nothing(compose_cfg, tmp_path, name):
    case = CASES[name]
    cfg, paths = base_cfg(compose_cfg, tmp_path, case)
    cfg.dataset.format, cfg.dataset.path = case["format"], str(BROKEN / name)
    cfg.dataset.eval_path = str(BROKEN / case["eval"]) if "eval" in case else None
    validate(cfg)
    with pytest.raises(DataError) as err:
        prepare.run(cfg, paths)
    problems = [p for p in err.value.problems if p.startswith(str(BROKEN))]
    assert len(problems) == len(case["expect"]), "\n".join(problems)
    for problem, want in zip(problems, expected(case)):
        assert problem.startswith(want), (problem, want)
    assert not paths.prepare_dir.exists() and not list(tmp_path.glob("run/.prepare-*"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_quarantine_records_every_dropped_row_or_refuses_whole_file_problems(compose_cfg, tmp_path, name):
    case = CASES[name]
    cfg, paths = base_cfg(compose_cfg, tmp_path, case)
    mapping = {k: cfg.dataset[k] for k in ("system_prompt", "user_template", "answer_column")}
    cfg.dataset.path, cfg.dataset.on_invalid = None, "quarantine"
    cfg.dataset.sources = [SourceConfig(format=case["format"], path=str(BROKEN / name), **mapping)]
    cfg.dataset.eval_path = str(BROKEN / case["eval"]) if "eval" in case else str(HELDOUT)
    validate(cfg)
    if case.get("fatal"):
        with pytest.raises(DataError, match="cannot be quarantined"):
            prepare.run(cfg, paths)
        assert not paths.prepare_dir.exists()
        return
    manifest = prepare.run(cfg, paths)
    records = [json.loads(line) for line in (paths.prepare_dir / "quarantine.jsonl").read_text().splitlines()]
    wanted = [line.rsplit(": ", 1) for line in expected(case)]
    assert sorted((r["where"], r["reasons"][0]) for r in records) == sorted((w, r) for w, r in wanted)
    assert all(r["row"] for r in records)  # the row as read, to fix and re-add
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_quarantined"] > manifest["rows_out"]
    kept = paths.train_jsonl.read_text() + paths.eval_jsonl.read_text()
    assert len(kept.splitlines()) == manifest["rows_out"]
