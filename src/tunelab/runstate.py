"""How a process ends, and whether the process that started a run is still alive.

SIGTERM becomes an exception (`Terminated`, a KeyboardInterrupt) so that `finally` blocks run and
the MLflow run ends KILLED, as it does on Ctrl-C. After the first SIGINT/SIGTERM the process is
shielded from more of them for SHIELD_S seconds, so that a second signal (a second Ctrl-C, or
Ctrl-C reaching a sweep's workers both from the terminal and from the sweep process) cannot cut
the cleanup short; later ones end the process at once. A sweep process whose jobs run in worker
processes passes those workers the signal and waits for them (`sweep.stop_jobs`). A run whose
process died without that chance (SIGKILL, power loss) is recognised later by its recorded pid and
process start time.

Training defers the first interrupt instead (`deferred_interrupts`): the signal is only recorded,
the trainer saves a checkpoint at the end of its current step and stops, and the stage then raises
the same interrupt (`raise_pending`), so a preempted job (SLURM's `scancel --signal=TERM@120`)
loses no more than the step it was in. A second signal during the deferral raises at once.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, List, Optional

SHIELD_S = 60.0  # after the first interrupt, further SIGINT/SIGTERM are ignored this long
STOP_CHILDREN_S = 120.0  # how long a sweep process waits for its workers to end their runs
_first_interrupt: List[float] = []
shielded: List[int] = []  # the signals the shield has ignored, in order (tests wait on this)


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal number."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


def _shield(signum, frame) -> None:
    """A signal after the first: ignored while the first one's cleanup runs, fatal after SHIELD_S."""
    if time.monotonic() - _first_interrupt[0] > SHIELD_S:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    shielded.append(signum)


def _interrupt(signum: int) -> KeyboardInterrupt:
    """Shield the process from further SIGINT/SIGTERM and return the exception signum stands for."""
    _first_interrupt.append(time.monotonic())
    for handled in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(handled) is not signal.SIG_IGN:
            signal.signal(handled, _shield)
    return Terminated(f"received signal {signum}") if signum == signal.SIGTERM else KeyboardInterrupt()


@contextmanager
def sigterm_raises(on_interrupt: Optional[Callable[[int], None]] = None):
    """Within this block SIGTERM raises Terminated and SIGINT KeyboardInterrupt, once: the process is
    then shielded (see the module's doc). on_interrupt(signum) runs first (e.g. sweep.stop_jobs).
    Only the main thread can own signal handlers; a SIGINT ignored by the parent shell stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        interrupt = _interrupt(signum)
        if on_interrupt is not None:
            on_interrupt(signum)
        raise interrupt

    with _handling(_raise):
        yield


@contextmanager
def _handling(handler):
    """SIGTERM and SIGINT go to handler within the block (not where the parent shell set SIG_IGN, nor
    over the shield). The previous handlers come back unless the block ended by an interrupt: then
    the shield stays, the process is on its way out."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    for signum, old in previous.items():
        if old is not signal.SIG_IGN and old is not _shield:
            signal.signal(signum, handler)
    interrupted = False
    try:
        yield
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if not interrupted:
            for signum, old in previous.items():
                if signal.getsignal(signum) is handler:
                    signal.signal(signum, old)


class Pending:
    """The interrupt a `deferred_interrupts` block has recorded: None, SIGTERM or SIGINT."""

    def __init__(self):
        self.signum: Optional[int] = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextmanager
def deferred_interrupts():
    """Within this block the first SIGTERM/SIGINT is only recorded in the yielded Pending (poll it,
    e.g. at the end of each training step); a second one raises at once, as sigterm_raises does.
    The caller raises the recorded one with raise_pending when it has saved what it needs. Outside
    the main thread, or for a signal the parent shell set to SIG_IGN, nothing changes."""
    pending = Pending()
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return

    def _record(signum, frame):
        if pending:
            raise _interrupt(signum)
        pending.signum = signum

    with _handling(_record):
        yield pending


def raise_pending(pending: Pending) -> None:
    """Raise the interrupt a deferred_interrupts block recorded (shielding the cleanup), if any."""
    if pending:
        raise _interrupt(pending.signum)


def stop_children(signum: int) -> None:
    """Send SIGTERM to this process's children (a parallel sweep's workers, submitit's local jobs) and
    wait, at most STOP_CHILDREN_S, for those that do not ignore it to end their runs and exit."""
    import psutil

    children = [child for child in psutil.Process().children() if not _ignores_sigterm(child.pid)]
    for child in children:
        try:
            child.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=STOP_CHILDREN_S)


def park(limit_s: float = 600.0) -> None:
    """Wait, doing nothing, until this process is killed, its parent ends or limit_s has passed."""
    parent, deadline = os.getppid(), time.monotonic() + limit_s
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.5)


def _ignores_sigterm(pid: int) -> bool:
    """True for a process with SIGTERM set to SIG_IGN (e.g. joblib's resource tracker), per /proc."""
    try:
        with open(f"/proc/{pid}/status") as status:
            ignored = next(line for line in status if line.startswith("SigIgn:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(ignored, 16) >> (signal.SIGTERM - 1) & 1)


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
