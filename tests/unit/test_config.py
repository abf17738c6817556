"""Every option of every group and every experiment composes and validates; typos name the key."""
from __future__ import annotations

import pytest
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError
from hydra.errors import ConfigCompositionException

from tunelab.config.checks import ConfigError, validate
from conftest import CONF, ROOT

GROUPS = ["dataset", "model", "lora", "template", "quantization", "training", "eval", "tracking", "paths"]
# Options that need a value only a user can give (a path) get one here.
REQUIRED = {
    ("dataset", "sharegpt"): [f"dataset.path={ROOT}/tests/data/sharegpt_valid.jsonl"],
    ("dataset", "openai"): [f"dataset.path={ROOT}/tests/data/openai_valid.jsonl"],
    ("dataset", "alpaca"): [f"dataset.path={ROOT}/tests/data/alpaca_valid.json"],
    ("dataset", "hf_disk"): [f"dataset.path={ROOT}/tests/data"],
    ("dataset", "hub"): ["dataset.path=org/name", "dataset.revision=0123abcd"],
    ("model", "local"): [f"model.path={ROOT}"],
}


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(compose_cfg, group, option):
    cfg = compose_cfg(f"{group}={option}", *REQUIRED.get((group, option), []))
    validate(cfg)
    assert cfg[group] is not None


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(compose_cfg, experiment):
    cfg = compose_cfg(f"experiment={experiment}")
    validate(cfg)
    assert cfg.name == experiment


def test_every_experiment_file_starts_with_the_command_that_runs_it():
    for path in (CONF / "experiment").glob("*.yaml"):
        head = path.read_text().splitlines()[:4]
        assert head[0] == "# @package _global_"
        assert any(f"tunelab experiment={path.stem}" in line for line in head), path


def test_a_typo_in_a_group_key_fails_at_compose_time_naming_the_full_key(compose_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("lora.rr=8")
    assert "lora.rr" in str(err.value.__cause__) or "lora.rr" in str(err.value)


def test_a_wrong_type_fails_at_compose_time_naming_the_key(compose_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("lora.r=sixteen")
    text = f"{err.value} {err.value.__cause__}"
    assert "lora.r" in text and "sixteen" in text


def test_a_typo_in_a_yaml_file_fails_naming_the_full_key(compose_cfg, tmp_path, monkeypatch):
    bad = CONF / "lora" / "zz_typo_test.yaml"
    bad.write_text("r: 8\nalpah: 16\n")
    try:
        with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError,
                            ConfigAttributeError)) as err:
            compose_cfg("lora=zz_typo_test")
        assert "lora.alpah" in f"{err.value} {err.value.__cause__}"
    finally:
        bad.unlink()


def test_validate_reports_every_problem_at_once(compose_cfg):
    cfg = compose_cfg("lora.r=0", "quantization.ship=q4_0", "training.backend=jax",
                      "dataset.path=missing.csv", "eval.headline=nope", "eval.temperature=0.7")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    keys = ["lora.r", "quantization.ship", "training.backend", "dataset.path", "eval.headline", "eval.temperature"]
    assert all(any(k in p for p in err.value.problems) for k in keys), err.value.problems
    assert len(err.value.problems) >= len(keys)
