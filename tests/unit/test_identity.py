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


def _dataset_cfg(**dataset):
    return OmegaConf.create({"lora": {"r": 8}, "dataset": {"format": "csv", "eval_path": None, "sources": [],
                                                           **dataset}})


def test_hash_is_the_same_for_a_dataset_path_spelled_absolute_or_relative(tmp_path, monkeypatch):
    from tunelab.data.sources import dataset_sha256

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.csv").write_text("topic,tweet\nTea,TEA.\n")
    (tmp_path / "data" / "held.csv").write_text("topic,tweet\nCoffee,COFFEE.\n")
    monkeypatch.chdir(tmp_path)
    spellings = [("data/d.csv", "data/held.csv"), (str(tmp_path / "data/d.csv"), "./data/../data/held.csv")]
    hashes = set()
    for path, eval_path in spellings:
        cfg = _dataset_cfg(path=path, eval_path=eval_path)
        hashes.add(config_hash(cfg, dataset_sha256(cfg.dataset)))
    assert len(hashes) == 1
    (tmp_path / "data" / "d.csv").write_text("topic,tweet\nTea,TEA!\n")  # other bytes, same path
    cfg = _dataset_cfg(path="data/d.csv", eval_path="data/held.csv")
    assert config_hash(cfg, dataset_sha256(cfg.dataset)) not in hashes


def test_hash_keeps_a_hub_id_whether_eval_path_is_set_and_each_source_path():
    hub = _dataset_cfg(format="hub", path="org/a", revision="abc")
    assert config_hash(hub, "d") != config_hash(_dataset_cfg(format="hub", path="org/b", revision="abc"), "d")
    assert config_hash(_dataset_cfg(path="a.csv"), "d") != config_hash(_dataset_cfg(path="a.csv", eval_path="b.csv"), "d")
    mixed = [{"format": "csv", "path": "a.csv"}, {"format": "hub", "path": "org/x", "revision": "1"}]
    other = [{"format": "csv", "path": "/abs/a.csv"}, {"format": "hub", "path": "org/x", "revision": "1"}]
    assert config_hash(_dataset_cfg(sources=mixed), "d") == config_hash(_dataset_cfg(sources=other), "d")
    other[1]["path"] = "org/y"
    assert config_hash(_dataset_cfg(sources=mixed), "d") != config_hash(_dataset_cfg(sources=other), "d")
