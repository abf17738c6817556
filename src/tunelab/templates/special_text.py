"""Message text that the tokenizer reads as a control token, and how to tokenize it as plain text.

A fast tokenizer matches its special and added tokens anywhere in the raw text, before anything
else: an answer that quotes `<|im_end|>` is trained as the end-of-turn token itself, and the model
learns to stop in the middle of an answer. `dataset.special_tokens_in_text` decides what happens:
`error` (the row is a problem, like an empty answer) or `escape` (the text is trained as ordinary
pieces, `<`, `|`, `im`, ...; the template's own markup stays special).
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from tunelab.templates.sandbox import TemplateError

POLICIES = ("error", "escape")
# An added token that is a plain word (a domain term added to the vocabulary) is vocabulary, not
# control markup: reading it as one token is what its author wanted, so it is never flagged.
PLAIN_WORD = re.compile(r"^\s*\w+\s*$")
REMEDY = "remove it or set dataset.special_tokens_in_text=escape to train it as plain text"

Span = Tuple[int, int]
# control_tokens per tokenizer, with the tokenizer's size: adding tokens to it makes a new entry.
_CONTROLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Control:
    text: str
    special: bool  # special tokens are split by split_special_tokens; other added tokens are not
    normalized: bool  # matched in the normalized text (else in the raw text, as chat markup is)


@dataclass(frozen=True)
class Finding:
    message: int  # index into the row's messages
    role: str
    token_id: int
    control: Control

    def __str__(self) -> str:
        kind = "special" if self.control.special else "added"
        return (f"message {self.message + 1} ({self.role}) contains {self.control.text!r}, which the tokenizer "
                f"reads as the {kind} token id {self.token_id}")


def control_tokens(tokenizer) -> Dict[int, Control]:
    """id -> token for every special or added token the tokenizer matches in text, plain words left out."""
    size = len(tokenizer)
    cached = _CONTROLS.get(tokenizer)
    if cached is not None and cached[0] == size:
        return cached[1]
    special = set(tokenizer.all_special_tokens)
    controls = {}
    for token_id, token in tokenizer.added_tokens_decoder.items():
        is_special = token.special or token.content in special
        if is_special or not PLAIN_WORD.match(token.content):
            controls[token_id] = Control(token.content, is_special, bool(token.normalized))
    _CONTROLS[tokenizer] = (size, controls)
    return controls


def _spelled(controls: Dict[int, Control], token_id: int, text: str, span: Span) -> Optional[Span]:
    """Where the text spells the control token (None for other tokens, and for an <unk> id that an
    unknown character gave). The token's span may be wider: lstrip/rstrip tokens take the
    whitespace next to them."""
    control = controls.get(token_id)
    at = text.find(control.text, span[0], span[1]) if control is not None else -1
    return (at, at + len(control.text)) if at >= 0 else None


def find_special_text(tokenizer, messages: Sequence[dict]) -> List[Finding]:
    """Every control token that a message's content turns into, in order. The contents are
    tokenized as the tokenizer reads them, each on its own: no substring guess."""
    controls = control_tokens(tokenizer)
    contents = [m["content"] for m in messages]
    # Looking costs less than tokenizing: a token matched in the raw text can only be there if its
    # text is (chat markup is never normalized; a normalized one could hide behind case folding).
    if not any(c.normalized or c.text in content for c in controls.values() for content in contents):
        return []
    encoded = tokenizer(contents, add_special_tokens=False, return_offsets_mapping=True)
    findings = []
    for index, (message, ids, spans) in enumerate(zip(messages, encoded["input_ids"], encoded["offset_mapping"])):
        for token_id, span in zip(ids, spans):
            if _spelled(controls, token_id, message["content"], span) is not None:
                findings.append(Finding(index, message["role"], token_id, controls[token_id]))
    return findings


def describe(findings: List[Finding]) -> str:
    """One line for a row: the first finding in full, then how many more and which tokens."""
    more = findings[1:]
    rest = (f" (and {len(more)} more: {', '.join(sorted({repr(f.control.text) for f in more}))})"
            if more else "")
    return f"{findings[0]}{rest}; {REMEDY}"


def plain_encoding(tokenizer, text: str, escape: List[Span]) -> Tuple[List[int], List[Span]]:
    """input_ids and character offsets of `text`, with every control token that lies inside an
    `escape` span (message contents) tokenized as plain text; the rest exactly as the tokenizer does.

    The tokenizer cuts text at each added token and tokenizes the pieces between them on their own.
    So only the piece around an escaped token is tokenized again: from the previous added token
    that stays to the next one, as the tokenizer would have if the escaped token were not special.
    """
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    controls, added = control_tokens(tokenizer), set(tokenizer.added_tokens_decoder)

    def escaped(k: int) -> bool:
        spelled = _spelled(controls, ids[k], text, offsets[k])
        return spelled is not None and any(lo <= spelled[0] and spelled[1] <= hi for lo, hi in escape)

    def boundary(k: int) -> bool:
        return ids[k] in added and not escaped(k)

    out_ids: List[int] = []
    out_offsets: List[Span] = []
    k = 0
    while k < len(ids):
        if not escaped(k):
            out_ids.append(ids[k])
            out_offsets.append(offsets[k])
            k += 1
            continue
        lo = k
        while lo > 0 and not boundary(lo - 1):
            lo -= 1
        hi = k
        while hi < len(ids) and not boundary(hi):
            hi += 1
        del out_ids[len(out_ids) - (k - lo):], out_offsets[len(out_offsets) - (k - lo):]
        start = offsets[lo - 1][1] if lo else 0
        end = offsets[hi][0] if hi < len(ids) else len(text)
        _check_piece(tokenizer, text[start:end], ids[lo:hi])
        piece_ids, piece_offsets = _plain_piece(tokenizer, text[start:end], controls)
        out_ids += piece_ids
        out_offsets += [(s + start, e + start) for s, e in piece_offsets]
        k = hi
    return out_ids, out_offsets


def _check_piece(tokenizer, piece: str, in_context: List[int]) -> None:
    """The piece, tokenized on its own as usual, must give the ids it has inside the whole text; a
    tokenizer that adds something to a piece on its own (a SentencePiece prefix space) would make
    the escaped row differ from its text in more than the escaped token."""
    alone = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
    if alone != in_context:
        raise TemplateError(
            "dataset.special_tokens_in_text=escape cannot escape this row with this tokenizer: it tokenizes "
            f"{piece[:80]!r} differently on its own than inside the conversation; remove the special-token "
            "text from the data instead")


def _plain_piece(tokenizer, piece: str, controls: Dict[int, Control]) -> Tuple[List[int], List[Span]]:
    """The piece with no control token: special tokens split by the tokenizer itself
    (split_special_tokens), added tokens that are not special (which it never splits) cut after their
    first character, each side tokenized on its own."""
    encoded = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    spelled = next((at for token_id, span in zip(ids, offsets)
                    if (at := _spelled(controls, token_id, piece, span)) is not None), None)
    if spelled is None:
        return ids, offsets
    start, end = spelled
    if end - start < 2:
        raise TemplateError(f"the added token {piece[start:end]!r} is one character: it cannot be "
                            "tokenized as plain text; remove it from the data")
    cut = start + 1
    head_ids, head_offsets = _plain_piece(tokenizer, piece[:cut], controls)
    tail_ids, tail_offsets = _plain_piece(tokenizer, piece[cut:], controls)
    return head_ids + tail_ids, head_offsets + [(s + cut, e + cut) for s, e in tail_offsets]
