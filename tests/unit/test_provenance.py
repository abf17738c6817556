"""git_dirty: changed tracked files, and untracked files under conf/, experiments/ and the dataset files."""
from __future__ import annotations

import subprocess

from omegaconf import OmegaConf

from tunelab.provenance import dataset_files, git_state


def git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def make_repo(tmp_path):
    for name, text in {"conf/config.yaml": "a: 1\n", ".gitignore": "data/ignored.csv\n", "README": "x\n"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "init")
    return tmp_path


def test_untracked_configs_and_dataset_files_make_the_tree_dirty(tmp_path, monkeypatch):
    repo = make_repo(tmp_path)
    monkeypatch.chdir(repo)
    assert git_state()["dirty"] == "false" and len(git_state()["commit"]) == 40
    (repo / "notes.txt").write_text("scratch\n")  # untracked, but nothing a run reads
    assert git_state()["dirty"] == "false"
    (repo / "experiments").mkdir()
    (repo / "experiments/mine.yaml").write_text("name: mine\n")
    assert git_state()["dirty"] == "true"
    (repo / "experiments/mine.yaml").unlink()
    (repo / "conf/dataset").mkdir()
    (repo / "conf/dataset/mine.yaml").write_text("name: mine\n")
    assert git_state()["dirty"] == "true"
    (repo / "conf/dataset/mine.yaml").unlink()
    (repo / "data").mkdir()
    (repo / "data/mine.csv").write_text("topic,tweet\n")
    (repo / "data/ignored.csv").write_text("topic,tweet\n")
    assert git_state()["dirty"] == "false"
    assert git_state(["data/ignored.csv", "/elsewhere/outside.csv"])["dirty"] == "false"  # ignored (DVC), outside
    assert git_state(["data/mine.csv"])["dirty"] == "true"
    (repo / "README").write_text("changed\n")
    assert git_state()["dirty"] == "true"


def test_dataset_files_are_the_local_paths_a_run_reads():
    cfg = OmegaConf.create({"dataset": {"format": "csv", "path": "data/a.csv", "eval_path": "data/held.csv",
                                        "sources": [{"format": "hub", "path": "org/x"},
                                                    {"format": "openai", "path": "data/b.jsonl"}]}})
    assert dataset_files(cfg) == ["data/a.csv", "data/held.csv", "data/b.jsonl"]
    assert dataset_files(OmegaConf.create({"name": "t"})) == []
    hub = OmegaConf.create({"dataset": {"format": "hub", "path": "org/y", "eval_path": None, "sources": []}})
    assert dataset_files(hub) == []
