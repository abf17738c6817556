"""The template contract: loss on assistant content and its end-of-turn token, nothing else."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from tunelab.config.schema import ModelConfig
from tunelab.models.source import load_tokenizer, resolve_model
from tunelab.paths import RunPaths
from tunelab.templates.chat import TemplateError, sandbox, template_from_config, tokenize_conversation
from conftest import ROOT

CONVERSATION = [
    {"role": "system", "content": "Write a tweet in all capital letters."},
    {"role": "user", "content": "The topic is: Pokemon"},
    {"role": "assistant", "content": "SNORLAX. THAT'S THE TWEET."},
    {"role": "user", "content": "Another"},
    {"role": "assistant", "content": "ONE MORE."},
]


@pytest.fixture(scope="module")
def tokenizer():
    paths = RunPaths(ROOT / "runs/unit", ROOT / ".cache/tunelab")
    return load_tokenizer(resolve_model(OmegaConf.structured(ModelConfig(name="tiny-llama", source="tiny")), paths))


def native(tokenizer, **kw):
    return template_from_config(SimpleNamespace(name="native", chat_template=None, end_of_turn=None, **kw), tokenizer)


def test_end_of_turn_is_read_from_the_template_not_the_gguf_eos(tokenizer):
    # SmolLM2's GGUF-derived tokenizer carries a misleading eos; the template ends turns with <|im_end|>.
    assert native(tokenizer).end_of_turn == "<|im_end|>"


def test_loss_mask_covers_each_answer_and_its_end_of_turn_only(tokenizer):
    template = native(tokenizer)
    encoded = tokenize_conversation(template, tokenizer, CONVERSATION)
    trained = [tokenizer.decode([i]) for i, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert "".join(trained) == "SNORLAX. THAT'S THE TWEET.<|im_end|>ONE MORE.<|im_end|>"


def test_sequences_over_the_limit_are_an_error_not_a_silent_cut(tokenizer):
    with pytest.raises(TemplateError, match="max_seq_length"):
        tokenize_conversation(native(tokenizer), tokenizer, CONVERSATION, max_length=10)


def test_a_template_that_never_writes_the_end_of_turn_token_is_refused(tokenizer):
    broken = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    template = template_from_config(
        SimpleNamespace(name="broken", chat_template=broken, end_of_turn="<|im_end|>"), tokenizer)
    with pytest.raises(TemplateError, match="could never learn to stop"):
        template.assistant_spans(CONVERSATION[:3])


def test_templates_render_in_a_sandbox():
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception) as err:
        sandbox().from_string(evil).render()
    assert "unsafe" in str(err.value).lower() or "access" in str(err.value).lower()
