"""One source of defaults: the schema's defaults (tunelab.config.schema) are the values of the default
options (conf/config.yaml's defaults list), so a file of one's own that leaves a key out gets what
tunelab's own default has (it did not: 1 epoch instead of 2, no KL floor)."""
from __future__ import annotations

from omegaconf import MISSING, OmegaConf

from tunelab.config.schema import (Config, DatasetConfig, EvalConfig, LoraConfig, ModelConfig, QuantizationConfig,
                                   TemplateConfig, TrackingConfig, TrainingConfig)

# What an option is about (a dataset's file and columns, a task's metrics): no default can hold it.
OPTION_SPECIFIC = {
    "dataset": {"name", "path", "eval_path", "system_prompt", "user_template", "answer_column"},
    "eval": {"headline", "metrics"},
}
GROUPS = {"dataset": DatasetConfig, "model": ModelConfig, "lora": LoraConfig, "template": TemplateConfig,
          "quantization": QuantizationConfig, "training": TrainingConfig, "eval": EvalConfig,
          "tracking": TrackingConfig}


def drift(composed, schema_node, exempt) -> list:
    defaults = OmegaConf.to_container(OmegaConf.structured(schema_node))
    values = OmegaConf.to_container(composed, resolve=False)
    return [f"{key}: schema {defaults[key]!r}, default option {values.get(key)!r}"
            for key in defaults if key not in exempt and defaults[key] != MISSING and defaults[key] != values.get(key)]


def test_the_schema_defaults_are_the_default_options_values(compose_cfg):
    cfg = compose_cfg()
    problems = [f"{group}.{p}" for group, node in GROUPS.items()
                for p in drift(cfg[group], node, OPTION_SPECIFIC.get(group, set()))]
    root = {k: v for k, v in OmegaConf.to_container(OmegaConf.structured(Config)).items() if k in ("stage",)}
    problems += [f"{k}: schema {v!r}, config.yaml {cfg[k]!r}" for k, v in root.items() if cfg[k] != v]
    assert problems == []


def test_drift_is_found(compose_cfg):
    cfg = compose_cfg("training.epochs=3", "quantization.max_kl=null")
    assert [p.split(":")[0] for p in drift(cfg.training, TrainingConfig, set())] == ["epochs"]
    assert [p.split(":")[0] for p in drift(cfg.quantization, QuantizationConfig, set())] == ["max_kl"]


def test_a_file_of_ones_own_that_leaves_keys_out_gets_the_default_options_values(tmp_path, monkeypatch):
    from tunelab.config.compose import compose

    (tmp_path / "conf" / "training").mkdir(parents=True)
    (tmp_path / "conf" / "training" / "mine.yaml").write_text("learning_rate: 1.0e-4\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUNELAB_CONF", raising=False)
    mine, ours = compose(["training=mine"]), compose([])
    assert mine.training.learning_rate == 1e-4
    assert {k: v for k, v in mine.training.items() if k != "learning_rate"} == \
        {k: v for k, v in ours.training.items() if k != "learning_rate"}
    assert mine.quantization.max_kl == 0.25
