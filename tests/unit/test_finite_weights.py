"""Non-finite weights are refused before conversion, naming where they are (adapter file, merge)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tunelab.export.finite import check_adapter, check_merged, non_finite_tensors
from tunelab.export.llama_cpp import ExportError


def test_an_adapter_with_a_nan_is_refused_naming_the_file_and_tensor(tmp_path):
    weights = {f"base_model.layers.{i}.lora_A.weight": torch.zeros(4, 8) for i in range(3)}
    weights["base_model.layers.1.lora_A.weight"][2, 3] = float("nan")
    weights["base_model.layers.2.lora_A.weight"][0, :] = float("-inf")
    save_file(weights, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ExportError) as err:
        check_adapter(tmp_path)
    message = str(err.value)
    assert message.startswith(f"the adapter {tmp_path / 'adapter_model.safetensors'} holds NaN or infinite weights "
                              "in 2 tensor(s): base_model.layers.1.lora_A.weight (1 of 32 values), "
                              "base_model.layers.2.lora_A.weight (8 of 32 values)")
    assert "Nothing was exported" in message and "learning_rate" in message


def test_a_finite_adapter_passes(tmp_path):
    save_file({"w": torch.ones(3, 3, dtype=torch.float16)}, tmp_path / "adapter_model.safetensors")
    check_adapter(tmp_path)


def test_a_merged_model_with_an_infinity_is_refused_naming_the_merge():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    with pytest.raises(ExportError, match=r"^the merge of train/adapter into /models/base holds NaN or infinite "
                                          r"weights in 1 tensor\(s\): 1.bias \(1 of 2 values\)"):
        check_merged(model, Path("train/adapter"), Path("/models/base"))


def test_integer_tensors_and_many_bad_tensors():
    tensors = [("ids", torch.arange(5))] + [(f"t{i}", torch.full((2,), float("nan"))) for i in range(7)]
    assert [name for name, _, _ in non_finite_tensors(tensors)] == [f"t{i}" for i in range(7)]


def test_large_finite_values_whose_sum_overflows_are_not_refused():
    tensors = [("big", torch.full((4,), 3e38)), ("big16", torch.full((4,), 60000.0, dtype=torch.float16))]
    assert non_finite_tensors(tensors) == []
