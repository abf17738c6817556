from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tunelab.data.formats import DataError, read_csv, read_sharegpt
from tunelab.paths import RunPaths
from tunelab.stages import prepare
from conftest import ROOT


def dataset_cfg(path, **kw):
    base = dict(name="t", format="csv", path=str(path), eval_path=None, eval_fraction=0.25, max_eval_rows=None,
                system_prompt="Write a tweet in all capital letters.", user_template="The topic is: {topic}",
                answer_column="tweet", seed=0)
    return SimpleNamespace(**{**base, **kw})


def write_csv(path, rows, header="topic,tweet"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_csv_becomes_sharegpt_jsonl_exactly_as_in_the_seed(tmp_path):
    src = write_csv(tmp_path / "d.csv", [f"Topic {i},TWEET NUMBER {i}" for i in range(40)] + ["Rap music,I LOVE RAP MUSIIIIIIIIC"])
    paths = RunPaths(tmp_path / "run", tmp_path / "cache")
    manifest = prepare.run(dataset_cfg(src), paths)
    lines = (paths.train_jsonl.read_text() + paths.eval_jsonl.read_text()).splitlines()
    assert manifest["train_rows"] + manifest["eval_rows"] == 41 == len(lines)
    assert manifest["train_rows"] > 0 and manifest["eval_rows"] > 0
    rap = next(json.loads(l) for l in lines if "Rap music" in l)
    assert rap == {"conversations": [
        {"from": "system", "value": "Write a tweet in all capital letters."},
        {"from": "human", "value": "The topic is: Rap music"},
        {"from": "gpt", "value": "I LOVE RAP MUSIIIIIIIIC"}]}


def test_split_is_deterministic_and_seeded(tmp_path):
    src = write_csv(tmp_path / "d.csv", [f"Topic {i},TWEET {i}" for i in range(60)])
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        paths = RunPaths(tmp_path / name, tmp_path / "cache")
        prepare.run(dataset_cfg(src, seed=seed), paths)
        runs.append(paths.eval_jsonl.read_text())
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_equal_prompts_never_straddle_the_split(tmp_path):
    rows = [f"Topic {i % 10},TWEET VARIANT {i}" for i in range(50)]
    src = write_csv(tmp_path / "d.csv", rows)
    paths = RunPaths(tmp_path / "run", tmp_path / "cache")
    prepare.run(dataset_cfg(src, eval_fraction=0.3), paths)
    train = {json.loads(l)["conversations"][1]["value"] for l in paths.train_jsonl.read_text().splitlines()}
    evals = {json.loads(l)["conversations"][1]["value"] for l in paths.eval_jsonl.read_text().splitlines()}
    assert train and evals and not train & evals


def test_sharegpt_jsonl_reads_directly_with_role_aliases():
    conversations = read_sharegpt(ROOT / "tests/data/sharegpt_valid.jsonl")
    assert len(conversations) == 5
    assert [m["role"] for m in conversations[2].messages] == ["user", "assistant", "user", "assistant"]


def test_csv_and_sharegpt_give_the_same_canonical_records(tmp_path):
    src = write_csv(tmp_path / "d.csv", ["Rap music,I LOVE RAP MUSIIIIIIIIC", "Pokemon,SNORLAX. THAT'S THE TWEET."])
    cfg = dataset_cfg(src)
    from_csv = [c.messages for c in read_csv(src, cfg.system_prompt, cfg.user_template, cfg.answer_column)]
    from_jsonl = [c.messages for c in read_sharegpt(ROOT / "tests/data/sharegpt_valid.jsonl")][:2]
    assert from_csv == from_jsonl


def test_every_bad_row_is_reported_with_file_and_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join([
        '{"conversations": [{"from": "human", "value": "ok"}, {"from": "gpt", "value": "OK"}]}',
        '{"conversations": [{"from": "human", "value": "x"}',
        '{"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "Y"}]}',
        '{"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "  "}]}',
        '{"conversations": [{"from": "human", "value": "only a question"}]}',
    ]) + "\n")
    with pytest.raises(DataError) as err:
        read_sharegpt(src)
    problems = err.value.problems
    assert any(f"{src}:2: malformed JSON" in p for p in problems)
    assert any(f"{src}:3: unknown role 'robot'" in p for p in problems)
    assert any(f"{src}:4: empty content" in p for p in problems)
    assert any(f"{src}:5: no assistant turn" in p for p in problems)
    assert not any(f"{src}:1:" in p for p in problems)


def test_missing_csv_column_names_the_file_and_the_columns(tmp_path):
    src = write_csv(tmp_path / "d.csv", ["a,b"], header="subject,text")
    with pytest.raises(DataError) as err:
        read_csv(src, None, "The topic is: {topic}", "tweet")
    assert f"{src}:1" in str(err.value) and "topic" in str(err.value) and "tweet" in str(err.value)


def test_a_failing_prepare_writes_nothing(tmp_path):
    src = write_csv(tmp_path / "d.csv", ["Tea,TEA", "Empty,"])
    paths = RunPaths(tmp_path / "run", tmp_path / "cache")
    with pytest.raises(DataError) as err:
        prepare.run(dataset_cfg(src), paths)
    assert f"{src}:3: empty content" in str(err.value)
    assert not paths.prepare_dir.exists()
