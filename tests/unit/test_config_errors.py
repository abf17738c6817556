"""Every config mistake fails before anything runs: exit 2, a message naming the key or the options,
no run directory and no MLflow store written. Run as a user would, in a project folder of their own."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def project(tmp_path):
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "dataset").mkdir()
    (tmp_path / "conf" / "dataset" / "mine.yaml").write_text("name: mine\nformat: csv\npath: data/mine.csv\n")
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /dataset: mine\nname: mine\n")
    return tmp_path


def tunelab(folder: Path, *args: str):
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    env.pop("TUNELAB_CONF", None)
    done = subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


CASES = [
    (["experiment=mien"], ["experiment=mien: no such option of group experiment", "did you mean experiment=mine?",
                           "mine (yours", "smoke", "tweets"]),
    (["dataset=nope"], ["dataset=nope: no such option of group dataset", "mine (yours", "tweets"]),
    (["training.learnig_rate=1e-4"], ["training.learnig_rate: no such config key",
                                      "did you mean training.learning_rate?"]),
    (["+lora.rr=8"], ["+lora.rr: no such config key", "did you mean lora.r?"]),
    (["+training.resume_from_checkpoint=x"], ["+training.resume_from_checkpoint: no such config key"]),
    (["+training.learning_rate=1e-4"], ["training.learning_rate is already a config key",
                                        "training.learning_rate=..."]),
    (["lora.r=sixteen"], ["lora.r:", "sixteen"]),
    (["-m", "training.learnig_rate=1e-4,2e-4"], ["did you mean training.learning_rate?"]),
    (["-m", "experiment=mine,mien"], ["experiment=mien: no such option"]),
    (["data", "check", "experiment=mien"], ["experiment=mien: no such option"]),
    (["runs", "lora.rr=8"], ["lora.rr: no such config key", "did you mean lora.r?"]),
]


@pytest.mark.parametrize("args,expected", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_a_config_mistake_exits_2_naming_it_and_runs_nothing(project, args, expected):
    code, out = tunelab(project, *args)
    assert code == 2, out
    assert all(text in out for text in expected), out
    assert "+training.learnig_rate" not in out and "Traceback" not in out
    assert not (project / "runs").exists() and not (project / "mlflow.db").exists()


def test_a_typo_in_ones_own_file_names_the_key_the_file_and_the_nearest_key(project):
    (project / "conf" / "lora").mkdir()
    (project / "conf" / "lora" / "mine.yaml").write_text("r: 8\nalpah: 16\n")
    code, out = tunelab(project, "experiment=mine", "lora=mine")
    assert code == 2 and "lora.alpah" in out and "did you mean lora.alpha?" in out and "lora/mine.yaml" in out, out


def test_a_hand_written_root_config_fails_naming_the_key_not_with_a_traceback(project):
    (project / "conf" / "config.yaml").write_text(
        "defaults:\n  - base_config\n  - dataset: mine\n  - model: tiny\n  - lora: default\n  - template: native\n"
        "  - quantization: default\n  - training: cpu\n  - eval: tweets\n  - _self_\n"
        "paths:\n  run_dir: runs/${nmae}\n")
    code, out = tunelab(project)
    assert code == 2 and "Traceback" not in out, out
    assert "name: has no value" in out or "paths.run_dir" in out, out


def test_a_config_error_in_a_single_run_creates_no_mlflow_run(project):
    code, out = tunelab(project, "experiment=mine", "lora.r=0", "training.learning_rate=-1")
    assert code == 2 and "lora.r=0 must be >= 1" in out and "training.learning_rate=-1.0 must be > 0" in out, out
    assert not (project / "mlflow.db").exists() and not (project / "runs").exists()


def test_a_data_error_in_a_single_run_creates_no_mlflow_run(project):
    (project / "data").mkdir()
    (project / "data" / "mine.csv").write_text("prompt,answer\nhello,\n")  # an empty answer
    code, out = tunelab(project, "experiment=mine", "model=tiny", "dataset.eval_fraction=0.5")
    assert code == 2 and "mine.csv" in out, out
    assert not (project / "mlflow.db").exists(), out


def test_help_lists_the_projects_options_beside_tunelabs(project):
    code, out = tunelab(project, "--help")
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith("experiment:"))
    assert {"mine", "smoke", "tweets"} <= set(line.split(":", 1)[1].replace(",", " ").split()), line
    assert str(project / "conf") in out


def test_an_option_of_ones_own_missed_from_a_subfolder_says_where_options_are_read(project):
    (project / "notebooks").mkdir()
    code, out = tunelab(project / "notebooks", "experiment=mine")
    assert code == 2 and "experiment=mine: no such option of group experiment" in out, out
    assert f"read from ./conf/experiment/ of the folder tunelab runs in, {project / 'notebooks'}" in out, out
    code, out = tunelab(project, "experiment=mien")  # where the project's own options are found: no such line
    assert code == 2 and "mine (yours" in out and "read from ./conf" not in out, out
