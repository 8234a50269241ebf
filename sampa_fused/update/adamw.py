"""torch.optim.AdamW (decoupled weight decay, bias correction, amsgrad,
maximize): its hyperparameters as device scalars, the torch reference update,
and the Triton kernels, side by side.

The op order follows torch.optim.AdamW's single-tensor step, t = count + 1:
    x = x (1 - lr wd);  m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2
    [vmax = max(vmax, v)];  denom = sqrt(v or vmax) / sqrt(1 - b2^t) + eps
    x = x - lr / (1 - b1^t) * m / denom
Bias corrections are computed on the host in double, as torch does.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from .common import check_number, device_scalar, launch, triton
from .table import RULE

NAME = "adamw"
STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")            # every name its state may hold
OPTIMIZER = torch.optim.AdamW
DECAY, W, B2, OMB2, STEP_SIZE, BC2, EPS_ = range(RULE, RULE + 7)     # row slots


# ------------------------------------------------------------------ host
def hyper(group: dict, where: str) -> dict:
    betas = group.get("betas")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}: betas must be a pair of numbers, got {betas!r}")
    return dict(lr=check_number(group, "lr", where),
                beta1=check_number(group, "beta1", where, betas[0]),
                beta2=check_number(group, "beta2", where, betas[1]),
                eps=check_number(group, "eps", where), weight_decay=check_number(group, "weight_decay", where),
                amsgrad=bool(group["amsgrad"]), maximize=bool(group.get("maximize", False)))


def state_names(hp: dict) -> List[str]:
    return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if hp["amsgrad"] else [])


def state_order(fl: Tuple[bool, ...]) -> List[str]:
    """The state buffers an op gets, in order, for these flags."""
    return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if fl[0] else [])


def uses_state(hp: dict) -> bool:
    return True


def flags(hp: dict) -> Tuple[bool, ...]:
    # torch.lerp picks its formula by the weight (w = 1 - beta1) for accuracy.
    return (hp["amsgrad"], hp["maximize"], hp["weight_decay"] != 0, abs(1.0 - hp["beta1"]) < 0.5)


def row(hp: dict, count: int) -> Dict[int, float]:
    t = count + 1
    lr, b1, b2 = hp["lr"], hp["beta1"], hp["beta2"]
    return {DECAY: 1 - lr * hp["weight_decay"], W: 1 - b1, B2: b2, OMB2: 1 - b2,
            STEP_SIZE: lr / (1 - b1 ** t), BC2: (1 - b2 ** t) ** 0.5, EPS_: hp["eps"]}


# ------------------------------------------------------------------ torch
def step(x: torch.Tensor, g: torch.Tensor, state: Dict[str, torch.Tensor], h: torch.Tensor,
         fl: Tuple[bool, ...]):
    """One step from (x, state) with gradient g, out of place (also the peek)."""
    amsgrad, maximize, weight_decay, _ = fl
    if maximize:
        g = -g
    if weight_decay:
        x = x * h[DECAY]
    m = torch.lerp(state["exp_avg"].to(g.dtype), g, h[W])
    v = state["exp_avg_sq"].to(g.dtype) * h[B2] + h[OMB2] * g * g
    new = {"exp_avg": m, "exp_avg_sq": v}
    if amsgrad:
        v = torch.maximum(state["max_exp_avg_sq"].to(g.dtype), v)
        new["max_exp_avg_sq"] = v
    denom = v.sqrt() / h[BC2] + h[EPS_]
    return x - h[STEP_SIZE] * (m / denom), new


def _direction_(m: torch.Tensor, v: torch.Tensor, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """out <- m / (sqrt(v) / sqrt(1 - b2^t) + eps) (out may be v's scratch copy)."""
    torch.sqrt(v, out=out)
    out.div_(h[BC2]).add_(h[EPS_])
    return torch.div(m, out, out=out)


def peek_(y: torch.Tensor, x: torch.Tensor, gy: torch.Tensor, state: Dict[str, torch.Tensor],
          h: torch.Tensor, fl: Tuple[bool, ...], first=None) -> None:
    """y <- the step from (x, state) with gradient gy, written into y (the
    state is only read; one temporary for the second moment)."""
    amsgrad, maximize, weight_decay, _ = fl
    g = torch.neg(gy) if maximize else gy
    torch.lerp(state["exp_avg"], g, h[W], out=y)                       # m'
    v = torch.mul(g, g).mul_(h[OMB2]).addcmul_(state["exp_avg_sq"], h[B2])   # v'
    if amsgrad:
        torch.maximum(state["max_exp_avg_sq"], v, out=v)
    _direction_(y, v, v, h)
    if weight_decay:
        torch.mul(x, h[DECAY], out=y)
        y.addcmul_(v, h[STEP_SIZE], value=-1)
    else:
        torch.addcmul(x, v, h[STEP_SIZE], value=-1, out=y)


def apply_(x: torch.Tensor, g: torch.Tensor, scratch: torch.Tensor, state: Dict[str, torch.Tensor],
           h: torch.Tensor, fl: Tuple[bool, ...], first=None) -> None:
    """x, state <- one step with gradient g, in place (g is only read;
    `scratch`, a buffer of g's size, may be g itself)."""
    amsgrad, maximize, weight_decay, _ = fl
    m, v = state["exp_avg"], state["exp_avg_sq"]
    d = torch.neg(g, out=scratch) if maximize else g
    if weight_decay:
        x.mul_(h[DECAY])
    m.lerp_(d, h[W])
    sq = torch.mul(d, d, out=scratch)
    v.mul_(h[B2]).addcmul_(sq, h[OMB2])
    if amsgrad:
        torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
        v = state["max_exp_avg_sq"]
    x.addcmul_(_direction_(m, v, scratch, h), h[STEP_SIZE], value=-1)


# ------------------------------------------------------------------ Triton
if triton is not None:
    import triton.language as tl

    from .common import post_gradient, store_xt

    _DECAY, _W, _B2, _OMB2, _STEP, _BC2, _EPS = (tl.constexpr(v) for v in
                                                 (DECAY, W, B2, OMB2, STEP_SIZE, BC2, EPS_))

    @triton.jit
    def _adamw_math(x, g, m, v, vmax, hp_ptr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                    WEIGHT_DECAY: tl.constexpr, LERP_SMALL: tl.constexpr):
        # One torch.optim.AdamW step in fp32; returns (x, m, v, vmax).
        if MAXIMIZE:
            g = -g
        if WEIGHT_DECAY:
            x = x * tl.load(hp_ptr + _DECAY)
        w = tl.load(hp_ptr + _W)
        if LERP_SMALL:
            m = m + w * (g - m)
        else:
            m = g - (g - m) * (1.0 - w)
        v = v * tl.load(hp_ptr + _B2) + tl.load(hp_ptr + _OMB2) * g * g
        bc2 = tl.load(hp_ptr + _BC2)
        if AMSGRAD:
            vmax = tl.maximum(vmax, v)
            denom = tl.div_rn(tl.sqrt_rn(vmax), bc2) + tl.load(hp_ptr + _EPS)
        else:
            denom = tl.div_rn(tl.sqrt_rn(v), bc2) + tl.load(hp_ptr + _EPS)
        x = x - tl.load(hp_ptr + _STEP) * tl.div_rn(m, denom)
        return x, m, v, vmax

    @triton.jit
    def _load_moments(m_ptr, v_ptr, vmax_ptr, offs, mask, AMSGRAD: tl.constexpr):
        """exp_avg, exp_avg_sq and (amsgrad) max_exp_avg_sq in fp32; without
        amsgrad vmax is a stand-in that _adamw_math does not use."""
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
        vmax = v
        if AMSGRAD:
            vmax = tl.load(vmax_ptr + offs, mask=mask).to(tl.float32)
        return m, v, vmax

    @triton.jit
    def adamw_pre_kernel(x_ptr, xt_ptr, y_ptr, gy_ptr, m_ptr, v_ptr, vmax_ptr, norm_ptr, hp_ptr,
                         n, XT: tl.constexpr, Y: tl.constexpr, AMSGRAD: tl.constexpr,
                         MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                         LERP_SMALL: tl.constexpr, ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr):
        """The pass buffers from x (only read): xt when XT, y <- peek(x,
        state, gy) (state untouched) when Y."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        gy = tl.load(gy_ptr + offs, mask=mask).to(tl.float32)
        if XT:
            store_xt(xt_ptr, norm_ptr, hp_ptr, offs, mask, x, gy, ADAPTIVE)
        if Y:
            m, v, vmax = _load_moments(m_ptr, v_ptr, vmax_ptr, offs, mask, AMSGRAD)
            y, _m, _v, _vmax = _adamw_math(x, gy, m, v, vmax, hp_ptr, AMSGRAD, MAXIMIZE, WEIGHT_DECAY,
                                           LERP_SMALL)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def adamw_post_kernel(x_ptr, g_ptr, gy_new_ptr, gy_ptr, m_ptr, v_ptr, vmax_ptr,
                          inv_ptr, ok_ptr, coef_ptr, hp_ptr, n, MIX: tl.constexpr,
                          UNSCALE: tl.constexpr, CLIP: tl.constexpr, AMSGRAD: tl.constexpr,
                          MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, LERP_SMALL: tl.constexpr,
                          BLOCK: tl.constexpr):
        """x, state <- step(x, state, g) [and gy <- gy_new] where the step is
        accepted (*ok_ptr); else nothing is written."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        ok = tl.load(ok_ptr) != 0
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        g = post_gradient(g_ptr, gy_new_ptr, gy_ptr, inv_ptr, coef_ptr, hp_ptr, offs, mask, ok,
                          MIX, UNSCALE, CLIP)
        m, v, vmax = _load_moments(m_ptr, v_ptr, vmax_ptr, offs, mask, AMSGRAD)
        x, m, v, vmax = _adamw_math(x, g, m, v, vmax, hp_ptr, AMSGRAD, MAXIMIZE, WEIGHT_DECAY,
                                    LERP_SMALL)
        upd = mask & ok
        tl.store(x_ptr + offs, x.to(x_ptr.dtype.element_ty), mask=upd)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=upd)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=upd)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, vmax.to(vmax_ptr.dtype.element_ty), mask=upd)


def _moments(state: dict, amsgrad: bool):
    try:
        m, v = state["exp_avg"], state["exp_avg_sq"]
        return m, v, (state["max_exp_avg_sq"] if amsgrad else v)
    except KeyError as e:
        raise ValueError(f"adamw kernels: missing state buffer {e.args[0]!r}") from None


def _meta(fl, cfg) -> dict:
    return dict(AMSGRAD=fl[0], MAXIMIZE=fl[1], WEIGHT_DECAY=fl[2], LERP_SMALL=fl[3],
                BLOCK=cfg.block, num_warps=cfg.num_warps)


def triton_pre(x, xt, y, gy, state, norm, hp, fl, cfg, adaptive: bool = False) -> None:
    """xt and/or y (None: not formed) from x, gy and the state."""
    norm = device_scalar(norm, "norm", x)
    n = x.numel()
    if n and (xt is not None or y is not None):
        m, v, vmax = _moments(state, fl[0])
        launch(adamw_pre_kernel, triton.cdiv(n, cfg.block),
               (x, x if xt is None else xt, x if y is None else y, gy, m, v, vmax, norm, hp, n),
               dict(XT=xt is not None, Y=y is not None, ADAPTIVE=adaptive, **_meta(fl, cfg)))


def triton_post(x, g, gy_new, gy, state, inv, ok, coef, hp, fl, cfg) -> None:
    inv, coef = device_scalar(inv, "inv_scale", x), device_scalar(coef, "coef", x)
    ok = device_scalar(ok, "ok", x, torch.bool)
    n = x.numel()
    if n:
        m, v, vmax = _moments(state, fl[0])
        mix = gy_new is not None
        launch(adamw_post_kernel, triton.cdiv(n, cfg.block),
               (x, g, gy_new if mix else g, gy if mix else g, m, v, vmax,
                g if inv is None else inv, ok, g if coef is None else coef, hp, n),
               dict(MIX=mix, UNSCALE=inv is not None, CLIP=coef is not None, **_meta(fl, cfg)))
