"""Where llama.cpp runs a GGUF: `eval.gpu_layers` -> the layer count given to llama.cpp.

`auto` offloads every layer when this llama-cpp-python build can offload (a CUDA build on a machine
with a GPU) and none otherwise, so the same experiment runs on the CPU box and the GPU box. The
resolved backend is part of the evaluate stage's cache key: CUDA kernels round differently from the
CPU's, so answers measured on one are never reused as the other's.
"""
from __future__ import annotations

from typing import List

from tunelab.config.errors import ConfigError

ALL_LAYERS = -1  # llama.cpp's n_gpu_layers for "every layer"
NAMED = ("auto", "all")


def gpu_layers_problems(value) -> List[str]:
    text = str(value)
    if text in NAMED or (text.isdigit() and int(text) >= 0):
        return []
    return [f"eval.gpu_layers={value!r} is not auto, all or a layer count >= 0 "
            "(auto: every layer on the GPU where this llama-cpp-python build can offload, else 0)"]


def offload_supported() -> bool:
    """True for a llama-cpp-python built with a GPU backend that found a device (asked in llama.cpp's
    own process where it needs one: tunelab.llama_process)."""
    from tunelab import llama_process

    return llama_process.offload_supported()


def resolve_gpu_layers(value) -> int:
    """eval.gpu_layers -> n_gpu_layers: auto is all where offload works, 0 where it does not;
    `all` or a count on a build that cannot offload is refused (it would silently run on the CPU)."""
    text = str(value)
    if text == "auto":
        return ALL_LAYERS if offload_supported() else 0
    layers = ALL_LAYERS if text == "all" else int(text)
    if layers != 0 and not offload_supported():
        raise ConfigError([f"eval.gpu_layers={value}: this llama-cpp-python build cannot offload to a GPU "
                           "(a CPU build, or no GPU found); use eval.gpu_layers=auto or 0, or install the CUDA "
                           "build (docs/gpu.md)"])
    return layers


def backend_name(layers: int) -> str:
    """What the evaluate stage's cache key and report record: cpu, or gpu with the layer count."""
    return "cpu" if layers == 0 else f"gpu ({'all layers' if layers == ALL_LAYERS else f'{layers} layers'})"
