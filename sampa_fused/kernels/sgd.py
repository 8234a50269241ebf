"""SGD (momentum, dampening, nesterov, weight decay, maximize) as two fused
kernels over one param-group segment of a flat slab.

pre  (SAMPa steps 1-2): reads x, gy [, buf]; writes x_save = x,
     x = xt = x + rho gy / (||gy|| + eps), y = peek(x, buf, gy).
post (SAMPa steps 4-6 / SAM's step): reads x_save, g [, gy_new] [, buf];
     g_t = (1 - lam) g + lam gy_new; writes x, buf = base_step(x_save, buf, g_t)
     [and gy = gy_new, the commit]. With a loss scale, g and gy_new are
     unscaled as they are loaded (g_t and the committed gy are unscaled).

The op order follows `sampa_fused.rules.SGDRule.update` (torch.optim.SGD).
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import KernelConfig
from .perturb import post_gradient, store_pre


@triton.jit
def _sgd_math(x, g, buf, lr, momentum, damp1, weight_decay,
              MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
              WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr):
    # One torch.optim.SGD step in fp32; returns (new x, new momentum buffer).
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY:
        g = g + weight_decay * x
    if MOMENTUM:
        if FIRST:
            buf = g                      # torch: buf = clone(g) on the first step
        else:
            buf = buf * momentum + damp1 * g
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    return x - lr * g, buf


@triton.jit
def sgd_pre_kernel(x_ptr, x_save_ptr, y_ptr, gy_ptr, buf_ptr, norm_ptr, n,
                   rho, lr, momentum, damp1, weight_decay,
                   MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
                   WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x_raw = tl.load(x_ptr + offs, mask=mask)
    x = x_raw.to(tl.float32)
    gy = tl.load(gy_ptr + offs, mask=mask).to(tl.float32)
    buf = gy                             # placeholder when there is no buffer to read
    if MOMENTUM:
        if not FIRST:
            buf = tl.load(buf_ptr + offs, mask=mask).to(tl.float32)
    y, _ = _sgd_math(x, gy, buf, lr, momentum, damp1, weight_decay,
                     MOMENTUM, FIRST, NESTEROV, WEIGHT_DECAY, MAXIMIZE)
    store_pre(x_ptr, x_save_ptr, y_ptr, norm_ptr, offs, mask, x_raw, x, gy, y, rho)


@triton.jit
def sgd_post_kernel(x_ptr, x_save_ptr, g_ptr, gy_new_ptr, gy_ptr, buf_ptr, inv_ptr, n,
                    lam, one_minus_lam, lr, momentum, damp1, weight_decay,
                    MIX: tl.constexpr, UNSCALE: tl.constexpr, MOMENTUM: tl.constexpr,
                    FIRST: tl.constexpr, NESTEROV: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                    MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_save_ptr + offs, mask=mask).to(tl.float32)
    g = post_gradient(g_ptr, gy_new_ptr, gy_ptr, inv_ptr, offs, mask, lam, one_minus_lam, MIX, UNSCALE)
    buf = g
    if MOMENTUM:
        if not FIRST:
            buf = tl.load(buf_ptr + offs, mask=mask).to(tl.float32)
    x, buf = _sgd_math(x, g, buf, lr, momentum, damp1, weight_decay,
                       MOMENTUM, FIRST, NESTEROV, WEIGHT_DECAY, MAXIMIZE)
    tl.store(x_ptr + offs, x.to(x_ptr.dtype.element_ty), mask=mask)
    if MOMENTUM:
        tl.store(buf_ptr + offs, buf.to(buf_ptr.dtype.element_ty), mask=mask)


def _flags(hp: dict, step: int) -> dict:
    return dict(MOMENTUM=hp["momentum"] != 0, FIRST=step == 0, NESTEROV=bool(hp["nesterov"]),
                WEIGHT_DECAY=hp["weight_decay"] != 0, MAXIMIZE=bool(hp["maximize"]))


def _scalars(hp: dict):
    return (float(hp["lr"]), float(hp["momentum"]), float(1 - hp["dampening"]),
            float(hp["weight_decay"]))


def sgd_pre(x, x_save, y, gy, buf, norm, rho: float, hp: dict, step: int, cfg: KernelConfig) -> None:
    """x_save <- x; y <- SGD peek from (x, buf) with gy; x <- x + rho gy / (norm + eps).
    `buf` may be None when momentum is 0; `norm` is a 0-dim fp32 device tensor."""
    n = x.numel()
    if n == 0:
        return
    flags = _flags(hp, step)
    if flags["MOMENTUM"] and not flags["FIRST"] and buf is None:
        raise ValueError("sgd_pre: momentum != 0 after the first step needs the momentum buffer")
    sgd_pre_kernel[(triton.cdiv(n, cfg.block),)](
        x, x_save, y, gy, x if buf is None else buf, norm, n, float(rho), *_scalars(hp),
        **flags, BLOCK=cfg.block, num_warps=cfg.num_warps)


def sgd_post(x, x_save, g, buf, hp: dict, step: int, cfg: KernelConfig,
             gy_new=None, gy=None, lam: float = 0.0, inv_scale=None) -> None:
    """x, buf <- SGD step from (x_save, buf) with g, or with (1-lam) g + lam gy_new
    (and gy <- gy_new) when gy_new is given. With `inv_scale` (a 1-element fp32
    device tensor) g and gy_new are multiplied by it as they are loaded, and gy
    gets the unscaled gy_new; g and gy_new themselves are not written."""
    n = x.numel()
    if n == 0:
        return
    flags = _flags(hp, step)
    if flags["MOMENTUM"] and buf is None:
        raise ValueError("sgd_post: momentum != 0 needs the momentum buffer")
    mix = gy_new is not None
    if mix and gy is None:
        raise ValueError("sgd_post: gy_new given without gy to commit it to")
    sgd_post_kernel[(triton.cdiv(n, cfg.block),)](
        x, x_save, g, gy_new if mix else g, gy if mix else g, x if buf is None else buf,
        g if inv_scale is None else inv_scale, n, float(lam), float(1 - lam), *_scalars(hp),
        MIX=mix, UNSCALE=inv_scale is not None, **flags, BLOCK=cfg.block, num_warps=cfg.num_warps)
