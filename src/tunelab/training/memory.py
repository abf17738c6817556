"""Gradient checkpointing `auto`: off when the model and a micro-batch fit without it.

Recomputing the forward pass costs about a third more FLOPs, so it is worth paying only when the
activations would not fit. The estimate is deliberately coarse (Llama-style decoder, bf16
activations, logits upcast for the loss) and errs on the side of checkpointing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

SAFETY = 0.75  # use at most this share of the free GPU memory for weights + activations


def activation_bytes(config: dict, tokens: int, act_bytes: int = 2) -> int:
    """Saved activations of a training step without checkpointing, for `tokens` tokens."""
    h, i = config["hidden_size"], config["intermediate_size"]
    layers, vocab = config["num_hidden_layers"], config["vocab_size"]
    per_layer_token = act_bytes * (10 * h + 5 * i)  # norms, q/k/v/o inputs, residuals, MLP branches
    logits = tokens * vocab * (act_bytes + 8)          # logits + fp32 softmax and its gradient
    return layers * tokens * per_layer_token + logits


def weight_bytes(config: dict, load_in_4bit: bool, dtype_bytes: int) -> int:
    h, i = config["hidden_size"], config["intermediate_size"]
    layers, vocab = config["num_hidden_layers"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    attn = h * h * 2 + 2 * h * (h // heads) * kv
    params = layers * (attn + 3 * h * i) + vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    return int(params * (0.55 if load_in_4bit else dtype_bytes))


def choose_gradient_checkpointing(training_cfg, base_dir: Path, dtype, load_in_4bit: bool,
                                  backend: str) -> Tuple[str, str]:
    import torch

    mode = training_cfg.gradient_checkpointing
    if mode != "auto":
        if mode == "unsloth" and backend != "unsloth":
            return "on", "training.gradient_checkpointing=unsloth needs the unsloth backend: plain checkpointing"
        return mode, f"training.gradient_checkpointing={mode}"
    if not torch.cuda.is_available():
        return "off", "auto: CPU training keeps activations in host memory"
    config = json.loads((Path(base_dir) / "config.json").read_text())
    tokens = training_cfg.batch_size * training_cfg.max_seq_length
    dtype_bytes = torch.finfo(dtype).bits // 8
    need = weight_bytes(config, load_in_4bit, dtype_bytes) + activation_bytes(config, tokens)
    free, _ = torch.cuda.mem_get_info()
    if need <= SAFETY * free:
        return "off", f"auto: ~{need / 2**30:.1f} GiB needed without checkpointing, {free / 2**30:.1f} GiB free"
    fallback = "unsloth" if backend == "unsloth" else "on"
    return fallback, f"auto: ~{need / 2**30:.1f} GiB needed without checkpointing > {SAFETY:.0%} of {free / 2**30:.1f} GiB free"
