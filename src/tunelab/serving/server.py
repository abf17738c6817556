"""A llama-server child process on 127.0.0.1 and the parts of its HTTP API tunelab uses.

Started with tunelab.procs (it dies with tunelab, however tunelab ends), ready when /health says
so (polled: a condition, not a sleep), stopped with its whole process group. Its log goes to a
file, shown when it fails to start.
"""
from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional

from tunelab.procs import child_popen, kill_group

HOST = "127.0.0.1"


class ServerError(RuntimeError):
    pass


def check_port_free(port: int) -> None:
    """Fail before anything starts if another process listens on HOST:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # as servers bind: a port whose last connections are in TIME_WAIT is free, a listening one is not
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
            probe.listen()
        except OSError as err:
            raise ServerError(f"port {port} on {HOST} is in use ({err.strerror}): stop what listens there "
                              "or choose another with --port") from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class LlamaServer:
    """`binary args...` as a child; `with LlamaServer(...) as server:` waits until it is ready."""

    def __init__(self, binary: Path, args: List[str], port: int, log_path: Path, ready_timeout: float = 900):
        self.command = [str(binary), *args]
        self.port, self.log_path, self.ready_timeout = port, log_path, ready_timeout
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> "LlamaServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        check_port_free(self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = child_popen(self.command, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"llama-server exited ({self.proc.returncode}) before it was ready: "
                                  f"{' '.join(self.command)}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                pass  # not listening yet, or loading the model (503)
            time.sleep(0.1)
        raise ServerError(f"llama-server was not ready after {self.ready_timeout:.0f} s; log: {self.log_path}")

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        return "".join(text.splitlines(keepends=True)[-lines:])

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)

    def post(self, path: str, body: dict, timeout: float = 600) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as err:
            raise ServerError(f"llama-server {path}: HTTP {err.code}: {err.read()[:500]!r}") from None

    def get(self, path: str) -> tuple:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def apply_template(self, messages, add_generation_prompt: bool = True) -> str:
        """The prompt text llama-server builds for a chat request (its BOS dropped when it adds one)."""
        return self.post("/apply-template", {"messages": messages,
                                             "add_generation_prompt": add_generation_prompt})["prompt"]

    def tokenize(self, text: str) -> List[int]:
        """The ids a chat request feeds for that text: special tokens parsed, BOS added as the GGUF says."""
        return self.post("/tokenize", {"content": text, "add_special": True, "parse_special": True})["tokens"]

    def chat(self, messages, max_tokens: int, stop: Optional[List[str]] = None) -> dict:
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "seed": 0}
        if stop:
            body["stop"] = stop
        return self.post("/v1/chat/completions", body)["choices"][0]

