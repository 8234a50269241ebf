"""Any other torch.optim.Optimizer: the peek and the step are its own
`step()` on the real parameters, so they are exact by construction (and
slower: per-parameter work inside the base optimizer, a copy of its state
for the peek, and one more host read to decide whether to step).

The perturbation and the mix use the same device table as the fused path.
"""
from __future__ import annotations

import contextlib
import copy
from typing import FrozenSet, List, Optional, Sequence, Tuple

import torch

from .common import clip_coef, mix, perturbation, torch_check, unscaled, upcast


class NoRule:
    """The rule of a base optimizer without a fused one: no flat state buffers."""
    NAME = "generic"

    @staticmethod
    def state_names(hp) -> List[str]:
        return []

    @staticmethod
    def uses_state(hp) -> bool:
        return False


class GenericUpdate:
    fused = False
    rule = NoRule

    def __init__(self, base: torch.optim.Optimizer, flat, adaptive: bool, max_grad_norm: Optional[float]):
        self.base, self.flat = base, flat
        self.adaptive, self.max_grad_norm = adaptive, max_grad_norm
        self._n_groups = 0

    def refresh(self, hyper: Sequence[Tuple[dict, float, float]], replicas) -> tuple:
        self._n_groups = len(hyper)
        rows = [[rho, lam, 1.0 - lam] for (_, rho, lam) in (hyper[g] for g, _ in self.flat.rows)]
        for rep in replicas:
            for table in rep.tables.values():
                table.upload(rows)
        return ("generic", self.flat.structure())

    def uses_state(self) -> List[bool]:
        return [False] * self._n_groups

    def state_names(self, group: int) -> List[str]:
        return []

    # ------------------------------------------------------------ helpers
    def _rows(self, rep, inactive=None):
        for b, runs in zip(rep.slabs, self.flat.runs(inactive)):
            table = rep.table(b.dtype)
            for run in runs:
                yield b, run, slice(run.start, run.end), table.row(run.row)

    def _snapshot(self):
        state = {p: {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                     for k, v in st.items()} for p, st in self.base.state.items()}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.base.param_groups]
        return state, groups

    def _restore(self, saved) -> None:
        state, groups = saved
        self.base.state.clear()
        self.base.state.update(state)
        for g, s in zip(self.base.param_groups, groups):
            g.update(s)

    @contextlib.contextmanager
    def _without_grads(self, inactive: Optional[FrozenSet[int]]):
        """Parameters without a gradient this step hold grad None in the base
        step, so torch leaves them (and their state) alone."""
        params = self.flat.layout.params
        dropped = [(params[i], params[i].grad) for i in sorted(inactive or ())]
        for p, _ in dropped:
            p.grad = None
        try:
            yield
        finally:
            for p, g in dropped:
                p.grad = g

    def _norm(self, rep, name: str, sq: torch.Tensor, inv=None) -> torch.Tensor:
        if not self.adaptive:
            return sq.sqrt()
        total = torch.zeros((), dtype=torch.float32, device=rep.device)
        for b in rep.slabs:
            total += (upcast(rep.x_of(b)).float() * unscaled(getattr(b, name), inv).float()).square().sum()
        return total.sqrt()

    # ------------------------------------------------------------ SAMPa
    def save_x(self, replicas) -> None:
        for rep in replicas:
            if rep.in_place:
                for b in rep.slabs:
                    b.x_save.copy_(b.x)

    def sampa_pre(self, replicas, points: Sequence[str] = ("xt", "y")) -> None:
        (rep,) = replicas
        want = [p for p in points if p in rep.points]
        if rep.shared and len(want) > 1:
            raise RuntimeError("sampa_pre: xt and y share one pass buffer on this replica; "
                               "form them one at a time (xt, the x̃-pass, then y)")
        norm = self._norm(rep, "gy", rep.gy_sq) if "xt" in want else None
        if "y" in want:                       # first: in place, xt then overwrites x
            self._peek(rep)
        if "xt" in want:
            for b, run, sl, h in self._rows(rep):
                xf, gy = upcast(rep.x_of(b)[sl]), upcast(b.gy[sl])
                b.xt[sl].copy_(perturbation(xf, gy * xf * xf if self.adaptive else gy, h, norm))

    def _peek(self, rep) -> None:
        """y <- the base optimizer's step from (x, s) with gradient gy, its
        state left untouched: its own step() on the parameters, fed gy
        through the y buffer (g may hold this step's x̃ gradient), then x back."""
        params = self.flat.layout.params
        grads = [p.grad for p in params]
        for b in rep.slabs:
            if not rep.in_place:
                b.x_save.copy_(b.x)
            b.y.copy_(b.gy)
            b.slab.bind_grad(params, b.y)
        saved = self._snapshot()
        try:
            self.base.step()                  # x <- y (the peek) ...
        finally:
            self._restore(saved)              # ... with the state left untouched
            for p, g in zip(params, grads):
                p.grad = g
            for b in rep.slabs:
                b.y.copy_(b.x)
                b.x.copy_(b.x_save)

    def flags(self, rep, loss_ok, checks):
        return torch.stack([loss_ok.reshape(()), checks[0][0].reshape(())])

    def finite(self, rep, *losses):
        ok = torch.ones((), dtype=torch.bool, device=rep.device)
        for loss in losses:
            ok = ok & torch.isfinite(loss.detach().to(rep.device)).reshape(())
        return ok

    def check(self, replicas, losses, grads, sq, invs):
        return [torch_check(rep.slabs, losses, grads, sq, inv, rep.device) for rep, inv in zip(replicas, invs)]

    def _mixed_into_g(self, rep, inv, mixing: bool, inactive) -> None:
        """g <- the gradient the base step uses (unscaled, mixed, clipped)."""
        for b, run, sl, h in self._rows(rep, inactive):
            g = unscaled(b.g[sl], inv)
            if mixing:
                g = mix(g, unscaled(b.gy_new[sl], inv), h)
            b.g[sl].copy_(g)
        if self.max_grad_norm is not None:
            total = torch.zeros((), dtype=torch.float32, device=rep.device)
            for b, run, sl, h in self._rows(rep, inactive):
                if run.active:
                    total += b.g[sl].float().square().sum()
            coef = clip_coef(total.sqrt(), self.max_grad_norm)
            for b in rep.slabs:
                b.g.mul_(coef.to(b.g.dtype))

    def _post(self, replicas, checks, invs, inactive, mixing: bool) -> None:
        (rep,), ((ok, sq),), (inv,) = replicas, checks, invs
        self.restore_x(replicas)
        # The base optimizer steps on the host's say-so: a host read here.
        if not bool(ok):
            return
        self._mixed_into_g(rep, inv, mixing, inactive)
        with self._without_grads(inactive):
            self.base.step()
        if mixing:
            for b in rep.slabs:
                b.gy.copy_(unscaled(b.gy_new, inv))
            rep.gy_sq.copy_(sq)

    def sampa_post(self, replicas, checks, invs, inactive=None) -> None:
        self._post(replicas, checks, invs, inactive, mixing=True)

    def restore_x(self, replicas) -> None:
        """x <- x_save where the x̃-pass wrote xt into x; elsewhere the peek
        put x back itself."""
        for rep in replicas:
            if rep.in_place:
                for b in rep.slabs:
                    b.x.copy_(b.x_save)

    # ------------------------------------------------------------ SAM
    def sam_perturb(self, replicas, checks, invs) -> None:
        (rep,), ((_, sq),), (inv,) = replicas, checks, invs
        norm = self._norm(rep, "g", sq, inv)
        for b, run, sl, h in self._rows(rep):
            xf, g = upcast(rep.x_of(b)[sl]), unscaled(b.g[sl], inv)
            b.xt[sl].copy_(perturbation(xf, g * xf * xf if self.adaptive else g, h, norm))

    def sam_post(self, replicas, checks, invs, inactive=None) -> None:
        self._post(replicas, checks, invs, inactive, mixing=False)

