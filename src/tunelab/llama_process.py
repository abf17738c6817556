"""llama.cpp's work in a process of its own that never imports torch, where the two cannot share one.

Why: on a CUDA box, PyTorch's pip CUDA libraries (torch 2.11+cu130's nvidia/cu13 cudart and cublas)
and llama.cpp built with its CUDA backend against the toolkit's libraries crash a process that loads
both (`free(): invalid pointer`, or a segfault at load, in either order; measured on an H200,
docs/gpu.md), while each alone works. The pipeline merges LoRA with torch, so export's GGUF half
(converter, quantizer, parity gate) and the evaluate stage run through `call`: in this process for
llama-cpp-python's CPU build, which shares a process with torch safely, and in a child for a build
with a GPU backend. `TUNELAB_LLAMA_PROCESS=child|inline` forces one (auto: by the build).

The child is `python -m tunelab.llama_process <folder>`: it reads folder/request.json (the resolved
config, a target `module:function` and its JSON arguments), blocks torch (sys.modules["torch"] = None:
transformers then loads tokenizers without it, and any `import torch` fails loudly), runs the target
with SIGTERM as an interrupt, and writes folder/result.json: the target's JSON result, or the error.
The tunelab errors a stage raises for bad input come back as the same exception (exit 2 as in one
process); anything else as LlamaProcessFailed with the child's traceback. The child dies with tunelab
(tunelab.procs); Ctrl-C or SIGTERM here is passed on as SIGTERM, and the child's own cleanup (half
files) runs before the interrupt goes on here.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Dict, List

from tunelab import procs, records, runstate

MODE_ENV = "TUNELAB_LLAMA_PROCESS"
MODES = ("auto", "child", "inline")
GPU_BACKENDS = ("cuda", "hip", "vulkan", "metal", "sycl", "musa")  # libggml-<backend>.so beside libllama
STOP_S = 120.0  # after passing on an interrupt, how long the child may take to clean up and end
# The input errors stages raise (exit 2): rebuilt here from the child's report as the same type.
REBUILT = ("tunelab.config.errors:ConfigError", "tunelab.data.formats:DataError",
           "tunelab.export.llama_cpp:ExportError", "tunelab.records:IntegrityError",
           "tunelab.templates.chat:TemplateError", "tunelab.templates.chat:TemplateLimitError",
           "tunelab.templates.parity:ParityError", "builtins:FileNotFoundError")


class LlamaProcessFailed(RuntimeError):
    """The child running llama.cpp's work failed with an unexpected error or was killed."""


def gpu_backends() -> List[str]:
    """The GPU backend libraries of the installed llama-cpp-python (libggml-cuda.so, ...), found by
    name: loading the library to ask it is what must not happen beside torch."""
    spec = find_spec("llama_cpp")
    if spec is None or not spec.origin:
        return []
    lib = Path(spec.origin).parent / "lib"
    return sorted(p.name for p in lib.glob("libggml-*") if p.name.split("-", 1)[1].split(".")[0] in GPU_BACKENDS)


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto")
    if value not in MODES:
        raise LlamaProcessFailed(f"{MODE_ENV}={value!r} is not one of {', '.join(MODES)}")
    return value


def in_child() -> bool:
    """Whether llama.cpp's work runs in a child process (see the module's doc)."""
    chosen = mode()
    return chosen == "child" or (chosen == "auto" and bool(gpu_backends()))


def call(target: str, cfg, **kwargs) -> Any:
    """target(cfg, **kwargs) ("module:function"), in a torch-free child where in_child(), else here.
    kwargs and the result travel as JSON."""
    if not in_child():
        return _resolve(target)(cfg, **kwargs)
    from omegaconf import OmegaConf

    from tunelab.export.llama_cpp import llama_cpp_log

    with tempfile.TemporaryDirectory(prefix="tunelab-llama-") as folder:
        config = None if cfg is None else OmegaConf.to_yaml(cfg, resolve=True)
        request = {"target": target, "config": config, "kwargs": kwargs, "llama_log": str(llama_cpp_log()),
                   "hashed": records.hashed()}  # what this run has hashed is not read again there, nor back here
        (Path(folder) / "request.json").write_text(json.dumps(request))
        code = _run_child(Path(folder))
        return _outcome(Path(folder) / "result.json", code, target, request["llama_log"])


def _run_child(folder: Path) -> int:
    """The child's exit code; an interrupt here is passed on to it (SIGTERM) and waited for."""
    # inline there: the child holds no torch, so its own calls (the offload question) need no further child
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", MODE_ENV: "inline"}
    proc = procs.child_popen([sys.executable, "-m", "tunelab.llama_process", str(folder)], env=env,
                             stdin=subprocess.DEVNULL)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        raise
    finally:
        procs.kill_group(proc)  # a no-op once it has ended; reaps it


def _stop(proc: subprocess.Popen) -> None:
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass


def _outcome(result_file: Path, code: int, target: str, llama_log: str) -> Any:
    report = json.loads(result_file.read_text()) if result_file.is_file() else {}
    records.adopt_hashed(report.get("hashed", []))
    if code == 0 and "result" in report:
        return report["result"]
    if "error" in report:
        raise _rebuilt(report["error"])
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    raise LlamaProcessFailed(f"llama.cpp's process ({target}) {how} without a report; llama.cpp's log: {llama_log}")


def _rebuilt(error: Dict[str, Any]) -> BaseException:
    if error["type"] in REBUILT:
        module, name = error["type"].split(":")
        cls = getattr(importlib.import_module(module), name)
        err = cls.__new__(cls)
        Exception.__init__(err, error["message"])
        err.__dict__.update(error.get("attrs") or {})
        return err
    return LlamaProcessFailed(f"llama.cpp's process failed: {error['type']}: {error['message']}\n"
                              f"{error.get('traceback', '')}")


def _resolve(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _describe(err: BaseException) -> dict:
    attrs = {k: v for k, v in vars(err).items() if isinstance(v, (str, int, float, list, dict, type(None)))}
    return {"type": f"{type(err).__module__}:{type(err).__qualname__}", "message": str(err), "attrs": attrs,
            "traceback": "".join(traceback.format_exception(err))[-4000:]}


def _write(path: Path, report: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report))
    os.replace(partial, path)


def main(argv) -> int:
    folder = Path(argv[0])
    sys.modules["torch"] = None  # transformers sees no torch; an `import torch` raises here, never loads CUDA
    request = json.loads((folder / "request.json").read_text())
    from omegaconf import OmegaConf

    from tunelab.config.schema import Config
    from tunelab.export.llama_cpp import log_llama_cpp_to

    log_llama_cpp_to(Path(request["llama_log"]))
    records.adopt_hashed(request.get("hashed", []))
    try:
        with runstate.sigterm_raises():
            config = request["config"]
            cfg = None if config is None else OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(config))
            result = _resolve(request["target"])(cfg, **request["kwargs"])
    except KeyboardInterrupt as interrupt:
        return runstate.exit_code(interrupt)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it again
        _write(folder / "result.json", {"error": _describe(err)})
        return 1
    _write(folder / "result.json", {"result": result, "hashed": records.hashed()})
    return 0


@lru_cache(maxsize=None)
def offload_supported() -> bool:
    """Whether the installed llama-cpp-python can offload to a GPU here, asked where llama.cpp runs."""
    return bool(call("tunelab.llama_process:_offload_here", None))


def _offload_here(cfg) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
