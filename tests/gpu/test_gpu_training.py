"""GPU path: Unsloth and TRL+PEFT backends, 16-bit LoRA and 4-bit QLoRA, export after QLoRA.

Runs the real CLI on a tiny random-init Llama (with a real tokenizer) on a CUDA GPU; skipped
without one. On the bare GPU box: `. scripts/gpu_env.sh && python -m pytest -m gpu tests/gpu`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer_dir = os.environ.get("TUNELAB_GPU_TOKENIZER") or str(ROOT / ".gpu" / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def tunelab(run_dir: Path, model: Path, *overrides):
    cmd = [sys.executable, "-m", "tunelab", "experiment=smoke", "model=local", f"model.path={model}",
           f"paths.run_dir={run_dir}", "tracking=off", "training.max_steps=6", *overrides]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads((run_dir / "train" / "summary.json").read_text())


def test_auto_picks_unsloth_on_a_gpu_and_the_whole_pipeline_runs(tmp_path, tiny_model):
    summary = tunelab(tmp_path, tiny_model, "training.backend=auto")
    assert summary["backend"] == "unsloth", summary["backend_reason"]
    assert summary["dtype"] == "bfloat16"
    assert (tmp_path / "export" / "model.q5_k_m.gguf").stat().st_size > 0
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert set(metrics["finetuned"]) == {"f16", "q5_k_m"}


@pytest.mark.parametrize("backend", ["hf", "unsloth"])
def test_qlora_trains_4bit_and_export_merges_into_the_16bit_base(tmp_path, tiny_model, backend):
    from safetensors import safe_open

    summary = tunelab(tmp_path, tiny_model, f"training.backend={backend}", "lora=qlora", "eval.evaluate_base=false")
    assert summary["backend"] == backend and summary["load_in_4bit"] is True
    merged = next((tmp_path / "export" / "merged").glob("*.safetensors"))
    with safe_open(str(merged), "pt") as weights:
        dtypes = {weights.get_tensor(k).dtype for k in weights.keys()}
    assert dtypes <= {torch.bfloat16, torch.float16, torch.float32}, dtypes  # no packed 4-bit tensors
    assert (tmp_path / "export" / "model.f16.gguf").is_file()


@pytest.mark.parametrize("mode", ["on", "off", "unsloth"])
def test_gradient_checkpointing_modes_train(tmp_path, tiny_model, mode):
    summary = tunelab(tmp_path, tiny_model, "training.backend=unsloth", f"training.gradient_checkpointing={mode}",
                      "quantization=f16", "eval.evaluate_base=false")
    assert summary["gradient_checkpointing"] == mode
    assert summary["steps"] == 6


@pytest.mark.parametrize("option", ["packing", "padding_free"])
def test_packing_and_padding_free_train_on_unsloth(tmp_path, tiny_model, option):
    summary = tunelab(tmp_path, tiny_model, "training.backend=unsloth", f"training.{option}=true",
                      "training.max_steps=-1", "training.epochs=1", "training.batch_size=4",
                      "training.max_seq_length=512", "quantization=f16", "eval.evaluate_base=false")
    unpacked_steps = -(-summary["train_rows"] // 4)
    if option == "packing":  # several conversations per 512-token row: far fewer steps per epoch
        assert summary["steps"] < unpacked_steps / 2, summary
    else:
        assert summary["steps"] == unpacked_steps, summary
    assert summary["train_loss"] == summary["train_loss"] and summary["train_loss"] > 0  # finite, not NaN
