"""Eval rows that take their greedy steps together, one llama_decode per step for all of them, with
the answers create_completion gives each row alone.

A second llama.cpp context on the loaded model holds one KV-cache stream per row slot (`kv_unified`
off: each row's cells are its own, in position order, as they are alone). Rows stay bitwise what
llama-cpp-python computes for them one after another, call for call:

- a row's prompt is decoded in a call of its own after the prefix it shares with the row before
  (create_completion's reuse of its KV cache): that prefix's cache is copied from the slot that
  decoded the row before, so every cached token was computed by the same calls as there. llama.cpp
  picks kernels by the number of tokens in a call (on this CPU: one family below 8 tokens and one
  from 8, or one for 1 and one from 2), so the split matters;
- the reference answer (logit pass) is decoded in a call of its own too. A call that mixed one
  row's prompt with other rows' steps gave that row logits ~1 apart from alone;
- only greedy steps are shared: one token per row. Those are exact only up to as many rows as the
  kernels keep rounding each row as they do a single token: with llama.cpp's default CPU build,
  7 for q5_k_m (a tiled K-quant kernel starts at 8 tokens), none for f16 (tinyBLAS from 2 tokens),
  12 or more for q8_0. So each loaded GGUF is probed first: a greedy step of 1..N rows together must
  give logits bitwise equal to a step alone in the model's own context. The rows go together in
  the largest group that passed, or one at a time (`tunelab.eval.decode`) if none did.
"""
from __future__ import annotations

import time
from collections import deque
from typing import List, Optional, Sequence

import numpy as np

from tunelab.eval.decode import (Completion, Decoder, Timing, alone, common_prefix, decode_batch, finish_row,
                                 start_row)

# Rows answered alone first, until this many greedy steps were timed: the per-request speed the
# report gives, comparable between GGUFs whether or not their rows could go together.
STREAM_SAMPLE_STEPS = 32
PROBE_TOKENS = 16


class RowSlots:
    """A context with `rows` sequences (one KV-cache stream each) on the model `llm` has loaded."""

    def __init__(self, llm, rows: int, stops: Sequence[str]):
        import llama_cpp

        self.lib = llama_cpp
        params = type(llm.context_params).from_buffer_copy(llm.context_params)
        params.n_ctx, params.n_seq_max, params.kv_unified = llm.n_ctx() * rows, rows, False
        self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise MemoryError(f"llama.cpp could not make a context for {rows} rows of {llm.n_ctx()} tokens: "
                              "lower eval.parallel_rows")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(max(llm.n_batch, rows), 0, 1)
        self.decoders = [Decoder(llm, stops, ctx=self.ctx, seq=i, batch=self.batch) for i in range(rows)]

    def step(self, rows: List[tuple]) -> List[np.ndarray]:
        """One llama_decode: one token for each (decoder, token); the logits after each."""
        decode_batch(self.lib, self.ctx, self.batch,
                     [(token, len(decoder.cached), decoder.seq, True) for decoder, token in rows])
        for decoder, token in rows:
            decoder.cached.append(token)
        return [decoder.logits(j) for j, (decoder, _) in enumerate(rows)]

    def copy(self, source: Decoder, target: Decoder) -> None:
        """target's stream becomes source's (llama.cpp copies the cells before its next decode)."""
        if source is not target:
            self.lib.llama_memory_seq_cp(self.memory, source.seq, target.seq, -1, -1)
            target.cached = list(source.cached)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)


def rows_alike(llm, slots: RowSlots, prompt: List[int]) -> int:
    """How many rows (up to every slot) can step together with every row's logits bitwise what a
    step alone gives in the model's own context: the start of `prompt` decoded in every slot, then
    one greedy step with 1, 2, ... rows together. 1 means none. Leaves every slot empty."""
    tokens = prompt[:PROBE_TOKENS]
    own = Decoder(llm, ())
    try:
        expected_prompt = own.decode(tokens, len(tokens) - 1)[-1]
        token = int(np.argmax(expected_prompt))
        expected_step = own.decode([token], len(tokens))[-1]
    finally:
        own.close()
    alike = 1
    try:
        for decoder in slots.decoders:
            if not np.array_equal(decoder.decode(tokens, len(tokens) - 1)[-1], expected_prompt):
                return 1
        for n in range(2, len(slots.decoders) + 1):
            group = slots.decoders[:n]
            got = slots.step([(decoder, token) for decoder in group])
            for decoder in group:
                decoder.keep(tokens, len(tokens))
            if not all(np.array_equal(logits, expected_step) for logits in got):
                break
            alike = n
        return alike
    finally:
        for decoder in slots.decoders:
            decoder.keep((), 0)


def run_together(llm, prompts, sequences, max_new_tokens: int, stops: Sequence[str], on_logits, progress,
                 rows: int, timing: Timing) -> Optional[List[Completion]]:
    """Every row's Completion, rows stepping together, or None (nothing done) where the probe found
    that no two rows can."""
    slots = RowSlots(llm, rows, stops)
    try:
        alike = rows_alike(llm, slots, prompts[0])
        if alike < 2:
            return None
        timing.rows_together = alike
        completions: List[Optional[Completion]] = [None] * len(prompts)
        pending = deque(range(len(prompts)))
        while pending and timing.stream_step_tokens < STREAM_SAMPLE_STEPS:
            index = pending.popleft()
            completions[index] = alone(slots.decoders[0], index, prompts, sequences, max_new_tokens, llm.n_ctx(),
                                       on_logits, timing)
            if progress:
                progress()
        together = _Together(slots, slots.decoders[:alike], prompts, sequences, max_new_tokens, on_logits,
                             progress, timing, completions)
        together.run(pending, previous=slots.decoders[0])
        return completions
    finally:
        slots.close()


class _Together:
    """The rows left, `len(decoders)` at a time, started in order."""

    def __init__(self, slots, decoders, prompts, sequences, max_new_tokens, on_logits, progress, timing,
                 completions):
        self.slots, self.free, self.active = slots, list(decoders), {}
        self.prompts, self.sequences, self.max_new_tokens = prompts, sequences, max_new_tokens
        self.on_logits, self.progress, self.timing, self.completions = on_logits, progress, timing, completions
        self.n_ctx = decoders[0].llm.n_ctx()

    def sequence(self, index: int):
        return self.sequences[index] if self.sequences is not None else None

    def waits(self, index: int) -> bool:
        """Whether the row's shared prefix reaches into the previous row's answer, still unwritten."""
        if index == 0 or self.completions[index - 1] is not None:
            return False
        before = self.prompts[index - 1]
        return common_prefix(before, self.prompts[index][:-1]) == len(before)

    def run(self, pending: deque, previous: Decoder) -> None:
        while pending or self.active:
            while self.free and pending and not self.waits(pending[0]):
                previous = self.start(pending.popleft(), previous)
            if self.active:
                self.step()

    def start(self, index: int, previous: Decoder) -> Decoder:
        decoder = previous if previous in self.free else self.free[-1]
        self.free.remove(decoder)
        self.slots.copy(previous, decoder)
        answer = start_row(decoder, index, self.prompts[index], self.sequence(index), self.max_new_tokens,
                           self.n_ctx, self.on_logits, self.timing)
        if answer.finish is None:
            self.active[decoder] = (index, answer)
        else:
            self.finish(decoder, index, answer)
        return decoder

    def step(self) -> None:
        started, group = time.perf_counter(), list(self.active)
        logits = self.slots.step([(decoder, self.active[decoder][1].tokens[-1]) for decoder in group])
        for decoder, row_logits in zip(group, logits):
            decoder.greedy(self.active[decoder][1], row_logits)
        self.timing.add_steps(len(group), time.perf_counter() - started, alone=False)
        for decoder in group:
            if self.active[decoder][1].finish is not None:
                self.finish(decoder, *self.active.pop(decoder))

    def finish(self, decoder: Decoder, index: int, answer) -> None:
        self.completions[index] = finish_row(decoder, index, answer, self.sequence(index), self.on_logits,
                                             self.timing)
        self.free.append(decoder)
        if self.progress:
            self.progress()


def run_rows(llm, prompts: Optional[List[List[int]]], sequences, max_new_tokens: int, stops: Sequence[str],
             on_logits=None, progress=None, parallel_rows: int = 1):
    """Greedy answers to `prompts` (None: no generation) and, for each of `sequences` (AnswerSequence;
    None: no logit pass), the raw logits at its answer positions, passed to on_logits(row index, array
    of shape (answer tokens, vocabulary)). Up to `parallel_rows` rows take their greedy steps
    together where that changes no logit (run_together). Returns ([Completion or None per
    row], Timing)."""
    n_ctx, timing = llm.n_ctx(), Timing()
    count = len(prompts) if prompts is not None else len(sequences)
    if prompts is not None and parallel_rows > 1 and count > 1:
        together = run_together(llm, prompts, sequences, max_new_tokens, stops, on_logits, progress,
                                min(parallel_rows, count), timing)
        if together is not None:
            return together, timing
    decoder, completions = Decoder(llm, stops), []
    try:
        for index in range(count):
            completions.append(alone(decoder, index, prompts, sequences, max_new_tokens, n_ctx, on_logits, timing))
            if progress:
                progress()
    finally:
        decoder.close()
    return completions, timing
