"""Generation through llama-cpp-python: the shipped GGUF, with the chat template embedded in it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

from tunelab.eval.metrics import Generation


def load_gguf(path: Path, n_ctx: int, threads=None):
    from llama_cpp import Llama

    # chat_format names the GGUF's own template: without it llama-cpp-python may swap in a built-in
    # format it guesses from the template's text, which is not what the parity gate checked.
    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads or os.cpu_count(),
                 seed=0, verbose=False, chat_format="chat_template.default")


def generate(llm, conversations, max_new_tokens: int, temperature: float, progress=None) -> List[Generation]:
    """Answer each conversation's last prompt (everything before its final assistant turn)."""
    results = []
    for messages in conversations:
        prompt, reference = messages[:-1], messages[-1]["content"]
        out = llm.create_chat_completion(messages=prompt, max_tokens=max_new_tokens,
                                         temperature=temperature, seed=0)
        choice = out["choices"][0]
        results.append(Generation(prompt=prompt[-1]["content"], reference=reference,
                                  answer=choice["message"]["content"] or "",
                                  finish_reason=choice["finish_reason"],
                                  completion_tokens=out["usage"]["completion_tokens"]))
        if progress:
            progress()
    return results
