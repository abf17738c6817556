"""`tunelab runs`: without experiment= every experiment with its run counts; the status and why a run
did not finish are never cut, however narrow the terminal."""
from __future__ import annotations

import pytest
from rich.console import Console

from tunelab.commands import runs as runs_command
from conftest import ROOT


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A store with experiment smoke (2 finished, 1 failed by a config error) and tweets (1 killed)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", "200")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    for name, statuses in {"smoke": ["FINISHED", "FINISHED", "FAILED"], "tweets": ["KILLED"]}.items():
        experiment = client.create_experiment(name, artifact_location=str(tmp_path / "art" / name))
        for status in statuses:
            run = client.create_run(experiment, tags={"tunelab.config_hash": "ab" * 32})
            client.log_param(run.info.run_id, "lora.r", "8" if status == "FAILED" else "16")
            client.log_param(run.info.run_id, "dataset.path", f"data/{run.info.run_id}/conversations.jsonl")
            if status == "FAILED":
                client.set_tag(run.info.run_id, "tunelab.error",
                               "Traceback (most recent call last):\nConfigError: lora.alpha=0 must be > 0")
            client.set_terminated(run.info.run_id, status=status)
    return uri


def test_runs_without_an_experiment_lists_every_experiment_with_its_run_counts(store, capsys):
    assert runs_command.main([f"tracking.uri={store}"]) == 0
    out = capsys.readouterr().out
    smoke = next(line for line in out.splitlines() if "│ smoke" in line).split("│")
    tweets = next(line for line in out.splitlines() if "│ tweets" in line).split("│")
    assert [cell.strip() for cell in smoke[2:7]] == ["3", "2", "1", "0", "0"]  # runs, finished, failed, killed, running
    assert [cell.strip() for cell in tweets[2:7]] == ["1", "0", "0", "1", "0"]
    assert "2 experiment(s)" in out and "tunelab runs experiment=<name>" in out


def test_an_empty_store_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert runs_command.main([f"tracking.uri=sqlite:///{tmp_path}/empty.db"]) == 1
    assert "no runs in sqlite:///" in capsys.readouterr().err


def test_an_experiment_without_runs_names_the_ones_with_runs(store, capsys):
    assert runs_command.main(["tracking.experiment=nothing_here", f"tracking.uri={store}"]) == 1
    err = capsys.readouterr().err
    assert "no runs of experiment 'nothing_here'" in err and "experiments with runs: " in err
    assert "smoke (3)" in err and "tweets (1)" in err


def test_no_cell_is_cut_and_why_a_run_failed_is_printed_whole(store, capsys):
    from tunelab import tracking
    from tunelab.config.compose import compose

    cfg = compose(["experiment=smoke", f"tracking.uri={store}"])
    listed = tracking.list_runs(cfg.tracking, "smoke")
    metrics = ["finetuned.q5_k_m.all_caps_rate", "finetuned.f16.all_caps_rate", "train.final_loss"]
    console = Console(width=80, record=True)
    console.print(runs_command.render(listed, "smoke", metrics[0], metrics))
    text = console.export_text()
    assert text.count("FINISHED") == 2 and text.count("FAILED") == 1
    assert "…" not in text  # params and metrics fold onto more lines instead of being cut
    failed = next(run for run in listed if run["status"] == "FAILED")
    assert runs_command.not_finished(listed) == [f"{failed['run_id'][:8]} FAILED: ConfigError: lora.alpha=0 must be > 0"]


def test_the_runs_of_one_experiment_end_with_why_each_unfinished_one_did_not_finish(store, capsys):
    assert runs_command.main(["experiment=smoke", f"tracking.uri={store}"]) == 0
    out = capsys.readouterr().out
    assert "experiment smoke: 3 runs" in out and "FAILED: ConfigError: lora.alpha=0 must be > 0" in out
