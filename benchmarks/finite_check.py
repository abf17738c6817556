"""What export's finite-weights check costs on a model of SmolLM2-135M's shape (random weights:
the cost does not depend on the values), float32 and bfloat16, against the plain isfinite().all().

    PYTHONPATH=src python benchmarks/finite_check.py
"""
from __future__ import annotations

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.export.finite import non_finite_tensors

# HuggingFaceTB/SmolLM2-135M-Instruct's config.json
SMOLLM2_135M = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def best_of(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        state = LlamaForCausalLM(SMOLLM2_135M).to(dtype).state_dict()
        params = sum(t.numel() for t in state.values()) / 1e6
        ours = best_of(lambda: non_finite_tensors(state.items()))
        plain = best_of(lambda: [bool(torch.isfinite(t).all()) for t in state.values()])
        print(f"{str(dtype):<15} {params:.0f}M values: non_finite_tensors {ours * 1e3:.0f} ms, "
              f"isfinite().all() {plain * 1e3:.0f} ms ({plain / ours:.1f}x)")


if __name__ == "__main__":
    main()
