"""training.distributed=fsdp on one GPU through tunelab's launcher (one NCCL rank): LoRA and QLoRA train,
the adapter is gathered and saved by rank 0, the backend choice says why it is hf, QLoRA's 4-bit weights
are stored in the compute dtype. On the bare GPU box:
`. scripts/gpu_env.sh && python -m pytest -m gpu tests/gpu/test_gpu_distributed.py`."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from test_gpu_training import ROOT, tiny_model  # noqa: F401  (the shared fixture)

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
STEPS = 6


def tunelab(run_dir: Path, model: Path, *overrides):
    cmd = [sys.executable, "-m", "tunelab", "experiment=smoke", "model=local", f"model.path={model}",
           f"paths.run_dir={run_dir}", "tracking=off", "cache.enabled=false", f"training.max_steps={STEPS}",
           "training.distributed=fsdp", "training.nproc_per_node=1", *overrides]
    done = subprocess.run([*cmd, "stage=prepare"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([*cmd, "stage=train"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    log = (run_dir / ".tunelab/logs/rank-0.log")
    assert done.returncode == 0, done.stderr[-3000:] + (log.read_text()[-4000:] if log.is_file() else "")
    return json.loads((run_dir / "train/summary.json").read_text())


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "train/adapter/adapter_model.safetensors"))


@pytest.mark.parametrize("lora", ["default", "qlora"])
def test_fsdp_on_one_gpu_trains_and_rank_zero_saves_the_whole_adapter(tmp_path, tiny_model, lora):  # noqa: F811
    summary = tunelab(tmp_path, tiny_model, f"lora={lora}")
    assert summary["world_size"] == 1 and summary["distributed"] == "fsdp" and summary["steps"] == STEPS
    assert summary["backend"] == "hf" and "training.distributed=fsdp" in summary["backend_reason"]
    assert math.isfinite(summary["train_loss"])
    tensors = adapter_tensors(tmp_path)
    assert tensors and all("lora_" in name for name in tensors)
    # gathered, not a shard: every LoRA B matrix has its full shape and has moved from its zero init
    assert all(t.numel() > 0 and torch.isfinite(t).all() for t in tensors.values())
    assert any(t.abs().max() > 0 for name, t in tensors.items() if "lora_B" in name)
    ranked = (tmp_path / ".tunelab/ranks/config.yaml").read_text()
    if lora == "qlora":
        assert "quant_storage: bf16" in ranked  # set to the compute dtype for FSDP
