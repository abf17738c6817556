"""Checkpoint verification, markers, choice and rotation, on checkpoint folders made by hand (no training)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tunelab import runstate
from tunelab.config.checks import ConfigError
from tunelab.training import checkpoints, resume
from tunelab.training.callbacks import CheckpointPolicy

ID = "a" * 64


def make_checkpoint(root: Path, step: int, world_size: int = 1) -> Path:
    """The files HF's Trainer writes for a PEFT model, small."""
    import torch
    from safetensors.torch import save_file

    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"lora_A": torch.randn(4, 8), "lora_B": torch.zeros(8, 4)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    torch.save({"state": {0: torch.randn(8)}}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    for name in (["rng_state.pth"] if world_size == 1 else [f"rng_state_{r}.pth" for r in range(world_size)]):
        torch.save({"cpu": torch.random.get_rng_state()}, folder / name)
    history = [{"step": s, "loss": 5.0 - s / 10, "learning_rate": 1e-4, "epoch": s / 100} for s in range(1, step + 1)]
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 50,
                                                           "log_history": history}))
    return folder


def truncate(path: Path, keep: int = 64) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_a_whole_checkpoint_is_marked_with_what_identifies_it(tmp_path):
    folder = make_checkpoint(tmp_path, 10)
    record = checkpoints.mark_complete(folder, ID, 1, "run123")
    marker = json.loads((folder / checkpoints.MARKER).read_text())
    assert marker == record and marker["identity"] == ID and marker["global_step"] == 10
    assert marker["world_size"] == 1 and marker["mlflow_run_id"] == "run123" and marker["time"]
    sizes = {name: info["bytes"] for name, info in marker["files"].items()}
    assert sizes["adapter_model.safetensors"] == (folder / "adapter_model.safetensors").stat().st_size
    assert not list(folder.glob("*.tmp"))  # written to a temp file and renamed
    assert checkpoints.problem_with(folder, ID, 1) is None


@pytest.mark.parametrize("damage,reason", [
    (lambda f: (f / "optimizer.pt").unlink(), "missing optimizer.pt"),
    (lambda f: (f / "rng_state.pth").unlink(), "missing rng_state.pth"),
    (lambda f: truncate(f / "adapter_model.safetensors"), "adapter_model.safetensors does not parse"),
    (lambda f: truncate(f / "optimizer.pt", 100), "optimizer.pt does not parse"),
    (lambda f: (f / "trainer_state.json").write_text("{"), "trainer_state.json does not parse"),
])
def test_a_checkpoint_that_is_not_whole_is_not_marked(tmp_path, damage, reason):
    folder = make_checkpoint(tmp_path, 10)
    damage(folder)
    with pytest.raises(ValueError, match=reason):
        checkpoints.mark_complete(folder, ID, 1, None)
    assert not (folder / checkpoints.MARKER).exists()


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,reason", [
    (lambda f: (f / checkpoints.MARKER).unlink(), "no valid tunelab-checkpoint.json"),
    (lambda f: truncate(f / checkpoints.MARKER, 20), "no valid tunelab-checkpoint.json"),
    (lambda f: (f / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    (lambda f: truncate(f / "adapter_model.safetensors"), "adapter_model.safetensors has 64 bytes"),
    (lambda f: flip_last_byte(f / "adapter_model.safetensors"), "adapter_model.safetensors changed"),
])
def test_a_marked_checkpoint_damaged_later_is_not_resumable(tmp_path, damage, reason):
    folder = make_checkpoint(tmp_path, 10)
    checkpoints.mark_complete(folder, ID, 1, None)
    damage(folder)
    assert reason in checkpoints.problem_with(folder, ID, 1)


def test_another_trainings_or_world_sizes_checkpoint_is_not_resumable(tmp_path):
    folder = make_checkpoint(tmp_path, 10, world_size=2)
    checkpoints.mark_complete(folder, ID, 2, None)
    assert "another training" in checkpoints.problem_with(folder, "b" * 64, 2)
    assert "world of 2 processes, this training has 1" in checkpoints.problem_with(folder, ID, 1)


def test_the_newest_usable_checkpoint_is_chosen_and_newer_broken_ones_are_named(tmp_path):
    for step in (10, 20, 30):
        checkpoints.mark_complete(make_checkpoint(tmp_path, step), ID, 1, f"run{step}")
    truncate(tmp_path / "checkpoint-30/adapter_model.safetensors")
    make_checkpoint(tmp_path, 40)  # the process died before marking it
    choice = checkpoints.newest_usable(tmp_path, ID, 1)
    assert choice.folder == tmp_path / "checkpoint-20"
    assert [(f.name, "bytes" in why or "no valid" in why) for f, why in choice.skipped] == [
        ("checkpoint-40", True), ("checkpoint-30", True)]
    assert resume.choose("auto", tmp_path, ID, 1) == tmp_path / "checkpoint-20"
    assert resume.choose("never", tmp_path, ID, 1) is None
    assert resume.choose("auto", tmp_path, "b" * 64, 1) is None  # another training's: start over


def test_an_explicit_checkpoint_of_another_training_or_incomplete_is_refused(tmp_path):
    folder = make_checkpoint(tmp_path, 10)
    with pytest.raises(ConfigError, match=r"training.resume=.*checkpoint-10: refusing to resume from it: no valid"):
        resume.choose(str(folder), tmp_path, ID, 1)
    checkpoints.mark_complete(folder, ID, 1, None)
    with pytest.raises(ConfigError, match=r"training.resume=.*refusing .*another training"):
        resume.choose(str(folder), tmp_path, "b" * 64, 1)
    with pytest.raises(ConfigError, match=r"training.resume=.*not a checkpoint folder"):
        resume.choose(str(tmp_path), tmp_path, ID, 1)
    assert resume.choose(str(folder), tmp_path, ID, 1) == folder.resolve()


def test_rotation_keeps_the_newest_marked_and_never_touches_unmarked_folders(tmp_path):
    for step in (10, 20, 30):
        checkpoints.mark_complete(make_checkpoint(tmp_path, step), ID, 1, None)
        time.sleep(0.01)
    make_checkpoint(tmp_path, 5)  # unmarked: maybe not ours
    (tmp_path / "notes.txt").write_text("the user's")
    removed = checkpoints.rotate(tmp_path, 2, protect=tmp_path / "checkpoint-30")
    assert removed == [tmp_path / "checkpoint-10"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", "checkpoint-30", "checkpoint-5",
                                                          "notes.txt"]


def policy(tmp_path, save_steps="auto", minutes=5.0, pending=None):
    cfg = SimpleNamespace(save_steps=save_steps, save_minutes=minutes, keep_checkpoints=2)
    made = CheckpointPolicy(tmp_path, cfg, ID, 1, None, runstate.Pending() if pending is None else pending)
    made.begin(45)
    return made


def test_auto_saves_every_tenth_of_the_steps_and_after_save_minutes(tmp_path):
    every = policy(tmp_path)
    assert [s for s in range(1, 46) if every.step_end(s)[0]] == [5, 10, 15, 20, 25, 30, 35, 40, 45]  # ceil(4.5)
    assert [s for s in range(1, 46) if policy(tmp_path, save_steps=20).step_end(s)[0]] == [20, 40]
    assert not any(policy(tmp_path, save_steps=0).step_end(s)[0] for s in range(1, 46))
    timed = policy(tmp_path, save_steps=1000, minutes=1.0)
    timed.last_save -= 61  # a minute has passed since the last save
    assert timed.step_end(3) == (True, False)


def test_an_interrupt_saves_at_the_end_of_the_step_and_stops(tmp_path):
    pending = runstate.Pending()
    made = policy(tmp_path, save_steps=1000, pending=pending)
    assert made.step_end(3) == (False, False)
    pending.signum = 15
    assert made.step_end(4) == (True, True) and made.interrupt_step == 4
    assert policy(tmp_path, save_steps=0, pending=pending).step_end(4) == (False, True)  # 0: no checkpoints


def test_saving_over_a_marked_folder_unmarks_it_first(tmp_path):
    folder = make_checkpoint(tmp_path, 5)
    checkpoints.mark_complete(folder, "b" * 64, 1, None)
    policy(tmp_path, save_steps=5).step_end(5)
    assert not (folder / checkpoints.MARKER).exists()  # being overwritten: not complete until verified


def test_the_curve_before_the_resume_step_continues_in_loss_jsonl_and_the_new_run(tmp_path):
    folder = make_checkpoint(tmp_path, 3)
    checkpoints.mark_complete(folder, ID, 1, "killed-run")
    sent, tags = [], {}
    reporter = SimpleNamespace(log_metrics=lambda m, step: sent.append((step, m["train.loss"])),
                               set_tags=tags.update)
    resumed = resume.continue_curve(folder, tmp_path / "loss.jsonl", reporter)
    assert resumed == {"step": 3, "checkpoint": str(folder), "run_id": "killed-run"}
    assert [step for step, _ in sent] == [1, 2, 3]
    assert [json.loads(l)["step"] for l in (tmp_path / "loss.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert tags["tunelab.resumed_from_run"] == "killed-run" and tags["tunelab.resumed_from_step"] == "3"


def test_the_training_identity_ignores_how_to_checkpoint_but_not_what_is_trained(compose_cfg):
    cfg = compose_cfg("experiment=smoke")
    base = checkpoints.training_identity(cfg, "d" * 64, 1)
    assert checkpoints.training_identity(compose_cfg("experiment=smoke", "training.save_steps=3",
                                                     "training.resume=never", "training.keep_checkpoints=5"),
                                         "d" * 64, 1) == base
    assert checkpoints.training_identity(compose_cfg("experiment=smoke", "training.learning_rate=1e-3"),
                                         "d" * 64, 1) != base
    assert checkpoints.training_identity(cfg, "e" * 64, 1) != base
    assert checkpoints.training_identity(cfg, "d" * 64, 2) != base


def test_checkpoint_keys_are_validated_up_front_each_named(compose_cfg):
    from tunelab.config.checks import check_checkpointing

    cfg = compose_cfg("experiment=smoke", "training.save_steps=-1", "training.keep_checkpoints=0",
                      "training.save_minutes=-2", "training.resume=/no/such/checkpoint-3")
    problems = check_checkpointing(cfg.training)
    assert [p.split("=")[0] for p in problems] == ["training.save_steps", "training.save_minutes",
                                                    "training.keep_checkpoints", "training.resume"]
    assert check_checkpointing(compose_cfg("experiment=smoke").training) == []
    assert check_checkpointing(compose_cfg("experiment=smoke", "training.save_steps=sometimes").training)
