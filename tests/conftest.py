import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


import signal

import pytest


@pytest.fixture
def no_hang():
    """A read that blocks (a FIFO) fails the test instead of hanging the suite."""
    def alarm(*_):
        raise TimeoutError("blocked on a read")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="session")
def golden_pair(tmp_path_factory):
    """(base, fine-tune) the golden artifacts were made from, generated (tests/golden_inputs.py)."""
    from golden_inputs import write_golden_inputs

    return write_golden_inputs(str(tmp_path_factory.mktemp("golden-inputs")))
