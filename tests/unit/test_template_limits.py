"""Rendering a chat template is bounded in time and size; a template over a bound or breaking the
sandbox fails fast, naming where it came from. The bounds' own timing is what is tested: each case
must end (pytest-timeout stops a hang) and the time bound is asserted as a floor, never a ceiling."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from tunelab.config.schema import ModelConfig
from tunelab.models.source import load_tokenizer, resolve_model
from tunelab.paths import RunPaths
from tunelab.templates import sandbox as bounds
from tunelab.templates.chat import ChatTemplate, TemplateLimitError, template_from_config
from conftest import ROOT

pytestmark = pytest.mark.timeout(60)
ORIGIN = "template.chat_template (template=evil)"
ROWS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HELLO"}]

RUNAWAY = {
    "nested range loops with no output": (
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "longer than"),
    "loops over a list (not range)": (
        "{% set r = range(100000)|list %}{% for a in r %}{% for b in r %}{% endfor %}{% endfor %}", "longer than"),
    "one loop with a slow body and no call": (
        "{% set r = range(100000)|list %}{% for a in r %}{% set s = r|join %}{% endfor %}", "longer than"),
    "a huge repetition": ("{{ 'x' * 10**9 }}", "'*' would make 1,000,000,000 items"),
    "a huge power": ("{{ 7 ** 100000000 }}", "would be a number of over"),
    "a huge output loop": ("{% for a in range(100000) %}{{ 'xxxxxxxxxx' * 10 }}{% endfor %}",
                           "rendered text is over the bound"),
    "a recursive macro": ("{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}", "recurses too deep"),
    "a sandbox escape": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "break out of the sandbox"),
}


@pytest.mark.parametrize("case", list(RUNAWAY))
def test_a_runaway_template_fails_naming_its_source_and_the_bound(case):
    source, bound = RUNAWAY[case]
    with pytest.raises(TemplateLimitError) as err:
        ChatTemplate(source, "<|im_end|>", origin=ORIGIN).render(ROWS)
    assert str(err.value).startswith(f"{ORIGIN}: ") and bound in str(err.value)


def test_the_time_bound_is_the_configured_one(monkeypatch):
    monkeypatch.setattr(bounds, "RENDER_SECONDS", 0.2)
    template = ChatTemplate(RUNAWAY["nested range loops with no output"][0], "", origin=ORIGIN)
    with pytest.raises(TemplateLimitError, match="longer than the bound of 0.2 s"):
        template.render(ROWS)


def test_an_ordinary_template_renders_untouched_and_leaves_no_deadline_behind():
    text = ChatTemplate("{% for m in messages %}[{{ m.role }}] {{ m.content ~ '!' * 3 + '?' }}\n{% endfor %}", "").render(ROWS)
    assert text == "[user] hi!!!?\n[assistant] HELLO!!!?\n" and bounds._DEADLINE.at is None


def test_doubling_a_string_stops_at_the_size_bound_not_at_the_memory_limit():
    source = "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
    with pytest.raises(TemplateLimitError, match="'\\+' or '~' makes a value of 1,048,576 items"):
        ChatTemplate(source, "", origin=ORIGIN).render(ROWS)


def test_a_macro_that_calls_itself_twice_stops_at_the_deadline():
    source = "{% macro m(n) %}{% if n %}{{ m(n - 1) }}{{ m(n - 1) }}{% endif %}{% endmacro %}{{ m(60) }}"
    with pytest.raises(TemplateLimitError, match="longer than the bound"):
        ChatTemplate(source, "", origin=ORIGIN).render(ROWS)


@pytest.fixture(scope="module")
def tokenizer():
    paths = RunPaths(ROOT / "runs/unit", ROOT / ".cache/tunelab")
    return load_tokenizer(resolve_model(OmegaConf.structured(ModelConfig(name="tiny-llama", source="tiny")), paths))


def test_a_configured_template_is_named_by_its_key_and_config(tokenizer):
    cfg = SimpleNamespace(name="evil", chat_template=RUNAWAY["a huge repetition"][0], end_of_turn="<|im_end|>")
    with pytest.raises(TemplateLimitError, match=r"^template\.chat_template \(template=evil\): '\*' would make"):
        template_from_config(cfg, tokenizer)


def test_the_models_own_template_is_named_by_its_tokenizer_folder(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", RUNAWAY["a recursive macro"][0])
    cfg = SimpleNamespace(name="native", chat_template=None, end_of_turn="<|im_end|>")
    with pytest.raises(TemplateLimitError) as err:
        template_from_config(cfg, tokenizer)
    assert str(err.value).startswith(f"the model's own template (template=native) from {tokenizer.name_or_path}: ")
    assert "recurses too deep" in str(err.value)


def test_a_row_that_sets_off_a_runaway_template_stops_prepares_length_check(tokenizer):
    """Not one row's 'template error' among others: every row would spend the time bound again."""
    from tunelab.data.formats import Conversation
    from tunelab.data.lengths import LengthMeter

    source = ("{% for m in messages %}{% if m.content == 'boom' %}{{ 'x' * 10**9 }}{% endif %}"
              "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    cfg = SimpleNamespace(name="evil", chat_template=source, end_of_turn="<|im_end|>")
    meter = LengthMeter(template_from_config(cfg, tokenizer), tokenizer, 512)
    assert meter.fit(Conversation(ROWS, "a.csv:2"), False)[1] is None
    with pytest.raises(TemplateLimitError, match="template=evil"):
        meter.fit(Conversation([ROWS[0], {"role": "assistant", "content": "boom"}], "a.csv:3"), False)
