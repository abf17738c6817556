"""The Ollama Modelfile's Go template is read off the Jinja template and must reassemble it exactly
(the gate then checks it by token ids: tests/unit/test_runtimes.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tunelab.export.modelfile import message_pieces, modelfile_text, reassemble
from tunelab.templates.chat import ChatTemplate
from tunelab.templates.parity import sample_conversations
from conftest import CONF

SETTINGS = {"n_ctx": 512, "max_tokens": 64}
CONVERSATIONS = [
    [{"role": "system", "content": "Write in capitals."}, {"role": "user", "content": "Tea"},
     {"role": "assistant", "content": "TEA!"}],
    [{"role": "user", "content": "Tea"}, {"role": "assistant", "content": "TEA!"},
     {"role": "user", "content": "More"}, {"role": "assistant", "content": "MORE TEA!"}],
]


def template(option: str) -> ChatTemplate:
    cfg = OmegaConf.load(CONF / "template" / f"{option}.yaml")
    return ChatTemplate(cfg.chat_template, cfg.get("end_of_turn") or "</s>", "<s>", "</s>", name=option)


@pytest.mark.parametrize("option", ["chatml", "llama3", "phi3", "zephyr", "alpaca"])
def test_per_message_templates_get_a_go_template_that_reassembles_them(option):
    chat = template(option)
    pieces = message_pieces(chat)
    assert pieces.default_system == ""
    for messages in sample_conversations(CONVERSATIONS):
        assert reassemble(pieces, messages, False) == chat.render(messages)
        assert reassemble(pieces, messages[:-1], True) == chat.render(messages[:-1], add_generation_prompt=True)
    text = modelfile_text(Path("model.q5_k_m.gguf"), chat, ["User:"], pieces, "", False, None, SETTINGS)
    assert text.splitlines()[1] == "FROM ./model.q5_k_m.gguf"
    assert 'TEMPLATE """' in text and '{{ .Content }}' in text and "SYSTEM" not in text
    assert f'PARAMETER stop "{chat.end_of_turn}"' in text and 'PARAMETER stop "User:"' in text
    assert "PARAMETER temperature 0" in text and "PARAMETER repeat_penalty 1" in text
    assert "PARAMETER num_ctx 512" in text and "PARAMETER num_predict 64" in text


def test_when_the_gguf_adds_bos_the_go_template_does_not_write_it():
    chat = template("llama3")
    pieces = message_pieces(chat)
    assert pieces.head == "<s>"
    messages = sample_conversations(CONVERSATIONS)[0]
    assert reassemble(pieces, messages, False, drop_head=True) == chat.render(messages)[len("<s>"):]
    with_head = modelfile_text(Path("m.gguf"), chat, [], pieces, "", False, None, SETTINGS)
    without = modelfile_text(Path("m.gguf"), chat, [], pieces, "", True, None, SETTINGS)
    assert 'TEMPLATE """<s>' in with_head and 'TEMPLATE """<s>' not in without and 'TEMPLATE """' in without


def test_the_system_prompt_training_always_had_becomes_the_modelfiles_system():
    chat = template("chatml")
    text = modelfile_text(Path("m.gguf"), chat, [], message_pieces(chat), "", False, "Write in capitals.", SETTINGS)
    assert 'SYSTEM """Write in capitals."""' in text


@pytest.mark.parametrize("option", ["mistral", "gemma"])
def test_templates_that_merge_turns_get_no_go_template(option):
    assert message_pieces(template(option)) is None
    text = modelfile_text(Path("model.f16.gguf"), template(option), [], None, "it merges turns", False, None, SETTINGS)
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "")
    assert "# No TEMPLATE: it merges turns" in text


def test_the_gate_samples_each_conversation_with_and_without_a_system_prompt():
    samples = sample_conversations(CONVERSATIONS)
    assert len(samples) == 4
    assert [m["role"] for m in samples[0]] == ["system", "user", "assistant"]
    assert [m["role"] for m in samples[1]] == ["user", "assistant"]
    assert samples[2][0] == {"role": "system", "content": "You are a helpful assistant."}
    assert samples[3] == CONVERSATIONS[1]


SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\\nYou are SmolLM<|im_end|>\\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_a_default_system_prompt_is_carried_into_the_go_template():
    chat = ChatTemplate(SMOLLM2, "<|im_end|>", "<|im_start|>", "<|im_end|>", name="native")
    pieces = message_pieces(chat)
    assert pieces.default_system == "You are SmolLM"
    for messages in sample_conversations(CONVERSATIONS):
        assert reassemble(pieces, messages, False) == chat.render(messages)
    text = modelfile_text(Path("model.f16.gguf"), chat, [], pieces, "", False, None, SETTINGS)
    assert '(ne (index .Messages 0).Role "system") }}<|im_start|>system\nYou are SmolLM<|im_end|>' in text
