from omegaconf import OmegaConf

from tunelab.config.identity import config_hash


def test_hash_is_stable_across_key_order_and_ignores_paths_and_tracking():
    a = OmegaConf.create({"lora": {"r": 8, "alpha": 16}, "paths": {"run_dir": "a"}, "tracking": {"uri": "x"}})
    b = OmegaConf.create({"tracking": {"uri": "y"}, "paths": {"run_dir": "b"}, "lora": {"alpha": 16, "r": 8}})
    assert config_hash(a, "d") == config_hash(b, "d")


def test_hash_changes_with_a_value_or_the_data():
    a = OmegaConf.create({"lora": {"r": 8}})
    assert config_hash(a, "d") != config_hash(OmegaConf.create({"lora": {"r": 16}}), "d")
    assert config_hash(a, "d") != config_hash(a, "e")


def test_hash_ignores_logging_caching_and_the_sweep_objective():
    a = OmegaConf.create({"training": {"lr": 1, "logging_steps": 5}, "eval": {"samples_to_log": 20},
                          "cache": {"enabled": True}, "sweep": {"objective": "x"}})
    b = OmegaConf.create({"training": {"lr": 1, "logging_steps": 1}, "eval": {"samples_to_log": 4},
                          "cache": {"enabled": False}, "sweep": {"objective": "y"}})
    assert config_hash(a, "d") == config_hash(b, "d")
    b.training.lr = 2
    assert config_hash(a, "d") != config_hash(b, "d")
