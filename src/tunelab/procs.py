"""Child processes that end when tunelab ends, however it ends.

`child_popen` starts a command in its own process group with the Linux parent-death signal set
to SIGKILL (prctl PR_SET_PDEATHSIG): when tunelab dies, even by kill -9, the kernel kills the
child. `run_child` runs one to its end and, on any exception (KeyboardInterrupt and SIGTERM
included, which tunelab turns into KeyboardInterrupt), kills its whole process group before the
exception goes on. Used for llama.cpp's converter; meant for any server tunelab starts as well.

The parent-death signal fires when the *thread* that started the child ends: start children
from a thread that lives as long as they should (the main thread, for a stage).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from typing import List, Optional, Tuple

PR_SET_PDEATHSIG = 1
# Loaded here, not in the child: between fork and exec only async-signal-safe work is safe.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with(parent_pid: int):
    def preexec() -> None:
        if _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


def child_popen(cmd: List[str], **kwargs) -> subprocess.Popen:
    """subprocess.Popen(cmd, **kwargs) that dies with this process, in a process group of its own
    (so that kill_group reaches what it starts too, and Ctrl-C reaches it only through tunelab)."""
    return subprocess.Popen(cmd, preexec_fn=_die_with(os.getpid()), start_new_session=True, **kwargs)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group and reap the child; nothing if it has already ended."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its group id is its pid (start_new_session)
        except ProcessLookupError:
            pass
    proc.wait()


def run_child(cmd: List[str], timeout: Optional[float] = None, **kwargs) -> Tuple[int, str, str]:
    """(exit code, stdout, stderr) of cmd run to its end as text; killed with its group on any
    exception in the meantime (then the exception goes on)."""
    proc = child_popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        kill_group(proc)
        raise
    return proc.returncode, out, err
