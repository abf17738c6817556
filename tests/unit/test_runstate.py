import os
import signal
import socket
import subprocess
import sys

import pytest

from tunelab import runstate


def test_sigterm_raises_terminated_which_counts_as_an_interrupt():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(runstate.Terminated) as caught:
        with runstate.sigterm_raises():
            os.kill(os.getpid(), signal.SIGTERM)
    assert isinstance(caught.value, KeyboardInterrupt)
    assert runstate.exit_code(caught.value) == 143 and runstate.exit_code(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_live_process_is_not_gone_a_finished_or_reused_one_is():
    me = runstate.this_process()
    assert not runstate.process_gone(me["host"], me["pid"], me["started"])
    assert runstate.process_gone(me["host"], me["pid"], str(float(me["started"]) - 100))  # pid reused
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert runstate.process_gone(socket.gethostname(), str(child.pid), me["started"])
    assert not runstate.process_gone("another-host", str(child.pid), me["started"])  # cannot tell: leave it
