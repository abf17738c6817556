from __future__ import annotations

import json

import pytest

from tunelab.data.formats import DataError
from tunelab.data.sources import dataset_sha256
from tunelab.paths import RunPaths
from tunelab.stages import prepare
from data_helpers import dataset_cfg, meter, write


def write_csv(path, rows, header="topic,tweet"):
    return write(path, header + "\n" + "\n".join(rows) + "\n")


def run_prepare(tmp_path, cfg, max_length=256, name="run"):
    paths = RunPaths(tmp_path / name, tmp_path / "cache")
    return prepare.prepare_dataset(cfg, paths, meter(max_length)), paths


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_csv_becomes_sharegpt_jsonl_exactly_as_in_the_seed(tmp_path):
    src = write_csv(tmp_path / "d.csv", [f"Topic {i},TWEET NUMBER {i}" for i in range(40)] + ["Rap music,I LOVE RAP MUSIIIIIIIIC"])
    manifest, paths = run_prepare(tmp_path, dataset_cfg(src))
    rows = lines(paths.train_jsonl) + lines(paths.eval_jsonl)
    assert manifest["train_rows"] + manifest["eval_rows"] == 41 == len(rows) == manifest["rows_in"] == manifest["rows_out"]
    assert manifest["train_rows"] > 0 and manifest["eval_rows"] > 0
    rap = next(r for r in rows if "Rap music" in json.dumps(r))
    assert rap == {"conversations": [
        {"from": "system", "value": "Write a tweet in all capital letters."},
        {"from": "human", "value": "The topic is: Rap music"},
        {"from": "gpt", "value": "I LOVE RAP MUSIIIIIIIIC"}]}
    assert not (paths.prepare_dir / "quarantine.jsonl").exists()


def test_split_is_deterministic_and_seeded(tmp_path):
    src = write_csv(tmp_path / "d.csv", [f"Topic {i},TWEET {i}" for i in range(60)])
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        _, paths = run_prepare(tmp_path, dataset_cfg(src, seed=seed), name=name)
        runs.append(paths.eval_jsonl.read_text())
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_equal_and_near_equal_prompts_never_straddle_the_split(tmp_path):
    rows = [f"{'topic' if i % 3 else 'Topic'} {i % 10}{'!' if i % 2 else ''},TWEET VARIANT {i}" for i in range(50)]
    src = write_csv(tmp_path / "d.csv", rows)
    manifest, paths = run_prepare(tmp_path, dataset_cfg(src, eval_fraction=0.3))

    def topics(path):
        return {r["conversations"][1]["value"].lower().rstrip("!") for r in lines(path)}
    assert topics(paths.train_jsonl) and topics(paths.eval_jsonl)
    assert not topics(paths.train_jsonl) & topics(paths.eval_jsonl)
    assert manifest["split_overlap"] == 0


def test_a_failing_prepare_writes_nothing(tmp_path):
    src = write_csv(tmp_path / "d.csv", ["Tea,TEA", "Empty,"])
    with pytest.raises(DataError) as err:
        run_prepare(tmp_path, dataset_cfg(src))
    assert f"{src}:3: empty content" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_quarantine_drops_rows_with_a_record_each_and_counts_them(tmp_path):
    src = write_csv(tmp_path / "d.csv", [f"Topic {i},TWEET {i}" for i in range(20)] + ["Empty,", "Topic 3,TWEET 3"])
    manifest, paths = run_prepare(tmp_path, dataset_cfg(src, on_invalid="quarantine"))
    records = lines(paths.prepare_dir / "quarantine.jsonl")
    assert [(r["where"], r["reasons"], r["row"]) for r in records] == [
        (f"{src}:22", ["empty content"], "Empty,"), (f"{src}:23", ["duplicate"], "Topic 3,TWEET 3")]
    assert manifest["rows_in"] == 22 and manifest["rows_quarantined"] == 2 and manifest["rows_out"] == 20
    assert len(lines(paths.train_jsonl)) + len(lines(paths.eval_jsonl)) == 20


def test_whole_file_problems_fail_even_under_quarantine(tmp_path):
    src = write_csv(tmp_path / "d.csv", ["Tea,TEA"], header="subject,tweet")
    with pytest.raises(DataError, match="missing CSV column"):
        run_prepare(tmp_path, dataset_cfg(src, on_invalid="quarantine"))
    assert not (tmp_path / "run").exists()


def multi_turn_jsonl(path, turns: int, extra_rows=10):
    def row(n, words):
        body = []
        for t in range(n):
            body += [{"from": "human", "value": f"question {t} " + "word " * words},
                     {"from": "gpt", "value": f"ANSWER {t} " + "WORD " * words}]
        return {"conversations": [{"from": "system", "value": "Be loud."}] + body}
    rows = [row(turns, 40)] + [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"A{i}"}]}
                               for i in range(extra_rows)]
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_over_long_rows_fail_by_default_naming_the_line_and_the_limit(tmp_path):
    src = multi_turn_jsonl(tmp_path / "d.jsonl", turns=3)
    with pytest.raises(DataError) as err:
        run_prepare(tmp_path, dataset_cfg(src, format="sharegpt"), max_length=150)
    assert f"{src}:1: over-long (" in str(err.value) and "training.max_seq_length=150" in str(err.value)
    assert f"{src}:2:" not in str(err.value)


def test_trim_history_drops_old_exchanges_never_the_final_answer(tmp_path):
    from tunelab.data.formats import ROLE_ALIASES

    src = multi_turn_jsonl(tmp_path / "d.jsonl", turns=3)
    turns = json.loads(src.read_text().splitlines()[0])["conversations"]
    messages = [{"role": ROLE_ALIASES[t["from"]], "content": t["value"]} for t in turns]
    last_two = len(meter().encode(messages[:1] + messages[3:])["input_ids"])  # system + the last 2 exchanges
    cfg = dataset_cfg(src, format="sharegpt", trim_history=True, eval_fraction=0.3)
    manifest, paths = run_prepare(tmp_path, cfg, max_length=last_two)
    long_row = next(r for r in lines(paths.train_jsonl) + lines(paths.eval_jsonl) if len(r["conversations"]) > 3)
    assert long_row["conversations"] == turns[:1] + turns[3:]
    assert manifest["rows_trimmed"] == 1 and manifest["token_lengths"]["max"] == last_two
    record = lines(paths.prepare_dir / "quarantine.jsonl")[0]
    assert record["action"] == "trimmed" and record["where"] == f"{src}:1" and "dropped the 1 oldest" in record["problems"][0]


def test_trim_history_never_cuts_a_single_exchange(tmp_path):
    src = multi_turn_jsonl(tmp_path / "d.jsonl", turns=1)
    with pytest.raises(DataError, match="over-long .*even its final exchange alone is too long"):
        run_prepare(tmp_path, dataset_cfg(src, format="sharegpt", trim_history=True), max_length=40)


def test_eval_path_leakage_names_the_eval_row_and_its_training_twin(tmp_path):
    train = write_csv(tmp_path / "train.csv", [f"Topic {i},TWEET {i}" for i in range(10)])
    held = write_csv(tmp_path / "eval.csv", ["Fresh,NEW", "TOPIC 4.,A DIFFERENT ANSWER", "Topic 5,TWEET 5"])
    with pytest.raises(DataError) as err:
        run_prepare(tmp_path, dataset_cfg(train, eval_path=str(held)))
    assert f"{held}:3: leakage between splits - its prompt is also in the training data at {train}:6" in str(err.value)
    assert f"{held}:4: leakage between splits - the whole row is a duplicate of {train}:7" in str(err.value)
    manifest, paths = run_prepare(tmp_path, dataset_cfg(train, eval_path=str(held), on_invalid="quarantine"))
    assert manifest["eval_rows"] == 1 and manifest["rows_quarantined"] == 2


def test_manifest_records_the_same_identity_the_config_hash_uses(tmp_path):
    train = write_csv(tmp_path / "train.csv", [f"Topic {i},TWEET {i}" for i in range(10)])
    held = write_csv(tmp_path / "eval.csv", ["Fresh,NEW"])
    cfg = dataset_cfg(train, eval_path=str(held))
    manifest, _ = run_prepare(tmp_path, cfg)
    assert manifest["dataset_sha256"] == dataset_sha256(cfg)
    write_csv(held, ["Fresh,NEWER"])
    assert dataset_sha256(cfg) != manifest["dataset_sha256"]


def test_a_pinned_hash_refuses_other_bytes(tmp_path):
    src = write_csv(tmp_path / "d.csv", [f"Topic {i},TWEET {i}" for i in range(10)])
    pinned = dataset_sha256(dataset_cfg(src))
    run_prepare(tmp_path, dataset_cfg(src, sha256=pinned))
    write_csv(src, [f"Topic {i},TWEET {i}" for i in range(11)])
    with pytest.raises(DataError, match=f"hash mismatch .*dataset.sha256 pins {pinned}"):
        run_prepare(tmp_path, dataset_cfg(src, sha256=pinned), name="again")
    assert not (tmp_path / "again").exists()


def test_several_sources_mix_by_rows_and_weight(tmp_path):
    a = write_csv(tmp_path / "a.csv", [f"A {i},TWEET A {i}" for i in range(40)])
    b = write(tmp_path / "b.jsonl", "".join(json.dumps({"messages": [{"role": "user", "content": f"B {i}"},
                                                                     {"role": "assistant", "content": f"B{i}"}]}) + "\n"
                                            for i in range(30)))
    mapping = dict(system_prompt=None, user_template="{topic}", answer_column="tweet")
    cfg = dataset_cfg(sources=[dict(format="csv", path=str(a), rows=10, **mapping),
                               dict(format="openai", path=str(b), weight=2.0)], eval_fraction=0.2)
    manifest, paths = run_prepare(tmp_path, cfg)
    rows = lines(paths.train_jsonl) + lines(paths.eval_jsonl)
    from_a = [r for r in rows if r["conversations"][0]["value"].startswith("A ")]
    from_b_train = [r for r in lines(paths.train_jsonl) if r["conversations"][0]["value"].startswith("B ")]
    b_train_unique = {json.dumps(r) for r in from_b_train}
    assert len(from_a) == 10 and manifest["rows_not_sampled"] == 30
    assert len(from_b_train) == 2 * len(b_train_unique)  # weight 2: every training row of b twice
    assert manifest["sources"][0]["rows_used"] == 10 and manifest["rows_repeated"] == len(b_train_unique)
    assert manifest["rows_in"] == (manifest["rows_out"] - manifest["rows_repeated"] + manifest["rows_quarantined"]
                                   + manifest["rows_not_sampled"] + manifest["eval_rows_not_used"])
    again, paths2 = run_prepare(tmp_path, cfg, name="again")
    assert paths2.train_jsonl.read_text() == paths.train_jsonl.read_text()


def test_the_stage_removes_an_older_split_when_it_fails(tmp_path, compose_cfg):
    good = write_csv(tmp_path / "d.csv", [f"Topic {i},TWEET {i}" for i in range(20)])
    cfg = compose_cfg("experiment=smoke", f"dataset.path={good}", "dataset.eval_path=null", f"paths.run_dir={tmp_path}/run")
    paths = RunPaths.from_config(cfg.paths)
    prepare.run(cfg, paths)
    assert paths.train_jsonl.is_file()
    write_csv(good, [f"Topic {i},TWEET {i}" for i in range(20)] + ["Topic 1,TWEET 1"])
    with pytest.raises(DataError, match=f"{good}:22: duplicate"):
        prepare.run(cfg, paths)
    assert not paths.prepare_dir.exists()
