"""llama.cpp's own process (tunelab.llama_process): where the installed build has a GPU backend, export's
GGUF half and evaluation run in a child that never loads torch (the two crash a process that holds
both on a CUDA box). Forced here with TUNELAB_LLAMA_PROCESS=child on the CPU build."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from tunelab import llama_process
from tunelab.export.llama_cpp import llama_cpp_log
from tunelab.config.errors import ConfigError
from tunelab.templates.parity import ParityError

TESTS = str(ROOT / "tests")


@pytest.fixture
def child(monkeypatch):
    monkeypatch.setenv(llama_process.MODE_ENV, "child")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))


def test_the_child_loads_llama_cpp_and_never_torch(child, compose_cfg):
    cfg = compose_cfg("experiment=smoke")
    seen = llama_process.call("llama_targets:probe", cfg)
    assert seen["pid"] != os.getpid()
    assert seen["llama_loaded"] and not seen["torch_loaded"]
    assert "halted" in seen["torch_import"]  # an `import torch` there fails, it never loads CUDA libraries
    assert seen["cfg_name"] == "smoke"  # the resolved config travels, typed by the schema


def test_inline_runs_here(monkeypatch):
    monkeypatch.setenv(llama_process.MODE_ENV, "inline")
    monkeypatch.syspath_prepend(TESTS)
    assert llama_process.call("llama_targets:probe", None)["pid"] == os.getpid()


def test_input_errors_come_back_as_themselves(child, tmp_path):
    with pytest.raises(ConfigError) as err:
        llama_process.call("llama_targets:raise_config_error", None)
    assert err.value.problems == ["eval.n_ctx=0 is not > 0", "eval.threads=-1 is not >= 0"]
    assert "eval.threads=-1" in str(err.value)
    with pytest.raises(ParityError) as err:
        llama_process.call("llama_targets:raise_parity_error", None, gguf=str(tmp_path / "model.f16.gguf"))
    assert "model.f16.gguf" in str(err.value) and err.value.problems[0].startswith("check 3")


def test_an_unexpected_error_names_the_child_and_its_traceback(child):
    with pytest.raises(llama_process.LlamaProcessFailed, match="ZeroDivisionError: a bug in the child") as err:
        llama_process.call("llama_targets:raise_unexpected", None)
    assert "llama_targets.py" in str(err.value)


def test_a_crash_is_named_by_its_signal(child):
    with pytest.raises(llama_process.LlamaProcessFailed, match="killed by SIGSEGV") as err:
        llama_process.call("llama_targets:crash", None)
    assert str(llama_cpp_log()) in str(err.value)  # where llama.cpp's own lines about it are


def _wait_for(condition, what: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_sigterm_is_passed_on_and_the_child_cleans_up(tmp_path):
    script = ("import sys\nfrom tunelab import llama_process, runstate\ntry:\n    with runstate.sigterm_raises():\n"
              f"        llama_process.call('llama_targets:wait_for_stop', None, folder={str(tmp_path)!r})\n"
              "except KeyboardInterrupt as stop:\n    sys.exit(runstate.exit_code(stop))\n")
    env = {**os.environ, llama_process.MODE_ENV: "child", "PYTHONPATH": TESTS}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for(lambda: (tmp_path / "started").is_file() or parent.poll() is not None, "the child to start")
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        parent.kill()
    assert (tmp_path / "cleaned").read_text() == "yes"  # its finally ran before the parent went on
    child_pid = int((tmp_path / "started").read_text())
    _wait_for(lambda: not _alive(child_pid), "the child to be gone")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.is_file() and stat.read_text().split(")")[-1].split()[0] != "Z"


def test_gpu_backends_are_found_by_file_name(monkeypatch, tmp_path):
    assert llama_process.gpu_backends() == []  # the CPU build installed here
    (tmp_path / "lib").mkdir()
    for name in ("libggml-base.so", "libggml-cpu.so", "libllama.so", "libggml-cuda.so"):
        (tmp_path / "lib" / name).write_bytes(b"")
    (tmp_path / "__init__.py").write_text("")
    monkeypatch.setattr(llama_process, "find_spec",
                        lambda name: type("Spec", (), {"origin": str(tmp_path / "__init__.py")})())
    assert llama_process.gpu_backends() == ["libggml-cuda.so"]
    monkeypatch.delenv(llama_process.MODE_ENV, raising=False)
    assert llama_process.in_child()  # auto: a GPU build runs llama.cpp's work in a child


def test_an_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv(llama_process.MODE_ENV, "sometimes")
    with pytest.raises(llama_process.LlamaProcessFailed, match="TUNELAB_LLAMA_PROCESS='sometimes'"):
        llama_process.in_child()


def test_hashes_cross_to_the_child_and_back_while_the_bytes_stay(child, tmp_path, monkeypatch):
    from tunelab import records

    monkeypatch.setattr(records, "_verified", {})
    known, made = tmp_path / "known.bin", tmp_path / "made.bin"
    known.write_bytes(b"hashed here")
    made.write_bytes(b"hashed there")
    records.sha256_file(known)
    seen = llama_process.call("llama_targets:hash_file", None, path=str(made), known=str(known))
    assert seen["knew"]  # the parent's hash went along: the child need not read the file again
    assert {row[0] for row in records.hashed()} == {str(known), str(made)}  # and the child's came back
    made.write_bytes(b"changed since")  # another size and mtime: the old hash no longer applies
    assert records.sha256_file(made) != seen["sha256"]


def test_a_call_inside_the_child_runs_there(child):
    seen = llama_process.call("llama_targets:nested", None)
    assert seen["inner"] == seen["outer"] != os.getpid()
