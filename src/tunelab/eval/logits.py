"""Scores from llama.cpp's logits: what `llama-perplexity --kl-divergence` uses to judge quantization.

- perplexity of the reference answers: exp of the mean negative log-likelihood over the answer
  tokens only (the answer's tokens and the end-of-turn token that closes it, as training counts
  them), each conditioned on the rendered prompt and the answer tokens before it;
- KL divergence KL(P_ref || P_quant) of each quantized GGUF's next-token distribution from the
  reference GGUF's (f16), averaged over the same positions, and how often both pick the same top token.

Token ids come from rendering each conversation with the GGUF's embedded template and tokenizing
with the GGUF. The logits come from `tunelab.eval.decode`, which decodes each reference answer right
after the prompt it evaluates for generation anyway. The reference's log-probabilities (positions x
vocabulary) are kept on disk.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from tunelab.eval.decode import common_prefix
from tunelab.eval.parallel import run_rows
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


def answer_sequences(llm, template: ChatTemplate, conversations, n_ctx: int) -> List[AnswerSequence]:
    """Each conversation's token ids and where its final answer lies in them."""
    end_of_turn = llm.token_eos()
    sequences = []
    for row, messages in enumerate(conversations, start=1):
        prompt = prompt_ids(llm, template, messages[:-1])
        tokens = tokenize(llm, template.render(messages))
        start = common_prefix(prompt, tokens)  # a token may straddle the prompt/answer boundary
        answer = tokens[start:]
        end = start + answer.index(end_of_turn) + 1 if end_of_turn in answer else len(tokens)
        if start == 0 or end <= start:
            raise ValueError(f"eval row {row}: the template leaves no answer tokens after the prompt")
        if end > n_ctx:
            raise ValueError(f"eval row {row}: {end} tokens do not fit eval.n_ctx={n_ctx}; raise eval.n_ctx")
        sequences.append(AnswerSequence(tokens, start, end))
    return sequences


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


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


class AnswerScores:
    """Perplexity always; kl_divergence and top1_agreement against `reference` when given. `record`
    stores this GGUF's log-probabilities as the reference for the others. Rows may come in any order."""

    def __init__(self, sequences: List[AnswerSequence], reference: Optional[ReferenceLogprobs] = None,
                 record: Optional[ReferenceLogprobs] = None):
        self.sequences, self.reference, self.record = sequences, reference, record
        lengths = [len(seq.answer) for seq in sequences]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
        self.nll, self.kl, self.same_top, self.seen = 0.0, 0.0, 0, set()

    def add(self, index: int, logits: np.ndarray) -> None:
        """Row `index`'s raw logits at its answer positions (answer tokens x vocabulary)."""
        answer, logp = np.asarray(self.sequences[index].answer), log_softmax(logits)
        self.nll -= float(logp[np.arange(len(answer)), answer].sum())
        span = slice(self.offsets[index], self.offsets[index + 1])
        if self.record is not None:
            self.record.array[span] = logp
        if self.reference is not None:
            ref = self.reference.array[span].astype(np.float64)
            self.kl += float((np.exp(ref) * (ref - logp)).sum())
            self.same_top += int((ref.argmax(axis=1) == logp.argmax(axis=1)).sum())
        self.seen.add(index)

    def result(self) -> dict:
        if len(self.seen) != len(self.sequences):
            raise RuntimeError(f"the logit pass scored {len(self.seen)} of {len(self.sequences)} eval rows")
        total = int(self.offsets[-1])
        scores = {"perplexity": float(np.exp(self.nll / total))}
        if self.reference is not None:
            # float rounding can leave a hair below zero for identical distributions
            scores.update(kl_divergence=max(self.kl / total, 0.0), top1_agreement=self.same_top / total)
        return scores


def score_answers(llm, sequences: List[AnswerSequence], reference: Optional[ReferenceLogprobs] = None,
                  record: Optional[ReferenceLogprobs] = None) -> dict:
    """The logit pass alone (no generation): see AnswerScores."""
    scores = AnswerScores(sequences, reference, record)
    run_rows(llm, None, sequences, 0, (), on_logits=scores.add)
    return scores.result()
