"""The pytest plugin of a GPU-check rehearsal (`-p rehearsal_plugin`, loaded
only by scripts/gpu-check.sh --rehearse). With CUDA stood in for
(sitecustomize.py here), a test that reaches for the real GPU fails on this
machine but would run on the GPU one: its failure becomes a skip that says
so, and what still fails is what the GPU machine would see fail too (its
software, optional packages, the harness)."""
import pytest
from real_cuda import needs_real_gpu

REASON = "rehearsal: needs the real GPU"


def _as_skip(rep, where, line):
    rep.outcome = "skipped"
    rep.longrepr = (str(where[0]), where[1] or 0, f"{REASON} ({line})")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        line = needs_real_gpu(rep.longreprtext)
        if line:
            _as_skip(rep, (item.path, item.location[1]), line)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        line = needs_real_gpu(rep.longreprtext)
        if line:
            _as_skip(rep, (getattr(collector, "path", "?"), 0), line)


def pytest_report_header(config):
    return "rehearsal: CUDA stood in for (one device, no real GPU); Triton kernels interpreted"
