"""llama.cpp's own converter and quantizer, co-versioned with the installed llama-cpp-python.

The converter (convert_hf_to_gguf.py with its conversion/ and gguf-py/ packages) ships inside the
llama-cpp-python source archive on PyPI, at vendor/llama.cpp/. It is fetched once into the cache
(or read from $TUNELAB_LLAMA_CPP_SDIST, for offline machines) and run in a subprocess.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Optional, Tuple

from tunelab.procs import run_child

CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-llama-bpe.gguf",
                     "LICENSE")
QUANT_FTYPES = {
    "f32": "LLAMA_FTYPE_ALL_F32", "f16": "LLAMA_FTYPE_MOSTLY_F16", "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
CONVERTER_OUTTYPES = ("f32", "f16", "bf16")
# Sampling defaults written into every GGUF (llama.cpp applies general.sampling.* where a command line
# sets nothing): evaluation's greedy decoding without penalty, what was tested. Without this the
# converter copies the base model's generation_config.json (Llama 3 Instruct: temperature 0.6, top_p 0.9).
EVALUATION_SAMPLING = {"general.sampling.temp": 0.0, "general.sampling.penalty_repeat": 1.0}


class ExportError(RuntimeError):
    pass


def llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def download_sdist(version: str, into: Path) -> Path:
    """The llama-cpp-python source archive of `version` ($TUNELAB_LLAMA_CPP_SDIST, or fetched by pip
    from the package index, which checks its hash, into `into`)."""
    local = os.environ.get("TUNELAB_LLAMA_CPP_SDIST")
    if local:
        return Path(local)
    into.mkdir(parents=True, exist_ok=True)
    kept = into / f"llama_cpp_python-{version}.tar.gz"
    if kept.is_file():
        return kept
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={version}", "-d", str(into)]
    code, _, stderr = run_child(cmd)  # pip dies with tunelab too
    archives = list(into.glob("llama_cpp_python-*.tar.gz"))
    if code != 0 or not archives:
        raise ExportError(f"could not fetch llama.cpp's source (the llama-cpp-python=={version} source archive):\n"
                          f"{stderr[-2000:]}\nOffline? Set TUNELAB_LLAMA_CPP_SDIST to a local copy of it.")
    return archives[0]


def ensure_converter(cache_root: Path) -> Path:
    """The path of convert_hf_to_gguf.py for the installed llama-cpp-python version."""
    version = llama_cpp_version()
    root = cache_root / version
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    cache_root.mkdir(parents=True, exist_ok=True)
    local = os.environ.get("TUNELAB_LLAMA_CPP_SDIST")
    origin = (f"from $TUNELAB_LLAMA_CPP_SDIST={local}" if local else
              f"from the llama-cpp-python=={version} source archive on the package index (once; offline: "
              "set TUNELAB_LLAMA_CPP_SDIST to a local copy)")
    print(f"tunelab: fetching llama.cpp's converter {origin} into {root}", file=sys.stderr, flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=cache_root) as tmp:
        archive = download_sdist(version, Path(tmp))
        staging = Path(tmp) / "llama.cpp"
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                _, _, inner = member.name.partition("/vendor/llama.cpp/")
                if inner and inner.startswith(CONVERTER_MEMBERS) and (member.isfile() or member.isdir()):
                    member.name = inner
                    tar.extract(member, staging, filter="data")
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise ExportError(f"{archive} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
    print(f"tunelab: llama.cpp's converter is in {root} ({time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)
    return script


def convert(hf_dir: Path, out_path: Path, outtype: str, cache_root: Path) -> Path:
    """HF folder -> GGUF with llama.cpp's converter, in a subprocess that dies with tunelab
    (tunelab.procs); atomic on success: only model.<type>.partial is ever half-written."""
    script = ensure_converter(cache_root)
    tmp = out_path.with_suffix(".partial")
    override = out_path.with_suffix(".metadata.partial")  # a .partial name: a kill -9 leaves nothing that looks done
    override.write_text(json.dumps(EVALUATION_SAMPLING))
    cmd = [sys.executable, str(script), str(hf_dir), "--outfile", str(tmp), "--outtype", outtype,
           "--metadata", str(override)]
    env = {**os.environ, "PYTHONPATH": str(script.parent)}
    env.pop("NO_LOCAL_GGUF", None)  # use the gguf-py that ships with this converter
    try:
        code, _, stderr = run_child(cmd, env=env, cwd=script.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)  # the converter is dead (run_child killed it): its half file goes
        raise
    finally:
        override.unlink(missing_ok=True)
    if code != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ExportError(f"llama.cpp's converter failed on {hf_dir} (exit {code}):\n{stderr[-3000:]}")
    os.replace(tmp, out_path)
    return out_path


@contextmanager
def native_output_to(log_path: Path, fds: Tuple[int, ...] = (1, 2)):
    """Send what C code prints (llama.cpp's per-tensor log) to a file instead of the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    with open(log_path, "ab") as log:
        for fd in fds:
            os.dup2(log.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            for fd, kept in zip(fds, saved):
                os.dup2(kept, fd)
                os.close(kept)


# Where llama.cpp's log lines go while a model loads (quiet_llama): the run's log once a stage names
# it (log_llama_cpp_to), else one file per process in the temp folder.
_llama_log: Optional[Path] = None


def log_llama_cpp_to(path: Path) -> None:
    global _llama_log
    _llama_log = Path(path)


def llama_cpp_log() -> Path:
    return _llama_log or Path(tempfile.gettempdir()) / f"tunelab-llama.cpp.{os.getpid()}.log"


@contextmanager
def quiet_llama(what: str):
    """llama.cpp's stderr lines while `what` runs (a model load's "n_ctx_seq (512) > n_ctx_train (0)"
    and the like) go to llama_cpp_log(); when it fails, those lines are shown with the error."""
    log = llama_cpp_log()
    log.parent.mkdir(parents=True, exist_ok=True)
    start = log.stat().st_size if log.exists() else 0
    try:  # both: llama-cpp-python's log callback prints to sys.stderr, C code writes to fd 2
        with native_output_to(log, fds=(2,)), open(log, "a", encoding="utf-8") as text, redirect_stderr(text):
            yield
    except BaseException:
        with open(log, "rb") as handle:
            handle.seek(start)
            lines = handle.read().decode("utf-8", "replace").strip()
        if lines:
            print(f"tunelab: llama.cpp's log while {what} ({log}):\n{lines[-3000:]}", file=sys.stderr, flush=True)
        raise


def quantize(src: Path, out_path: Path, quant: str, threads: int = 0) -> Path:
    """GGUF -> GGUF of another type with llama.cpp's quantizer (through llama-cpp-python).

    llama.cpp's log of the quantization (which tensors fell back to other types) goes to
    <out>.log beside the file."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[quant])
    params.nthread = threads
    tmp = out_path.with_suffix(".partial")
    log = out_path.with_suffix(".log")
    try:
        with native_output_to(log):
            status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    except BaseException:  # Ctrl-C/SIGTERM arrive when the C call returns: its half file goes
        tmp.unlink(missing_ok=True)
        raise
    if status != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ExportError(f"llama.cpp's quantizer failed ({status}) making {quant} from {src}; see {log}")
    os.replace(tmp, out_path)
    return out_path
