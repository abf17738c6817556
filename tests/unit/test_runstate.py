import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tunelab import runstate


@pytest.fixture
def handlers():
    """The test process's SIGINT/SIGTERM handlers, put back afterwards (an interrupt leaves a shield)."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    # Python's own defaults, even where the suite was started with SIGINT ignored (a shell's `cmd &`),
    # which runstate rightly leaves alone.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    for signum, handler in before.items():
        signal.signal(signum, handler)


DEADLINE_S = 30.0  # generous: a loaded machine delays delivery, it does not lose the signal


def deliver(signum, until=lambda: False):
    """Send signum to this process and wait, up to DEADLINE_S, for what it causes: an exception its
    handler raises here (the loop is where Python runs handlers), or until() turning true. os.kill
    to oneself is delivered asynchronously, so returning right after it would race the handler."""
    os.kill(os.getpid(), signum)
    deadline = time.monotonic() + DEADLINE_S
    while not until():
        assert time.monotonic() < deadline, f"signal {signum} was not handled within {DEADLINE_S} s"
        time.sleep(0.01)


def test_sigterm_raises_terminated_which_counts_as_an_interrupt(handlers):
    with runstate.sigterm_raises():
        pass
    assert signal.getsignal(signal.SIGTERM) is handlers[signal.SIGTERM]  # no signal: handlers restored
    seen = []
    with pytest.raises(runstate.Terminated) as caught:
        with runstate.sigterm_raises(on_interrupt=seen.append):
            deliver(signal.SIGTERM)
    assert isinstance(caught.value, KeyboardInterrupt) and seen == [signal.SIGTERM]
    assert runstate.exit_code(caught.value) == 143 and runstate.exit_code(KeyboardInterrupt()) == 130


def test_after_the_first_interrupt_more_signals_do_not_cut_the_cleanup_short(handlers):
    with pytest.raises(KeyboardInterrupt) as caught:
        with runstate.sigterm_raises():
            deliver(signal.SIGINT)
    assert not isinstance(caught.value, runstate.Terminated)
    assert signal.getsignal(signal.SIGTERM) is runstate._shield
    before = len(runstate.shielded)
    deliver(signal.SIGTERM, until=lambda: len(runstate.shielded) > before)  # ignored: the process lives on
    deliver(signal.SIGINT, until=lambda: len(runstate.shielded) > before + 1)
    assert runstate.shielded[before:] == [signal.SIGTERM, signal.SIGINT]


def test_a_deferred_interrupt_is_recorded_then_raised_when_the_caller_is_ready(handlers):
    with runstate.deferred_interrupts() as pending:
        deliver(signal.SIGTERM, until=lambda: bool(pending))  # recorded, not raised: the step goes on
        assert pending.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is handlers[signal.SIGTERM]  # the block's handler is gone
    with pytest.raises(runstate.Terminated):
        runstate.raise_pending(pending)
    assert signal.getsignal(signal.SIGTERM) is runstate._shield  # the cleanup after it is shielded
    runstate.raise_pending(runstate.Pending())  # nothing recorded: nothing raised


def test_a_second_signal_during_a_deferral_raises_at_once(handlers):
    with pytest.raises(KeyboardInterrupt) as caught:
        with runstate.deferred_interrupts() as pending:
            deliver(signal.SIGTERM, until=lambda: bool(pending))
            deliver(signal.SIGINT)  # raises inside this loop
    assert not isinstance(caught.value, runstate.Terminated) and pending.signum == signal.SIGTERM


def test_inside_a_deferral_sigterm_raises_resumes_after_it(handlers):
    """train's deferral nests inside the tracker's sigterm_raises: outside it, SIGTERM raises again."""
    with pytest.raises(runstate.Terminated):
        with runstate.sigterm_raises():
            with runstate.deferred_interrupts() as pending:
                pass
            assert not pending
            deliver(signal.SIGTERM)


CHILD = """
import signal, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    def bye(signum, frame):
        time.sleep(0.5)  # ends its run
        open(sys.argv[2], "w").write("ended")
        sys.exit(143)
    signal.signal(signal.SIGTERM, bye)
print("ready", flush=True)
time.sleep(60)
"""


def test_stop_children_signals_the_workers_and_waits_for_them(tmp_path):
    children = [subprocess.Popen([sys.executable, "-c", CHILD, mode, str(tmp_path / mode)], stdout=subprocess.PIPE,
                                 text=True) for mode in ("worker", "ignore")]
    try:
        assert [child.stdout.readline() for child in children] == ["ready\n"] * 2
        runstate.stop_children(signal.SIGINT)
        assert (tmp_path / "worker").read_text() == "ended" and children[0].poll() is not None  # waited for it
        assert children[1].poll() is None  # ignores SIGTERM (like joblib's resource tracker): not waited for
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_a_live_process_is_not_gone_a_finished_or_reused_one_is():
    me = runstate.this_process()
    assert not runstate.process_gone(me["host"], me["pid"], me["started"])
    assert runstate.process_gone(me["host"], me["pid"], str(float(me["started"]) - 100))  # pid reused
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert runstate.process_gone(socket.gethostname(), str(child.pid), me["started"])
    assert not runstate.process_gone("another-host", str(child.pid), me["started"])  # cannot tell: leave it
