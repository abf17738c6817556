"""Generation through llama-cpp-python: the shipped GGUF, with the chat template embedded in it.

Prompts are rendered here with the GGUF's own template (in the Jinja sandbox) and tokenized by the
GGUF, so that generation and the reference scoring in `tunelab.eval.logits` see the same token ids.
Speed comes from llama.cpp's own performance counters, read around the generation loop.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Sequence

from tunelab.eval.metrics import Generation
from tunelab.templates.chat import ChatTemplate, Message


def load_gguf(path: Path, n_ctx: int, threads=None):
    from llama_cpp import Llama

    threads = threads or os.cpu_count()
    # The same number for batches (prompts, the logit pass): llama-cpp-python would otherwise use
    # every core there, and its spinning threads crawl on a machine that is busy with other work.
    # chat_format names the GGUF's own template: without it llama-cpp-python may swap in a built-in
    # format it guesses from the template's text, which is not what the parity gate checked.
    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                 seed=0, verbose=False, chat_format="chat_template.default")


def embedded_template(llm, path: Path) -> ChatTemplate:
    """The chat template inside the GGUF, with its BOS/EOS text (as llama-cpp-python's chat handler
    sets them); EOS is the trained end-of-turn token."""
    import llama_cpp

    source = llm.metadata.get("tokenizer.chat_template")
    if not source:
        raise FileNotFoundError(f"{path}: the GGUF has no tokenizer.chat_template; re-run `tunelab stage=export`")
    vocab = llama_cpp.llama_model_get_vocab(llm.model)

    def text(token: int) -> str:
        return llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8") if token != -1 else ""

    eos = text(llm.token_eos())
    return ChatTemplate(source, eos, bos_token=text(llm.token_bos()), eos_token=eos)


def tokenize(llm, text: str) -> List[int]:
    # As llama-cpp-python's chat handler does for a Jinja template: special tokens parsed, no extra
    # BOS (a template that wants one writes {{ bos_token }} itself).
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def prompt_ids(llm, template: ChatTemplate, prompt: Sequence[Message]) -> List[int]:
    return tokenize(llm, template.render(list(prompt), add_generation_prompt=True))


@dataclass
class Speed:
    """llama.cpp's counters over one generation loop: prompt tokens it evaluated (after prefix
    reuse), tokens it generated one by one, and the wall time of the whole loop."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def gen_tokens_per_s(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "prompt_tokens_per_s": self.prompt_tokens_per_s,
                "gen_tokens_per_s": self.gen_tokens_per_s}


def generate(llm, template: ChatTemplate, conversations, max_new_tokens: int, temperature: float,
             stop: Sequence[str] = (), progress=None):
    """Answer each conversation's last prompt (everything before its final assistant turn).

    Returns (generations, Speed). Consecutive prompts share their system prompt, which
    llama-cpp-python keeps in the KV cache instead of evaluating it again.
    """
    import llama_cpp

    stops = [template.end_of_turn, *stop] if template.end_of_turn else list(stop)
    results = []
    llama_cpp.llama_perf_context_reset(llm.ctx)
    started = time.perf_counter()
    for messages in conversations:
        prompt, reference = messages[:-1], messages[-1]["content"]
        ids = prompt_ids(llm, template, prompt)
        out = llm.create_completion(ids, max_tokens=max_new_tokens, temperature=temperature, seed=0, stop=stops)
        choice = out["choices"][0]
        results.append(Generation(prompt=prompt[-1]["content"], reference=reference, answer=choice["text"] or "",
                                  finish_reason=choice["finish_reason"],
                                  completion_tokens=out["usage"]["completion_tokens"], prompt_tokens=len(ids)))
        if progress:
            progress()
    perf = llama_cpp.llama_perf_context(llm.ctx)
    speed = Speed(perf.n_p_eval, perf.t_p_eval_ms / 1e3, perf.n_eval, perf.t_eval_ms / 1e3,
                  time.perf_counter() - started)
    return results, speed
