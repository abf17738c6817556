"""The config's error type, in a module of its own: data readers raise it too, and checks imports them."""
from __future__ import annotations

from typing import List


class ConfigError(ValueError):
    """All the problems of one config, each naming its key."""

    def __init__(self, problems: List[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))
