"""One parsed row of any format -> canonical messages, or the problems that stop it.

Each function returns (messages, problems); messages is None when the row cannot be read at all.
The structural rules every conversation must meet (roles, order, empty turns) live in validate.py.
"""
from __future__ import annotations

import string
from typing import List, Optional, Tuple

from tunelab.data.formats import ROLE_ALIASES, Message, Problem

Result = Tuple[Optional[List[Message]], List[Problem]]
KNOWN_ROLES = ", ".join(sorted(ROLE_ALIASES))


def _role(name, where: str, turn: int) -> Tuple[Optional[str], List[Problem]]:
    role = ROLE_ALIASES.get(name.lower()) if isinstance(name, str) else None
    if role is None:
        return None, [Problem(where, "unknown role", f"{name!r} in turn {turn}; use one of {KNOWN_ROLES}")]
    return role, []


def _text(content, where: str, turn: int) -> Tuple[Optional[str], List[Problem]]:
    """A message's text: a string, or OpenAI-style text parts joined. None counts as empty."""
    if content is None or isinstance(content, str):
        return content or "", []
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content), []
    return None, [Problem(where, "unsupported content", f"- turn {turn}: content must be a string or a list "
                                                        f"of text parts, got {type(content).__name__}")]


def _turns(turns, role_key: str, text_key: str, where: str, container: str) -> Result:
    if not isinstance(turns, list):
        return None, [Problem(where, "missing field", f'- expected an object with a "{container}" list')]
    messages, problems = [], []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            problems.append(Problem(where, "not an object", f"- turn {i} is {type(turn).__name__}"))
            continue
        role, role_problems = _role(turn.get(role_key), where, i)
        text, text_problems = _text(turn.get(text_key), where, i)
        problems += role_problems + text_problems
        if role and text is not None:
            messages.append({"role": role, "content": text})
    return messages, problems


def _not_an_object(obj, where: str) -> List[Problem]:
    return [] if isinstance(obj, dict) else [Problem(where, "not an object", f"- expected an object, got "
                                                                           f"{type(obj).__name__}")]


def sharegpt_messages(obj, where: str) -> Result:
    problems = _not_an_object(obj, where)
    return (None, problems) if problems else _turns(obj.get("conversations"), "from", "value", where, "conversations")


def openai_messages(obj, where: str) -> Result:
    problems = _not_an_object(obj, where)
    return (None, problems) if problems else _turns(obj.get("messages"), "role", "content", where, "messages")


def alpaca_messages(obj, where: str, system_prompt: Optional[str]) -> Result:
    """instruction + input (a blank line between, as Alpaca's own prompt does) -> user; output -> assistant.
    A row without "output" has no assistant turn; one without "instruction" an empty user turn."""
    if not isinstance(obj, dict):
        return None, _not_an_object(obj, where)
    values = {}
    for key in ("instruction", "input", "output", "system"):
        value, problems = _text(obj.get(key), where, 0)
        if problems:
            return None, problems
        values[key] = value
    user = values["instruction"] + (f"\n\n{values['input']}" if values["input"].strip() else "")
    system = values["system"] or system_prompt
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    if "output" in obj:
        messages.append({"role": "assistant", "content": values["output"]})
    return messages, []


def template_fields(template: Optional[str]) -> List[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template or "") if f]


def mapped_messages(row: dict, where: str, source) -> Result:
    """A flat row (CSV line, `datasets` row): system and user prompts from templates, answer from a column."""
    values = {k: ("" if v is None else str(v)) for k, v in row.items() if isinstance(k, str)}
    messages = []
    if source.system_prompt:
        messages.append({"role": "system", "content": source.system_prompt.format(**values)})
    messages.append({"role": "user", "content": source.user_template.format(**values)})
    messages.append({"role": "assistant", "content": values.get(source.answer_column, "")})
    return messages, []


def missing_columns(columns, source) -> List[str]:
    needed = template_fields(source.system_prompt) + template_fields(source.user_template) + [source.answer_column]
    return [c for c in dict.fromkeys(needed) if c not in columns]


def row_shape(row: dict) -> str:
    """Which reader a `datasets` row needs, from its columns."""
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "openai"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return "mapped"
