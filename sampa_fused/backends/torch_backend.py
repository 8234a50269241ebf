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

    def sampa_post(self, b, seg, rule, hp, step, lam, inv_scale=None):
        g, gy_new = _unscaled(_seg(b.g, seg), inv_scale), _unscaled(_seg(b.gy_new, seg), inv_scale)
        self._base_step(b, seg, rule, hp, step, g.mul(1 - lam).add_(gy_new, alpha=lam))
        _seg(b.gy, seg).copy_(gy_new)

    def sam_perturb(self, b, seg, rho, g_norm, inv_scale=None):
        x, g = _seg(b.x, seg), _unscaled(_seg(b.g, seg), inv_scale)
        scale = rho / (g_norm + EPS)
        x.copy_(upcast(x) + scale * g)

    def sam_post(self, b, seg, rule, hp, step, inv_scale=None):
        self._base_step(b, seg, rule, hp, step, _unscaled(_seg(b.g, seg), inv_scale))

    @staticmethod
    def _base_step(b, seg, rule, hp, step, g):
        state = _state(b, seg, rule, hp)
        x_new, state_new = rule.update(_seg(b.x_save, seg), g, state, hp, step)
        _seg(b.x, seg).copy_(x_new)
        for n, v in state_new.items():
            _write(state[n], v)

    def check(self, slabs: Sequence, losses: Sequence[torch.Tensor], grads_attr: Sequence[str],
              sq_attr: str, inv_scale=None):
        device = slabs[0].x.device
        ok = torch.ones((), dtype=torch.bool, device=device)
        for loss in losses:
            ok &= torch.isfinite(loss.detach()).reshape(()).to(device, non_blocking=True)
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for b in slabs:
            for name in grads_attr:
                ok &= torch.isfinite(getattr(b, name)).all()
            if sq_attr is not None:
                sq += _unscaled(getattr(b, sq_attr), inv_scale).float().square().sum()
        ok &= torch.isfinite(sq)
        return ok, sq


def _unscaled(t: torch.Tensor, inv_scale) -> torch.Tensor:
    """The gradient in fp32 math (16-bit upcast), divided by the loss scale if any."""
    t = upcast(t)
    return t if inv_scale is None else t * inv_scale
