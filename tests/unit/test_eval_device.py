"""eval.gpu_layers: where llama.cpp runs each GGUF, refused where it cannot run, part of the cache key."""
from __future__ import annotations

import pytest

from tunelab.config.checks import ConfigError, validate
from tunelab.eval import device


def test_gpu_layers_takes_auto_all_or_a_count_and_names_the_key_otherwise(compose_cfg):
    for good in ("auto", "all", "0", "12"):
        validate(compose_cfg(f"eval.gpu_layers={good}"))
    with pytest.raises(ConfigError, match=r"eval.gpu_layers='fast' is not auto, all or a layer count"):
        validate(compose_cfg("eval.gpu_layers=fast"))
    with pytest.raises(ConfigError, match=r"eval.gpu_layers='-2'"):
        validate(compose_cfg("eval.gpu_layers=-2"))


def test_auto_follows_what_the_installed_build_can_offload(monkeypatch):
    monkeypatch.setattr(device, "offload_supported", lambda: False)
    assert device.resolve_gpu_layers("auto") == 0 and device.resolve_gpu_layers("0") == 0
    assert device.backend_name(0) == "cpu"
    monkeypatch.setattr(device, "offload_supported", lambda: True)
    assert device.resolve_gpu_layers("auto") == device.ALL_LAYERS == device.resolve_gpu_layers("all")
    assert device.resolve_gpu_layers("7") == 7
    assert device.backend_name(-1) == "gpu (all layers)" and device.backend_name(7) == "gpu (7 layers)"


def test_the_installed_build_decides_auto_and_a_cpu_build_refuses_the_gpu():
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():  # a CUDA build on a GPU machine: auto is every layer
        assert device.resolve_gpu_layers("auto") == device.ALL_LAYERS and device.resolve_gpu_layers("3") == 3
        return
    assert device.resolve_gpu_layers("auto") == 0
    for asked in ("all", "3"):  # never silently run on the CPU what was asked of the GPU
        with pytest.raises(ConfigError, match=rf"eval.gpu_layers={asked}: this llama-cpp-python build cannot offload"):
            device.resolve_gpu_layers(asked)


def test_the_evaluate_key_changes_with_the_backend_the_others_do_not(monkeypatch, tmp_path):
    from tunelab.cache import stage_inputs
    from tunelab.paths import RunPaths

    paths = RunPaths(tmp_path / "run", tmp_path / "cache")
    monkeypatch.setattr("tunelab.cache.StageRecord.verified_digest", lambda self: "d")
    cpu = stage_inputs("evaluate", paths, "data", None, "0")
    monkeypatch.setattr(device, "offload_supported", lambda: True)
    gpu = stage_inputs("evaluate", paths, "data", None, "auto")
    assert cpu["backend"] == "cpu" and gpu["backend"] == "gpu (all layers)"
    assert "backend" not in stage_inputs("prepare", paths, "data", None, "auto")
