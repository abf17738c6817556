"""Every input format -> the same canonical records for the same conversations; problems name file:line."""
from __future__ import annotations

import json

import pytest

from tunelab.data.formats import DataError
from tunelab.data.load import load_dataset
from tunelab.data.readers import read_source
from tunelab.data.sources import Source
from data_helpers import TWEET_SYSTEM, write

ROWS = [("Rap music", "I LOVE RAP MUSIIIIIIIIC"), ("Pokemon", "SNORLAX. THAT'S THE TWEET."),
        ("Café au lait", "CAFÉ AU LAIT, S'IL VOUS PLAÎT.")]
CANONICAL = [[{"role": "system", "content": TWEET_SYSTEM}, {"role": "user", "content": f"The topic is: {t}"},
              {"role": "assistant", "content": a}] for t, a in ROWS]
MULTI_TURN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "HELLO"}, {"role": "user", "content": "Again"},
              {"role": "assistant", "content": "HELLO AGAIN"}]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}
CSV_MAPPING = dict(system_prompt=TWEET_SYSTEM, user_template="The topic is: {topic}", answer_column="tweet")


def sharegpt(messages):
    return {"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in messages]}


def jsonl(path, objects):
    return write(path, "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects))


def messages_of(source):
    data = read_source(source)
    assert not data.problems, [str(p) for p in data.problems]
    return [c.messages for c in data.conversations]


def save_to_disk(path, rows):
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(path))
    return path


def test_every_format_gives_identical_canonical_records(tmp_path):
    csv_text = "topic,tweet\n" + "".join(f'"{t}","{a}"\n' for t, a in ROWS)
    alpaca = [{"instruction": m[1]["content"], "input": "", "output": m[2]["content"]} for m in CANONICAL]
    sources = [
        Source("csv", str(write(tmp_path / "plain.csv", csv_text)), **CSV_MAPPING),
        Source("csv", str(write(tmp_path / "bom.csv", "\ufeff" + csv_text)), **CSV_MAPPING),
        Source("csv", str(write(tmp_path / "crlf.csv", csv_text.replace("\n", "\r\n"))), **CSV_MAPPING),
        Source("sharegpt", str(jsonl(tmp_path / "s.jsonl", [sharegpt(m) for m in CANONICAL]))),
        Source("openai", str(jsonl(tmp_path / "o.jsonl", [{"messages": m} for m in CANONICAL]))),
        Source("alpaca", str(jsonl(tmp_path / "a.jsonl", alpaca)), system_prompt=TWEET_SYSTEM),
        Source("alpaca", str(write(tmp_path / "a.json", json.dumps(alpaca, indent=2))), system_prompt=TWEET_SYSTEM),
        Source("hf_disk", str(save_to_disk(tmp_path / "hf_cols", [{"topic": t, "tweet": a} for t, a in ROWS])),
               **CSV_MAPPING),
        Source("hf_disk", str(save_to_disk(tmp_path / "hf_msgs", [{"messages": m} for m in CANONICAL]))),
        Source("hf_disk", str(save_to_disk(tmp_path / "hf_sharegpt", [sharegpt(m) for m in CANONICAL]))),
    ]
    for source in sources:
        assert messages_of(source) == CANONICAL, source.path


def test_multi_turn_conversations_keep_every_turn_in_every_conversation_format(tmp_path):
    sources = [
        Source("sharegpt", str(jsonl(tmp_path / "s.jsonl", [sharegpt(MULTI_TURN)]))),
        Source("openai", str(jsonl(tmp_path / "o.jsonl", [{"messages": MULTI_TURN}]))),
        Source("hf_disk", str(save_to_disk(tmp_path / "hf", [{"messages": MULTI_TURN}]))),
    ]
    for source in sources:
        assert messages_of(source) == [MULTI_TURN]


def test_role_aliases_and_openai_text_parts(tmp_path):
    turns = [{"from": "USER", "value": "Hi"}, {"from": "model", "value": "HELLO"},
             {"from": "human", "value": "Again"}, {"from": "assistant", "value": "HELLO AGAIN"}]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]},
                          {"role": "assistant", "content": "HELLO"}]}
    assert messages_of(Source("sharegpt", str(jsonl(tmp_path / "s.jsonl", [{"conversations": turns}])))) == [MULTI_TURN[1:]]
    assert messages_of(Source("openai", str(jsonl(tmp_path / "o.jsonl", [parts])))) == [MULTI_TURN[1:3]]


def test_alpaca_input_follows_the_instruction_after_a_blank_line(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [{"instruction": "Shout this.", "input": "hello", "output": "HELLO"}])
    assert messages_of(Source("alpaca", str(path))) == [[{"role": "user", "content": "Shout this.\n\nhello"},
                                                          {"role": "assistant", "content": "HELLO"}]]


def test_csv_system_and_user_prompts_can_be_templated(tmp_path):
    path = write(tmp_path / "d.csv", "lang,q,a\nFrench,Bonjour?,OUI\n")
    source = Source("csv", str(path), system_prompt="Answer in {lang}. Literal {{braces}}.",
                    user_template="Q: {q}", answer_column="a")
    assert messages_of(source) == [[{"role": "system", "content": "Answer in French. Literal {braces}."},
                                    {"role": "user", "content": "Q: Bonjour?"}, {"role": "assistant", "content": "OUI"}]]


def test_a_latin1_csv_names_every_bad_line_and_how_to_convert(tmp_path):
    path = write(tmp_path / "d.csv", "topic,tweet\nCafé,OK\nTea,FINE\nNaïve,YES\n", encoding="latin-1")
    data = read_source(Source("csv", str(path), **CSV_MAPPING))
    messages = [str(p) for p in data.problems]
    assert messages[0].startswith(f"{path}:2: not UTF-8 byte 0xe9") and "iconv" in messages[0]
    assert messages[1].startswith(f"{path}:4: not UTF-8")
    assert len(messages) == 2 and all(p.fatal for p in data.problems) and not data.conversations


def test_a_utf16_file_is_named_as_such(tmp_path):
    path = write(tmp_path / "d.csv", "\ufefftopic,tweet\nTea,FINE\n", encoding="utf-16")
    data = read_source(Source("csv", str(path), **CSV_MAPPING))
    assert [str(p) for p in data.problems] == [f"{path}:1: not UTF-8 the file is UTF-16 (it starts with a UTF-16 "
                                               "byte-order mark); re-save it as UTF-8"]


def test_csv_rows_with_the_wrong_number_of_fields_are_named(tmp_path):
    path = write(tmp_path / "d.csv", "topic,tweet\nTea,FINE\nCoffee\nBeer,YES,EXTRA\n")
    problems = [str(p) for p in read_source(Source("csv", str(path), **CSV_MAPPING)).problems]
    assert problems == [f"{path}:3: malformed CSV the row has 1 fields, the header has 2",
                        f"{path}:4: malformed CSV the row has 3 fields, the header has 2"]


def test_a_missing_column_in_a_datasets_folder_is_named(tmp_path):
    folder = save_to_disk(tmp_path / "hf", [{"subject": "Tea", "tweet": "FINE"}])
    problems = read_source(Source("hf_disk", str(folder), **CSV_MAPPING)).problems
    assert len(problems) == 1 and problems[0].reason == "missing CSV column" and "'topic'" in str(problems[0])


def test_datasets_folder_rows_are_named_by_index(tmp_path):
    folder = save_to_disk(tmp_path / "hf", [{"messages": MULTI_TURN}, {"messages": MULTI_TURN[:2]}])
    problems = [str(p) for p in read_source(Source("hf_disk", str(folder))).problems]
    assert problems == [f"{folder}[1]: no assistant turn - every row needs an answer to train on"]


def test_every_problem_of_every_source_is_reported_in_one_pass(tmp_path):
    from data_helpers import dataset_cfg

    bad_csv = write(tmp_path / "a.csv", "topic,tweet\nTea,\nTea,FINE\ntea!,FINE\n")
    bad_jsonl = write(tmp_path / "b.jsonl", '{"conversations": [}\n' + json.dumps(sharegpt(MULTI_TURN[:2])) + "\n")
    cfg = dataset_cfg(sources=[dict(format="csv", path=str(bad_csv), **CSV_MAPPING),
                               dict(format="sharegpt", path=str(bad_jsonl))])
    loaded = load_dataset(cfg, meter=None)
    assert [str(p).split(" ")[0:3] for p in loaded.problems] == [
        [f"{bad_csv}:2:", "empty", "content"], [f"{bad_csv}:4:", "duplicate", "(near-exact:"],
        [f"{bad_jsonl}:1:", "malformed", "JSON"], [f"{bad_jsonl}:2:", "no", "assistant"]]
    with pytest.raises(DataError):
        from tunelab.data.quarantine import enforce
        enforce(loaded.problems, "fail")


def test_a_datasets_dict_folder_reads_the_configured_split(tmp_path):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "hf"
    DatasetDict({"train": Dataset.from_list([{"messages": MULTI_TURN}]),
                 "test": Dataset.from_list([{"messages": MULTI_TURN[:3]}])}).save_to_disk(str(folder))
    assert messages_of(Source("hf_disk", str(folder), split="test")) == [MULTI_TURN[:3]]
    with pytest.raises(FileNotFoundError, match="no split 'dev'; it has \\['train', 'test'\\]"):
        read_source(Source("hf_disk", str(folder), split="dev"))


def test_an_empty_source_is_a_problem_not_an_empty_dataset(tmp_path):
    from data_helpers import dataset_cfg

    empty = write(tmp_path / "e.jsonl", "\n")
    loaded = load_dataset(dataset_cfg(empty, format="sharegpt"), meter=None)
    assert [str(p) for p in loaded.problems] == [f"{empty}: no rows - the source is empty"]
