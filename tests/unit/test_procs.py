"""Children started through tunelab.procs end with tunelab, however it ends. Every wait here is on
a condition (a pid printed, a process gone) with a generous deadline, never a fixed sleep."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tunelab.procs import run_child

pytestmark = pytest.mark.timeout(120)
PARENT = """
import sys, time
from tunelab.procs import child_popen
child = child_popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


def gone(pid: int, deadline_s: float = 60) -> bool:
    """True once pid has ended (a zombie counts: it runs no more), polling every 10 ms."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.01)
    return False


def test_a_child_dies_when_its_parent_is_killed_with_sigkill():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, env=os.environ)
    try:
        child = int(parent.stdout.readline())
        assert psutil.pid_exists(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert gone(child), f"child {child} outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait()


def sleepers():
    return [p for p in psutil.Process().children(recursive=True) if "tunelab-test-sleeper" in " ".join(p.cmdline())]


def test_an_exception_while_waiting_kills_the_child_and_goes_on():
    with pytest.raises(subprocess.TimeoutExpired):
        run_child([sys.executable, "-c", "import time; time.sleep(600)", "tunelab-test-sleeper"], timeout=0.5)
    assert sleepers() == []


def test_a_finished_child_gives_its_code_and_output():
    code, out, err = run_child([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"])
    assert (code, out) == (3, "out\n")
