"""training.distributed, nproc_per_node and lora.quant_storage: validation up front (every problem at
once, naming the key), resolution, the config hash and cache key, and the launcher's pieces that need
no process (rank environment, event relay, which rank is blamed, agreeing on checkpoints)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tunelab import runstate
from tunelab.cache import stage_key
from tunelab.config import distributed
from tunelab.config.checks import ConfigError, validate
from tunelab.config.identity import config_hash, identity_dict
from tunelab.training import checkpoints, launch, world
from tunelab.training.callbacks import CheckpointPolicy


@pytest.fixture
def devices(monkeypatch):
    """Pretend this machine has n CUDA devices (validation asks tunelab.config.distributed.cuda_count)."""
    def _set(n: int):
        monkeypatch.setattr(distributed, "cuda_count", lambda: n)
        monkeypatch.setattr(distributed, "compute_storage", lambda precision, cuda: {"auto": "bf16"}.get(
            precision, distributed.PRECISION_STORAGE.get(precision)) if cuda else "fp32")
    return _set


def problems(cfg):
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    return err.value.problems


def test_defaults_are_one_process_and_validate(compose_cfg):
    cfg = compose_cfg()
    assert (cfg.training.distributed, cfg.training.nproc_per_node, cfg.lora.quant_storage) == ("none", "auto", None)
    validate(cfg)
    assert distributed.world_size(cfg.training) == 1


def test_cpu_ddp_needs_a_number_of_processes(compose_cfg, devices):
    devices(0)
    found = problems(compose_cfg("training.distributed=ddp"))
    assert len(found) == 1 and found[0].startswith("training.nproc_per_node=auto counts CUDA devices")
    validate(compose_cfg("training.distributed=ddp", "training.nproc_per_node=2"))


def test_fsdp_without_cuda_is_refused_with_every_other_problem_at_once(compose_cfg, devices):
    devices(0)
    found = problems(compose_cfg("training.distributed=fsdp", "training.backend=unsloth", "lora.r=0"))
    text = "\n".join(found)
    assert "lora.r=0 must be >= 1" in text
    assert "training.nproc_per_node" not in text  # no advice to give CPU processes to fsdp
    assert len(found) == 3
    assert "training.distributed=fsdp needs CUDA GPUs" in text and "use training.distributed=ddp" in text
    assert "training.backend=unsloth with training.distributed=fsdp" in text and "UNSLOTH_FSDP2" in text


@pytest.mark.parametrize("overrides,key", [
    (["training.distributed=ring"], "training.distributed='ring' is not one of none, ddp, fsdp"),
    (["training.nproc_per_node=2"], "training.nproc_per_node=2 has no effect with training.distributed=none"),
    (["training.distributed=ddp", "training.nproc_per_node=0"], "training.nproc_per_node=0 must be auto"),
    (["training.distributed=ddp", "training.nproc_per_node=many"], "training.nproc_per_node='many' must be auto"),
    (["training.distributed=ddp", "training.nproc_per_node=3"], "training.nproc_per_node=3 is more than the 2"),
    (["lora.quant_storage=bf16"], "lora.quant_storage=bf16 has no effect without lora.load_in_4bit"),
    (["lora=qlora", "lora.quant_storage=int4"], "lora.quant_storage='int4' is not one of"),
])
def test_each_wrong_value_is_named(compose_cfg, devices, overrides, key):
    devices(2)
    found = problems(compose_cfg(*overrides))
    assert any(p.startswith(key) for p in found), found


def test_qlora_under_fsdp_stores_4bit_weights_in_the_compute_dtype(compose_cfg, devices):
    devices(2)
    found = problems(compose_cfg("training=gpu", "lora=qlora", "training.distributed=fsdp", "lora.quant_storage=uint8"))
    assert len(found) == 1 and found[0].startswith("lora.quant_storage=uint8 with training.distributed=fsdp")
    assert "compute dtype (bf16" in found[0]
    cfg = compose_cfg("training=gpu", "lora=qlora", "training.distributed=fsdp", "training.precision=fp16")
    validate(cfg)
    distributed.resolve(cfg, cuda=2)
    assert cfg.lora.quant_storage == "fp16" and cfg.training.nproc_per_node == 2
    cfg = compose_cfg("training=gpu", "lora=qlora", "training.distributed=ddp")  # DDP: bitsandbytes' default stays
    distributed.resolve(cfg, cuda=2)
    assert cfg.lora.quant_storage is None


def test_auto_backend_under_fsdp_is_hf_and_says_why():
    from tunelab.training.backends import select_backend

    backend, reason = select_backend("auto", "fsdp")
    assert backend == "hf" and "training.distributed=fsdp" in reason and "Unsloth 2026.10.9" in reason


def test_single_process_configs_keep_their_hash(compose_cfg):
    """The new keys at their defaults do not enter the hash: runs recorded before them keep theirs."""
    cfg = compose_cfg()
    data = identity_dict(cfg)
    assert "distributed" not in data["training"] and "nproc_per_node" not in data["training"]
    assert "quant_storage" not in data["lora"]


def test_the_world_size_is_in_the_hash_and_the_train_cache_key(compose_cfg):
    two = compose_cfg("training.distributed=ddp", "training.nproc_per_node=2")
    four = compose_cfg("training.distributed=ddp", "training.nproc_per_node=4")
    one = compose_cfg()
    assert len({config_hash(c, "d") for c in (one, two, four)}) == 3
    assert stage_key("train", two, {}) != stage_key("train", four, {})
    assert stage_key("export", two, {}) == stage_key("export", four, {})  # export reads the adapter, not this
    auto = compose_cfg("training.distributed=ddp")
    distributed.resolve(auto, cuda=2)  # what auto means is hashed, not the word
    assert config_hash(auto, "d") == config_hash(two, "d")


def test_checkpoints_of_another_world_size_are_another_training(compose_cfg):
    cfg = compose_cfg("training.distributed=ddp", "training.nproc_per_node=2")
    assert checkpoints.training_identity(cfg, "d", 2) != checkpoints.training_identity(cfg, "d", 1)


def test_rank_environment_is_torchruns():
    env = world.rank_env(world.World(2, master_port=29511), 1, "run123", None)
    assert {k: env[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "TUNELAB_RANK",
                                "TUNELAB_RUN_ID")} == {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", "RANK": "1",
                                                       "LOCAL_RANK": "1", "WORLD_SIZE": "2", "TUNELAB_RANK": "1",
                                                       "TUNELAB_RUN_ID": "run123"}


class Recorder:
    def __init__(self):
        self.metrics, self.tags = [], []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, metrics))

    def set_tags(self, tags):
        self.tags.append(tags)


def test_events_are_forwarded_once_each_and_only_whole_lines(tmp_path: Path):
    path, sink = tmp_path / "events.jsonl", Recorder()
    events = launch.Events(path, sink)
    events.forward()  # not there yet
    path.write_text(json.dumps({"kind": "metrics", "metrics": {"train.loss": 2.0}, "step": 1}) + "\n"
                    + '{"kind": "tags", "ta')
    events.forward()
    assert sink.metrics == [(1, {"train.loss": 2.0})] and sink.tags == []
    with open(path, "a") as handle:
        handle.write('gs": {"a": "b"}}\n')
    events.forward()
    events.forward()
    assert sink.metrics == [(1, {"train.loss": 2.0})] and sink.tags == [{"a": "b"}]


def test_the_rank_killed_by_a_signal_is_blamed_not_its_peer():
    assert launch.first_cause({0: 1, 1: -9}) == 1
    assert launch.first_cause({2: 1, 1: 1}) == 1


def test_a_failure_names_the_rank_and_its_log(tmp_path: Path):
    from tunelab.paths import RunPaths

    paths = RunPaths(tmp_path / "run", tmp_path / "cache")
    launch.log_path(paths, 1).parent.mkdir(parents=True)
    launch.log_path(paths, 1).write_text("loading\r 50%\r100%\nTraceback: boom\n")
    err = launch.failure(1, -9, paths, world.World(2))
    assert isinstance(err, launch.RankFailed)
    assert str(err).startswith(f"training rank 1 of 2 was killed by SIGKILL; the other ranks were stopped. Its log: "
                               f"{launch.log_path(paths, 1)}")
    assert "100%" in str(err) and "50%" not in str(err) and "Traceback: boom" in str(err)
    launch.error_path(paths, 1).write_text(json.dumps({"type": "ConfigError", "problems": ["training.resume=x: no"]}))
    err = launch.failure(1, 2, paths, world.World(2))
    assert isinstance(err, ConfigError) and err.problems == ["training.resume=x: no"]


def policy(tmp_path: Path, main: bool, pending=None):
    training = SimpleNamespace(save_steps=10, keep_checkpoints=2, save_minutes=0)
    p = CheckpointPolicy(tmp_path, training, "a" * 64, 2, None, pending or runstate.Pending(), main)
    p.begin(100)
    return p


def test_ranks_save_and_stop_when_any_rank_decides_to(tmp_path: Path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / checkpoints.MARKER).write_text("{}")
    rank1 = policy(tmp_path, main=False)
    assert rank1.step_end(3, agree=lambda save, stop: (save, True)) == (True, True)  # rank 0 got SIGTERM
    assert (folder / checkpoints.MARKER).exists()  # only rank 0 unmarks a folder
    rank0 = policy(tmp_path, main=True)
    assert rank0.step_end(3, agree=lambda save, stop: (True, stop)) == (True, False)
    assert not (folder / checkpoints.MARKER).exists()
    assert rank0.step_end(4, agree=lambda save, stop: (save, stop)) == (False, False)
