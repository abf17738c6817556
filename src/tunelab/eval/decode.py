"""One pass over the eval rows through llama.cpp's low-level API: each prompt is evaluated once for
both the greedy answer and the reference answer's logits.

Per row, on the loaded model's own context (one sequence, its KV cache carried from row to row):

1. the prompt, after the prefix the KV cache still holds from the previous row (the system prompt,
   usually; all but its last token when the whole prompt is cached), is decoded with one output: the
   logits at its last position, which give the first answer token and, for the logit pass, the
   log-probabilities of the reference's first token;
2. with the logit pass on, the reference answer's tokens are decoded after the prompt with an
   output at every position, then dropped from the KV cache again;
3. greedy steps decode one token at a time, and the row stops exactly where llama-cpp-python's
   `create_completion` stops: the end-of-generation token, a stop string, max tokens (and its
   handling of an incomplete UTF-8 character).

This is what `create_completion` does, batch for batch, so the answers are its answers token for
token. Several rows can take their greedy steps together (`tunelab.eval.parallel`), but only where
llama.cpp's kernels give each row the same logits as alone: that is probed per loaded GGUF.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np


@dataclass
class Completion:
    tokens: List[int]
    text: str
    finish_reason: str


@dataclass
class Timing:
    """Over one GGUF's pass: prompt tokens llama.cpp evaluated (after the prefix reused from the KV
    cache), reference-answer tokens evaluated for the logit pass, answer tokens generated, the
    greedy steps (one llama_decode per step, one token per row in it) and the seconds of each, the
    steps of rows decoded alone (`stream_`: the speed one request gets), how many rows took their
    steps together at most, and the wall time of the whole loop (set by its caller)."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    step_tokens: int = 0
    generation_seconds: float = 0.0
    stream_step_tokens: int = 0
    stream_seconds: float = 0.0
    rows_together: int = 1
    wall_seconds: float = 0.0
    reference_tokens: int = 0
    reference_seconds: float = 0.0

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def gen_tokens_per_s(self) -> float:
        """One row at a time: the generation speed of this GGUF for one request."""
        return self.stream_step_tokens / self.stream_seconds if self.stream_seconds else 0.0

    @property
    def eval_gen_tokens_per_s(self) -> float:
        """Every step of the pass, rows together where they were."""
        return self.step_tokens / self.generation_seconds if self.generation_seconds else 0.0

    def add_steps(self, tokens: int, seconds: float, alone: bool) -> None:
        self.step_tokens += tokens
        self.generation_seconds += seconds
        if alone:
            self.stream_step_tokens += tokens
            self.stream_seconds += seconds

    def as_dict(self) -> dict:
        return {**asdict(self), "prompt_tokens_per_s": self.prompt_tokens_per_s,
                "gen_tokens_per_s": self.gen_tokens_per_s, "eval_gen_tokens_per_s": self.eval_gen_tokens_per_s}


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def incomplete_utf8(text: bytes) -> int:
    """How many more bytes the last characters of `text` wait for, as llama-cpp-python's completion
    loop counts them (it generates that many more tokens before it checks stops and length)."""
    missing = 0
    for offset, byte in enumerate(text[-3:]):
        have = 3 - offset
        for size, lead in ((2, 0xC0), (3, 0xE0), (4, 0xF0)):
            if size > have and byte & lead == lead:
                missing = size - have
    return missing


@dataclass
class _Answer:
    """A greedy answer in the making, judged token by token as create_completion judges it."""

    prompt: List[int]
    max_tokens: int
    tokens: List[int] = field(default_factory=list)
    text: bytes = b""
    finish: Optional[str] = None
    wait_bytes: int = 0

    def accept(self, llm, token: int, is_eog: Callable[[int], bool], stops: Sequence[bytes]) -> None:
        if is_eog(token):
            self.text, self.finish = llm.detokenize(self.tokens, prev_tokens=self.prompt), "stop"
            return
        self.tokens.append(token)
        text = llm.detokenize(self.tokens, prev_tokens=self.prompt)
        self.wait_bytes = incomplete_utf8(text) or self.wait_bytes
        if self.wait_bytes > 0:
            self.wait_bytes -= 1
            return
        hit = next((s for s in stops if s in text), None)
        if hit is not None:
            self.text, self.finish = text[:text.index(hit)], "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.text, self.finish = text, "length"


def decode_batch(lib, ctx, batch, entries: Sequence[tuple]) -> None:
    """One llama_decode of `entries`: (token, position, sequence id, whether to output its logits)."""
    batch.n_tokens = len(entries)
    for j, (token, pos, seq, output) in enumerate(entries):
        batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, pos, 1
        batch.seq_id[j][0], batch.logits[j] = seq, output
    if lib.llama_decode(ctx, batch) != 0:
        raise RuntimeError(f"llama_decode failed on a batch of {len(entries)} tokens")


class Decoder:
    """One sequence of a llama.cpp context, driven token by token; `cached` mirrors what its KV cache
    holds. Without `ctx`: the loaded model's own context (sequence 0), as create_completion uses it."""

    def __init__(self, llm, stops: Sequence[str], ctx=None, seq: int = 0, batch=None):
        import llama_cpp

        self.llm, self.lib, self.seq = llm, llama_cpp, seq
        self.ctx = llm.ctx if ctx is None else ctx
        self.n_vocab, self.n_batch = llm.n_vocab(), llm.n_batch
        self.stops = [s.encode("utf-8") for s in stops]
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.own_context = ctx is None
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1) if batch is None else batch
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.is_eog = lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token))
        llama_cpp.llama_memory_seq_rm(self.memory, seq, 0, -1)
        self.cached: List[int] = []

    def close(self) -> None:
        if self.own_context:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_memory_clear(self.memory, True)
            self.llm.reset()  # llama-cpp-python's own record of the KV cache is stale now

    def keep(self, tokens: Sequence[int], limit: int) -> int:
        """Keeps the cached prefix of `tokens` (at most `limit` tokens) and drops the rest."""
        n = min(common_prefix(self.cached, tokens), limit)
        self.lib.llama_memory_seq_rm(self.memory, self.seq, n, -1)
        self.cached = list(tokens[:n])
        return n

    def logits(self, j: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, j), shape=(self.n_vocab,)).copy()

    def decode(self, tokens: Sequence[int], first_output: int) -> List[np.ndarray]:
        """Decodes `tokens` after the cached ones, in batches of n_batch of this sequence alone, and
        returns copies of the logits at positions >= first_output."""
        rows = []
        for begin in range(0, len(tokens), self.n_batch):
            part = tokens[begin:begin + self.n_batch]
            start = len(self.cached)
            decode_batch(self.lib, self.ctx, self.batch,
                         [(token, start + j, self.seq, start + j >= first_output) for j, token in enumerate(part)])
            self.cached += part
            rows += [self.logits(j) for j in range(len(part)) if start + j >= first_output]
        return rows

    def greedy(self, answer: _Answer, logits: np.ndarray) -> None:
        answer.accept(self.llm, int(np.argmax(logits)), self.is_eog, self.stops)


def _prompt(decoder: Decoder, prompt: List[int], timing: Timing) -> np.ndarray:
    """Step 1: the prompt's last logits (as create_completion: a fully cached prompt re-decodes its
    last token)."""
    started = time.perf_counter()
    kept = decoder.keep(prompt, len(prompt) - 1)
    logits = decoder.decode(prompt[kept:], len(prompt) - 1)[-1]
    timing.prompt_tokens += len(prompt) - kept
    timing.prompt_seconds += time.perf_counter() - started
    return logits


def _reference(decoder: Decoder, sequence, prompt: Optional[List[int]], timing: Timing) -> List[np.ndarray]:
    """Step 2: the logits at the reference answer's positions. After a prompt was decoded for
    generation, its tokens stay; a token straddling the prompt's end is decoded again."""
    started = time.perf_counter()
    tokens, first = sequence.tokens[:sequence.end - 1], sequence.start - 1
    kept = decoder.keep(tokens, first if prompt is None or sequence.start < len(prompt) else len(prompt))
    rows = decoder.decode(tokens[kept:], first)
    timing.reference_tokens += len(tokens) - kept
    timing.reference_seconds += time.perf_counter() - started
    return rows


def _generate(decoder: Decoder, answer: _Answer, timing: Timing) -> None:
    """Step 3: one token per llama_decode until the answer stops."""
    started, steps = time.perf_counter(), 0
    while answer.finish is None:
        decoder.greedy(answer, decoder.decode([answer.tokens[-1]], len(decoder.cached))[-1])
        steps += 1
    timing.add_steps(steps, time.perf_counter() - started, alone=True)


def start_row(decoder: Decoder, index: int, prompt: List[int], sequence, max_new_tokens: int, n_ctx: int,
              on_logits, timing: Timing) -> _Answer:
    """Steps 1 and 2 and the answer's first token."""
    if len(prompt) >= n_ctx:
        raise ValueError(f"eval row {index + 1}: its prompt's {len(prompt)} tokens do not fit eval.n_ctx={n_ctx}; "
                         "raise eval.n_ctx")
    # as create_completion: the answer may fill the context, no more
    answer = _Answer(prompt, max_new_tokens if max_new_tokens + len(prompt) < n_ctx else n_ctx - len(prompt))
    first = _prompt(decoder, prompt, timing)
    if sequence is not None and not _straddles(sequence, prompt):
        on_logits(index, np.stack([first] + _reference(decoder, sequence, prompt, timing)))
        decoder.keep(prompt, len(prompt))  # the reference leaves the KV cache
    decoder.greedy(answer, first)
    return answer


def finish_row(decoder: Decoder, index: int, answer: _Answer, sequence, on_logits, timing: Timing) -> Completion:
    timing.generated_tokens += len(answer.tokens)
    if sequence is not None and _straddles(sequence, answer.prompt):
        on_logits(index, np.stack(_reference(decoder, sequence, None, timing)))
    return Completion(answer.tokens, answer.text.decode("utf-8", errors="ignore"), answer.finish)


def _straddles(sequence, prompt: List[int]) -> bool:
    return sequence.start < len(prompt)


def alone(decoder: Decoder, index: int, prompts, sequences, max_new_tokens: int, n_ctx: int, on_logits,
          timing: Timing) -> Optional[Completion]:
    """One row from start to finish on its own (no prompts: the logit pass alone)."""
    sequence = sequences[index] if sequences is not None else None
    if prompts is None:
        on_logits(index, np.stack(_reference(decoder, sequence, None, timing)))
        return None
    answer = start_row(decoder, index, prompts[index], sequence, max_new_tokens, n_ctx, on_logits, timing)
    if answer.finish is None:
        _generate(decoder, answer, timing)
    return finish_row(decoder, index, answer, sequence, on_logits, timing)
