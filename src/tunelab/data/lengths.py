"""Token lengths with the model's tokenizer and the run's chat template: what training will see.

An over-long row is a problem by default (training would cut it, perhaps mid-answer). The opt-in
`dataset.trim_history` drops a multi-turn row's oldest exchanges (never the system prompt, never
the final exchange) until it fits; it never cuts an answer.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from tunelab.data.formats import Conversation, Message, Problem
from tunelab.templates.chat import TemplateError, template_from_config, template_tokenizer, tokenize_conversation
from tunelab.templates.special_text import Finding, find_special_text


class LengthMeter:
    def __init__(self, template, tokenizer, max_length: int, special_text: str = "error"):
        self.template, self.tokenizer, self.max_length = template, tokenizer, max_length
        self.special_text = special_text  # dataset.special_tokens_in_text: training reads the same key

    @classmethod
    def from_config(cls, cfg, paths) -> "LengthMeter":
        from tunelab.models.source import load_tokenizer, resolve_model

        base_dir = resolve_model(cfg.model, paths)
        tokenizer, _ = template_tokenizer(cfg.template, lambda: load_tokenizer(base_dir, cfg.model.trust_remote_code))
        return cls(template_from_config(cfg.template, tokenizer), tokenizer, cfg.training.max_seq_length,
                   cfg.dataset.special_tokens_in_text)

    def encode(self, messages: List[Message]) -> Dict[str, list]:
        """input_ids, assistant_masks and offsets exactly as training builds them (no limit applied)."""
        return tokenize_conversation(self.template, self.tokenizer, messages, special_text=self.special_text)

    def special_text_in(self, messages: List[Message]) -> List[Finding]:
        """The message text this tokenizer would read as a special or added token."""
        return find_special_text(self.tokenizer, messages)

    def fit(self, conv: Conversation, trim_history: bool
            ) -> Tuple[Optional[Conversation], Optional[Problem], int, int]:
        """(the row, possibly trimmed; or None with the problem), the number of exchanges dropped, its length."""
        messages, dropped = conv.messages, 0
        while True:
            try:
                length = len(self.encode(messages)["input_ids"])
            except TemplateError as err:
                return None, Problem(conv.source, "template error", f"- {err}"), 0, 0
            if length <= self.max_length:
                trimmed = conv if not dropped else Conversation(messages, conv.source, conv.raw, conv.origin)
                return trimmed, None, dropped, length
            start = 1 if messages[0]["role"] == "system" else 0
            if not trim_history or len(messages) - start <= 2:
                return None, self._too_long(conv, length, trim_history), 0, length
            messages, dropped = messages[:start] + messages[start + 2:], dropped + 1

    def _too_long(self, conv: Conversation, length: int, trim_history: bool) -> Problem:
        remedy = ("even its final exchange alone is too long" if trim_history else
                  "raise training.max_seq_length, shorten the row, or for multi-turn rows set "
                  "dataset.trim_history=true")
        return Problem(conv.source, "over-long", f"({length} tokens > training.max_seq_length="
                                                 f"{self.max_length}): {remedy}")


def percentiles(values: List[int], points=(50, 90, 95, 99)) -> Dict[str, int]:
    """Nearest-rank percentiles plus the maximum (empty input: empty dict)."""
    if not values:
        return {}
    ordered = sorted(values)
    result = {f"p{p}": ordered[max(0, -(-p * len(ordered) // 100) - 1)] for p in points}
    result["max"] = ordered[-1]
    return result
