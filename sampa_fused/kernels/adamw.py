"""AdamW (decoupled weight decay, bias correction, amsgrad, maximize) as two
fused kernels over one param-group segment of a flat slab.

pre  (SAMPa steps 1-2): reads x, gy, exp_avg, exp_avg_sq [, max_exp_avg_sq];
     writes x_save = x, x = xt, y = peek (the state is left untouched).
post (SAMPa steps 4-6 / SAM's step): reads x_save, g [, gy_new], the state;
     writes x and the state [and gy = gy_new]. With a loss scale, g and gy_new
     are unscaled as they are loaded (the committed gy is unscaled).

The op order follows `sampa_fused.rules.AdamWRule.update` (torch.optim.AdamW,
single-tensor path): lerp for the first moment, mul + addcmul for the second,
denom = sqrt(v) / sqrt(1 - b2^t) + eps, x -= step_size * m / denom.
Bias corrections are computed on the host in double, as torch does.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import KernelConfig
from .perturb import post_gradient, store_pre


@triton.jit
def _adamw_math(x, g, m, v, vmax, decay, w, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
                WEIGHT_DECAY: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                LERP_SMALL: tl.constexpr):
    # One torch.optim.AdamW step in fp32; returns (x, m, v, vmax).
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY:
        x = x * decay
    # torch.lerp picks its formula by the weight (w = 1 - beta1) for accuracy.
    if LERP_SMALL:
        m = m + w * (g - m)
    else:
        m = g - (g - m) * (1.0 - w)
    v = v * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        vmax = tl.maximum(vmax, v)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    x = x - step_size * tl.div_rn(m, denom)
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
def adamw_pre_kernel(x_ptr, x_save_ptr, y_ptr, gy_ptr, m_ptr, v_ptr, vmax_ptr, norm_ptr, n,
                     rho, decay, w, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
                     WEIGHT_DECAY: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                     LERP_SMALL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x_raw = tl.load(x_ptr + offs, mask=mask)
    x = x_raw.to(tl.float32)
    gy = tl.load(gy_ptr + offs, mask=mask).to(tl.float32)
    m, v, vmax = _load_moments(m_ptr, v_ptr, vmax_ptr, offs, mask, AMSGRAD)
    y, _m, _v, _vmax = _adamw_math(x, gy, m, v, vmax, decay, w, beta2, one_minus_beta2,
                                   step_size, bc2_sqrt, eps,
                                   WEIGHT_DECAY, AMSGRAD, MAXIMIZE, LERP_SMALL)
    store_pre(x_ptr, x_save_ptr, y_ptr, norm_ptr, offs, mask, x_raw, x, gy, y, rho)


@triton.jit
def adamw_post_kernel(x_ptr, x_save_ptr, g_ptr, gy_new_ptr, gy_ptr, m_ptr, v_ptr, vmax_ptr,
                      inv_ptr, n, lam, one_minus_lam, decay, w, beta2, one_minus_beta2, step_size,
                      bc2_sqrt, eps, MIX: tl.constexpr, UNSCALE: tl.constexpr,
                      WEIGHT_DECAY: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                      LERP_SMALL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_save_ptr + offs, mask=mask).to(tl.float32)
    g = post_gradient(g_ptr, gy_new_ptr, gy_ptr, inv_ptr, offs, mask, lam, one_minus_lam, MIX, UNSCALE)
    m, v, vmax = _load_moments(m_ptr, v_ptr, vmax_ptr, offs, mask, AMSGRAD)
    x, m, v, vmax = _adamw_math(x, g, m, v, vmax, decay, w, beta2, one_minus_beta2,
                                step_size, bc2_sqrt, eps,
                                WEIGHT_DECAY, AMSGRAD, MAXIMIZE, LERP_SMALL)
    tl.store(x_ptr + offs, x.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    if AMSGRAD:
        tl.store(vmax_ptr + offs, vmax.to(vmax_ptr.dtype.element_ty), mask=mask)


def _args(hp: dict, step: int):
    """Host scalars (double math, as torch.optim.AdamW) and flags; t = step + 1."""
    t = step + 1
    lr, b1, b2, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["weight_decay"]
    w = 1 - b1
    scalars = (float(1 - lr * wd), float(w), float(b2), float(1 - b2),
               float(lr / (1 - b1 ** t)), float((1 - b2 ** t) ** 0.5), float(hp["eps"]))
    flags = dict(WEIGHT_DECAY=wd != 0, AMSGRAD=bool(hp["amsgrad"]), MAXIMIZE=bool(hp["maximize"]),
                 LERP_SMALL=abs(float(w)) < 0.5)
    return scalars, flags


def _state(state: dict, amsgrad: bool):
    try:
        m, v = state["exp_avg"], state["exp_avg_sq"]
        vmax = state["max_exp_avg_sq"] if amsgrad else v
    except KeyError as e:
        raise ValueError(f"adamw kernels: missing state buffer {e.args[0]!r}") from None
    return m, v, vmax


def adamw_pre(x, x_save, y, gy, state: dict, norm, rho: float, hp: dict, step: int,
              cfg: KernelConfig) -> None:
    """x_save <- x; y <- AdamW peek from (x, state) with gy; x <- x + rho gy / (norm + eps)."""
    n = x.numel()
    if n == 0:
        return
    scalars, flags = _args(hp, step)
    m, v, vmax = _state(state, flags["AMSGRAD"])
    adamw_pre_kernel[(triton.cdiv(n, cfg.block),)](
        x, x_save, y, gy, m, v, vmax, norm, n, float(rho), *scalars,
        **flags, BLOCK=cfg.block, num_warps=cfg.num_warps)


def adamw_post(x, x_save, g, state: dict, hp: dict, step: int, cfg: KernelConfig,
               gy_new=None, gy=None, lam: float = 0.0, inv_scale=None) -> None:
    """x, state <- AdamW step from (x_save, state) with g, or with
    (1-lam) g + lam gy_new (and gy <- gy_new) when gy_new is given. With
    `inv_scale` (a 1-element fp32 device tensor) g and gy_new are multiplied by
    it as they are loaded, and gy gets the unscaled gy_new."""
    n = x.numel()
    if n == 0:
        return
    scalars, flags = _args(hp, step)
    m, v, vmax = _state(state, flags["AMSGRAD"])
    mix = gy_new is not None
    if mix and gy is None:
        raise ValueError("adamw_post: gy_new given without gy to commit it to")
    adamw_post_kernel[(triton.cdiv(n, cfg.block),)](
        x, x_save, g, gy_new if mix else g, gy if mix else g, m, v, vmax,
        g if inv_scale is None else inv_scale, n, float(lam), float(1 - lam), *scalars,
        MIX=mix, UNSCALE=inv_scale is not None, **flags, BLOCK=cfg.block, num_warps=cfg.num_warps)
