"""The GGUFs evaluated on the GPU: llama-cpp-python's CUDA build (scripts/gpu_llama_cuda.sh), every layer
offloaded by eval.gpu_layers=auto, answers equal to create_chat_completion's on the same GPU.

On the bare GPU box: `. scripts/gpu_env.sh && python3 -m pytest -m gpu tests/gpu/test_gpu_eval.py`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from test_gpu_training import tiny_model, tunelab  # noqa: F401  (the module's fixture and runner)

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def chat_answers(gguf: Path, rows, max_tokens: int, n_ctx: int):
    """What plain llama-cpp-python answers on the GPU, with the GGUF's own template (in a torch-free child)."""
    from tunelab import llama_process

    return llama_process.call("llama_answers:chat_answers", None, gguf=str(gguf), rows=rows, max_tokens=max_tokens,
                              n_ctx=n_ctx)


def test_every_gguf_is_evaluated_on_the_gpu_and_answers_as_create_chat_completion(tmp_path, tiny_model,  # noqa: F811
                                                                                   monkeypatch):
    from tunelab import llama_process
    from tunelab.data.formats import read_prepared
    from tunelab.eval.device import offload_supported

    assert llama_process.in_child(), "a CUDA build runs llama.cpp's work in a child: it crashes beside torch"
    assert offload_supported(), "this llama-cpp-python is a CPU build: `. scripts/gpu_env.sh` builds the CUDA one"
    monkeypatch.setenv("PYTHONPATH", f"{Path(__file__).parent}:{os.environ.get('PYTHONPATH', '')}")
    tunelab(tmp_path, tiny_model, "training.backend=hf", "eval.max_new_tokens=16")
    summary = json.loads((tmp_path / "evaluate" / "summary.json").read_text())
    assert summary["decoding"]["backend"] == "gpu (all layers)", summary["decoding"]
    rows = read_prepared(tmp_path / "prepare" / "eval.jsonl")
    generations = [json.loads(line) for line in (tmp_path / "evaluate" / "generations.jsonl").read_text().splitlines()]
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    for variant in ("finetuned", "base"):
        for quant, info in manifest[variant].items():
            ours = [g["answer"] for g in generations if g["variant"] == variant and g["quant"] == quant]
            assert ours == chat_answers(Path(info["path"]), rows, 16, summary["decoding"]["n_ctx"]), (variant, quant)
