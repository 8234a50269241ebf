"""The library's trajectories stay those recorded before its redesign
(tests/trajectories.py), within 1e-6 relative."""
import pytest
import torch
from trajectories import CONFIGS, DATA, run

from sampa_fused import SAM

RECORDED = torch.load(DATA)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trajectory_is_kept(name):
    got, want = run(name), RECORDED[name]
    torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-6, atol=0)
    assert got["state"].keys() == want["state"].keys()
    for k, v in want["state"].items():
        if CONFIGS[name][0] is SAM and k.startswith("bn."):
            # Recorded when SAM's perturbed pass also updated the running
            # statistics; now only the pass at x does (README, tested in
            # test_user_patterns): the parameters are unaffected.
            continue
        if v.is_floating_point():
            torch.testing.assert_close(got["state"][k], v, rtol=1e-6, atol=1e-7, msg=k)
        else:
            assert torch.equal(got["state"][k], v), k
