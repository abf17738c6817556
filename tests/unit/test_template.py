"""The template contract: loss on assistant content and its end-of-turn token, nothing else."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from tunelab.config.checks import ConfigError
from tunelab.config.schema import ModelConfig
from tunelab.models.source import load_tokenizer, resolve_model
from tunelab.paths import RunPaths
from tunelab.templates.chat import ChatTemplate, TemplateError, sandbox, template_from_config, tokenize_conversation
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


# --- every template option, on both tiny tokenizers (SmolLM2's and Llama 3's real one) ---

import copy

from tunelab.config.checks import validate
from tunelab.templates.chat import add_special_tokens
from conftest import CONF

TEMPLATES = sorted(p.stem for p in (CONF / "template").glob("*.yaml") if p.stem != "native")
TINY_MODELS = {"tiny": "tiny", "tiny_llama3": "tiny-llama3"}


@pytest.fixture(scope="module")
def tokenizers():
    paths = RunPaths(ROOT / "runs/unit", ROOT / ".cache/tunelab")
    out = {}
    for option in TINY_MODELS:
        from tunelab.config.compose import compose

        cfg = compose([f"model={option}"])
        out[option] = load_tokenizer(resolve_model(cfg.model, RunPaths.from_config(cfg.paths)))
    return out


@pytest.mark.parametrize("model", sorted(TINY_MODELS))
@pytest.mark.parametrize("option", TEMPLATES)
def test_each_template_trains_exactly_the_answers_and_their_end_of_turn(compose_cfg, tokenizers, model, option):
    cfg = compose_cfg(f"template={option}", f"model={model}")
    tokenizer = copy.deepcopy(tokenizers[model])
    added = add_special_tokens(tokenizer, list(cfg.template.special_tokens))
    template = template_from_config(cfg.template, tokenizer)
    encoded = tokenize_conversation(template, tokenizer, CONVERSATION)
    trained = tokenizer.decode([i for i, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m])
    assert trained.replace(" ", "") == (f"SNORLAX. THAT'S THE TWEET.{template.end_of_turn}"
                                        f"ONE MORE.{template.end_of_turn}").replace(" ", "")
    ids = encoded["input_ids"]
    if template.bos == "template":  # exactly one BOS, first
        assert ids[0] == tokenizer.bos_token_id != ids[1]
    marked = ChatTemplate(template.source, template.end_of_turn, "<BOS-MARK>", template.eos_token)
    assert marked.render(CONVERSATION).count("<BOS-MARK>") == (template.bos == "template")
    prompt = template.render(CONVERSATION[:2], add_generation_prompt=True)
    assert prompt.endswith(cfg.template.assistant_start)
    assert set(added) <= set(cfg.template.special_tokens)


@pytest.mark.parametrize("option", ["llama3", "gemma", "phi3"])
def test_special_tokens_the_tokenizer_lacks_are_an_error_naming_them(compose_cfg, tokenizers, option):
    cfg = compose_cfg(f"template={option}", "model=tiny")
    with pytest.raises(TemplateError) as err:
        template_from_config(cfg.template, tokenizers["tiny"])
    assert "template.add_missing_tokens=true" in str(err.value)
    assert all(t in str(err.value) for t in cfg.template.special_tokens)


def test_llama3_template_on_llama3_tokenizer_needs_nothing_added(compose_cfg, tokenizers):
    cfg = compose_cfg("template=llama3", "model=tiny_llama3")
    template = template_from_config(cfg.template, tokenizers["tiny_llama3"])
    assert template.end_of_turn == "<|eot_id|>" and template.bos_token == "<|begin_of_text|>"
    assert tokenizers["tiny_llama3"].convert_tokens_to_ids("<|eot_id|>") == 128009


def test_a_model_without_a_template_of_its_own_cannot_use_native(compose_cfg, tokenizers):
    cfg = compose_cfg("template=native", "model=tiny_llama3")
    with pytest.raises(TemplateError, match="no chat template of its own"):
        template_from_config(cfg.template, tokenizers["tiny_llama3"])


def test_a_bos_policy_the_template_does_not_follow_is_refused(compose_cfg, tokenizers):
    cfg = compose_cfg("template=chatml", "template.bos=template")
    with pytest.raises(TemplateError, match="does not start with the BOS token"):
        template_from_config(cfg.template, _with_chatml(tokenizers))


def _with_chatml(tokenizers):
    tokenizer = copy.deepcopy(tokenizers["tiny_llama3"])
    add_special_tokens(tokenizer, ["<|im_start|>", "<|im_end|>"])
    return tokenizer


def test_an_assistant_marker_the_template_does_not_write_is_refused(compose_cfg, tokenizers):
    cfg = compose_cfg("template=llama3", "model=tiny_llama3", "template.assistant_start='<|im_start|>assistant'")
    with pytest.raises(TemplateError, match="assistant_start"):
        template_from_config(cfg.template, tokenizers["tiny_llama3"])


def test_every_run_measures_stopping_and_template_leaks(compose_cfg):
    cfg = compose_cfg("eval=generic", "~eval.metrics.stop_by_eot_rate", "template.bos=sometimes")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert any("stop_by_eot_rate" in p for p in err.value.problems)
    assert any("template.bos='sometimes'" in p for p in err.value.problems)


def test_llama3_tokenizer_read_from_the_vocab_gguf_tokenizes_like_llama_cpp(tokenizers):
    from llama_cpp import Llama

    from tunelab.models.source import tiny_tokenizer_gguf

    vocab = Llama(model_path=str(tiny_tokenizer_gguf("llama3", ROOT / ".cache/tunelab")), vocab_only=True, verbose=False)
    texts = ["3.14159 and 2024\n\n\nI'm   don't", "<|start_header_id|>user<|end_header_id|>\n\nHI<|eot_id|>",
             "naïve café 😀\t tabs  ", "WRITE A TWEET ABOUT RAP MUSIC!!! #2024"]
    for text in texts:
        ours = tokenizers["tiny_llama3"](text, add_special_tokens=False)["input_ids"]
        assert ours == list(vocab.tokenize(text.encode(), add_bos=False, special=True)), text
    vocab.close()
