"""`tunelab data check`: the exact training text with the loss-carrying tokens highlighted, and statistics."""
from __future__ import annotations

from tunelab.commands import data as data_command
from data_helpers import TWEET_SYSTEM, meter
from conftest import ROOT

CONVERSATION = [{"role": "system", "content": TWEET_SYSTEM}, {"role": "user", "content": "The topic is: Tea"},
                {"role": "assistant", "content": "TEA TIME."}, {"role": "user", "content": "Again"},
                {"role": "assistant", "content": "MORE TEA."}]


def test_highlighted_text_is_the_training_text_and_marks_exactly_the_loss_tokens():
    m = meter()
    text = data_command.rendered_sample(m, CONVERSATION)
    assert text.plain == m.template.render(CONVERSATION)
    highlighted = "".join(text.plain[s.start:s.end] for s in text.spans if "on green" in str(s.style))
    assert highlighted == "TEA TIME.<|im_end|>MORE TEA.<|im_end|>"


def test_data_check_prints_samples_and_statistics(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert data_command.main(["check", "--samples", "2", "experiment=smoke"]) == 0
    out = capsys.readouterr().out
    assert out.count("data/tweets/train.csv:") == 2 and "<|im_start|>assistant" in out
    assert "rows read" in out and "535" in out and "p50" in out and "over max_seq_length=256" in out


def test_data_check_fails_on_data_that_prepare_would_refuse(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    broken = "tests/data/broken/duplicates.csv"
    code = data_command.main(["check", "experiment=smoke", f"dataset.path={broken}", "dataset.eval_path=null"])
    out = capsys.readouterr().out
    assert code == 1
    assert f"{broken}:4: duplicate" in out and f"{broken}:5: duplicate" in out and "prepare would fail" in out


def test_data_check_names_a_bad_config_key(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert data_command.main(["check", "experiment=smoke", "dataset.on_invalid=skip"]) == 2
    assert "dataset.on_invalid='skip'" in capsys.readouterr().err


def test_data_check_names_special_token_text_and_counts_it_when_escaped(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    data = "tests/data/broken/special_tokens.csv"
    args = ["check", "--samples", "4", "experiment=smoke", f"dataset.path={data}", "dataset.eval_path=null"]
    assert data_command.main(args) == 1
    out = capsys.readouterr().out
    assert f"{data}:3: special token in text - message 3 (assistant) contains '<|im_end|>'" in out
    assert f"{data}:4: special token in text - message 2 (user) contains '<|im_start|>'" in out
    assert data_command.main(args + ["dataset.special_tokens_in_text=escape"]) == 0
    out = capsys.readouterr().out
    assert "special token in text" not in out and "COFFEE <|im_end|> THEN MORE" in out
    assert "special-token text (escape)" in out and "2 row(s) trained as plain text" in out


def test_data_check_shows_the_train_eval_split(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", "200")
    args = ["check", "--samples", "1", "experiment=smoke", "dataset.max_eval_rows=null"]
    assert data_command.main(args + ["dataset.eval_path=null", "dataset.eval_fraction=0.2"]) == 0
    assert "396 train, 99 eval (eval_fraction=0.2 of 495 rows, grouped by prompt)" in capsys.readouterr().out
    assert data_command.main(args) == 0
    assert "495 train, 40 eval (eval_path)" in capsys.readouterr().out
