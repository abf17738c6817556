"""eval.metrics: `_target_` names any callable; keyword arguments come from the config and are checked
when the config is validated, each problem naming its key."""
from __future__ import annotations

import pytest

from tunelab.config.checks import ConfigError, validate
from tunelab.eval.metrics import Generation
from tunelab.eval.registry import metric_from_spec, metrics_from_config


def gens(*answers):
    return [Generation(prompt="p", reference="r", answer=a, finish_reason="stop") for a in answers]


def word_count_at_least(generations, n=1):
    """A user metric, named by _target_ like the built-ins."""
    return sum(len(g.answer.split()) >= n for g in generations) / len(generations)


def test_keyword_arguments_from_the_config_are_bound():
    fns = metrics_from_config({
        "digits": {"_target_": "tunelab.eval.metrics.regex_match", "pattern": r"^\d+$"},
        "long": {"_target_": f"{__name__}.word_count_at_least", "n": 2},
    })
    assert fns["digits"](gens("42", "4 2", "x")) == 1 / 3
    assert fns["long"](gens("a b", "a", "a b c")) == 2 / 3


@pytest.mark.parametrize("spec, message", [
    ({"_target_": "tunelab.eval.metrics.no_such_metric"}, "cannot be imported"),
    ({"_target_": "tunelab.eval.metrics.regex_match"}, "does not accept"),  # pattern missing
    ({"_target_": "tunelab.eval.metrics.all_caps_rate", "patern": "x"}, "does not accept"),
    ({"_target_": "tunelab.eval.metrics.regex_match", "pattern": "(["}, "unterminated character set"),
    ({"_target_": "tunelab.eval.metrics.json_schema_valid", "schema": {"type": "objekt"}}, "objekt"),
    ({"_target_": "tunelab.eval.metrics.json_schema_valid"}, "exactly one of schema"),
    ({"_target_": "tunelab.eval.metrics.answer_length", "unit": "lines"}, "unit='lines'"),
    ({"pattern": "x"}, "needs a _target_"),
])
def test_a_bad_metric_spec_fails_naming_its_key(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        metric_from_spec("fmt", spec)
    assert "eval.metrics.fmt" in str(err.value)


def test_config_validation_reports_every_bad_metric_at_once(compose_cfg):
    cfg = compose_cfg("experiment=smoke", "+eval.metrics.fmt={_target_: tunelab.eval.metrics.regex_match}",
                      "+eval.metrics.typo={_target_: tunelab.eval.metrics.all_caps}",
                      "quantization.max_kl=-1")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    assert "eval.metrics.fmt" in text and "eval.metrics.typo" in text and "quantization.max_kl=-1" in text
