"""The elementwise work of a step, over every replica, slab and run.

One module per base optimizer holds its math (`sgd.py`, `adamw.py`: host
scalars, the torch reference, the Triton kernels); `generic.py` runs any
other torch optimizer through its own `step()`; `common.py` holds what they
share. This layer does the looping, so the optimizer reads as the README's algorithm:

    sampa_pre    the pass buffers: xt = x + rho gy/(||gy|| + eps) and/or y = peek(x, s, gy)
    check        losses and gradients finite, and ||gy_new||^2 (||g||^2 for SAM)
    sampa_post   where the step is accepted: x, s <- base_step(x, s, (1-lam) g + lam gy_new),
                 gy <- gy_new; else nothing moves
    sam_perturb / sam_post   the same for SAM's two sequential passes

x is only read until the accepted step writes it. A replica whose engine
runs the x̃-pass on the model itself (`in_place`, see state.BufferPlan)
keeps x in x_save for the step: `save_x` before, the update works on
x_save, and x gets it back after the post-gradient update.

Each stage is a registered op (`ops.py`); a replica holds its family of
ops (`rep.ops`: the torch implementation or the Triton kernels, chosen once
by its backend), so nothing here branches on the backend. Every
hyperparameter is read from the device table (`table.py`), every norm and
flag from device memory: nothing here synchronises with a device. A CPU
replica decides accept-or-refuse on the host (reading a CPU flag costs
nothing): a refused step then runs no post-gradient op at all.
"""
from __future__ import annotations

from typing import FrozenSet, List, Optional, Sequence, Tuple

import torch

from .. import _cuda
from . import adamw, sgd
from .common import EPS, clip_coef, default_config, mix, require_triton, triton, unscaled, upcast
from .ops import config_list
from .table import LAM, OML, RHO

RULES = {torch.optim.SGD: sgd, torch.optim.AdamW: adamw}


def rule_for(base: torch.optim.Optimizer):
    """The module that reproduces `base` exactly, or None (generic path).
    Subclasses may override step(), so only the exact classes qualify."""
    if base.defaults.get("differentiable", False):
        return None
    return RULES.get(type(base))


def backend_for(name: str, device: torch.device, dtypes) -> str:
    """'torch' or 'triton' for a replica on `device` (a physical device)."""
    wide = torch.float64 in set(dtypes)
    if name == "auto":
        return "triton" if device.type == "cuda" and not wide and triton is not None else "torch"
    if name == "triton":
        if wide:
            raise ValueError("backend='triton' computes in fp32 and would round float64 parameters; "
                             "use backend='torch' (backend='auto' does) for float64 models")
        require_triton(device)
        return "triton"
    if name == "torch":
        return "torch"
    raise ValueError(f"unknown backend {name!r}: choose 'torch', 'triton' or 'auto'")


class Update:
    """The fused path (SGD, AdamW): one launch per run and stage."""

    fused = True

    def __init__(self, rule, flat, adaptive: bool = False, max_grad_norm: Optional[float] = None):
        self.rule, self.flat = rule, flat
        self.adaptive, self.max_grad_norm = adaptive, max_grad_norm
        self._hps: List[dict] = []
        self._rule_flags: List[tuple] = []
        self._cfgs: dict = {}

    # ------------------------------------------------------------ per step
    def refresh(self, hyper: Sequence[Tuple[dict, float, float]], replicas) -> tuple:
        """Upload this step's rows (rho, lam and the rule's scalars per
        (group, count)) to every replica's table. Returns the structure the
        step's kernels depend on besides the values (a captured graph is
        valid while it stays the same)."""
        self._hps = [h for h, _, _ in hyper]
        self._rule_flags = [self.rule.flags(h) for h in self._hps]
        rows = []
        for g, count in self.flat.rows:
            hp, rho, lam = hyper[g]
            r = {RHO: rho, LAM: lam, OML: 1.0 - lam}
            r.update(self.rule.row(hp, count))
            rows.append([r.get(k, 0.0) for k in range(max(r) + 1)])
        for rep in replicas:
            with _cuda.on_device(rep.logical):
                for table in rep.tables.values():
                    table.upload(rows)
        versions = tuple(t.version for rep in replicas for t in rep.tables.values())
        return (tuple(self._rule_flags), self.flat.structure(), versions, self.adaptive, self.max_grad_norm)

    def uses_state(self) -> List[bool]:
        return [self.rule.uses_state(h) for h in self._hps]

    def state_names(self, group: int) -> List[str]:
        return self.rule.state_names(self._hps[group])

    # ------------------------------------------------------------ helpers
    def _cfg(self, rep) -> List[int]:
        """The Triton launch shape of `rep`'s device, as the ops take it."""
        cfg = self._cfgs.get(rep.device)
        if cfg is None:
            cfg = self._cfgs[rep.device] = default_config(rep.device)
        return config_list(cfg)

    def _each(self, replicas, inactive: Optional[FrozenSet[int]] = None):
        """(replica, slab buffers, run, its row, its group's flags and state views)."""
        runs = self.flat.runs(inactive)
        for rep in replicas:
            with _cuda.on_device(rep.logical):
                for b, slab_runs in zip(rep.slabs, runs):
                    table = rep.table(b.dtype)
                    for run in slab_runs:
                        g = self.flat.rows[run.row][0]
                        sl = slice(run.start, run.end)
                        state = {n: b.state[n][sl] for n in self.rule.state_names(self._hps[g])}
                        yield rep, b, run, sl, table.row(run.row), self._rule_flags[g], state

    def _norm(self, rep, sq: torch.Tensor, grad_of) -> torch.Tensor:
        """||g|| for the perturbation: from the check's sum of squares, or
        ||x * g|| for adaptive SAM (one extra reduction over the buffers;
        grad_of(slab) is g there)."""
        if not self.adaptive:
            return sq.sqrt()
        total = torch.zeros((), dtype=torch.float32, device=rep.device)
        for b in rep.slabs:
            total += (upcast(rep.x_of(b)).float() * grad_of(b).float()).square().sum()
        return total.sqrt()

    # ------------------------------------------------------------ SAMPa
    def save_x(self, replicas) -> None:
        """x_save <- x on replicas whose x̃-pass writes xt into x (in place)."""
        for rep in replicas:
            if rep.in_place:
                with _cuda.on_device(rep.logical):
                    for b in rep.slabs:
                        b.x_save.copy_(b.x)

    def sampa_pre(self, replicas, points: Sequence[str] = ("xt", "y")) -> None:
        """README algorithm, steps 1-2 on every replica, into its pass buffers: xt <- x +
        rho gy/(||gy|| + eps), y <- peek(x, s, gy), each where asked and held."""
        todo = {}
        for rep in replicas:
            want = tuple(p for p in points if p in rep.points)
            if rep.shared and len(want) > 1:
                raise RuntimeError("sampa_pre: xt and y share one pass buffer on this replica; "
                                   "form them one at a time (xt, the x̃-pass, then y)")
            if want:
                with _cuda.on_device(rep.logical):
                    todo[id(rep)] = (want, self._norm(rep, rep.gy_sq, lambda b: upcast(b.gy)) if "xt" in want else None)
        for rep, b, run, sl, h, fl, state in self._each([r for r in replicas if id(r) in todo]):
            want, norm = todo[id(rep)]
            rep.ops.pre[self.rule.NAME](
                rep.x_of(b)[sl], b.xt[sl] if "xt" in want else None, b.y[sl] if "y" in want else None,
                b.gy[sl], list(state.values()), rep.gy_sq if norm is None else norm, h, list(fl),
                self._first(rep, run), self.adaptive, self._cfg(rep))

    def check(self, replicas, losses: Sequence[torch.Tensor], grads: Sequence[str],
              sq: Optional[str], invs) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per replica (ok, sum of squares of the `sq` buffers), on its device."""
        out = []
        for rep, inv in zip(replicas, invs):
            with _cuda.on_device(rep.logical):
                losses = [_cuda.to_device(loss.detach(), rep.logical) for loss in losses]
                squared = [getattr(b, sq) for b in rep.slabs] if sq is not None else []
                checked = [getattr(b, n) for b in rep.slabs for n in grads if n != sq]
                out.append(rep.ops.check(squared, checked, losses, inv, len(rep.slabs), self._cfg(rep)))
        return out

    def flags(self, rep, loss_ok: torch.Tensor, checks) -> torch.Tensor:
        """[losses finite, the step's check passed] on `rep`'s device: what the
        host reads once at the end of a step."""
        with _cuda.on_device(rep.logical):
            return torch.stack([_cuda.to_device(loss_ok, rep.logical).reshape(()),
                                checks[0][0].reshape(())])

    def finite(self, rep, *losses: torch.Tensor) -> torch.Tensor:
        """All `losses` finite, on `rep`'s device."""
        with _cuda.on_device(rep.logical):
            ok = torch.ones((), dtype=torch.bool, device=rep.device)
            for loss in losses:
                ok = ok & torch.isfinite(_cuda.to_device(loss.detach(), rep.logical)).reshape(())
            return ok

    def _clip(self, rep, inv, mixing: bool, inactive) -> Optional[torch.Tensor]:
        """clip_grad_norm_'s factor for the gradient the step uses, or None."""
        if self.max_grad_norm is None:
            return None
        total = torch.zeros((), dtype=torch.float32, device=rep.device)
        for r, b, run, sl, h, fl, state in self._each([rep], inactive):
            if not run.active:
                continue
            g = unscaled(b.g[sl], inv)
            if mixing:
                g = mix(g, unscaled(b.gy_new[sl], inv), h)
            total += g.float().square().sum()
        return clip_coef(total.sqrt(), self.max_grad_norm)

    def sampa_post(self, replicas, checks, invs, inactive: Optional[FrozenSet[int]] = None) -> None:
        """README algorithm, steps 4-6 where the step is accepted (each replica's `ok`
        flag is read on the device); a refused step only restores x."""
        oks = self._post(replicas, checks, invs, inactive, mixing=True)
        for rep, (ok, sq), host_ok in zip(replicas, checks, oks):
            with _cuda.on_device(rep.logical):
                if host_ok is None:
                    rep.gy_sq.copy_(torch.where(ok, sq, rep.gy_sq))
                elif host_ok:
                    rep.gy_sq.copy_(sq)

    def _post(self, replicas, checks, invs, inactive, mixing: bool) -> list:
        """Per replica: True/False where the host decided (a CPU replica: a
        refused step runs no op), None where the ops read the device flag."""
        by_rep, oks = {}, []
        for rep, (ok, _), inv in zip(replicas, checks, invs):
            with _cuda.on_device(rep.logical):
                host_ok = bool(ok) if rep.logical.type == "cpu" else None
                coef = self._clip(rep, inv, mixing, inactive) if host_ok is not False else None
                by_rep[id(rep)] = (ok, inv, coef, -1 if host_ok is None else int(host_ok))
                oks.append(host_ok)
        stepping = [r for r, o in zip(replicas, oks) if o is not False]
        for rep, b, run, sl, h, fl, state in self._each(stepping, inactive):
            ok, inv, coef, host_ok = by_rep[id(rep)]
            rep.ops.post[self.rule.NAME](
                rep.x_of(b)[sl], b.g[sl], b.gy_new[sl] if mixing else None, b.gy[sl] if mixing else None,
                list(state.values()), self._scratch(b)[sl], inv, ok, coef, h, list(fl),
                self._first(rep, run), host_ok, run.active, self._cfg(rep))
        self.restore_x(replicas)
        return oks

    def _scratch(self, b) -> torch.Tensor:
        """A pass buffer, free once the passes are done: the torch ops'
        working buffer in the post-gradient update (an in-place replica's xt
        is x itself, which gets x_save back afterwards)."""
        return b.xt if "xt" in b.names else b.y

    def _first(self, rep, run) -> int:
        """1/0: whether the run's state starts now, known on the host for a
        CPU replica; -1: read from the row on the device (a CUDA graph
        replays whatever the counts are then)."""
        return int(self.flat.rows[run.row][1] == 0) if rep.logical.type == "cpu" else -1

    def restore_x(self, replicas) -> None:
        """x <- x_save on replicas whose x̃-pass wrote xt into x (after the
        update, and for a step that raised); elsewhere x was never written."""
        for rep in replicas:
            if rep.in_place:
                with _cuda.on_device(rep.logical):
                    for b in rep.slabs:
                        b.x.copy_(b.x_save)

    # ------------------------------------------------------------ SAM
    def sam_perturb(self, replicas, checks, invs) -> None:
        """The pass buffer xt <- x + rho g / (||g|| + eps), ||g|| from the
        first pass's check."""
        norms = {}
        for rep, (_, sq), inv in zip(replicas, checks, invs):
            with _cuda.on_device(rep.logical):
                norms[id(rep)] = self._norm(rep, sq, lambda b, inv=inv: unscaled(b.g, inv))
        inv_of = {id(rep): inv for rep, inv in zip(replicas, invs)}
        for rep, b, run, sl, h, fl, state in self._each(replicas):
            norm, inv = norms[id(rep)], inv_of[id(rep)]
            rep.ops.perturb(rep.x_of(b)[sl], b.xt[sl], b.g[sl], norm, inv, h, self.adaptive, self._cfg(rep))

    def sam_post(self, replicas, checks, invs, inactive: Optional[FrozenSet[int]] = None) -> None:
        self._post(replicas, checks, invs, inactive, mixing=False)


def make_update(base: torch.optim.Optimizer, flat, adaptive: bool, max_grad_norm):
    rule = rule_for(base)
    if rule is None:
        from .generic import GenericUpdate
        return GenericUpdate(base, flat, adaptive, max_grad_norm)
    return Update(rule, flat, adaptive, max_grad_norm)


__all__ = ["Update", "make_update", "rule_for", "backend_for", "RULES", "EPS"]
