"""A user dataset versioned with a real DVC and a local-folder remote: push two versions, check the
old one out by its .dvc file from the remote, prepare it again and get the old hash back; bytes
that differ from the .dvc record (an edited file, a corrupted cache) are refused."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.data.formats import DataError
from tunelab.paths import RunPaths
from tunelab.stages.prepare import prepare_dataset
from data_helpers import dataset_cfg, meter

pytestmark = pytest.mark.slow
DVC = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


def sh(repo: Path, *cmd: str) -> str:
    done = subprocess.run(cmd, cwd=repo, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{cmd}: {done.stdout}{done.stderr}"
    return done.stdout


def write_version(path: Path, rows: int) -> None:
    path.write_text("topic,tweet\n" + "".join(f"Topic {i},TWEET NUMBER {i}\n" for i in range(rows)))


def prepared_hash(tmp_path: Path, csv: Path, name: str) -> str:
    return prepare_dataset(dataset_cfg(csv), RunPaths(tmp_path / name, tmp_path / "cache"), meter())["dataset_sha256"]


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    sh(repo, "git", "init", "-q")
    sh(repo, DVC, "init", "-q")
    sh(repo, DVC, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    return repo


def test_push_change_push_then_pull_the_old_version_back_by_its_dvc_file(tmp_path, repo):
    data = repo / "support.csv"
    write_version(data, 20)
    sh(repo, DVC, "add", "-q", "support.csv")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "v1")
    sh(repo, DVC, "push", "-q")
    first = prepared_hash(tmp_path, data, "v1")

    write_version(data, 25)
    sh(repo, DVC, "add", "-q", "support.csv")
    sh(repo, "git", "commit", "-qam", "v2")
    sh(repo, DVC, "push", "-q")
    second = prepared_hash(tmp_path, data, "v2")
    assert second != first

    # The old version by its .dvc file, from the remote alone: no local cache, no workspace copy.
    sh(repo, "git", "checkout", "HEAD~1", "--", "support.csv.dvc")
    shutil.rmtree(repo / ".dvc/cache")
    data.unlink()
    sh(repo, DVC, "pull", "-q")
    assert prepared_hash(tmp_path, data, "v1-again") == first


def test_bytes_that_differ_from_the_dvc_record_are_refused(tmp_path, repo):
    data = repo / "support.csv"
    write_version(data, 20)
    sh(repo, DVC, "add", "-q", "support.csv")
    write_version(data, 21)  # edited after `dvc add`, not re-added
    with pytest.raises(DataError, match=r"support.csv: hash mismatch .*support.csv.dvc records"):
        prepared_hash(tmp_path, data, "edited")

    # A corrupted cache: `dvc checkout` places its bytes without re-checking them.
    cached = next(p for p in (repo / ".dvc/cache").rglob("*") if p.is_file())
    cached.chmod(0o644)
    cached.write_text(cached.read_text().replace("TWEET NUMBER 3", "TWEET NUMBER 4"))
    data.unlink()
    sh(repo, DVC, "checkout", "-q")
    assert "Topic 3,TWEET NUMBER 4\n" in data.read_text()  # DVC placed the corrupted bytes without noticing
    with pytest.raises(DataError, match="hash mismatch") as err:
        prepared_hash(tmp_path, data, "corrupted")
    assert "dvc checkout" in str(err.value)
    assert not (tmp_path / "corrupted").exists()
