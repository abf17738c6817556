"""The stage cache: which config change invalidates which stage, and a store/restore round trip."""
from __future__ import annotations

import json

import pytest

from tunelab.cache import StageCache, outputs_digest, stage_key
from tunelab.paths import RunPaths


@pytest.fixture
def fake_run(tmp_path):
    """A run directory whose stages wrote small stand-in outputs."""
    def write(run_dir, stage, files):
        for name, text in files.items():
            path = run_dir / stage / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    run_dir = tmp_path / "run"
    write(run_dir, "prepare", {"train.jsonl": "t\n", "eval.jsonl": "e\n", "manifest.json": "{}"})
    write(run_dir, "train", {"adapter/adapter_model.safetensors": "w", "loss.jsonl": "{}\n"})
    write(run_dir, "export", {"model.f16.gguf": "g", "manifest.json": json.dumps({"path": str(run_dir / "export")})})
    return RunPaths(run_dir, tmp_path / "models")


def keys(cfg, paths):
    return {stage: stage_key(stage, cfg, paths, "data-sha") for stage in ("prepare", "train", "export", "evaluate")}


def test_changing_only_the_quantization_changes_only_export_and_evaluate_keys(compose_cfg, fake_run):
    before = keys(compose_cfg("experiment=smoke"), fake_run)
    after = keys(compose_cfg("experiment=smoke", "quantization=f16"), fake_run)
    assert [s for s in before if before[s] != after[s]] == ["export", "evaluate"]


def test_keys_follow_their_own_config_and_inputs_not_paths_or_logging(compose_cfg, fake_run):
    base = keys(compose_cfg("experiment=smoke"), fake_run)
    lr = keys(compose_cfg("experiment=smoke", "training.learning_rate=1e-3"), fake_run)
    assert base["prepare"] == lr["prepare"] and base["train"] != lr["train"]
    moved = keys(compose_cfg("experiment=smoke", "paths.run_dir=elsewhere", "tracking=off"), fake_run)
    assert moved == base
    assert stage_key("prepare", compose_cfg("experiment=smoke"), fake_run, "other-data") != base["prepare"]
    (fake_run.run_dir / "train/adapter/adapter_model.safetensors").write_text("retrained")
    assert keys(compose_cfg("experiment=smoke"), fake_run)["export"] != base["export"]


def test_store_then_restore_into_another_run_dir_relocates_paths(compose_cfg, fake_run, tmp_path):
    cfg = compose_cfg("experiment=smoke", f"cache.dir={tmp_path}/stages")
    cache = StageCache(cfg.cache, fake_run)
    key = stage_key("export", cfg, fake_run, "d")
    assert cache.lookup("export", key) is None
    result = {"finetuned": {"f16": {"path": str(fake_run.run_dir / "export/model.f16.gguf")}}}
    digest = cache.store("export", key, result)
    assert digest == outputs_digest(fake_run.run_dir / "export", "export")

    other = RunPaths(tmp_path / "other", fake_run.cache_dir)
    other.run_dir.mkdir()
    restored = StageCache(cfg.cache, other).restore("export", key, cache.lookup("export", key))
    assert restored["finetuned"]["f16"]["path"] == str(other.run_dir / "export/model.f16.gguf")
    assert json.loads((other.run_dir / "export/manifest.json").read_text())["path"] == str(other.run_dir / "export")
    assert (other.run_dir / "export/model.f16.gguf").read_text() == "g"
    # the cached copy is untouched by the relocation, and a stage that re-runs never writes into it
    assert str(fake_run.run_dir) in (tmp_path / "stages/export" / key / "files/manifest.json").read_text()
    StageCache(cfg.cache, other).prepare_fresh("export")
    assert not (other.run_dir / "export").exists()
    assert (tmp_path / "stages/export" / key / "files/model.f16.gguf").read_text() == "g"


def test_a_disabled_cache_never_hits(compose_cfg, fake_run, tmp_path):
    cfg = compose_cfg("experiment=smoke", f"cache.dir={tmp_path}/stages", "cache.enabled=false")
    cache = StageCache(cfg.cache, fake_run)
    key = stage_key("prepare", cfg, fake_run, "d")
    cache.store("prepare", key, {})
    assert cache.lookup("prepare", key) is None and not (tmp_path / "stages").exists()
