"""The stage cache: which change invalidates which stage, and that no stored or restored byte is
trusted unverified (copies, not links; flipped bytes detected, the entry and its descendants dropped)."""
from __future__ import annotations

import json
import multiprocessing

import pytest

from tunelab.cache import CacheCorruption, StageCache, model_digests, stage_inputs, stage_key
from tunelab.paths import RunPaths
from tunelab.records import IntegrityError, StageRecord, file_entries

STAGES = ("prepare", "train", "export", "evaluate")
MODEL = {"tokenizer": "tok-sha", "model": "weights-sha"}


def write(run_dir, stage, files):
    for name, text in files.items():
        path = run_dir / stage / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def fake_run(tmp_path):
    """A run directory whose stages wrote small stand-in outputs, each with its complete record."""
    run_dir = tmp_path / "run"
    paths = RunPaths(run_dir, tmp_path / "models")
    write(run_dir, "prepare", {"train.jsonl": "t\n", "eval.jsonl": "e\n", "manifest.json": "{}"})
    write(run_dir, "train", {"adapter/adapter_model.safetensors": "w", "loss.jsonl": "{}\n"})
    write(run_dir, "export", {"model.f16.gguf": "g", "manifest.json": json.dumps({"path": str(run_dir / "export")})})
    write(run_dir, "evaluate", {"metrics.json": "{}", "generations.jsonl": "\n"})
    for stage in STAGES:
        StageRecord(paths, stage).complete("k", file_entries(run_dir / stage))
    return paths


def keys(cfg, paths, data="data-sha", model=MODEL):
    return {stage: stage_key(stage, cfg, stage_inputs(stage, paths, data, model)) for stage in STAGES}


def changed(before, after):
    return [s for s in before if before[s] != after[s]]


def test_changing_only_the_quantization_changes_only_export_and_evaluate_keys(compose_cfg, fake_run):
    before = keys(compose_cfg("experiment=smoke"), fake_run)
    assert changed(before, keys(compose_cfg("experiment=smoke", "quantization=f16"), fake_run)) == ["export", "evaluate"]


def test_prepare_key_covers_the_dataset_tokenizer_template_and_length_limit(compose_cfg, fake_run):
    cfg = compose_cfg("experiment=smoke")
    base = keys(cfg, fake_run)
    assert "prepare" in changed(base, keys(cfg, fake_run, data="other-data"))
    assert "prepare" in changed(base, keys(cfg, fake_run, model={**MODEL, "tokenizer": "new-tokenizer"}))
    assert "prepare" in changed(base, keys(compose_cfg("experiment=smoke", "template=chatml"), fake_run))
    assert "prepare" in changed(base, keys(compose_cfg("experiment=smoke", "training.max_seq_length=128"), fake_run))
    # how special-token text in messages is tokenized: prepare's length check and training
    escape = keys(compose_cfg("experiment=smoke", "dataset.special_tokens_in_text=escape"), fake_run)
    assert changed(base, escape) == ["prepare", "train"]
    # the weights are not read by prepare (only by train and export)
    assert changed(base, keys(cfg, fake_run, model={**MODEL, "model": "new-weights"})) == ["train", "export"]


def test_keys_follow_their_own_config_and_the_bytes_of_their_inputs(compose_cfg, fake_run):
    base = keys(compose_cfg("experiment=smoke"), fake_run)
    assert changed(base, keys(compose_cfg("experiment=smoke", "training.learning_rate=1e-3"), fake_run)) == ["train"]
    assert changed(base, keys(compose_cfg("experiment=smoke", "paths.run_dir=elsewhere", "tracking=off"),
                              fake_run)) == []
    assert changed(base, keys(compose_cfg("experiment=smoke", "training.save_steps=7", "training.resume=never",
                                          "training.keep_checkpoints=5"), fake_run)) == []
    adapter = fake_run.run_dir / "train/adapter/adapter_model.safetensors"
    adapter.write_text("retrained")
    with pytest.raises(IntegrityError, match="train/adapter/adapter_model.safetensors changed"):
        keys(compose_cfg("experiment=smoke"), fake_run)  # the record no longer matches the bytes
    StageRecord(fake_run, "train").complete("k2", file_entries(fake_run.run_dir / "train"))
    assert changed(base, keys(compose_cfg("experiment=smoke"), fake_run)) == ["export"]


def test_model_digests_separate_the_tokenizer_from_the_weights(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "model.safetensors").write_text("w1")
    first = model_digests(tmp_path)
    (tmp_path / "model.safetensors").write_text("w2")
    second = model_digests(tmp_path)
    assert first["tokenizer"] == second["tokenizer"] and first["model"] != second["model"]


def store(cfg, paths, stage="export"):
    cache = StageCache(cfg.cache, paths)
    key = stage_key(stage, cfg, stage_inputs(stage, paths, "d", MODEL))
    result = {"finetuned": {"f16": {"path": str(paths.run_dir / "export/model.f16.gguf")}}}
    cache.store(stage, key, result, stage_inputs(stage, paths, "d", MODEL))
    return cache, key


def test_restore_into_another_run_dir_copies_verified_bytes_and_relocates_paths(compose_cfg, fake_run, tmp_path):
    cfg = compose_cfg("experiment=smoke", f"cache.dir={tmp_path}/stages")
    cache, key = store(cfg, fake_run)
    stored = tmp_path / "stages/export" / key / "files"
    assert str(fake_run.run_dir) in (stored / "manifest.json").read_text()
    other = RunPaths(tmp_path / "other", tmp_path / "models")
    restored = StageCache(cfg.cache, other).restore("export", key, cache.lookup("export", key))
    assert restored["finetuned"]["f16"]["path"] == str(other.run_dir / "export/model.f16.gguf")
    assert json.loads((other.run_dir / "export/manifest.json").read_text())["path"] == str(other.run_dir / "export")
    gguf = other.run_dir / "export/model.f16.gguf"
    assert gguf.read_text() == "g" and gguf.stat().st_nlink == 1  # a copy: not linked to the cache
    assert gguf.stat().st_ino != (stored / "model.f16.gguf").stat().st_ino
    with open(gguf, "r+") as handle:  # an in-place write in the run directory...
        handle.write("X")
    assert (stored / "model.f16.gguf").read_text() == "g"  # ...does not reach the cache
    assert StageRecord(other, "export").complete_record()["key"] == key
    assert str(fake_run.run_dir) in (stored / "manifest.json").read_text()  # the entry keeps its own paths


def test_flipped_bytes_in_an_entry_drop_it_and_every_entry_made_from_it(compose_cfg, fake_run, tmp_path):
    cfg = compose_cfg("experiment=smoke", f"cache.dir={tmp_path}/stages")
    cache, train_key = store(cfg, fake_run, "train")
    _, export_key = store(cfg, fake_run, "export")  # made from the train outputs (their digest)
    _, evaluate_key = store(cfg, fake_run, "evaluate")
    (tmp_path / "stages/train" / train_key / "files/adapter/adapter_model.safetensors").write_text("W")
    other = RunPaths(tmp_path / "other", tmp_path / "models")
    with pytest.raises(CacheCorruption, match=r"cached train stage .* adapter/adapter_model.safetensors"):
        StageCache(cfg.cache, other).restore("train", train_key, cache.lookup("train", train_key))
    assert cache.lookup("train", train_key) is None and cache.lookup("export", export_key) is None
    assert cache.lookup("evaluate", evaluate_key) is None  # made from export's outputs, dropped in turn
    assert not (other.run_dir / "train").exists()  # nothing half-restored


def test_an_unchanged_run_dir_is_verified_in_place_and_a_changed_one_restored(compose_cfg, fake_run, tmp_path):
    cfg = compose_cfg("experiment=smoke", f"cache.dir={tmp_path}/stages")
    cache, key = store(cfg, fake_run)
    gguf = fake_run.run_dir / "export/model.f16.gguf"
    inode = gguf.stat().st_ino
    cache.restore("export", key, cache.lookup("export", key))
    assert gguf.stat().st_ino == inode  # the same bytes were there: nothing copied
    gguf.write_text("swapped")
    cache.restore("export", key, cache.lookup("export", key))
    assert gguf.read_text() == "g" and StageRecord(fake_run, "export").verify()


def _store_in_a_process(cache_dir, run_dir, text, key, started):
    from omegaconf import OmegaConf

    paths = RunPaths(run_dir, run_dir / "models")
    write(run_dir, "export", {"model.f16.gguf": text * 100_000})
    started.wait()
    StageCache(OmegaConf.create({"enabled": True, "dir": cache_dir}), paths).store("export", key, {}, {})


def test_concurrent_writers_of_one_key_publish_one_whole_entry(tmp_path):
    started = multiprocessing.get_context("fork").Event()
    writers = [multiprocessing.get_context("fork").Process(
        target=_store_in_a_process, args=(str(tmp_path / "stages"), tmp_path / f"run{i}", text, "key", started))
        for i, text in enumerate("ab")]
    for writer in writers:
        writer.start()
    started.set()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    entry = tmp_path / "stages/export/key"
    meta = json.loads((entry / "entry.json").read_text())
    assert file_entries(entry / "files") == meta["files"]  # the files are the ones its record lists
    assert [p for p in (tmp_path / "stages/export").iterdir() if p.name != "key"] == []  # no leftovers


def test_a_stage_begins_by_removing_only_the_files_its_record_lists(fake_run):
    record = StageRecord(fake_run, "evaluate")
    user_file = fake_run.run_dir / "evaluate/notes.txt"
    user_file.write_text("mine")
    assert record.unlisted_files() == ["evaluate/notes.txt"]
    with pytest.raises(IntegrityError, match="notes.txt"):
        record.begin("new-key")
    assert user_file.read_text() == "mine" and (fake_run.run_dir / "evaluate/metrics.json").exists()  # untouched
    user_file.unlink()
    record.begin("new-key")
    assert not (fake_run.run_dir / "evaluate").exists()
    assert record.read()["status"] == "running" and record.complete_record() is None
