"""Rules over conversations: structure, duplicates (exact and near-exact), leakage between splits.

Each check returns (conversation, Problem) pairs so that the caller can drop exactly the rows at
fault (on_invalid=quarantine) or fail with every problem at once (the default).
"""
from __future__ import annotations

import json
import re
import unicodedata
from typing import Dict, List, Tuple

from tunelab.data.formats import Conversation, Message, Problem

Flagged = List[Tuple[Conversation, Problem]]


def check_structure(messages: List[Message], where: str) -> List[Problem]:
    """[system], user, assistant, user, assistant, ...: ending on an answer, no empty turn."""
    problems = []
    roles = [m["role"] for m in messages]
    for i, m in enumerate(messages):
        if not isinstance(m["content"], str) or not m["content"].strip():
            problems.append(Problem(where, "empty content", f"in turn {i} ({m['role']})"))
    if "assistant" not in roles:
        problems.append(Problem(where, "no assistant turn", "- every row needs an answer to train on"))
        return problems
    body = roles[1:] if roles and roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if "system" in body or body != expected[: len(body)] or roles[-1] != "assistant":
        problems.append(Problem(where, "wrong role order", f"{roles}: expected [system], user, assistant, "
                                                           "user, assistant, ..., ending with assistant"))
    return problems


def normalise(text: str) -> str:
    """Equal for texts that differ only in case, whitespace, punctuation or Unicode form."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s]|_", " ", text).split())


def conversation_key(messages: List[Message], normalised: bool) -> str:
    view = [(m["role"], normalise(m["content"]) if normalised else m["content"]) for m in messages]
    return json.dumps(view, ensure_ascii=False)


def prompt_group(conversation: Conversation) -> str:
    """Rows whose prompts are equal up to case/whitespace/punctuation share a group and a split side."""
    return conversation_key(conversation.messages[:-1], normalised=True)


def find_duplicates(conversations: List[Conversation]) -> Flagged:
    """Every row equal (or equal up to case, whitespace, punctuation) to an earlier one."""
    exact: Dict[str, Conversation] = {}
    near: Dict[str, Conversation] = {}
    flagged = []
    for conv in conversations:
        exact_key, near_key = conversation_key(conv.messages, False), conversation_key(conv.messages, True)
        if exact_key in exact:
            flagged.append((conv, Problem(conv.source, "duplicate", f"(exact) of {exact[exact_key].source}")))
        elif near_key in near:
            flagged.append((conv, Problem(conv.source, "duplicate", "(near-exact: differs only in case, whitespace "
                                                                    f"or punctuation) of {near[near_key].source}")))
        exact.setdefault(exact_key, conv)
        near.setdefault(near_key, conv)
    return flagged


def find_leakage(train: List[Conversation], evals: List[Conversation]) -> Flagged:
    """Eval rows whose prompt (up to case/whitespace/punctuation) is also a training prompt."""
    seen: Dict[str, Conversation] = {}
    for conv in train:
        seen.setdefault(prompt_group(conv), conv)
    flagged = []
    for conv in evals:
        twin = seen.get(prompt_group(conv))
        if twin is None:
            continue
        same = conversation_key(conv.messages, True) == conversation_key(twin.messages, True)
        what = "the whole row is a duplicate of" if same else "its prompt is also in the training data at"
        flagged.append((conv, Problem(conv.source, "leakage between splits",
                                      f"- {what} {twin.source}; remove it from one side")))
    return flagged


def split_overlap(train: List[Conversation], evals: List[Conversation]) -> int:
    """How many eval rows share a prompt group with a training row (the run requires 0)."""
    groups = {prompt_group(c) for c in train}
    return sum(prompt_group(c) in groups for c in evals)
