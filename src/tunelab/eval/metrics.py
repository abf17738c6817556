"""Built-in metrics. Each takes the list of Generation of one GGUF and returns a number.

User metrics plug in the same way: name any callable by `_target_` under `eval.metrics`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List

# Special-token text (<|im_end|>, <s>, [INST], <start_of_turn>...) or a bare role name on a line of
# its own or closing a line ("... system"): what a wrong template leaks into answers.
SPECIAL_TOKEN_TEXT = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?s>|\[/?INST\]|<(start|end)_of_turn>|<\|?eot_id\|?>")
ROLE_LEAK = re.compile(r"(?m)(^\s*(system|user|assistant|human|gpt)\s*:?\s*$)|(\b(system|assistant|user)\s*$)")


@dataclass
class Generation:
    prompt: str
    reference: str
    answer: str
    finish_reason: str  # "stop": ended by the end-of-turn token; "length": hit max_new_tokens
    completion_tokens: int = 0


def _rate(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0


def is_all_caps(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and all(not c.islower() for c in letters)


def has_artifact(text: str) -> bool:
    return bool(SPECIAL_TOKEN_TEXT.search(text) or ROLE_LEAK.search(text))


def is_clean_stop(g: Generation) -> bool:
    return bool(g.answer.strip()) and g.finish_reason == "stop" and not has_artifact(g.answer)


def all_caps_rate(generations: List[Generation]) -> float:
    return _rate(is_all_caps(g.answer) for g in generations)


def nonempty_rate(generations: List[Generation]) -> float:
    return _rate(bool(g.answer.strip()) for g in generations)


def stop_by_eot_rate(generations: List[Generation]) -> float:
    return _rate(g.finish_reason == "stop" for g in generations)


def artifact_free_rate(generations: List[Generation]) -> float:
    return _rate(not has_artifact(g.answer) for g in generations)


def hygiene_rate(generations: List[Generation]) -> float:
    """Non-empty, stopped by the end-of-turn token, free of template artifacts."""
    return _rate(is_clean_stop(g) for g in generations)


def success_rate(generations: List[Generation]) -> float:
    """All capitals, non-empty, stopped by the end-of-turn token and free of artifacts, all at once."""
    return _rate(is_clean_stop(g) and is_all_caps(g.answer) for g in generations)


def mean_answer_words(generations: List[Generation]) -> float:
    return sum(len(g.answer.split()) for g in generations) / max(len(generations), 1)
