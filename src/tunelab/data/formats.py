"""Readers per input format -> one canonical conversation: a list of {"role", "content"} messages.

On disk the canonical form is ShareGPT JSONL exactly as in the seed:
{"conversations": [{"from": "system", "value": ...}, {"from": "human", ...}, {"from": "gpt", ...}]}
Every problem is reported with file:line and a reason, all of them in one pass.
"""
from __future__ import annotations

import csv
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

ROLE_ALIASES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant",
}
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}

Message = Dict[str, str]


@dataclass
class Conversation:
    messages: List[Message]
    source: str  # file:line, for error messages and quarantine records

    def to_sharegpt(self) -> dict:
        return {"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]}
                                  for m in self.messages]}

    @property
    def prompt_key(self) -> str:
        """The conversation without its final answer: rows sharing it belong to one split."""
        return json.dumps(self.messages[:-1], sort_keys=True)


class DataError(ValueError):
    def __init__(self, problems: List[str]):
        self.problems = problems
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} invalid row(s):\n" + "\n".join(f"  {p}" for p in shown) + more)


def check_conversation(messages: List[Message], where: str) -> List[str]:
    """Structural rules every conversation must meet, whatever its format."""
    problems = []
    roles = [m["role"] for m in messages]
    for i, m in enumerate(messages):
        if not isinstance(m["content"], str) or not m["content"].strip():
            problems.append(f"{where}: empty content in turn {i} ({m['role']})")
    if "assistant" not in roles:
        problems.append(f"{where}: no assistant turn")
    elif roles[-1] != "assistant":
        problems.append(f"{where}: the last turn must be the assistant's, got {roles[-1]}")
    body = roles[1:] if roles and roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if "system" in body or body != expected[: len(body)]:
        problems.append(f"{where}: wrong role order {roles}: expected [system], user, assistant, user, ...")
    return problems


def read_csv(path: Path, system_prompt: Optional[str], user_template: str, answer_column: str):
    path = Path(path)
    fields = [f for _, f, _, _ in string.Formatter().parse(user_template) if f]
    conversations, problems = [], []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in fields + [answer_column] if c not in header]
        if missing:
            raise DataError([f"{path}:1: missing CSV column(s) {missing}; the header has {header}. "
                             "Fix dataset.user_template / dataset.answer_column or the file."])
        for row in reader:
            where = f"{path}:{reader.line_num}"
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            messages.append({"role": "user", "content": user_template.format(**row)})
            messages.append({"role": "assistant", "content": row[answer_column] or ""})
            row_problems = check_conversation(messages, where)
            problems += row_problems
            if not row_problems:
                conversations.append(Conversation(messages, where))
    if problems:
        raise DataError(problems)
    return conversations


def _sharegpt_messages(obj, where: str):
    turns = obj.get("conversations") if isinstance(obj, dict) else None
    if not isinstance(turns, list):
        return None, [f'{where}: expected an object with a "conversations" list']
    messages, problems = [], []
    for i, turn in enumerate(turns):
        role = ROLE_ALIASES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
        if role is None:
            problems.append(f"{where}: unknown role {turn.get('from') if isinstance(turn, dict) else turn!r} "
                            f"in turn {i}; use one of {sorted(ROLE_ALIASES)}")
            continue
        messages.append({"role": role, "content": turn.get("value")})
    return messages, problems


def read_sharegpt(path: Path):
    path = Path(path)
    conversations, problems = [], []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{where}: malformed JSON ({err.msg} at column {err.colno})")
                continue
            messages, row_problems = _sharegpt_messages(obj, where)
            if messages is not None and not row_problems:
                row_problems = check_conversation(messages, where)
            problems += row_problems
            if not row_problems:
                conversations.append(Conversation(messages, where))
    if problems:
        raise DataError(problems)
    return conversations


def read_dataset(path, fmt: str, dataset_cfg) -> List[Conversation]:
    if fmt == "csv":
        return read_csv(path, dataset_cfg.system_prompt, dataset_cfg.user_template, dataset_cfg.answer_column)
    if fmt == "sharegpt":
        return read_sharegpt(path)
    raise ValueError(f"dataset.format={fmt!r} has no reader")


def write_jsonl(path: Path, conversations: List[Conversation]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for conversation in conversations:
            handle.write(json.dumps(conversation.to_sharegpt(), ensure_ascii=False) + "\n")


def read_prepared(path: Path) -> List[List[Message]]:
    """The prepare stage's output back as message lists."""
    with open(path, encoding="utf-8") as handle:
        return [[{"role": ROLE_ALIASES[t["from"]], "content": t["value"]} for t in json.loads(line)["conversations"]]
                for line in handle if line.strip()]
