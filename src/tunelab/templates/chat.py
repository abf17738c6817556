"""The template contract: one chat template gives the training text, the loss mask, the GGUF's
template and end-of-turn token, and the evaluation prompts.

Templates (also those read from a model or a GGUF) render in Jinja's immutable sandbox, bounded
in time and size (templates/sandbox.py); `origin` names where a template came from in its errors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from tunelab.templates.sandbox import TemplateError, TemplateLimitError, compile_bounded, render_bounded, sandbox
from tunelab.templates.special_text import POLICIES, describe, find_special_text, plain_encoding

__all__ = ["TemplateError", "TemplateLimitError", "sandbox", "ChatTemplate", "template_from_config"]

Message = Dict[str, str]


BOS_POLICIES = ("template", "none")
# Private-use characters, which no template writes: where a message's content lands in the text.
CONTENT_MARK = "\ue000tunelab-content-{}\ue001"
CONTENT_MARK_RE = re.compile("\ue000tunelab-content-(\\d+)\ue001")
PROBE = [{"role": "system", "content": "tunelab-probe-system"}, {"role": "user", "content": "tunelab-probe-user"},
         {"role": "assistant", "content": "tunelab-probe-answer"}]


@dataclass
class ChatTemplate:
    source: str
    end_of_turn: str
    bos_token: str = ""
    eos_token: str = ""
    # "template": the rendered text starts with bos_token and nothing else adds one; "none": no BOS.
    bos: str = "none"
    assistant_start: Optional[str] = None
    name: str = ""
    origin: str = "the chat template"  # where it came from: a config key, a tokenizer folder, a GGUF

    def __post_init__(self):
        self._compiled = compile_bounded(sandbox(), self.source, self.origin)

    def render(self, messages: List[Message], add_generation_prompt: bool = False) -> str:
        return render_bounded(self._compiled, self.origin, messages=messages, add_generation_prompt=add_generation_prompt,
                              bos_token=self.bos_token, eos_token=self.eos_token)

    def assistant_spans(self, messages: List[Message]) -> Tuple[str, List[Tuple[int, int]]]:
        """The full text and the character spans that carry loss: each assistant turn's content
        through its end-of-turn token (so the model learns to stop)."""
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            if not full.startswith(prefix):
                raise TemplateError(
                    f"the template is not prefix-stable: the prompt for turn {i} is not a prefix of the "
                    f"whole conversation.\nprompt: {prefix[-200:]!r}\nwhole:  {full[:len(prefix)][-200:]!r}")
            end = full.find(self.end_of_turn, len(prefix) + len(message["content"]))
            if end < 0:
                raise TemplateError(f"the end-of-turn token {self.end_of_turn!r} does not follow assistant "
                                    f"turn {i}: the model could never learn to stop")
            spans.append((len(prefix), end + len(self.end_of_turn)))
        return full, spans

    def content_spans(self, messages: List[Message], indices: List[int]) -> List[Tuple[int, int]]:
        """Where the contents of messages[indices] are in the rendered text. Each content is rendered
        as a unique mark, then the marks are put back (as is, or trimmed, for templates that `trim`);
        the result must be the real text, or the template did something to the content and its
        place is unknown."""
        skeleton = self.render([dict(m, content=CONTENT_MARK.format(i)) if i in indices else m
                                for i, m in enumerate(messages)])
        pieces = CONTENT_MARK_RE.split(skeleton)  # text, message index, text, message index, ..., text
        full = self.render(messages)
        for shape in (lambda text: text, str.strip):
            rebuilt, spans = "", []
            for k, piece in enumerate(pieces):
                if k % 2:
                    piece = shape(messages[int(piece)]["content"])
                    spans.append((len(rebuilt), len(rebuilt) + len(piece)))
                rebuilt += piece
            if rebuilt == full:
                return spans
        raise TemplateError(f"{self.origin} changes the content of message(s) "
                            f"{', '.join(str(i + 1) for i in indices)} as it renders them: the special-token "
                            "text in them cannot be found to tokenize it as plain text; remove it from the data")


def _cfg(template_cfg, key, default=None):
    return getattr(template_cfg, key, default)


def template_from_config(template_cfg, tokenizer) -> ChatTemplate:
    """The run's ChatTemplate, checked against the tokenizer: every special token it needs is one
    token, its BOS policy and assistant marker are what it renders."""
    name = template_cfg.name
    source = template_cfg.chat_template or getattr(tokenizer, "chat_template", None)
    origin = template_origin(template_cfg, tokenizer)
    if not source:
        raise TemplateError(f"template={name}: the model has no chat template of its own; "
                            "choose one with template=chatml (or llama3, ...)")
    missing = missing_special_tokens(tokenizer, list(_cfg(template_cfg, "special_tokens", None) or []))
    if missing:
        raise TemplateError(
            f"template={name} needs special token(s) the model's tokenizer lacks: {', '.join(missing)}. "
            "Their embeddings would be untrained noise. Set template.add_missing_tokens=true to add them "
            "and train their rows, or choose a template the model knows (template=native).")
    probe = ChatTemplate(source, "", tokenizer.bos_token or "", tokenizer.eos_token or "", origin=origin)
    end_of_turn = template_cfg.end_of_turn or infer_end_of_turn(probe, tokenizer)
    if not end_of_turn or missing_special_tokens(tokenizer, [end_of_turn]):
        raise TemplateError(f"template.end_of_turn={end_of_turn!r} is not a token of the model's tokenizer")
    template = ChatTemplate(source, end_of_turn, tokenizer.bos_token or "", end_of_turn,
                            bos=_cfg(template_cfg, "bos") or infer_bos(probe),
                            assistant_start=_cfg(template_cfg, "assistant_start"), name=name, origin=origin)
    check_rendering(template)
    return template


def template_origin(template_cfg, tokenizer) -> str:
    """Where the run's template comes from, as its errors name it."""
    if template_cfg.chat_template:
        return f"template.chat_template (template={template_cfg.name})"
    where = getattr(tokenizer, "name_or_path", "") or "the model's tokenizer"
    return f"the model's own template (template={template_cfg.name}) from {where}"


def infer_bos(template: ChatTemplate) -> str:
    text = template.render(PROBE[1:])
    return "template" if template.bos_token and text.startswith(template.bos_token) else "none"


def check_rendering(template: ChatTemplate) -> None:
    """The configured BOS policy and assistant marker are what the template really renders."""
    name = f"template={template.name}" if template.name else "the template"
    if template.bos not in BOS_POLICIES:
        raise TemplateError(f"template.bos={template.bos!r} is not one of {', '.join(BOS_POLICIES)}")
    text = template.render(PROBE)
    starts = bool(template.bos_token) and text.startswith(template.bos_token)
    if template.bos == "template" and not starts:
        raise TemplateError(f"{name}: template.bos=template but the rendered text does not start with the "
                            f"BOS token {template.bos_token!r}: write {{{{ bos_token }}}} first or set template.bos=none")
    if template.bos == "none" and template.bos_token and text.startswith(template.bos_token * 2):
        raise TemplateError(f"{name}: the rendered text starts with two BOS tokens {template.bos_token!r}")
    prompt = template.render(PROBE[:2], add_generation_prompt=True)
    if template.assistant_start and not prompt.endswith(template.assistant_start):
        raise TemplateError(f"{name}: the generation prompt does not end with template.assistant_start="
                            f"{template.assistant_start!r}:\n{prompt[-120:]!r}")


def _single_token_id(tokenizer, token: str) -> Optional[int]:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 and ids[0] != tokenizer.unk_token_id else None


def missing_special_tokens(tokenizer, tokens: List[str]) -> List[str]:
    """The tokens that the tokenizer does not read as one token of their own when they appear in text."""
    return [t for t in tokens if _single_token_id(tokenizer, t) is None]


def add_special_tokens(tokenizer, tokens: List[str]) -> Dict[str, int]:
    """Add the missing ones as special tokens; returns {token: new id}. The caller resizes embeddings."""
    missing = missing_special_tokens(tokenizer, tokens)
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return {t: tokenizer.convert_tokens_to_ids(t) for t in missing}


def template_tokenizer(template_cfg, load):
    """The model's tokenizer (`load()`), plus the template's special tokens it lacks when
    template.add_missing_tokens is set (else template_from_config refuses them by name).
    Returns (tokenizer, {added token: id}); prepare's length check and training share it."""
    tokenizer = load()
    if not template_cfg.add_missing_tokens:
        return tokenizer, {}
    wanted = list(template_cfg.special_tokens) + ([template_cfg.end_of_turn] if template_cfg.end_of_turn else [])
    return tokenizer, add_special_tokens(tokenizer, wanted)


def infer_end_of_turn(template: ChatTemplate, tokenizer) -> str:
    """The first special token the template writes after an assistant's content.

    The tokenizer's eos_token is not trusted: SmolLM2's, read from its GGUF, says <|im_start|>,
    while its template ends turns with <|im_end|>. Training on the wrong one never stops.
    """
    marker = PROBE[-1]["content"]
    text = template.render(PROBE[1:])
    tail = text[text.index(marker) + len(marker):]
    specials = sorted(tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()), key=len, reverse=True)
    for i in range(len(tail)):
        for token in specials:
            if token and tail.startswith(token, i):
                return token
    if tokenizer.eos_token:
        return tokenizer.eos_token
    raise TemplateError("the template writes no special token after an assistant turn: set template.end_of_turn")


def tokenize_conversation(template: ChatTemplate, tokenizer, messages: List[Message],
                          max_length: Optional[int] = None, special_text: str = "error") -> Dict[str, list]:
    """input_ids plus assistant_masks (1 where a token starts inside an assistant span) and each
    token's character offsets in the rendered text.

    Message text the tokenizer would read as a special or added token is refused (special_text
    "error", dataset.special_tokens_in_text) or tokenized as plain text ("escape"); the template's
    own markup is always special (templates/special_text.py)."""
    if special_text not in POLICIES:
        raise ValueError(f"special_text={special_text!r} is not one of {', '.join(POLICIES)}")
    text, spans = template.assistant_spans(messages)
    findings = find_special_text(tokenizer, messages)
    if findings and special_text == "error":
        raise TemplateError(describe(findings))
    if findings:
        flagged = sorted({f.message for f in findings})
        ids, offsets = plain_encoding(tokenizer, text, template.content_spans(messages, flagged))
    else:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    mask = [int(any(start <= s < end for start, end in spans)) for s, _ in offsets]
    if max_length is not None and len(ids) > max_length:
        raise TemplateError(f"{len(ids)} tokens exceed training.max_seq_length={max_length}")
    return {"input_ids": ids, "assistant_masks": mask, "offsets": offsets}
