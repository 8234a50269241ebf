"""Slow, per-parameter reference implementations of the algorithm (README, 'Exactly what it
computes'), used as
ground truth. The peek and the base step are torch's own optimizer, so they
are exact for every base optimizer by construction."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-12


class RefSAMPa:
    """`params` may be param groups carrying their own 'rho' and 'lam'."""

    def __init__(self, model, loss_fn, base_cls, rho, lam, params=None, max_grad_norm=None, **kw):
        self.model, self.loss_fn, self.rho, self.lam = model, loss_fn, rho, lam
        self.max_grad_norm = max_grad_norm
        self.ymodel = copy.deepcopy(model)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self.base = base_cls(params, **kw)
        self.params = [p for g in self.base.param_groups for p in g["params"]]
        names = {id(p): n for n, p in model.named_parameters()}
        ynamed = dict(self.ymodel.named_parameters())
        self.yparams = [ynamed[names[id(p)]] for p in self.params]
        self.gy = [torch.zeros_like(p) for p in self.params]
        self.held = None

    def add_param_group(self, group):
        self.base.add_param_group(group)
        names = {id(p): n for n, p in self.model.named_parameters()}
        ynamed = dict(self.ymodel.named_parameters())
        for p in self.base.param_groups[-1]["params"]:
            self.params.append(p)
            self.yparams.append(ynamed[names[id(p)]])
            self.gy.append(torch.zeros_like(p))

    def _per_param(self, key):
        default = getattr(self, key)
        return [g.get(key, default) for g in self.base.param_groups for _ in g["params"]]

    def _peek(self):
        x = [p.detach().clone() for p in self.params]
        state = copy.deepcopy(self.base.state_dict())
        for p, g in zip(self.params, self.gy):
            p.grad = g.clone()
        self.base.step()
        y = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, v in zip(self.params, x):
                p.copy_(v)
        self.base.load_state_dict(state)   # the state is left untouched
        return x, y

    def step(self, batch):
        held = batch if self.held is None else self.held
        with torch.no_grad():   # the y-copy follows the model's modes and current buffers
            for m, ym in zip(self.model.modules(), self.ymodel.modules()):
                ym.training = m.training
            for b, yb in zip(self.model.buffers(), self.ymodel.buffers()):
                yb.copy_(b)
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in self.gy))
        x, y = self._peek()
        rho, lam = self._per_param("rho"), self._per_param("lam")
        with torch.no_grad():
            for p, g, r in zip(self.params, self.gy, rho):
                p.copy_(p.float() + r / (norm + EPS) * g.float())
            for q, v in zip(self.yparams, y):
                q.copy_(v)
        for p in self.params:
            p.grad = None
        loss = self.loss_fn(self.model, held)
        loss.backward()
        gxt = [p.grad.clone() for p in self.params]
        for q in self.yparams:
            q.grad = None
        self.loss_fn(self.ymodel, batch).backward()
        gy_new = [q.grad.clone() for q in self.yparams]
        with torch.no_grad():
            for p, v, a, b, lm in zip(self.params, x, gxt, gy_new, lam):
                p.copy_(v)
                p.grad = ((1 - lm) * a.float() + lm * b.float()).to(p.dtype)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.base.step()
        self.gy, self.held = gy_new, batch
        return loss.detach()


class RefSAM:
    def __init__(self, model, loss_fn, base_cls, rho, max_grad_norm=None, **kw):
        self.model, self.loss_fn, self.rho = model, loss_fn, rho
        self.max_grad_norm = max_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.base = base_cls(self.params, **kw)

    def step(self, batch):
        for p in self.params:
            p.grad = None
        self.loss_fn(self.model, batch).backward()
        g = [p.grad.clone() for p in self.params]
        norm = torch.sqrt(sum((t.float() ** 2).sum() for t in g))
        x = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, t in zip(self.params, g):
                p.copy_(p.float() + self.rho / (norm + EPS) * t.float())
        for p in self.params:
            p.grad = None
        loss = self.loss_fn(self.model, batch)
        loss.backward()
        with torch.no_grad():
            for p, v in zip(self.params, x):
                p.copy_(v)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.base.step()
        return loss.detach()


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
