"""Message text the tokenizer reads as a special or added token: an error naming file:line, or
(dataset.special_tokens_in_text=escape) trained as plain text, and the gate's label check."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest

from tunelab.config.checks import ConfigError, validate
from tunelab.data.formats import DataError
from tunelab.paths import RunPaths
from tunelab.stages import prepare
from tunelab.templates.chat import TemplateError, template_from_config, tokenize_conversation
from tunelab.templates.parity import TrainingContract, check_end_of_turn, training_contract
from tunelab.templates.special_text import find_special_text
from data_helpers import dataset_cfg, meter, tiny_tokenizer, write

EOT = "<|im_end|>"  # the tiny model's (SmolLM2's) end of turn, id 2
ANSWER = f"USE {EOT} TO END A TURN"
CONVERSATION = [{"role": "system", "content": "Be loud."}, {"role": "user", "content": "How does ChatML end a turn?"},
                {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "And <|im_start|>?"},
                {"role": "assistant", "content": "IT STARTS ONE."}]


def run_prepare(tmp_path, cfg, special_text="error", name="run"):
    m = meter()
    m.special_text = cfg.special_tokens_in_text = special_text  # as LengthMeter.from_config reads it
    paths = RunPaths(tmp_path / name, tmp_path / "cache")
    return prepare.prepare_dataset(cfg, paths, m), paths


def tweets_csv(path, bad_rows):
    rows = [f"Topic {i},TWEET {i}" for i in range(12)] + bad_rows
    return write(path, "topic,tweet\n" + "\n".join(rows) + "\n")


def labels(encoded):
    return [i if m else -100 for i, m in zip(encoded["input_ids"], encoded["assistant_masks"])]


def test_strict_mode_names_every_row_by_file_and_line_and_writes_nothing(tmp_path):
    src = tweets_csv(tmp_path / "d.csv", [f"Coffee,COFFEE {EOT} MORE", "<|im_start|>Tea,TEA <|endoftext|> <|im_end|>"])
    with pytest.raises(DataError) as err:
        run_prepare(tmp_path, dataset_cfg(src))
    assert err.value.problems == [
        f"{src}:14: special token in text - message 3 (assistant) contains '<|im_end|>', which the tokenizer reads as "
        "the special token id 2; remove it or set dataset.special_tokens_in_text=escape to train it as plain text",
        f"{src}:15: special token in text - message 2 (user) contains '<|im_start|>', which the tokenizer reads as "
        "the special token id 1 (and 2 more: '<|endoftext|>', '<|im_end|>'); remove it or set "
        "dataset.special_tokens_in_text=escape to train it as plain text"]
    assert not (tmp_path / "run").exists()


def test_strict_mode_on_jsonl_and_quarantine_drops_the_row_with_its_reason(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
            for i in range(10)]
    rows.insert(3, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ANSWER}]})
    src = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"{src}:4: special token in text - message 2 \(assistant\) contains "
                                        r"'<\|im_end\|>'"):
        run_prepare(tmp_path, dataset_cfg(src, format="openai"))
    manifest, paths = run_prepare(tmp_path, dataset_cfg(src, format="openai", on_invalid="quarantine"))
    records = [json.loads(line) for line in (paths.prepare_dir / "quarantine.jsonl").read_text().splitlines()]
    assert [(r["where"], r["reasons"]) for r in records] == [(f"{src}:4", ["special token in text"])]
    assert manifest["rows_quarantined"] == 1 and manifest["rows_out"] == 10


def test_escape_keeps_the_row_and_counts_it(tmp_path):
    src = tweets_csv(tmp_path / "d.csv", [f"Coffee,COFFEE {EOT} MORE"])
    manifest, paths = run_prepare(tmp_path, dataset_cfg(src), special_text="escape")
    kept = paths.train_jsonl.read_text() + paths.eval_jsonl.read_text()
    assert f"COFFEE {EOT} MORE" in kept  # the data as written; only its tokenization changes
    assert manifest["rows_out"] == 13 and manifest["rows_special_text_escaped"] == 1
    assert manifest["special_tokens_in_text"] == "escape"


def test_escape_trains_the_text_as_plain_pieces_with_the_mask_and_turn_ends_right():
    tokenizer = tiny_tokenizer()
    template = meter().template
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    with pytest.raises(TemplateError, match="message 3 \\(assistant\\) contains '<\\|im_end\\|>'"):
        tokenize_conversation(template, tokenizer, CONVERSATION)
    encoded = tokenize_conversation(template, tokenizer, CONVERSATION, special_text="escape")
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    trained = [i for i, m in zip(ids, mask) if m]
    # the answers and their end of turn carry loss; the quoted <|im_end|> is ordinary pieces
    assert tokenizer.decode(trained) == f"{ANSWER}{EOT}IT STARTS ONE.{EOT}"
    assert trained.count(eot_id) == 2 and trained[-1] == eot_id
    assert "|" in tokenizer.convert_ids_to_tokens(trained)
    # the template's own markup stays special: one <|im_start|> per message (the user's quote is not one)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == len(CONVERSATION)
    assert ids.count(eot_id) == len(CONVERSATION)
    contract = training_contract(template, tokenizer, [labels(encoded)], [CONVERSATION], {})
    assert contract.eot_loss_tokens == 2 and contract.eot_inside_answers == 0
    # the answer is the tokens a tokenizer without special tokens gives it; every token outside the
    # two escaped contents is the one the tokenizer gives the whole text
    text, _ = template.assistant_spans(CONVERSATION)
    contents = template.content_spans(CONVERSATION, [2, 3])
    assert text[slice(*contents[0])] == ANSWER

    def tokens(ids, offsets, keep):
        return [(i, tuple(o)) for i, o in zip(ids, offsets) if keep(any(a <= o[0] < b for a, b in contents))]

    whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert (tokens(ids, encoded["offsets"], lambda inside: not inside)
            == tokens(whole["input_ids"], whole["offset_mapping"], lambda inside: not inside))
    answer = [i for i, (s, _) in zip(ids, encoded["offsets"]) if contents[0][0] <= s < contents[0][1]]
    assert answer == tokenizer(ANSWER, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_escape_with_llama3_tokenizer_and_template(compose_cfg):
    from tunelab.models.source import load_tokenizer, resolve_model

    cfg = compose_cfg("model=tiny_llama3", "template=llama3")
    tokenizer = load_tokenizer(resolve_model(cfg.model, RunPaths.from_config(cfg.paths)))
    template = template_from_config(cfg.template, tokenizer)
    messages = [{"role": "user", "content": "Quote it"}, {"role": "assistant", "content": "SAY <|eot_id|> NOW"}]
    encoded = tokenize_conversation(template, tokenizer, messages, special_text="escape")
    eot_id = 128009
    assert encoded["input_ids"].count(eot_id) == 2 and labels(encoded).count(eot_id) == 1
    assert labels(encoded)[-1] == eot_id and encoded["input_ids"][0] == tokenizer.bos_token_id
    trained = tokenizer.decode([i for i in labels(encoded) if i != -100])
    assert trained == "SAY <|eot_id|> NOW<|eot_id|>"


def test_added_tokens_are_flagged_and_escaped_but_not_plain_words():
    tokenizer = copy.deepcopy(tiny_tokenizer())
    tokenizer.add_tokens(["<tool_call>", "Snorlax"])  # not special: split_special_tokens leaves these whole
    tool_id = tokenizer.convert_tokens_to_ids("<tool_call>")
    messages = [{"role": "user", "content": "Snorlax?"}, {"role": "assistant", "content": "CALL <tool_call>NOW"}]
    assert [str(f) for f in find_special_text(tokenizer, messages)] == [
        f"message 2 (assistant) contains '<tool_call>', which the tokenizer reads as the added token id {tool_id}"]
    encoded = tokenize_conversation(meter().template, tokenizer, messages, special_text="escape")
    assert tool_id not in encoded["input_ids"]
    assert tokenizer.convert_tokens_to_ids("Snorlax") in encoded["input_ids"]  # a word, kept as the model's token
    assert tokenizer.decode([i for i in labels(encoded) if i != -100]) == f"CALL <tool_call>NOW{EOT}"


def test_a_token_that_takes_the_whitespace_around_it_is_escaped_too():
    from tokenizers import AddedToken

    tokenizer = copy.deepcopy(tiny_tokenizer())
    tokenizer.add_tokens([AddedToken("<tool>", lstrip=True, rstrip=True, special=True, normalized=False)])
    tool_id = tokenizer.convert_tokens_to_ids("<tool>")
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<tool> x <tool>"}]
    encoded = tokenize_conversation(meter().template, tokenizer, messages, special_text="escape")
    assert tool_id not in encoded["input_ids"]
    assert tokenizer.decode([i for i in labels(encoded) if i != -100]) == f"<tool> x <tool>{EOT}"


def test_a_template_that_changes_the_content_cannot_be_escaped_and_says_so():
    tokenizer = tiny_tokenizer()
    shouting = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n{% endfor %}"
    template = template_from_config(SimpleNamespace(name="x", chat_template=shouting, end_of_turn=EOT), tokenizer)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a <|im_end|> b"}]
    with pytest.raises(TemplateError, match="changes the content of message\\(s\\) 2"):
        tokenize_conversation(template, tokenizer, messages, special_text="escape")


class FakeVocab:
    """The GGUF side of check 3, agreeing with the tokenizer: only the contract is under test."""

    def __init__(self, eos_id):
        self.eos_id = eos_id

    def text(self, token_id):
        return EOT

    def is_end_of_generation(self, token_id):
        return True


def test_the_gate_fails_a_training_that_taught_the_end_of_turn_inside_an_answer(tmp_path):
    tokenizer = tiny_tokenizer()
    template = meter().template
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    text, spans = template.assistant_spans(CONVERSATION)
    # The bug this guards against: the quoted <|im_end|> tokenized as the control token and trained.
    raw = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    raw_labels = [i if any(a <= s < b for a, b in spans) else -100 for i, (s, _) in zip(raw["input_ids"],
                                                                                       raw["offset_mapping"])]
    bad = training_contract(template, tokenizer, [raw_labels], [CONVERSATION], {})
    assert bad.eot_inside_answers == 1
    problems = check_end_of_turn(FakeVocab(eot_id), template, tokenizer, bad)
    assert len(problems) == 1 and "1 time(s) inside an assistant answer" in problems[0]
    assert "taught to stop inside an answer" in problems[0]
    escaped = tokenize_conversation(template, tokenizer, CONVERSATION, special_text="escape")
    good = training_contract(template, tokenizer, [labels(escaped)], [CONVERSATION], {})
    assert check_end_of_turn(FakeVocab(eot_id), template, tokenizer, good) == []
    # a contract written before the count existed still reads, and is not failed for it
    old = json.loads(json.dumps(good.__dict__))
    del old["eot_inside_answers"]
    (tmp_path / "contract.json").write_text(json.dumps(old))
    assert TrainingContract.read(tmp_path / "contract.json").eot_inside_answers is None
    assert check_end_of_turn(FakeVocab(eot_id), template, tokenizer, TrainingContract.read(tmp_path / "contract.json")) == []


def test_training_refuses_prepared_special_text_unless_it_escapes():
    from tunelab.stages.train import build_dataset

    template, tokenizer = meter().template, tiny_tokenizer()
    with pytest.raises(TemplateError, match="prepared row 1: message 3 \\(assistant\\) contains '<\\|im_end\\|>'"):
        build_dataset([CONVERSATION], template, tokenizer, 256)
    row = build_dataset([CONVERSATION], template, tokenizer, 256, "escape")[0]
    assert row["labels"].count(tokenizer.convert_tokens_to_ids(EOT)) == 2


def test_the_policy_is_validated_naming_the_key_and_its_values(compose_cfg):
    validate(compose_cfg("experiment=smoke", "dataset.special_tokens_in_text=escape"))
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("experiment=smoke", "dataset.special_tokens_in_text=strip"))
    assert "dataset.special_tokens_in_text='strip' is not one of error, escape" in err.value.problems
