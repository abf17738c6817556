"""Plain llama-cpp-python's answers, run in llama.cpp's own process (tunelab.llama_process): on the GPU
box the CUDA build cannot share the test process with torch."""
from __future__ import annotations

from typing import List


def chat_answers(cfg, gguf: str, rows: List[list], max_tokens: int, n_ctx: int) -> List[str]:
    """What create_chat_completion answers with the GGUF's own template, every layer on the GPU."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=n_ctx, n_gpu_layers=-1, seed=0, verbose=False,
                chat_format="chat_template.default")
    try:
        return [llm.create_chat_completion(messages=row[:-1], max_tokens=max_tokens, temperature=0.0)["choices"][0]
                ["message"]["content"] or "" for row in rows]
    finally:
        llm.close()
