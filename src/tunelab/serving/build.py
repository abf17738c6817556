"""llama.cpp's own `llama-server`, built once from the llama.cpp that llama-cpp-python compiles.

The source is the llama-cpp-python source archive on PyPI (vendor/llama.cpp: the same commit, so
the same kernels and the same logits as evaluation). It is built with the flags below and cached
outside any checkout, by that version and those flags, in $TUNELAB_BUILD_CACHE (default
~/.cache/tunelab): the first build takes ~30 min on 2 cores, later uses none. A build that stops
half-way resumes (the build folder is kept); only a finished build writes build.json, which
records the binary's sha256, checked before every use.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, List, Optional

from tunelab.procs import child_popen, kill_group

# Static (one binary to cache and verify), portable like the llama-cpp-python build (GGML_NATIVE
# OFF, as the Makefile sets it there), no network (no libcurl, no prebuilt web page download).
SERVER_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF",
                "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF")
PROGRESS = re.compile(r"^\[\s*(\d+)%\]")


class BuildError(RuntimeError):
    pass


def build_cache() -> Path:
    root = os.environ.get("TUNELAB_BUILD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tunelab"
    return Path(root).expanduser().resolve()


def llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def server_home(version: Optional[str] = None) -> Path:
    """Where the build of this llama-cpp-python version with SERVER_FLAGS lives."""
    flags = hashlib.sha256("\n".join(SERVER_FLAGS).encode()).hexdigest()[:8]
    return build_cache() / "llama-server" / f"{version or llama_cpp_version()}-{flags}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def built_server(home: Optional[Path] = None) -> Optional[Path]:
    """The cached llama-server if a finished build is there; BuildError if its bytes changed."""
    home = home or server_home()
    record = home / "build.json"
    if not record.is_file():
        return None
    info = json.loads(record.read_text())
    binary = home / "bin" / "llama-server"
    if not binary.is_file() or file_sha256(binary) != info["sha256"]:
        raise BuildError(f"{binary} is not the llama-server that was built there (sha256 differs from {record}): "
                         f"delete {home} to build it again")
    return binary


def missing_tools() -> List[str]:
    wanted = {"cmake": ["cmake"], "a C++ compiler": ["c++", "g++", "clang++"], "make": ["make", "ninja"]}
    return [name for name, tools in wanted.items() if not any(shutil.which(t) for t in tools)]


def llama_cpp_source(home: Path, version: str) -> Path:
    """vendor/llama.cpp of the llama-cpp-python source archive, extracted once into home/src."""
    from tunelab.export.llama_cpp import download_sdist

    src = home / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    archive = download_sdist(version, build_cache() / "sdist")
    staging = home / ".src-partial"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            _, _, inner = member.name.partition("/vendor/llama.cpp/")
            if inner and (member.isfile() or member.isdir()):
                member.name = inner
                tar.extract(member, staging, filter="data")
    if not (staging / "CMakeLists.txt").is_file():
        raise BuildError(f"{archive} holds no vendor/llama.cpp/CMakeLists.txt")
    os.replace(staging, src)
    (home / "sdist.sha256").write_text(file_sha256(archive) + "\n")
    return src


def _run_logged(cmd: List[str], log: Path, on_percent: Callable[[int], None]) -> None:
    with open(log, "a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = child_popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in proc.stdout:
                out.write(line)
                match = PROGRESS.match(line)
                if match:
                    on_percent(int(match.group(1)))
            proc.wait()
        except BaseException:
            kill_group(proc)
            raise
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise BuildError(f"building llama-server failed ({' '.join(cmd[:3])} ... exit {proc.returncode}); "
                         f"the whole log is {log}:\n{tail}")


def ensure_server(say: Callable[[str], None] = print) -> Path:
    """The cached llama-server, built first if it is not there (with a progress bar)."""
    from tqdm import tqdm

    version = llama_cpp_version()
    home = server_home(version)
    found = built_server(home)
    if found:
        return found
    missing = missing_tools()
    if missing:
        raise BuildError(f"building llama-server needs {' and '.join(missing)}, not found on PATH: install them "
                         "(e.g. apt install cmake g++ make) or serve with --engine llama-cpp-python")
    home.mkdir(parents=True, exist_ok=True)
    with file_lock(home / ".lock"):  # one build at a time; a second caller waits, then finds it built
        found = built_server(home)
        if found:
            return found
        say(f"tunelab: building llama.cpp's llama-server {version} from its source, once (~30 min on 2 cores); "
            f"cached in {home}, log in {home / 'build.log'}")
        started = time.monotonic()
        src, build = llama_cpp_source(home, version), home / "build"
        bar = tqdm(total=100, desc="llama-server build", unit="%")

        def advance(percent: int) -> None:
            bar.update(max(0, percent - bar.n))

        try:
            _run_logged(["cmake", "-S", str(src), "-B", str(build), *SERVER_FLAGS], home / "build.log", advance)
            _run_logged(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                        home / "build.log", advance)
        finally:
            bar.close()
        return _publish(home, build, version, time.monotonic() - started)


def _publish(home: Path, build: Path, version: str, seconds: float) -> Path:
    binary = home / "bin" / "llama-server"
    binary.parent.mkdir(exist_ok=True)
    tmp = binary.with_suffix(".partial")
    shutil.copyfile(build / "bin" / "llama-server", tmp)
    tmp.chmod(0o755)
    os.replace(tmp, binary)
    record = {"llama_cpp_python": version, "flags": list(SERVER_FLAGS), "sha256": file_sha256(binary),
              "sdist_sha256": (home / "sdist.sha256").read_text().strip(), "build_seconds": round(seconds)}
    (home / "build.json.partial").write_text(json.dumps(record, indent=2))
    os.replace(home / "build.json.partial", home / "build.json")
    return binary


@contextmanager
def file_lock(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the kernel however this process ends
        yield


def main() -> int:
    try:
        print(ensure_server())
    except BuildError as err:
        print(f"tunelab: {err}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
