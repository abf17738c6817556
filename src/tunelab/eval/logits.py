"""Scores from llama.cpp's logits: what `llama-perplexity --kl-divergence` uses to judge quantization.

- perplexity of the reference answers: exp of the mean negative log-likelihood over the answer
  tokens only (the answer's tokens and the end-of-turn token that closes it, as training counts
  them), each conditioned on the rendered prompt and the answer tokens before it;
- KL divergence KL(P_ref || P_quant) of each quantized GGUF's next-token distribution from the
  reference GGUF's (f16), averaged over the same positions, and how often both pick the same top token.

Token ids come from rendering each conversation with the GGUF's embedded template and tokenizing
with the GGUF. The reference's log-probabilities (positions x vocabulary) are kept on disk.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from tunelab.eval.generate import prompt_ids, tokenize
from tunelab.templates.chat import ChatTemplate


@dataclass
class AnswerSequence:
    tokens: List[int]  # prompt + answer + end-of-turn (+ whatever the template writes after it)
    start: int  # index of the first answer token
    end: int  # one past the end-of-turn token

    @property
    def answer(self) -> List[int]:
        return self.tokens[self.start:self.end]


def _common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def answer_sequences(llm, template: ChatTemplate, conversations, n_ctx: int) -> List[AnswerSequence]:
    """Each conversation's token ids and where its final answer lies in them."""
    end_of_turn = llm.token_eos()
    sequences = []
    for row, messages in enumerate(conversations, start=1):
        prompt = prompt_ids(llm, template, messages[:-1])
        tokens = tokenize(llm, template.render(messages))
        start = _common_prefix(prompt, tokens)  # a token may straddle the prompt/answer boundary
        answer = tokens[start:]
        end = start + answer.index(end_of_turn) + 1 if end_of_turn in answer else len(tokens)
        if start == 0 or end <= start:
            raise ValueError(f"eval row {row}: the template leaves no answer tokens after the prompt")
        if end > n_ctx:
            raise ValueError(f"eval row {row}: {end} tokens do not fit eval.n_ctx={n_ctx}; raise eval.n_ctx")
        sequences.append(AnswerSequence(tokens, start, end))
    return sequences


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def answer_logprobs(llm, sequences: List[AnswerSequence]) -> Iterator[np.ndarray]:
    """Per sequence, log-softmax of the next-token logits at each position that predicts an answer
    token: shape (len(answer), n_vocab). Logits are computed only at those positions, and the KV
    cache keeps the prefix shared with the previous sequence (the system prompt, usually)."""
    import llama_cpp

    ctx, n_batch, n_vocab = llm.ctx, llm.n_batch, llm.n_vocab()
    memory = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    llama_cpp.llama_memory_clear(memory, True)
    cached: List[int] = []
    try:
        for seq in sequences:
            first_output = seq.start - 1
            keep = min(_common_prefix(cached, seq.tokens), first_output)
            llama_cpp.llama_memory_seq_rm(memory, 0, keep, -1)
            rows = []
            for begin in range(keep, seq.end - 1, n_batch):
                positions = range(begin, min(begin + n_batch, seq.end - 1))
                _fill(batch, seq.tokens, positions, first_output)
                if llama_cpp.llama_decode(ctx, batch) != 0:
                    raise RuntimeError(f"llama_decode failed on a sequence of {seq.end} tokens")
                rows += [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, j), shape=(n_vocab,)).copy()
                         for j, pos in enumerate(positions) if pos >= first_output]
            cached = seq.tokens[:seq.end - 1]
            yield _log_softmax(np.stack(rows))
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_memory_clear(memory, True)
        llm.reset()  # llama-cpp-python's own record of the KV cache is stale now


def _fill(batch, tokens: List[int], positions: range, first_output: int) -> None:
    batch.n_tokens = len(positions)
    for j, pos in enumerate(positions):
        batch.token[j] = tokens[pos]
        batch.pos[j] = pos
        batch.n_seq_id[j] = 1
        batch.seq_id[j][0] = 0
        batch.logits[j] = pos >= first_output


class ReferenceLogprobs:
    """The reference GGUF's answer log-probabilities, in a temporary .npy file next to the run's
    evaluation (the size is answer tokens x vocabulary x 4 bytes)."""

    def __init__(self, directory: Path, label: str, sequences: List[AnswerSequence], n_vocab: int):
        self.label = label
        self.path = directory / f".reference-logprobs-{label}.npy"
        self.tokens = [seq.tokens[:seq.end] for seq in sequences]
        total = sum(len(seq.answer) for seq in sequences)
        needed, free = total * n_vocab * 4, shutil.disk_usage(directory).free
        if needed > free // 2:
            raise OSError(f"the KL divergence needs {needed / 1e9:.1f} GB in {directory} for {total} answer tokens x "
                          f"{n_vocab} vocabulary entries, and {free / 1e9:.1f} GB are free: evaluate fewer rows "
                          "(dataset.max_eval_rows) or turn the logit pass off (eval.logit_metrics=false)")
        self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(total, n_vocab))

    def check_same_tokens(self, sequences: List[AnswerSequence], label: str) -> None:
        if [seq.tokens[:seq.end] for seq in sequences] != self.tokens:
            raise ValueError(f"{label} tokenizes the eval rows differently from {self.label}: "
                             "their next-token distributions cannot be compared")

    def close(self) -> None:
        del self.array
        self.path.unlink(missing_ok=True)


def score_answers(llm, sequences: List[AnswerSequence], reference: Optional[ReferenceLogprobs] = None,
                  record: Optional[ReferenceLogprobs] = None) -> dict:
    """perplexity always; kl_divergence and top1_agreement against `reference` when given.
    `record` stores this GGUF's log-probabilities as the reference for the others."""
    nll, offset, kl, same_top = 0.0, 0, 0.0, 0
    for seq, logp in zip(sequences, answer_logprobs(llm, sequences)):
        answer = np.asarray(seq.answer)
        nll -= float(logp[np.arange(len(answer)), answer].sum())
        span = slice(offset, offset + len(answer))
        if record is not None:
            record.array[span] = logp
        if reference is not None:
            ref = reference.array[span].astype(np.float64)
            kl += float((np.exp(ref) * (ref - logp)).sum())
            same_top += int((ref.argmax(axis=1) == logp.argmax(axis=1)).sum())
        offset += len(answer)
    scores = {"perplexity": float(np.exp(nll / offset))}
    if reference is not None:
        # float rounding can leave a hair below zero for identical distributions
        scores.update(kl_divergence=max(kl / offset, 0.0), top1_agreement=same_top / offset)
    return scores
