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
