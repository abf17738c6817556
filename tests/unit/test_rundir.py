"""One tunelab per run directory (the lock names its holder; a dead holder's lock is taken over), and
a run directory holding files tunelab did not write is refused before anything is touched."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tunelab import rundir
from tunelab.paths import RunPaths
from tunelab.records import StageRecord, file_entries


@pytest.fixture
def paths(tmp_path):
    return RunPaths(tmp_path / "run", tmp_path / "cache")


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_claim_is_refused_naming_the_holder_and_touching_nothing(paths):
    lock = rundir.claim(paths, False, "tunelab experiment=first")
    before = tree(paths.run_dir)
    with pytest.raises(rundir.RunDirError) as refused:
        rundir.claim(paths, False, "tunelab experiment=second")
    message = str(refused.value)
    assert f"pid {os.getpid()}" in message and "tunelab experiment=first" in message and "in use" in message
    assert tree(paths.run_dir) == before
    lock.release()
    rundir.claim(paths, False, "tunelab experiment=second").release()  # free again


HOLD = """
import sys
from tunelab import rundir
from tunelab.paths import RunPaths
from pathlib import Path
lock = rundir.claim(RunPaths(Path(sys.argv[1]), Path(sys.argv[1])), False, "tunelab experiment=killed")
print("held", flush=True)
sys.stdin.read()
"""


def test_the_lock_of_a_killed_process_is_taken_over_and_said_so(paths):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(paths.run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(rundir.RunDirError, match=f"pid {holder.pid}"):
            rundir.claim(paths, False, "tunelab")
        holder.kill()  # SIGKILL: no chance to release; the kernel drops its flock
        holder.wait(timeout=60)
    finally:
        holder.kill()
    lock = rundir.claim(paths, False, "tunelab")
    assert lock.took_over["pid"] == str(holder.pid) and lock.took_over["command"] == "tunelab experiment=killed"
    assert "is no longer" not in rundir.describe_holder(lock.took_over)  # the pipeline adds that sentence
    lock.release()


def test_a_folder_of_the_users_is_refused_naming_its_files_and_nothing_is_written(paths):
    for name in ("train/notes.md", "export/model.gguf", "config.yaml", "photos/cat.jpg"):
        (paths.run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (paths.run_dir / name).write_text(name)
    before = tree(paths.run_dir)
    with pytest.raises(rundir.RunDirError) as refused:
        rundir.claim(paths, False, "tunelab")
    for name in ("train/notes.md", "export/model.gguf", "config.yaml", "photos/cat.jpg"):
        assert name in str(refused.value)
    assert "paths.foreign_files=keep" in str(refused.value)
    assert tree(paths.run_dir) == before and not paths.state_dir.exists()
    # keep: files outside tunelab's own places may stay; those in its way are still refused
    with pytest.raises(rundir.RunDirError) as in_the_way:
        rundir.claim(paths, True, "tunelab")
    assert "photos/cat.jpg" not in str(in_the_way.value) and "train/notes.md" in str(in_the_way.value)
    for name in ("train/notes.md", "export/model.gguf", "config.yaml"):
        (paths.run_dir / name).unlink()
    rundir.claim(paths, True, "tunelab").release()
    assert (paths.run_dir / "photos/cat.jpg").read_text() == "photos/cat.jpg"


def test_what_tunelab_wrote_is_its_own_and_an_added_file_is_not(paths):
    lock = rundir.claim(paths, False, "tunelab")
    for name in ("config.yaml", "identity.json", "prepare/train.jsonl", "checkpoints/checkpoint-2/x.bin"):
        (paths.run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (paths.run_dir / name).write_text("x")
    StageRecord(paths, "prepare").complete("k", {"train.jsonl": {"size": 1, "sha256": "s"}})
    running = StageRecord(paths, "train")
    running.begin("k")  # a stage that was killed: its folder is all tunelab's
    (paths.run_dir / "train/half.partial").parent.mkdir()
    (paths.run_dir / "train/half.partial").write_text("x")
    (paths.run_dir / "hydra/2026-12-01_00-00-00/.hydra").mkdir(parents=True)
    (paths.run_dir / "hydra/2026-12-01_00-00-00/.hydra/config.yaml").write_text("hydra's")
    lock.release()
    assert rundir.foreign_files(paths) == []
    (paths.run_dir / "prepare/mine.csv").write_text("user")
    assert rundir.foreign_files(paths) == ["prepare/mine.csv"]


def test_claim_clears_only_tunelabs_scratch_space(paths):
    rundir.claim(paths, False, "tunelab").release()
    (paths.state_dir / "tmp/prepare-abc").mkdir(parents=True)
    (paths.state_dir / "tmp/prepare-abc/train.jsonl").write_text("half")
    rundir.claim(paths, False, "tunelab").release()
    assert not (paths.state_dir / "tmp").exists()


def test_a_file_as_run_dir_and_a_huge_folder_are_refused_quickly(paths, monkeypatch):
    paths.run_dir.parent.mkdir(parents=True, exist_ok=True)
    paths.run_dir.write_text("not a folder")
    with pytest.raises(rundir.RunDirError, match="is a file, not a folder"):
        rundir.claim(paths, False, "tunelab")
    paths.run_dir.unlink()
    for index in range(30):
        (paths.run_dir / f"photos/{index}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (paths.run_dir / f"photos/{index}.jpg").write_text("x")
    monkeypatch.setattr(rundir, "SCAN_LIMIT", 12)  # a home folder would hold millions: the walk stops
    assert len(rundir.foreign_files(paths, limit=rundir.SCAN_LIMIT)) == 12
    with pytest.raises(rundir.RunDirError, match="holds at least 12 file"):
        rundir.claim(paths, False, "tunelab")
