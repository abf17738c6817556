"""How a process ends, and whether the process that started a run is still alive.

SIGTERM becomes an exception (`Terminated`, a KeyboardInterrupt) so that `finally` blocks run and
the MLflow run ends KILLED, as it does on Ctrl-C. A run whose process died without that chance
(SIGKILL, power loss) is recognised later by its recorded pid and process start time.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
from contextlib import contextmanager
from typing import Optional


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal number."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


@contextmanager
def sigterm_raises():
    """Within this block SIGTERM raises Terminated (only the main thread can own signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Terminated(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _create_time(pid: int) -> Optional[float]:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def this_process() -> dict:
    """What identifies this process later, even after its pid is reused."""
    return {"host": socket.gethostname(), "pid": str(os.getpid()), "started": f"{_create_time(os.getpid()):.2f}"}


def process_gone(host: str, pid: str, started: str) -> bool:
    """True only when we can tell: same host, and no process with that pid and start time."""
    if host != socket.gethostname() or not pid.isdigit():
        return False
    created = _create_time(int(pid))
    return created is None or abs(created - float(started or 0)) > 1.0
