"""The update stages as registered ops (torch.library: schema, kernels, fake).

Two families with one signature per stage, as torch's `sgd()` has one
signature over its single-tensor / foreach / fused implementations; a replica
picks its family once (`family(backend)`), and the driver in `__init__.py`
calls `rep.ops.<stage>` with no backend branch:

    torch   the torch implementation: in place for fp32/fp64 (sgd.apply_,
            sgd.peek_, common.perturb_into, common.lean_check), fp32 math on
            copies for 16-bit buffers; any device (CPU, and backend='torch'
            on CUDA)
    triton  the Triton kernels (CUDA, and CPU tensors in the interpreter)

Each schema names what the op writes (`Tensor(a!)`), so torch.library.opcheck,
FakeTensor and torch.compile see the stages, and the stand-in CUDA of the
tests reads from the schema which buffers an op (and its launches) writes.

    pre      (x, xt?, y?, gy, state, norm, hp, flags, first, adaptive, cfg)    writes xt, y
    post     (x, g, gy_new?, gy?, state, scratch, inv?, ok, coef?, hp, flags,
              first, host_ok, active, cfg)                                     writes x, gy, state, scratch
    perturb  (x, xt, g, norm, inv?, hp, adaptive, cfg)                        writes xt
    check    (squared, checked, losses, inv?, slabs, cfg) -> (ok, sum of squares)

`first`: 1/0 when the host knows whether the state starts now, -1 to read
it from the row on the device (a CUDA graph). `host_ok`: 1 when the host
already decided the step is accepted (a CPU replica; a refused one does not
call post), -1 to commit with the device flag `ok`. `cfg`: the Triton launch
shape (KernelConfig's fields; the torch family ignores it).
"""
from __future__ import annotations

import types
from typing import List, Optional

import torch

from . import adamw, sgd
from .common import (
    KernelConfig,
    lean_check,
    mix,
    perturb_into,
    perturbation,
    triton,
    triton_check,
    triton_perturb,
    unscaled,
    upcast,
    wide,
)
from .table import LAM, OML

RULES = {"sgd": sgd, "adamw": adamw}

PRE = ("(Tensor x, Tensor(a!)? xt, Tensor(b!)? y, Tensor gy, Tensor[] state, Tensor norm, Tensor hp, "
       "bool[] flags, int first, bool adaptive, int[] cfg) -> ()")
POST = ("(Tensor(a!) x, Tensor g, Tensor? gy_new, Tensor(b!)? gy, Tensor(c!)[] state, Tensor(d!) scratch, "
        "Tensor? inv, Tensor ok, Tensor? coef, Tensor hp, bool[] flags, int first, int host_ok, bool active, "
        "int[] cfg) -> ()")
PERTURB = "(Tensor x, Tensor(a!) xt, Tensor g, Tensor norm, Tensor? inv, Tensor hp, bool adaptive, int[] cfg) -> ()"
CHECK = "(Tensor[] squared, Tensor[] checked, Tensor[] losses, Tensor? inv, int slabs, int[] cfg) -> (Tensor, Tensor)"


def _first(first: int) -> Optional[bool]:
    return None if first < 0 else bool(first)


def _config(cfg: List[int]) -> KernelConfig:
    return KernelConfig(*cfg)


def _slabs(squared, checked, slabs: int):
    """The check's buffers regrouped per slab (`s`: squared, `c0`...: checked)."""
    k = len(checked) // slabs if slabs else 0
    out = []
    for i in range(slabs):
        ns = types.SimpleNamespace(**{f"c{j}": checked[i * k + j] for j in range(k)})
        if squared:
            ns.s = squared[i]
        out.append(ns)
    return out, tuple(f"c{j}" for j in range(k)), ("s" if squared else None)


# ------------------------------------------------------------------ torch family
def _torch_pre(rule):
    def pre(x, xt, y, gy, state, norm, hp, flags, first, adaptive, cfg) -> None:
        fl = tuple(flags)
        st = dict(zip(rule.state_order(fl), state))
        if not wide(x.dtype):                        # 16-bit buffers: fp32 math on copies
            xf, gf = upcast(x), upcast(gy)
            if y is not None:
                y.copy_(rule.step(xf, gf, {k: upcast(v) for k, v in st.items()}, hp, fl)[0])
            if xt is not None:
                xt.copy_(perturbation(xf, gf * xf * xf if adaptive else gf, hp, norm))
            return
        if y is not None:
            rule.peek_(y, x, gy, st, hp, fl, _first(first))
        if xt is not None:
            perturb_into(xt, x, gy, None, hp, norm, adaptive)
    return pre


def _torch_post(rule):
    def post(x, g, gy_new, gy, state, scratch, inv, ok, coef, hp, flags, first, host_ok, active, cfg) -> None:
        fl = tuple(flags)
        st = dict(zip(rule.state_order(fl), state))
        mixing = gy_new is not None
        if not wide(x.dtype):
            _post_16(rule, x, g, gy_new, gy, st, inv, ok, coef, hp, fl, active)
            return
        host = host_ok > 0
        gu = None                                    # gy_{t+1}, unscaled: what gy commits to
        if mixing:
            gu = gy_new
            if host:
                gu = torch.mul(gu, inv, out=gy) if inv is not None else gy.copy_(gu)
            elif inv is not None:
                gu = gu * inv
        if not active:                               # no gradient in either pass: as torch, untouched
            if mixing and not host:
                torch.where(ok, gu, gy, out=gy)
            return
        d = g
        if inv is not None:
            d = torch.mul(d, inv, out=scratch)
        if mixing:                                   # (1 - lam) g + lam gy_{t+1}
            d = torch.mul(d, hp[OML], out=scratch).addcmul_(gu, hp[LAM])
        if coef is not None:
            d = torch.mul(d, coef, out=scratch)
        if host:
            rule.apply_(x, d, scratch, st, hp, fl, _first(first))
            return
        # the same ops on copies, committed with the device flag: the same bits
        xn, sn = x.clone(), {k: v.clone() for k, v in st.items()}
        rule.apply_(xn, d, scratch, sn, hp, fl, None)
        torch.where(ok, xn, x, out=x)
        for k, v in sn.items():
            torch.where(ok, v, st[k], out=st[k])
        if mixing:
            torch.where(ok, gu, gy, out=gy)
    return post


def _post_16(rule, x, g, gy_new, gy, st, inv, ok, coef, hp, fl, active) -> None:
    """16-bit buffers: fp32 math on copies, committed with the flag."""
    mixing = gy_new is not None
    if not active:
        if mixing:
            gy.copy_(torch.where(ok, unscaled(gy_new, inv), upcast(gy)))
        return
    d = unscaled(g, inv)
    if mixing:
        gu = unscaled(gy_new, inv)
        d = mix(d, gu, hp)
    if coef is not None:
        d = d * coef
    xf = upcast(x)
    x_new, st_new = rule.step(xf, d, {k: upcast(v) for k, v in st.items()}, hp, fl)
    x.copy_(torch.where(ok, x_new, xf))
    for n, v in st_new.items():
        st[n].copy_(torch.where(ok, v, upcast(st[n])))
    if mixing:
        gy.copy_(torch.where(ok, gu, upcast(gy)))


def _torch_perturb(x, xt, g, norm, inv, hp, adaptive, cfg) -> None:
    if not wide(x.dtype):
        gf, xf = unscaled(g, inv), upcast(x)
        xt.copy_(perturbation(xf, gf * xf * xf if adaptive else gf, hp, norm))
        return
    perturb_into(xt, x, g, inv, hp, norm, adaptive)


def _torch_check(squared, checked, losses, inv, slabs, cfg):
    bufs, names, sq = _slabs(squared, checked, slabs)
    return lean_check(bufs, losses, names, sq, inv, _device(squared, checked, losses))


# ------------------------------------------------------------------ Triton family
def _triton_pre(rule):
    def pre(x, xt, y, gy, state, norm, hp, flags, first, adaptive, cfg) -> None:
        fl = tuple(flags)
        rule.triton_pre(x, xt, y, gy, dict(zip(rule.state_order(fl), state)), norm, hp, fl,
                        _config(cfg), adaptive)
    return pre


def _triton_post(rule):
    def post(x, g, gy_new, gy, state, scratch, inv, ok, coef, hp, flags, first, host_ok, active, cfg) -> None:
        fl = tuple(flags)
        if not active:                               # no gradient in either pass: only gy commits
            if gy_new is not None:
                gy.copy_(torch.where(ok, unscaled(gy_new, inv), upcast(gy)))
            return
        rule.triton_post(x, g, gy_new, gy, dict(zip(rule.state_order(fl), state)), inv, ok, coef, hp, fl,
                         _config(cfg))
    return post


def _triton_perturb(x, xt, g, norm, inv, hp, adaptive, cfg) -> None:
    triton_perturb(x, xt, g, norm, hp, _config(cfg), inv, adaptive)


def _triton_check(squared, checked, losses, inv, slabs, cfg):
    bufs, names, sq = _slabs(squared, checked, slabs)
    device = _device(squared, checked, losses)
    return triton_check(bufs, losses, names, sq, inv, device, _config(cfg))


def _device(*lists) -> torch.device:
    for ts in lists:
        for t in ts:
            return t.device
    raise ValueError("check: no buffers and no losses")


# ------------------------------------------------------------------ registration
# torch.library.Library rather than custom_op's wrapper: the same registered
# op and schema, at about a tenth of custom_op's per-call cost (~10 us rather
# than ~140 us here), which a CPU step of small tensors feels.
_LIB = torch.library.Library("sampa_fused", "DEF")


def _define(name: str, schema: str, impl, fake):
    _LIB.define(name + schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"sampa_fused::{name}", fake, lib=_LIB)
    return getattr(torch.ops.sampa_fused, name).default


def _no_output(*args) -> None:
    return None


def _fake_check(squared, checked, losses, inv, slabs, cfg):
    device = _device(squared, checked, losses)
    return (torch.empty((), dtype=torch.bool, device=device),
            torch.empty((), dtype=torch.float32, device=device))


def _register(family: str, pre, post, perturb, check) -> types.SimpleNamespace:
    ops = types.SimpleNamespace(name=family, pre={}, post={})
    for rule_name, rule in RULES.items():
        ops.pre[rule_name] = _define(f"{family}_{rule_name}_pre", PRE, pre(rule), _no_output)
        ops.post[rule_name] = _define(f"{family}_{rule_name}_post", POST, post(rule), _no_output)
    ops.perturb = _define(f"{family}_perturb", PERTURB, perturb, _no_output)
    ops.check = _define(f"{family}_check", CHECK, check, _fake_check)
    return ops


FAMILIES = {"torch": _register("torch", _torch_pre, _torch_post, _torch_perturb, _torch_check)}
if triton is not None:
    FAMILIES["triton"] = _register("triton", _triton_pre, _triton_post, _triton_perturb, _triton_check)


def family(backend: str) -> types.SimpleNamespace:
    """The ops a replica on `backend` runs (chosen once, when it is built)."""
    return FAMILIES[backend]


def config_list(cfg: KernelConfig) -> List[int]:
    return [cfg.block, cfg.num_warps, cfg.reduce_block, cfg.reduce_iters, cfg.reduce_warps,
            cfg.final_block, cfg.final_warps]
