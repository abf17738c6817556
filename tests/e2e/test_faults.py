"""Off the happy path, through the real CLI on the smoke experiment: damaged cache entries, a swapped
GGUF, a folder of the user's, two processes on one run directory, and kill -9 in every stage. Each
ends with nothing lost, nothing wrong shipped and a message naming what happened."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
OUTPUTS = ("evaluate/metrics.json", "evaluate/generations.jsonl", "export/model.q5_k_m.gguf",
           "train/adapter/adapter_model.safetensors", "prepare/train.jsonl")


def command(tmp, run_dir, cache, *overrides):
    return [sys.executable, "-m", "tunelab", "experiment=smoke", f"paths.run_dir={run_dir}",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/artifacts",
            f"cache.dir={cache}", *overrides]


def tunelab(tmp, run_dir, cache, *overrides):
    return subprocess.run(command(tmp, run_dir, cache, *overrides), cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "COLUMNS": "200"})


def outputs(run_dir: Path) -> dict:
    return {name: (run_dir / name).read_bytes() for name in OUTPUTS}


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    """One uninterrupted run: the reference every faulty run must reproduce byte for byte."""
    tmp = tmp_path_factory.mktemp("solo")
    done = tunelab(tmp, tmp / "run", tmp / "stages")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp, outputs(tmp / "run")


def flip_a_byte(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def largest_file(entry: Path) -> Path:
    return max((p for p in (entry / "files").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_flipped_bytes_in_each_stages_cache_entry_are_detected_and_the_stage_runs_again(solo, tmp_path):
    tmp, expected = solo
    for number, stage in enumerate(("evaluate", "export", "train", "prepare")):
        (entry,) = [p for p in (tmp / "stages" / stage).iterdir() if not p.name.startswith(".")]
        damaged = largest_file(entry)
        flip_a_byte(damaged)
        run_dir = tmp_path / f"run{number}"  # a new run directory: every stage is restored from the cache
        done = tunelab(tmp, run_dir, tmp / "stages")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        name = damaged.relative_to(entry / "files").as_posix()
        assert f"cached {stage} stage" in done.stdout and name in done.stdout, done.stdout[-3000:]
        assert f"running {stage} again" in done.stdout
        assert outputs(run_dir) == expected  # the right bytes and metrics, not the damaged ones


def test_a_swapped_gguf_is_refused_by_evaluate_and_serve(solo, tmp_path):
    tmp, _ = solo
    done = tunelab(tmp, tmp_path / "run", tmp / "stages")
    assert done.returncode == 0, done.stderr[-3000:]
    gguf = tmp_path / "run/export/model.q5_k_m.gguf"
    flip_a_byte(gguf)  # same size, other bytes
    evaluate = tunelab(tmp, tmp_path / "run", tmp / "stages", "stage=evaluate")
    assert evaluate.returncode == 2 and "export/model.q5_k_m.gguf changed since the export stage wrote it" \
        in evaluate.stderr, evaluate.stderr[-3000:]
    serve = subprocess.run([sys.executable, "-m", "tunelab", "serve", "--port", "18731", "experiment=smoke",
                            f"paths.run_dir={tmp_path}/run"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert serve.returncode != 0 and "model.q5_k_m.gguf" in serve.stderr and "changed" in serve.stderr


def test_a_folder_of_the_users_is_refused_and_nothing_in_it_changes(solo, tmp_path):
    tmp, _ = solo
    mine = tmp_path / "mine"
    for name in ("train/notes.md", "config.yaml", "export/old.gguf"):
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text(f"the user's {name}")
    done = tunelab(tmp_path, mine, tmp / "stages")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    for name in ("train/notes.md", "config.yaml", "export/old.gguf"):
        assert name in done.stderr and (mine / name).read_text() == f"the user's {name}"
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "export", "hydra", "train"]
    assert not (tmp_path / "mlflow.db").exists()  # refused before any MLflow run was started


def wait_for(condition, what: str, process=None, limit_s: float = 600):
    deadline = time.monotonic() + limit_s
    while not condition():
        assert process is None or process.poll() is None, f"exited before {what}: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_second_process_on_the_same_run_directory_exits_2_and_the_first_is_unaffected(solo, tmp_path):
    tmp, expected = solo
    run_dir = tmp_path / "run"
    first = subprocess.Popen(command(tmp_path, run_dir, tmp_path / "stages"), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    lock = run_dir / ".tunelab/lock"
    wait_for(lambda: lock.is_file() and str(first.pid) in lock.read_text(), "the first run's lock", first)
    second = tunelab(tmp_path, run_dir, tmp_path / "stages")
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr and "in use" in second.stderr
    assert first.wait(timeout=900) == 0, first.stderr.read()[-3000:]
    assert outputs(run_dir) == expected


def record_status(run_dir: Path, stage: str):
    try:
        return json.loads((run_dir / f".tunelab/stages/{stage}.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None


def leftover_processes(run_dir: Path):
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(str(run_dir) in part for part in process.info["cmdline"] or []):
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return [p for p in found if p.status() != psutil.STATUS_ZOMBIE]


def test_kill_9_in_every_stage_then_the_same_command_finishes_with_the_solo_runs_bytes(solo, tmp_path):
    _, expected = solo
    run_dir, cache = tmp_path / "run", tmp_path / "stages"
    for stage in ("prepare", "train", "export", "evaluate"):
        process = subprocess.Popen(command(tmp_path, run_dir, cache), cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        wait_for(lambda: record_status(run_dir, stage) == "running", f"{stage} to start", process)
        process.kill()
        process.wait(timeout=60)
        wait_for(lambda: not leftover_processes(run_dir), "no process of the killed run left", limit_s=60)
    done = tunelab(tmp_path, run_dir, cache)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "took over the lock" in done.stdout
    assert outputs(run_dir) == expected


def test_prepare_runs_again_when_the_tokenizer_template_or_length_limit_changes(tmp_path):
    cache = tmp_path / "stages"

    def prepare(name, *overrides):
        done = tunelab(tmp_path, tmp_path / name, cache, "stage=prepare", "tracking=off", *overrides)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return "reused prepare" in done.stdout

    chatml = ("template=chatml", "template.add_missing_tokens=true")  # Llama 3's tokenizer lacks ChatML's tokens
    assert not prepare("first", *chatml)
    assert prepare("same", *chatml)  # unchanged: reused, every file verified
    assert not prepare("length", *chatml, "training.max_seq_length=200")
    assert not prepare("template", "template=zephyr", "template.add_missing_tokens=true")
    assert not prepare("tokenizer", *chatml, "model.tiny.tokenizer=llama3")
