"""Built-in metrics. Each takes the list of Generation of one GGUF (plus its keyword arguments from
the config) and returns a number.

User metrics plug in the same way: name any callable by `_target_` under `eval.metrics`, with its
keyword arguments beside it, e.g. `fmt: {_target_: tunelab.eval.metrics.regex_match, pattern: "^[A-Z]"}`.
A metric where lower is better is marked with @lower_is_better (the quantization verdict reads it).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import List, Optional

# Special-token text (<|im_end|>, <s>, [INST], <start_of_turn>...) or a bare role name on a line of
# its own or closing a line ("... system"): what a wrong template leaks into answers.
SPECIAL_TOKEN_TEXT = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?s>|\[/?INST\]|<(start|end)_of_turn>|<\|?eot_id\|?>")
ROLE_LEAK = re.compile(r"(?m)(^\s*(system|user|assistant|human|gpt)\s*:?\s*$)|(\b(system|assistant|user)\s*$)")
WORD = re.compile(r"\w+")


@dataclass
class Generation:
    prompt: str
    reference: str
    answer: str
    finish_reason: str  # "stop": ended by the end-of-turn token; "length": hit max_new_tokens
    completion_tokens: int = 0
    prompt_tokens: int = 0


def lower_is_better(fn):
    fn.higher_is_better = False
    return fn


def higher_is_better(fn) -> bool:
    return getattr(getattr(fn, "func", fn), "higher_is_better", True)


def _rate(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _normalize(text: str, ignore_case: bool) -> str:
    text = " ".join(text.split())
    return text.casefold() if ignore_case else text


def is_all_caps(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and all(not c.islower() for c in letters)


def has_artifact(text: str) -> bool:
    return bool(SPECIAL_TOKEN_TEXT.search(text) or ROLE_LEAK.search(text))


def is_clean_stop(g: Generation) -> bool:
    return bool(g.answer.strip()) and g.finish_reason == "stop" and not has_artifact(g.answer)


# --- matching the reference or a pattern -------------------------------------------------------

def exact_match(generations: List[Generation], ignore_case: bool = False) -> float:
    """Answer equals the reference, whitespace runs collapsed and ends stripped."""
    return _rate(_normalize(g.answer, ignore_case) == _normalize(g.reference, ignore_case) for g in generations)


def contains(generations: List[Generation], text: Optional[str] = None, ignore_case: bool = False) -> float:
    """Answer contains `text`, or the reference when no text is given (whitespace collapsed)."""
    return _rate(_normalize(text if text is not None else g.reference, ignore_case) in _normalize(g.answer, ignore_case)
                 for g in generations)


def regex_match(generations: List[Generation], pattern: str, fullmatch: bool = False,
                ignore_case: bool = False) -> float:
    """Answer (ends stripped) matches `pattern`: anywhere (re.search), or whole with fullmatch."""
    compiled = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    match = compiled.fullmatch if fullmatch else compiled.search
    return _rate(match(g.answer.strip()) is not None for g in generations)


def _lcs_length(a: List[str], b: List[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f1(answer: str, reference: str) -> float:
    a, r = WORD.findall(answer.lower()), WORD.findall(reference.lower())
    lcs = _lcs_length(a, r)
    return 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(r))


def rouge_l(generations: List[Generation]) -> float:
    """Mean ROUGE-L F1 against the reference, on lower-cased word tokens (\\w+)."""
    return _mean(rouge_l_f1(g.answer, g.reference) for g in generations)


# --- structure -----------------------------------------------------------------------------------

def _parse_json(text: str):
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None


def json_valid(generations: List[Generation]) -> float:
    """Answer (ends stripped) parses as one JSON value."""
    return _rate(_parse_json(g.answer.strip())[0] for g in generations)


def load_schema(schema: Optional[dict] = None, schema_path: Optional[str] = None) -> dict:
    if (schema is None) == (schema_path is None):
        raise ValueError("give exactly one of schema (inline) or schema_path (a .json file)")
    if schema_path is not None:
        with open(schema_path, encoding="utf-8") as handle:
            schema = json.load(handle)
    from jsonschema.validators import validator_for

    validator_for(schema).check_schema(schema)  # a broken schema fails here, not as a score of 0
    return schema


def json_schema_valid(generations: List[Generation], schema: Optional[dict] = None,
                      schema_path: Optional[str] = None) -> float:
    """Answer parses as JSON and validates against the JSON Schema."""
    from jsonschema.validators import validator_for

    schema = load_schema(schema, schema_path)
    validator = validator_for(schema)(schema)
    parsed = (_parse_json(g.answer.strip()) for g in generations)
    return _rate(ok and validator.is_valid(value) for ok, value in parsed)


# --- style and template hygiene --------------------------------------------------------------------

def all_caps_rate(generations: List[Generation]) -> float:
    return _rate(is_all_caps(g.answer) for g in generations)


def nonempty_rate(generations: List[Generation]) -> float:
    return _rate(bool(g.answer.strip()) for g in generations)


def stop_by_eot_rate(generations: List[Generation]) -> float:
    return _rate(g.finish_reason == "stop" for g in generations)


def artifact_free_rate(generations: List[Generation]) -> float:
    return _rate(not has_artifact(g.answer) for g in generations)


@lower_is_better
def template_artifact_rate(generations: List[Generation]) -> float:
    """Answers that leak special-token text or role names: a template mismatch."""
    return _rate(has_artifact(g.answer) for g in generations)


def hygiene_rate(generations: List[Generation]) -> float:
    """Non-empty, stopped by the end-of-turn token, free of template artifacts."""
    return _rate(is_clean_stop(g) for g in generations)


def success_rate(generations: List[Generation]) -> float:
    """All capitals, non-empty, stopped by the end-of-turn token and free of artifacts, all at once."""
    return _rate(is_clean_stop(g) and is_all_caps(g.answer) for g in generations)


# --- length ---------------------------------------------------------------------------------------

def answer_length(generations: List[Generation], unit: str = "words") -> float:
    """Mean answer length in words (whitespace-separated), chars, or tokens (generated tokens)."""
    measure = {"words": lambda g: len(g.answer.split()), "chars": lambda g: len(g.answer),
               "tokens": lambda g: g.completion_tokens}
    if unit not in measure:
        raise ValueError(f"unit={unit!r} is not one of {', '.join(measure)}")
    return _mean(measure[unit](g) for g in generations)


def mean_answer_words(generations: List[Generation]) -> float:
    return answer_length(generations, "words")
