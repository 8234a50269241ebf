"""ShardedSAMPa / ShardedSAM: the two passes over FSDP2-sharded halves, on
gloo over loopback. Each layout is launched once (module fixtures: 2k
processes of tests/sharded_ranks.py, 1 thread each); the tests check what
the ranks saved. The serial engine, run inside each rank, is the reference."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from sampa_fused.launch import free_port

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
except ImportError:                                   # torch without FSDP2
    pytestmark = pytest.mark.skip(reason="torch.distributed.fsdp.fully_shard is not available")

HERE = Path(__file__).resolve().parent
REPO = str(HERE.parent)
REL = 1e-6



def launch(world: int, scenarios: str, timeout: float = 120.0) -> list:
    """Run the scenarios on `world` ranks; each rank's saved results."""
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1")
        port = str(free_port())
        procs = [subprocess.Popen([sys.executable, str(HERE / "sharded_ranks.py"), str(r), str(world), port,
                                   out, scenarios], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for r in range(world)]
        logs = []
        try:
            for p in procs:
                logs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        results = []
        for r in range(world):
            path = os.path.join(out, f"rank{r}.pt")
            assert os.path.exists(path), f"rank {r} saved nothing:\n{logs[r][-3000:]}"
            res = torch.load(path, weights_only=False)
            assert "crash" not in res, f"rank {r}:\n{res['crash']}"
            results.append(res)
        return results


@pytest.fixture(scope="module")
def four():
    return launch(4, "trajectory,adamw,errors,buffers,checkpoint")


@pytest.fixture(scope="module")
def eight():
    return launch(8, "layout8")


def rel_error(ref, got) -> float:
    worst = 0.0
    for a, b in zip(ref, got):
        for u, v in zip(a, b):
            assert u.shape == v.shape
            worst = max(worst, ((u - v).abs().max() / u.abs().max()).item())
    return worst


@pytest.mark.parametrize("method", ["sampa", "sam", "adamw"])
def test_trajectory_matches_serial_2x2(four, method):
    for r, res in enumerate(four):
        ref, got = res[method]
        assert len(ref) == len(got) > 0
        err = rel_error(ref, got)
        # fp32 reduce order differs (FSDP2's reduce-scatter, the norm's
        # all-reduce), so bits may differ: within 1e-6 relative
        assert err <= REL, f"rank {r}: {method} off the serial trajectory by {err:.3g}"
        # the trajectory moved (a test that cannot pass by standing still)
        assert not torch.equal(ref[0][0], ref[-1][0])


def test_pairs_hold_identical_shards(four):
    k = len(four) // 2
    for r in range(k):
        for key in ("sampa_local", "sam_local"):
            a, b = four[r][key], four[r + k][key]
            assert all(torch.equal(u, v) for u, v in zip(a, b)), f"{key}: ranks {r} and {r + k} differ"


def test_bad_input_raises_on_every_rank(four):
    errs = [res["errors"] for res in four]
    for e in errs:
        assert e["odd_batch"].startswith("ValueError") and "multiple of 2" in e["odd_batch"]
        assert e["nan"].startswith("FloatingPointError")
        assert e["layout"].startswith("ValueError") and "fully_shard" in e["layout"]
    # the y-pass half raised its own error; the x̃-pass half names the ranks
    assert all("boom in the y-pass" in e["raise"] for e in errs[2:])
    assert all(e["raise"].startswith("RuntimeError") and "ranks 2, 3" in e["raise"] for e in errs[:2])
    assert len({e["odd_batch"] for e in errs}) == 1 and len({e["nan"] for e in errs}) == 1
    for e in errs:
        assert e["sam_odd"].startswith("ValueError") and "multiple of 4" in e["sam_odd"]
        assert e["sam_nan"].startswith("FloatingPointError")
    for res in four:
        assert res["sam_steps"] == (0, True, 1)        # the refused steps did not count
        ref, got = res["user_sharded"]
        assert rel_error([ref], [got]) <= REL
        assert res["unchanged"], "a refused step moved parameters, x, gy, the state or the held batch"
        assert res["after_ok"]


@pytest.mark.parametrize("method", ["sampa", "sam"])
def test_layout_2x4(eight, method):
    for r, res in enumerate(eight):
        ref, got = res[method]
        assert rel_error(ref, got) <= REL, f"rank {r}"
    for r in range(4):
        assert all(torch.equal(u, v) for u, v in zip(eight[r]["sampa_local"], eight[r + 4]["sampa_local"]))


def test_buffers_follow_the_x_pass(four):
    """SAMPa: the y-pass's running statistics are private; half 1 ends each
    step with half 0's (pair r, r + k identical). SAM: one buffer update per
    step (the perturbed pass's is discarded)."""
    k = len(four) // 2
    for r in range(k):
        a, b = four[r]["buffers"]["ShardedSAMPa"], four[r + k]["buffers"]["ShardedSAMPa"]
        assert all(torch.equal(u, v) for u, v in zip(a, b)), f"ranks {r} and {r + k}: buffers differ"
        mean, var, tracked = a
        assert not torch.equal(mean, torch.zeros_like(mean))
        assert int(tracked) == 3                     # three accepted steps, one x̃-pass each
    for res in four:
        assert int(res["buffers"]["ShardedSAM"][2]) == 3


def test_checkpoint_resume_is_bit_identical(four):
    for r, res in enumerate(four):
        whole, resumed = res["checkpoint"]
        assert len(whole) == len(resumed) == 3
        for a, b in zip(whole, resumed):
            assert all(torch.equal(u, v) for u, v in zip(a, b)), f"rank {r}: the resumed run differs"
        full, params = res["full_x"]
        assert all(torch.equal(u, v) for u, v in zip(full, params))
