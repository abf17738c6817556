import os
import signal
import socket
import subprocess
import sys

import pytest

from tunelab import runstate


@pytest.fixture
def handlers():
    """The test process's SIGINT/SIGTERM handlers, put back afterwards (an interrupt leaves a shield)."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield before
    for signum, handler in before.items():
        signal.signal(signum, handler)


def test_sigterm_raises_terminated_which_counts_as_an_interrupt(handlers):
    with runstate.sigterm_raises():
        pass
    assert signal.getsignal(signal.SIGTERM) is handlers[signal.SIGTERM]  # no signal: handlers restored
    seen = []
    with pytest.raises(runstate.Terminated) as caught:
        with runstate.sigterm_raises(on_interrupt=seen.append):
            os.kill(os.getpid(), signal.SIGTERM)
    assert isinstance(caught.value, KeyboardInterrupt) and seen == [signal.SIGTERM]
    assert runstate.exit_code(caught.value) == 143 and runstate.exit_code(KeyboardInterrupt()) == 130


def test_after_the_first_interrupt_more_signals_do_not_cut_the_cleanup_short(handlers):
    with pytest.raises(KeyboardInterrupt) as caught:
        with runstate.sigterm_raises():
            os.kill(os.getpid(), signal.SIGINT)
    assert not isinstance(caught.value, runstate.Terminated)
    os.kill(os.getpid(), signal.SIGTERM)  # shielded: ignored, the test process lives on
    os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is runstate._shield


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
