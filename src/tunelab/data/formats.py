"""The canonical record every input format is normalised to, and its on-disk form.

In memory a conversation is a list of {"role": system|user|assistant, "content": str} messages.
On disk the prepared form is ShareGPT JSONL exactly as in the seed:
{"conversations": [{"from": "system", "value": ...}, {"from": "human", ...}, {"from": "gpt", ...}]}
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

# Role names seen in the wild -> canonical role. Keys are compared lower-cased.
ROLE_ALIASES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant",
    "bot": "assistant",
}
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}

Message = Dict[str, str]


@dataclass
class Conversation:
    messages: List[Message]
    source: str  # file:line (or folder[row N]), for error messages and quarantine records
    raw: Optional[str] = field(default=None, repr=False)  # the input row as read, for quarantine
    origin: int = 0  # index of the dataset source it came from (mixing weights apply per source)

    def to_sharegpt(self) -> dict:
        return {"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]}
                                  for m in self.messages]}


@dataclass
class Problem:
    """One invalid row (or file). `reason` is a fixed name (see REASONS); `detail` says what to do."""

    where: str
    reason: str
    detail: str = ""
    raw: Optional[str] = None
    # A whole-file problem (undecodable bytes, a missing CSV column) can never be quarantined.
    fatal: bool = False

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}" + (f" {self.detail}" if self.detail else "")


REASONS = ("malformed JSON", "not UTF-8", "not an object", "missing field", "unsupported content",
           "unknown role", "empty content", "no assistant turn", "wrong role order", "missing CSV column",
           "malformed CSV", "no rows", "duplicate", "over-long", "template error", "leakage between splits",
           "hash mismatch", "special token in text")


class DataError(ValueError):
    """Every problem found, one per line, and what to do about them (`note`)."""

    def __init__(self, problems: List, note: str = "", limit: int = 50):
        self.problems = [str(p) for p in problems]
        shown = self.problems[:limit]
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        super().__init__(f"{len(problems)} problem(s) in the dataset:\n" + "\n".join(f"  {p}" for p in shown)
                         + more + (f"\n{note}" if note else ""))


def write_jsonl(path: Path, conversations: List[Conversation]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for conversation in conversations:
            handle.write(json.dumps(conversation.to_sharegpt(), ensure_ascii=False) + "\n")


def read_prepared(path: Path) -> List[List[Message]]:
    """The prepare stage's output back as message lists."""
    with open(path, encoding="utf-8") as handle:
        return [[{"role": ROLE_ALIASES[t["from"]], "content": t["value"]} for t in json.loads(line)["conversations"]]
                for line in handle if line.strip()]
