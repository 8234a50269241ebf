"""The reference backend: the update math in plain vectorized torch ops over
flat buffers, one call per param-group segment. Runs on any device."""
from __future__ import annotations

from typing import Sequence

import torch

from . import EPS
from ..rules import upcast


def _seg(t: torch.Tensor, seg) -> torch.Tensor:
    return t[seg.start:seg.end]


def _state(b, seg, rule, hp):
    return {n: _seg(b.state[n], seg) for n in rule.state_names(hp)}


def _write(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.data_ptr() != src.data_ptr():
        dst.copy_(src)


class TorchBackend:
    name = "torch"

    def sampa_pre(self, b, seg, rule, hp, step, rho, gy_norm):
        x, gy = _seg(b.x, seg), _seg(b.gy, seg)
        _seg(b.x_save, seg).copy_(x)
        y, _ = rule.update(x, gy, _state(b, seg, rule, hp), hp, step)
        _seg(b.y, seg).copy_(y)
        scale = rho / (gy_norm + EPS)
        x.copy_(upcast(x) + scale * upcast(gy))

    def sampa_post(self, b, seg, rule, hp, step, lam):
        g, gy_new = upcast(_seg(b.g, seg)), upcast(_seg(b.gy_new, seg))
        g = g.mul(1 - lam).add_(gy_new, alpha=lam)
        self._base_step(b, seg, rule, hp, step, g)
        _seg(b.gy, seg).copy_(_seg(b.gy_new, seg))

    def sam_perturb(self, b, seg, rho, g_norm):
        x, g = _seg(b.x, seg), _seg(b.g, seg)
        scale = rho / (g_norm + EPS)
        x.copy_(upcast(x) + scale * upcast(g))

    def sam_post(self, b, seg, rule, hp, step):
        self._base_step(b, seg, rule, hp, step, _seg(b.g, seg))

    @staticmethod
    def _base_step(b, seg, rule, hp, step, g):
        state = _state(b, seg, rule, hp)
        x_new, state_new = rule.update(_seg(b.x_save, seg), g, state, hp, step)
        _seg(b.x, seg).copy_(x_new)
        for n, v in state_new.items():
            _write(state[n], v)

    def check(self, slabs: Sequence, losses: Sequence[torch.Tensor], grads_attr: Sequence[str],
              sq_attr: str):
        device = slabs[0].x.device
        ok = torch.ones((), dtype=torch.bool, device=device)
        for loss in losses:
            ok &= torch.isfinite(loss.detach()).reshape(()).to(device, non_blocking=True)
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for b in slabs:
            for name in grads_attr:
                ok &= torch.isfinite(getattr(b, name)).all()
            if sq_attr is not None:
                sq += getattr(b, sq_attr).float().square().sum()
        ok &= torch.isfinite(sq)
        return ok, sq
