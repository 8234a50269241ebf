import faulthandler
import os
import signal
import sys

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter where no GPU is
# present. Must be set before any module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)  # reproducible float sums across runs and machines


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "slow: longer tests (still run in CI)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A per-test watchdog that needs no plugin, for scripts/gpu-check.sh (whose
# machine has no pytest-timeout); inactive unless it sets the variable.
# After WATCHDOG_S a SIGALRM fails the running test (a hang in Python code,
# or a wait that signals interrupt); if the hang is in C and the test never
# returns, faulthandler prints every thread's stack and ends pytest
# WATCHDOG_KILL_S later, and the check resumes the stage after that test.
WATCHDOG_S = float(os.environ.get("SAMPA_TEST_WATCHDOG_S") or 0)
WATCHDOG_KILL_S = float(os.environ.get("SAMPA_TEST_WATCHDOG_KILL_S") or 10)


class WatchdogTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise WatchdogTimeout(f"watchdog: this test ran past {WATCHDOG_S:g} s (SAMPA_TEST_WATCHDOG_S)")


_dump = []      # where the stacks go: pytest captures fd 2 while a test runs


def _dump_file():
    if not _dump:
        path = os.environ.get("SAMPA_TEST_WATCHDOG_DUMP")
        _dump.append(open(path, "a") if path else sys.__stderr__)
    return _dump[0]


if WATCHDOG_S > 0 and hasattr(signal, "setitimer"):
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        out = _dump_file()
        out.write(f"watchdog: {item.nodeid}\n")      # the last one named is the one that hung
        out.flush()
        faulthandler.dump_traceback_later(WATCHDOG_S + WATCHDOG_KILL_S, exit=True, file=out)
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, WATCHDOG_S)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            faulthandler.cancel_dump_traceback_later()
