"""Generation through llama-cpp-python: the shipped GGUF, with the chat template embedded in it.

Prompts are rendered here with the GGUF's own template (in the Jinja sandbox) and tokenized by the
GGUF, so that generation and the reference scoring in `tunelab.eval.logits` see the same token ids.
Generation itself (greedy, with the logit pass riding along) is in `tunelab.eval.decode`; its
answers are `create_completion`'s, token for token.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import List, Sequence

from tunelab.eval.parallel import run_rows
from tunelab.export.llama_cpp import quiet_llama
from tunelab.eval.metrics import Generation
from tunelab.templates.chat import ChatTemplate, Message


def load_gguf(path: Path, n_ctx: int, threads=None, gpu_layers: int = 0):
    from llama_cpp import Llama

    threads = threads or os.cpu_count()
    # The same number for batches (prompts, the logit pass): llama-cpp-python would otherwise use
    # every core there, and its spinning threads crawl on a machine that is busy with other work.
    # chat_format names the GGUF's own template: without it llama-cpp-python may swap in a built-in
    # format it guesses from the template's text, which is not what the parity gate checked.
    with quiet_llama(f"loading {path}"):
        return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                     n_gpu_layers=gpu_layers, seed=0, verbose=False, chat_format="chat_template.default")


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
    return ChatTemplate(source, eos, bos_token=text(llm.token_bos()), eos_token=eos,
                        origin=f"the chat template inside {path}")


def tokenize(llm, text: str) -> List[int]:
    # As llama-cpp-python's chat handler does for a Jinja template: special tokens parsed, no extra
    # BOS (a template that wants one writes {{ bos_token }} itself).
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def prompt_ids(llm, template: ChatTemplate, prompt: Sequence[Message]) -> List[int]:
    return tokenize(llm, template.render(list(prompt), add_generation_prompt=True))


def generate(llm, template: ChatTemplate, conversations, max_new_tokens: int, temperature: float,
             stop: Sequence[str] = (), progress=None, scores=None, parallel_rows: int = 1):
    """Answer each conversation's last prompt (everything before its final assistant turn), greedily
    (`tunelab.eval.decode`). With `scores` (an AnswerScores over these conversations'
    AnswerSequences), the same pass scores the reference answers. Up to `parallel_rows` rows take
    their greedy steps together where the GGUF's kernels allow it without changing an answer.

    Returns (generations, Timing of the pass with its wall time).
    """
    if temperature != 0:
        raise ValueError(f"eval.temperature={temperature}: evaluation decodes greedily (0.0), so that its "
                         "answers can be recomputed from the GGUF")
    stops = [template.end_of_turn, *stop] if template.end_of_turn else list(stop)
    prompts = [prompt_ids(llm, template, messages[:-1]) for messages in conversations]
    started = time.perf_counter()
    completions, timing = run_rows(llm, prompts, scores.sequences if scores else None, max_new_tokens, stops,
                                   on_logits=scores.add if scores else None, progress=progress,
                                   parallel_rows=parallel_rows)
    timing.wall_seconds = time.perf_counter() - started
    results = [Generation(prompt=messages[-2]["content"], reference=messages[-1]["content"], answer=done.text,
                          finish_reason=done.finish_reason, completion_tokens=len(done.tokens),
                          prompt_tokens=len(ids))
               for messages, done, ids in zip(conversations, completions, prompts)]
    return results, timing
