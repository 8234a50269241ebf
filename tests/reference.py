"""Test fixtures, and the ground truth every engine and backend is compared
against: the package's own per-parameter reference (sampa_fused/reference.py),
re-exported here as RefSAMPa and RefSAM."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from sampa_fused.reference import SAM as RefSAM  # noqa: F401  (the tests' ground truth)
from sampa_fused.reference import SAMPa as RefSAMPa  # noqa: F401


# ---------------------------------------------------------------- fixtures
class SmallNet(nn.Module):
    """Odd sizes (not multiples of any block size), batch norm, a 1-element parameter."""

    def __init__(self, d_in=7, d_hidden=13, d_out=5, bn=True):
        super().__init__()
        # no bias before batch norm: its true gradient is 0, and Adam would
        # amplify the rounding noise of a zero gradient into full steps
        self.fc1 = nn.Linear(d_in, d_hidden, bias=not bn)
        self.bn = nn.BatchNorm1d(d_hidden) if bn else nn.Identity()
        self.fc2 = nn.Linear(d_hidden, d_out)
        self.temperature = nn.Parameter(torch.ones(1) * 1.3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x)))) / self.temperature


def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_batches(n, batch=9, d_in=7, classes=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=gen), torch.randint(0, classes, (batch,), generator=gen))
            for _ in range(n)]


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _same(a, b):
    """Equal, NaN matching NaN (a poisoned held batch stays poisoned)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def assert_same(snap_a, snap_b, skipped=0):
    """Model and optimizer exactly as they were, but for `skipped` more skipped steps."""
    (ma, oa), (mb, ob) = snap_a, snap_b
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    for p in oa["state"]:
        for k, v in oa["state"][p].items():
            assert torch.equal(v, ob["state"][p][k]), (p, k)
    ea, eb = oa["sampa_fused"], ob["sampa_fused"]
    assert (ea["t"], ea["counts"]) == (eb["t"], eb["counts"])
    assert eb["skipped_steps"] == ea["skipped_steps"] + skipped
    if "gy_sq" in ea:
        assert torch.equal(ea["gy_sq"], eb["gy_sq"])
    if "gy" in ea:
        assert all(torch.equal(a, b) for a, b in zip(ea["gy"], eb["gy"]))
        assert _same_tree(ea["held_batch"], eb["held_batch"])


def _same_tree(a, b) -> bool:
    """Equal checkpointed batches (tensors compared with _same)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _same(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_tree(u, v) for u, v in zip(a, b))
    return a == b
