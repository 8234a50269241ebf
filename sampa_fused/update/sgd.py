"""torch.optim.SGD (momentum, dampening, nesterov, weight decay, maximize):
its hyperparameters as device scalars, the torch reference update, and the
Triton kernels, side by side.

The op order follows torch.optim.SGD's single-tensor step:
    g' = g (-g when maximize) + wd x
    buf = g' on the first step, else mu buf + (1 - dampening) g'
    dir = g' + mu buf (nesterov) or buf (momentum) or g'
    x   = x - lr dir
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .common import check_number, device_scalar, launch, triton
from .table import RULE

NAME = "sgd"
STATE = ("momentum_buffer",)            # every name its state may hold
OPTIMIZER = torch.optim.SGD
LR, MU, DAMP1, WD, FIRST = range(RULE, RULE + 5)      # row slots


# ------------------------------------------------------------------ host
def hyper(group: dict, where: str) -> dict:
    """The group's hyperparameters as host numbers, validated."""
    return dict(lr=check_number(group, "lr", where), momentum=check_number(group, "momentum", where),
                dampening=check_number(group, "dampening", where),
                weight_decay=check_number(group, "weight_decay", where),
                nesterov=bool(group["nesterov"]), maximize=bool(group.get("maximize", False)))


def state_names(hp: dict) -> List[str]:
    return ["momentum_buffer"] if hp["momentum"] != 0 else []


def state_order(fl: Tuple[bool, ...]) -> List[str]:
    """The state buffers an op gets, in order, for these flags."""
    return ["momentum_buffer"] if fl[0] else []


def uses_state(hp: dict) -> bool:
    """Whether a step counts for the state (the first momentum step starts the buffer)."""
    return hp["momentum"] != 0


def flags(hp: dict) -> Tuple[bool, ...]:
    """The structure of the update: which ops run at all."""
    return (hp["momentum"] != 0, hp["nesterov"], hp["weight_decay"] != 0, hp["maximize"])


def row(hp: dict, count: int) -> Dict[int, float]:
    """The rule's slots of a row; `count`: steps this state has taken."""
    return {LR: hp["lr"], MU: hp["momentum"], DAMP1: 1.0 - hp["dampening"], WD: hp["weight_decay"],
            FIRST: 1.0 if count == 0 else 0.0}


# ------------------------------------------------------------------ torch
def step(x: torch.Tensor, g: torch.Tensor, state: Dict[str, torch.Tensor], h: torch.Tensor,
         fl: Tuple[bool, ...]):
    """One step from (x, state) with gradient g, out of place (also the peek).
    `h` is the row; x and g in fp32 math. Returns (x, {name: new state})."""
    momentum, nesterov, weight_decay, maximize = fl
    if maximize:
        g = -g
    if weight_decay:
        g = g + h[WD] * x
    new = {}
    if momentum:
        buf = state["momentum_buffer"].float() if state["momentum_buffer"].dtype != g.dtype \
            else state["momentum_buffer"]
        buf = torch.where(h[FIRST] != 0, g, buf * h[MU] + h[DAMP1] * g)   # torch: clone(g) first
        new["momentum_buffer"] = buf
        g = g + h[MU] * buf if nesterov else buf
    return x - h[LR] * g, new


def peek_(y: torch.Tensor, x: torch.Tensor, gy: torch.Tensor, state: Dict[str, torch.Tensor],
          h: torch.Tensor, fl: Tuple[bool, ...], first: Optional[bool]) -> None:
    """y <- the step from (x, state) with gradient gy, written into y (the
    state is only read); every tensor in the compute dtype. `first`: whether
    the momentum buffer starts now, known on the host (None: read from the
    row, for a CUDA graph; the same bits)."""
    momentum, nesterov, weight_decay, maximize = fl
    torch.neg(gy, out=y) if maximize else y.copy_(gy)
    if weight_decay:
        y.addcmul_(x, h[WD])                                   # g' = g + wd x
    if momentum:
        buf = state["momentum_buffer"]
        gp = y.clone() if nesterov else None
        # buf' = mu buf + (1 - dampening) g', or g' on the first step
        if first is None:                                      # the row decides, on the device
            new = y.clone()
            new.mul_(h[DAMP1]).addcmul_(buf, h[MU])
            torch.where(h[FIRST] != 0, y, new, out=y)
        elif not first:
            y.mul_(h[DAMP1]).addcmul_(buf, h[MU])
        if nesterov:
            torch.addcmul(gp, y, h[MU], out=y)                 # g' + mu buf'
    y.mul_(h[LR])
    torch.sub(x, y, out=y)                                     # x - lr dir


def apply_(x: torch.Tensor, g: torch.Tensor, scratch: torch.Tensor, state: Dict[str, torch.Tensor],
           h: torch.Tensor, fl: Tuple[bool, ...], first: Optional[bool]) -> None:
    """x, state <- one step with gradient g, in place (g is only read;
    `scratch`, a buffer of g's size, may be g itself)."""
    momentum, nesterov, weight_decay, maximize = fl
    d = g
    if maximize:
        d = torch.neg(g, out=scratch)
    if weight_decay:
        d = torch.addcmul(d, x, h[WD], out=scratch)            # g' = g + wd x
    if momentum:
        buf = state["momentum_buffer"]
        if first is None:                                      # the row decides, on the device
            new = buf.mul(h[MU]).addcmul_(d, h[DAMP1])
            torch.where(h[FIRST] != 0, d, new, out=buf)
        elif first:
            buf.copy_(d)
        else:
            buf.mul_(h[MU]).addcmul_(d, h[DAMP1])
        d = torch.addcmul(d, buf, h[MU], out=scratch) if nesterov else buf
    x.addcmul_(d, h[LR], value=-1)                             # x - lr dir


# ------------------------------------------------------------------ Triton
if triton is not None:
    import triton.language as tl

    from .common import post_gradient, store_xt

    _LR, _MU, _DAMP1, _WD, _FIRST = (tl.constexpr(v) for v in (LR, MU, DAMP1, WD, FIRST))

    @triton.jit
    def _sgd_math(x, g, buf, hp_ptr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                  WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr):
        # One torch.optim.SGD step in fp32; returns (new x, new momentum buffer).
        if MAXIMIZE:
            g = -g
        if WEIGHT_DECAY:
            g = g + tl.load(hp_ptr + _WD) * x
        if MOMENTUM:
            mu = tl.load(hp_ptr + _MU)
            buf = tl.where(tl.load(hp_ptr + _FIRST) != 0, g, buf * mu + tl.load(hp_ptr + _DAMP1) * g)
            if NESTEROV:
                g = g + mu * buf
            else:
                g = buf
        return x - tl.load(hp_ptr + _LR) * g, buf

    @triton.jit
    def sgd_pre_kernel(x_ptr, xt_ptr, y_ptr, gy_ptr, buf_ptr, norm_ptr, hp_ptr, n, XT: tl.constexpr,
                       Y: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                       WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr, ADAPTIVE: tl.constexpr,
                       BLOCK: tl.constexpr):
        """The pass buffers from x (only read): xt when XT, y <- peek(x, buf,
        gy) (buf untouched) when Y."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        gy = tl.load(gy_ptr + offs, mask=mask).to(tl.float32)
        if XT:
            store_xt(xt_ptr, norm_ptr, hp_ptr, offs, mask, x, gy, ADAPTIVE)
        if Y:
            buf = gy
            if MOMENTUM:
                buf = tl.load(buf_ptr + offs, mask=mask).to(tl.float32)
            y, _ = _sgd_math(x, gy, buf, hp_ptr, MOMENTUM, NESTEROV, WEIGHT_DECAY, MAXIMIZE)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def sgd_post_kernel(x_ptr, g_ptr, gy_new_ptr, gy_ptr, buf_ptr, inv_ptr, ok_ptr,
                        coef_ptr, hp_ptr, n, MIX: tl.constexpr, UNSCALE: tl.constexpr,
                        CLIP: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                        WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
        """x, buf <- step(x, buf, g) [and gy <- gy_new] where the step is
        accepted (*ok_ptr); else nothing is written."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        ok = tl.load(ok_ptr) != 0
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        g = post_gradient(g_ptr, gy_new_ptr, gy_ptr, inv_ptr, coef_ptr, hp_ptr, offs, mask, ok,
                          MIX, UNSCALE, CLIP)
        buf = g
        if MOMENTUM:
            buf = tl.load(buf_ptr + offs, mask=mask).to(tl.float32)
        x, buf = _sgd_math(x, g, buf, hp_ptr, MOMENTUM, NESTEROV, WEIGHT_DECAY, MAXIMIZE)
        tl.store(x_ptr + offs, x.to(x_ptr.dtype.element_ty), mask=mask & ok)
        if MOMENTUM:
            tl.store(buf_ptr + offs, buf.to(buf_ptr.dtype.element_ty), mask=mask & ok)


def triton_pre(x, xt, y, gy, state, norm, hp, fl, cfg, adaptive: bool = False) -> None:
    """xt and/or y (None: not formed) from x, gy and the state."""
    norm = device_scalar(norm, "norm", x)
    n = x.numel()
    if n and (xt is not None or y is not None):
        buf = state.get("momentum_buffer", x)
        launch(sgd_pre_kernel, triton.cdiv(n, cfg.block),
               (x, x if xt is None else xt, x if y is None else y, gy, buf, norm, hp, n),
               dict(XT=xt is not None, Y=y is not None, MOMENTUM=fl[0], NESTEROV=fl[1],
                    WEIGHT_DECAY=fl[2], MAXIMIZE=fl[3], ADAPTIVE=adaptive, BLOCK=cfg.block,
                    num_warps=cfg.num_warps))


def triton_post(x, g, gy_new, gy, state, inv, ok, coef, hp, fl, cfg) -> None:
    inv, coef = device_scalar(inv, "inv_scale", x), device_scalar(coef, "coef", x)
    ok = device_scalar(ok, "ok", x, torch.bool)
    n = x.numel()
    if n:
        buf = state.get("momentum_buffer", x)
        mix = gy_new is not None
        launch(sgd_post_kernel, triton.cdiv(n, cfg.block),
               (x, g, gy_new if mix else g, gy if mix else g, buf,
                g if inv is None else inv, ok, g if coef is None else coef, hp, n),
               dict(MIX=mix, UNSCALE=inv is not None, CLIP=coef is not None, MOMENTUM=fl[0],
                    NESTEROV=fl[1], WEIGHT_DECAY=fl[2], MAXIMIZE=fl[3], BLOCK=cfg.block,
                    num_warps=cfg.num_warps))
