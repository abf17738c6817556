"""What is served is what was trained and evaluated, in llama.cpp's own llama-server as in
llama-cpp-python: one BOS through every runtime path (Llama 3's tokenizer), the same greedy answers
as evaluation, and `tunelab serve` with both engines (llama-server is built by `make test`'s setup)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tunelab.data.formats import read_prepared
from tunelab.export.hf_folder import gguf_metadata
from tunelab.export.modelfile import message_pieces
from tunelab.serving.build import built_server
from tunelab.serving.command import evaluation_settings, gate_server
from tunelab.serving.server import free_port
from tunelab.templates.parity import GGUFVocab, sample_conversations
from tunelab.templates.runtimes import (builtin_ids, llama_cpp_python_ids, llama_server_ids, modelfile_ids,
                                        trained_ids)
from conftest import ROOT
from e2e.test_template_contract import config, gate_untrained

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server_binary():
    binary = built_server()
    assert binary is not None, "llama-server is not built: `make test` builds it (python -m tunelab.serving.build)"
    return binary


def test_llama3_gets_exactly_one_bos_through_every_runtime(tmp_path, server_binary):
    cfg = config(tmp_path / "run", "model=tiny_llama3", "template=llama3")
    report, gguf, template, tokenizer, conversations = gate_untrained(cfg, tmp_path, keep=True)
    assert tokenizer("a")["input_ids"][0] == 128000  # the base tokenizer adds BOS, as Llama 3's does
    metadata = gguf_metadata(gguf)
    assert metadata["add_bos_token"] is True
    # llama.cpp applies these where a command line sets none: evaluation's greedy decoding
    assert (metadata["sampling_temp"], metadata["sampling_penalty_repeat"]) == (0.0, 1.0)
    runtimes = report["runtimes"]
    assert "llama3" in runtimes["builtin_equivalent"] and runtimes["modelfile_template"]
    samples = sample_conversations(conversations)
    vocab = GGUFVocab(gguf)
    (tmp_path / "t.jinja").write_text(template.source)
    try:
        with gate_server(tmp_path / "t.jinja", evaluation_settings(cfg.eval), tmp_path)(gguf) as server:
            paths = {"llama-cpp-python": llama_cpp_python_ids(vocab), "llama-server": llama_server_ids(server),
                     "built-in llama3": builtin_ids(vocab, "llama3"),
                     "Modelfile": modelfile_ids(vocab, message_pieces(template))}
            for messages in samples:
                expected = trained_ids(template, tokenizer)(messages[:-1], True)
                assert expected[0] == 128000 and expected[1] != 128000
                for name, ids in paths.items():
                    assert ids(messages[:-1], True) == expected, name
        vocab.add_bos = False  # the GGUF tunelab used to write: the built-in then feeds no BOS at all
        assert builtin_ids(vocab, "llama3")(samples[0][:-1], True)[0] != 128000
    finally:
        vocab.close()


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    """The tweets experiment (SmolLM2-135M, one training step), exported to f16 and q8_0, evaluated."""
    run = tmp_path_factory.mktemp("served") / "run"
    overrides = ["experiment=tweets", f"paths.run_dir={run}", "quantization.types=[f16,q8_0]",
                 "quantization.ship=q8_0", "tracking=off"]
    done = subprocess.run([sys.executable, "-m", "tunelab", *overrides, "training.max_steps=1", "training.batch_size=2",
                           "eval.evaluate_base=false", "dataset.max_eval_rows=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, overrides


@pytest.fixture(scope="module")
def tiny_llama3_run(tmp_path_factory):
    """The smoke experiment on the tiny Llama with Llama 3's tokenizer and template (its BOS added by
    llama-server, written by the template for llama-cpp-python): random weights answer at length."""
    run = tmp_path_factory.mktemp("tiny3") / "run"
    overrides = ["experiment=smoke", "model=tiny_llama3", "template=llama3", f"paths.run_dir={run}", "tracking=off"]
    done = subprocess.run([sys.executable, "-m", "tunelab", *overrides, "eval.max_new_tokens=32",
                           "eval.evaluate_base=false"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, overrides


def test_llama_server_answers_a_tiny_llama3_as_evaluation_did(tiny_llama3_run, server_binary):
    run, overrides = tiny_llama3_run
    manifest = json.loads((run / "export/manifest.json").read_text())
    assert manifest["gate"]["f16"]["runtimes"]["llama_server_checked"]
    evaluated = [json.loads(line) for line in (run / "evaluate/generations.jsonl").read_text().splitlines()]
    conversations = read_prepared(run / "prepare/eval.jsonl")
    for quant in manifest["finetuned"]:
        port = free_port()
        server = _serve(overrides, "--quant", quant, "--port", str(port))
        try:
            _wait_ready(server, port)
            rows = [r for r in evaluated if r["quant"] == quant]
            assert len(rows) == len(conversations) == 4 and any(r["completion_tokens"] > 8 for r in rows)
            for row, messages in zip(rows, conversations):
                reply = _chat(port, messages[:-1], 32)
                assert reply["message"]["content"] == row["answer"], (quant, row["prompt"])
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)


def _ctrl_c_reaches_it():
    """A shell's `cmd &` sets SIGINT to ignored, and children inherit that: the Ctrl-C these tests send
    must reach serve however the suite itself was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _serve(overrides, *args):
    return subprocess.Popen([sys.executable, "-m", "tunelab", "serve", *args, *overrides], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_ctrl_c_reaches_it)


def _wait_ready(proc, port, timeout=300):
    """Until `tunelab serve` says its server is ready (a condition, not a delay). A thread reads what
    it says into proc.lines (all of it, until it ends: proc.reader)."""
    import threading

    proc.lines, ready = [], threading.Event()

    def read():
        for line in proc.stdout:
            proc.lines.append(line)
            if " ready" in line and f":{port}" in line:
                ready.set()
        ready.set()  # it ended: the assertion below says why

    proc.reader = threading.Thread(target=read, daemon=True)
    proc.reader.start()
    assert ready.wait(timeout) and proc.poll() is None, "".join(proc.lines)


def _said(proc) -> str:
    proc.reader.join(timeout=60)
    return "".join(proc.lines)


def _chat(port, messages, max_tokens):
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        return json.loads(reply.read())["choices"][0]


@pytest.mark.parametrize("engine", ["llama-server", "llama-cpp-python"])
def test_the_served_answers_equal_evaluation(served_run, engine, server_binary):
    run, overrides = served_run
    evaluated = [json.loads(line) for line in (run / "evaluate/generations.jsonl").read_text().splitlines()]
    conversations = read_prepared(run / "prepare/eval.jsonl")
    for quant in ("f16", "q8_0"):
        port = free_port()
        server = _serve(overrides, "--engine", engine, "--quant", quant, "--port", str(port))
        try:
            _wait_ready(server, port) if engine == "llama-server" else _wait_models(server, port)
            rows = [r for r in evaluated if r["quant"] == quant]
            assert len(rows) == len(conversations) == 3
            for row, messages in zip(rows, conversations):
                reply = _chat(port, messages[:-1], 64)
                assert reply["message"]["content"] == row["answer"], (engine, quant, row["prompt"])
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)


def _wait_models(proc, port, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the server never became ready")


def test_serve_prints_the_command_it_runs_and_a_killed_serve_leaves_no_server(served_run, server_binary):
    run, overrides = served_run
    dry = subprocess.run([sys.executable, "-m", "tunelab", "serve", "--dry-run", "--port", "18099", *overrides],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    line = dry.stdout.strip().splitlines()[-1]
    assert line.startswith(str(server_binary)) and "model.q8_0.gguf" in line
    for flags in ("--host 127.0.0.1", "-fa off", "--jinja --chat-template-file", "--temp 0.0", "--repeat-penalty 1.0"):
        assert flags in line, flags
    assert "requests without one get it" in dry.stderr  # tweets always trained with a system prompt
    port = free_port()
    serve = _serve(overrides, "--port", str(port))
    _wait_ready(serve, port)
    children = subprocess.run(["pgrep", "-P", str(serve.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 1
    os.kill(serve.pid, signal.SIGKILL)  # however tunelab ends, its llama-server ends with it
    serve.wait()
    deadline = time.monotonic() + 60
    while os.path.exists(f"/proc/{children[0]}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{children[0]}")


def test_serve_refuses_a_port_in_use_and_an_unknown_engine(served_run):
    import socket

    run, overrides = served_run
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "tunelab", "serve", "--port", str(port), *overrides],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in done.stderr
    done = subprocess.run([sys.executable, "-m", "tunelab", "serve", "--engine", "ollama", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "invalid choice: 'ollama'" in done.stderr and "llama-server" in done.stderr


def test_serve_says_what_a_missing_compiler_stops_and_starts_nothing(served_run, tmp_path):
    run, overrides = served_run
    env = {**os.environ, "PATH": str(tmp_path / "no-tools"), "TUNELAB_BUILD_CACHE": str(tmp_path / "empty-cache")}
    done = subprocess.run([sys.executable, "-m", "tunelab", "serve", "--port", str(free_port()), *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2
    assert "building llama-server needs cmake and a C++ compiler and make, not found on PATH" in done.stderr
    assert "--engine llama-cpp-python" in done.stderr
    assert not list((tmp_path / "empty-cache").rglob("llama-server*"))


def _copy_server(cache, binary):
    """A build cache holding the built llama-server (bytes and record), as `make test` left it."""
    import shutil

    from tunelab.serving.build import server_home

    home = cache / "llama-server" / server_home().name
    (home / "bin").mkdir(parents=True)
    shutil.copy2(binary, home / "bin" / "llama-server")
    shutil.copy2(binary.parent.parent / "build.json", home / "build.json")
    return home


def _page_of(proc, port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as reply:
        return reply.status, reply.read().decode()


def test_serve_serves_the_web_page_once_built_and_says_plainly_when_not(served_run, server_binary, tmp_path,
                                                                       monkeypatch):
    from tunelab.serving import webui

    run, overrides = served_run
    cache = tmp_path / "cache"
    monkeypatch.setenv("TUNELAB_BUILD_CACHE", str(cache))  # here as in the serve it starts
    home = _copy_server(cache, server_binary)
    env = {**os.environ, "TUNELAB_BUILD_CACHE": str(cache)}
    for page in (None, "<html><body>tunelab test page</body></html>"):
        if page is not None:  # a published page: what `python -m tunelab.serving.webui` leaves
            ui = home / "src" / "tools" / "ui"
            ui.mkdir(parents=True)
            (ui / "package-lock.json").write_text("{}")
            www = webui.webui_home(webui.llama_cpp_version(), ui) / "www"
            www.mkdir(parents=True)
            (www / "index.html").write_text(page)
            (www.parent / webui.RECORD).write_text(json.dumps({"files": webui.file_hashes(www)}))
        port = free_port()
        serve = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", "--port", str(port), *overrides],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                 preexec_fn=_ctrl_c_reaches_it)
        try:
            _wait_ready(serve, port)
            if page is None:
                with pytest.raises(urllib.error.HTTPError, match="404"):
                    _page_of(serve, port)
            else:
                assert _page_of(serve, port) == (200, page)
        finally:
            serve.send_signal(signal.SIGINT)
            serve.wait(timeout=60)
        said = _said(serve)
        assert ("no web page (not built: `python -m tunelab.serving.webui`)" in said) == (page is None), said
        assert (f"web page http://127.0.0.1:{port}/" in said) == (page is not None), said
