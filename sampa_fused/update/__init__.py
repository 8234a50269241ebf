"""The elementwise work of a step, over every replica, slab and run.

One module per base optimizer holds its math (`sgd.py`, `adamw.py`: host
scalars, the torch reference, the Triton kernels); `generic.py` runs any
other torch optimizer through its own `step()`; `common.py` holds what they
share. This layer does the looping, so the optimizer reads as SPEC section 1:

    sampa_pre    the pass buffers: xt = x + rho gy/(||gy|| + eps) and/or y = peek(x, s, gy)
    check        losses and gradients finite, and ||gy_new||^2 (||g||^2 for SAM)
    sampa_post   where the step is accepted: x, s <- base_step(x, s, (1-lam) g + lam gy_new),
                 gy <- gy_new; else nothing moves
    sam_perturb / sam_post   the same for SAM's two sequential passes

x is only read until the accepted step writes it. A replica whose engine
runs the x̃-pass on the model itself (`in_place`, see state.BufferPlan)
keeps x in x_save for the step: `save_x` before, the update works on
x_save, and x gets it back after the post-gradient update.

Every hyperparameter is read from the device table (`table.py`), every norm
and flag from device memory: nothing here synchronises with the host.
"""
from __future__ import annotations

from typing import FrozenSet, List, Optional, Sequence, Tuple

import torch

from .. import _cuda
from . import adamw, sgd
from .common import (
    EPS,
    clip_coef,
    default_config,
    lean_check,
    mix,
    perturb_into,
    perturbation,
    require_triton,
    triton,
    triton_check,
    triton_perturb,
    unscaled,
    upcast,
    wide,
)
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
        self._flags: List[tuple] = []
        self._cfgs: dict = {}

    # ------------------------------------------------------------ per step
    def refresh(self, hyper: Sequence[Tuple[dict, float, float]], replicas) -> tuple:
        """Upload this step's rows (rho, lam and the rule's scalars per
        (group, count)) to every replica's table. Returns the structure the
        step's kernels depend on besides the values (a captured graph is
        valid while it stays the same)."""
        self._hps = [h for h, _, _ in hyper]
        self._flags = [self.rule.flags(h) for h in self._hps]
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
        return (tuple(self._flags), self.flat.structure(), versions, self.adaptive, self.max_grad_norm)

    def uses_state(self) -> List[bool]:
        return [self.rule.uses_state(h) for h in self._hps]

    def state_names(self, group: int) -> List[str]:
        return self.rule.state_names(self._hps[group])

    # ------------------------------------------------------------ helpers
    def _cfg(self, rep):
        cfg = self._cfgs.get(rep.device)
        if cfg is None:
            cfg = self._cfgs[rep.device] = default_config(rep.device)
        return cfg

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
                        yield rep, b, run, sl, table.row(run.row), self._flags[g], state

    def _norm(self, rep, name: str, sq: torch.Tensor) -> torch.Tensor:
        """||g|| for the perturbation: from the check's sum of squares, or
        ||x * g|| for adaptive SAM (one extra reduction over the buffers)."""
        if not self.adaptive:
            return sq.sqrt()
        total = torch.zeros((), dtype=torch.float32, device=rep.device)
        for b in rep.slabs:
            total += (upcast(rep.x_of(b)).float() * upcast(getattr(b, name)).float()).square().sum()
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
        """SPEC 1 steps 1-2 on every replica, into its pass buffers: xt <- x +
        rho gy/(||gy|| + eps), y <- peek(x, s, gy), each where asked and held."""
        todo = {}
        for rep in replicas:
            want = tuple(p for p in points if p in rep.points)
            if rep.shared and len(want) > 1:
                raise RuntimeError("sampa_pre: xt and y share one pass buffer on this replica; "
                                   "form them one at a time (xt, the x̃-pass, then y)")
            if want:
                with _cuda.on_device(rep.logical):
                    todo[id(rep)] = (want, self._norm(rep, "gy", rep.gy_sq) if "xt" in want else None)
        for rep, b, run, sl, h, fl, state in self._each([r for r in replicas if id(r) in todo]):
            want, norm = todo[id(rep)]
            xt = b.xt[sl] if "xt" in want else None
            y = b.y[sl] if "y" in want else None
            x = rep.x_of(b)[sl]
            if rep.backend == "triton":
                self.rule.triton_pre(x, xt, y, b.gy[sl], state, rep.gy_sq if norm is None else norm,
                                     h, fl, self._cfg(rep), self.adaptive)
                continue
            if not wide(b.dtype):            # 16-bit buffers: fp32 math on copies
                xf, gy = upcast(x), upcast(b.gy[sl])
                if y is not None:
                    y_new, _ = self.rule.step(xf, gy, {k: upcast(v) for k, v in state.items()}, h, fl)
                    y.copy_(y_new)
                if xt is not None:
                    xt.copy_(perturbation(xf, gy * xf * xf if self.adaptive else gy, h, norm))
                continue
            if y is not None:
                self.rule.peek_(y, x, b.gy[sl], state, h, fl, self._first(rep, run))
            if xt is not None:
                perturb_into(xt, x, b.gy[sl], None, h, norm, self.adaptive)

    def check(self, replicas, losses: Sequence[torch.Tensor], grads: Sequence[str],
              sq: Optional[str], invs) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per replica (ok, sum of squares of the `sq` buffers), on its device."""
        out = []
        for rep, inv in zip(replicas, invs):
            with _cuda.on_device(rep.logical):
                losses = [_cuda.to_device(loss.detach(), rep.logical) for loss in losses]
                if rep.backend == "triton":
                    out.append(triton_check(rep.slabs, losses, grads, sq, inv, rep.device, self._cfg(rep)))
                else:
                    out.append(lean_check(rep.slabs, losses, grads, sq, inv, rep.device))
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
        """SPEC 1 steps 4-6 where the step is accepted (each replica's `ok`
        flag is read on the device); a refused step only restores x."""
        oks = self._post(replicas, checks, invs, inactive, mixing=True)
        for rep, (ok, sq), host_ok in zip(replicas, checks, oks):
            with _cuda.on_device(rep.logical):
                if host_ok is None:
                    rep.gy_sq.copy_(torch.where(ok, sq, rep.gy_sq))
                elif host_ok:
                    rep.gy_sq.copy_(sq)

    def _post(self, replicas, checks, invs, inactive, mixing: bool) -> list:
        """Per replica: True/False where the step was accepted or refused on
        the host (a CPU replica: its flag costs nothing to read, and a refused
        step then writes nothing), None where the kernels read it on the device."""
        by_rep, oks = {}, []
        for rep, (ok, _), inv in zip(replicas, checks, invs):
            with _cuda.on_device(rep.logical):
                host_ok = bool(ok) if rep.logical.type == "cpu" else None
                coef = self._clip(rep, inv, mixing, inactive) if host_ok is not False else None
                by_rep[id(rep)] = (ok, inv, coef, host_ok)
                oks.append(host_ok)
        for rep, b, run, sl, h, fl, state in self._each([r for r, o in zip(replicas, oks) if o is not False],
                                                         inactive):
            ok, inv, coef, host_ok = by_rep[id(rep)]
            xb = rep.x_of(b)
            if rep.backend == "triton":
                if not run.active:          # no gradient in either pass: as torch, untouched
                    if mixing:
                        b.gy[sl].copy_(torch.where(ok, unscaled(b.gy_new[sl], inv), upcast(b.gy[sl])))
                    continue
                self.rule.triton_post(xb[sl], b.g[sl], b.gy_new[sl] if mixing else None,
                                      b.gy[sl] if mixing else None, state, inv, ok, coef, h, fl,
                                      self._cfg(rep))
            elif wide(b.dtype):
                self._post_run(rep, b, run, sl, h, fl, state, ok, inv, coef, host_ok, mixing)
            else:
                self._post_run_16(b, run, sl, xb, h, fl, state, ok, inv, coef, mixing)
        self.restore_x(replicas)
        return oks

    def _scratch(self, b) -> torch.Tensor:
        """A pass buffer, free once the passes are done: the post-gradient
        update's working buffer (an in-place replica's xt is x itself, which
        gets x_save back afterwards)."""
        return b.xt if "xt" in b.names else b.y

    def _first(self, rep, run) -> Optional[bool]:
        """Whether the run's state starts now, known on the host for a CPU
        replica; None: read from the row on the device (a CUDA graph replays
        whatever the counts are then)."""
        return self.flat.rows[run.row][1] == 0 if rep.logical.type == "cpu" else None

    def _post_run(self, rep, b, run, sl, h, fl, state, ok, inv, coef, host_ok, mixing) -> None:
        """fp32/fp64 buffers, in place: on the host's say-so (host_ok True), or
        on copies committed with the device flag (host_ok None), the same ops
        either way, so both give the same bits."""
        gy = b.gy[sl] if mixing else None
        gu = None                                   # gy_{t+1}, unscaled: what gy commits to
        if mixing:
            gu = b.gy_new[sl]
            if host_ok:
                gu = torch.mul(gu, inv, out=gy) if inv is not None else gy.copy_(gu)
            elif inv is not None:
                gu = gu * inv
        if not run.active:                          # no gradient in either pass: as torch, untouched
            if mixing and host_ok is None:
                gy.copy_(torch.where(ok, gu, gy))
            return
        d, scratch = b.g[sl], self._scratch(b)[sl]
        if inv is not None:
            d = torch.mul(d, inv, out=scratch)
        if mixing:                                  # (1 - lam) g + lam gy_{t+1}
            d = torch.mul(d, h[OML], out=scratch).addcmul_(gu, h[LAM])
        if coef is not None:
            d = torch.mul(d, coef, out=scratch)
        x = rep.x_of(b)[sl]
        if host_ok:
            self.rule.apply_(x, d, scratch, state, h, fl, self._first(rep, run))
            return
        xn, sn = x.clone(), {k: v.clone() for k, v in state.items()}
        self.rule.apply_(xn, d, scratch, sn, h, fl, None)
        torch.where(ok, xn, x, out=x)
        for k, v in sn.items():
            torch.where(ok, v, state[k], out=state[k])
        if mixing:
            torch.where(ok, gu, gy, out=gy)

    def _post_run_16(self, b, run, sl, xb, h, fl, state, ok, inv, coef, mixing) -> None:
        """16-bit buffers: fp32 math on copies, committed with the flag."""
        if not run.active:
            if mixing:
                b.gy[sl].copy_(torch.where(ok, unscaled(b.gy_new[sl], inv), upcast(b.gy[sl])))
            return
        g = unscaled(b.g[sl], inv)
        if mixing:
            gy_new = unscaled(b.gy_new[sl], inv)
            g = mix(g, gy_new, h)
        if coef is not None:
            g = g * coef
        x = upcast(xb[sl])
        x_new, st_new = self.rule.step(x, g, {k: upcast(v) for k, v in state.items()}, h, fl)
        xb[sl].copy_(torch.where(ok, x_new, x))
        for n, v in st_new.items():
            state[n].copy_(torch.where(ok, v, upcast(state[n])))
        if mixing:
            b.gy[sl].copy_(torch.where(ok, gy_new, upcast(b.gy[sl])))

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
                norms[id(rep)] = self._norm_sam(rep, sq, inv)
        inv_of = {id(rep): inv for rep, inv in zip(replicas, invs)}
        for rep, b, run, sl, h, fl, state in self._each(replicas):
            norm, inv = norms[id(rep)], inv_of[id(rep)]
            x = rep.x_of(b)[sl]
            if rep.backend == "triton":
                triton_perturb(x, b.xt[sl], b.g[sl], norm, h, self._cfg(rep), inv, self.adaptive)
                continue
            if not wide(b.dtype):
                g, xf = unscaled(b.g[sl], inv), upcast(x)
                b.xt[sl].copy_(perturbation(xf, g * xf * xf if self.adaptive else g, h, norm))
                continue
            perturb_into(b.xt[sl], x, b.g[sl], inv, h, norm, self.adaptive)

    def _norm_sam(self, rep, sq, inv):
        if not self.adaptive:
            return sq.sqrt()
        total = torch.zeros((), dtype=torch.float32, device=rep.device)
        for b in rep.slabs:
            total += (upcast(rep.x_of(b)).float() * unscaled(b.g, inv).float()).square().sum()
        return total.sqrt()

    def sam_post(self, replicas, checks, invs, inactive: Optional[FrozenSet[int]] = None) -> None:
        self._post(replicas, checks, invs, inactive, mixing=False)


def make_update(base: torch.optim.Optimizer, flat, adaptive: bool, max_grad_norm):
    rule = rule_for(base)
    if rule is None:
        from .generic import GenericUpdate
        return GenericUpdate(base, flat, adaptive, max_grad_norm)
    return Update(rule, flat, adaptive, max_grad_norm)


__all__ = ["Update", "make_update", "rule_for", "backend_for", "RULES", "EPS"]
