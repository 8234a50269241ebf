"""SAM's perturbation over one segment: x <- x + rho g / (||g|| + eps), the
norm read from device memory. (x_save already holds x.) Under a GradScaler g
holds scaled values and is unscaled as it is loaded."""
from __future__ import annotations

import triton
import triton.language as tl

from . import KernelConfig

@triton.jit
def post_gradient(g_ptr, gy_new_ptr, gy_ptr, inv_ptr, offs, mask, lam, one_minus_lam,
                  MIX: tl.constexpr, UNSCALE: tl.constexpr):
    """The gradient a post kernel steps with: gxt, unscaled by the GradScaler's
    1/scale (from device memory) when UNSCALE, mixed (1 - lam) gxt + lam gy_new
    when MIX, which also commits gy <- gy_new (unscaled) for the next step."""
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    if UNSCALE:
        inv = tl.load(inv_ptr)
        g = g * inv
    if MIX:
        gy_raw = tl.load(gy_new_ptr + offs, mask=mask)
        if UNSCALE:
            gy_new = gy_raw.to(tl.float32) * inv
            g = g * one_minus_lam + lam * gy_new
            tl.store(gy_ptr + offs, gy_new.to(gy_ptr.dtype.element_ty), mask=mask)
        else:
            g = g * one_minus_lam + lam * gy_raw.to(tl.float32)
            tl.store(gy_ptr + offs, gy_raw, mask=mask)      # bit-exact commit
    return g

@triton.jit
def store_pre(x_ptr, x_save_ptr, y_ptr, norm_ptr, offs, mask, x_raw, x, gy, y, rho):
    """The pre kernels' outputs: x_save <- x (bit-exact), the model's x <- xt =
    x + rho gy / (||gy|| + eps) with the norm read from the device (last step's
    check), never the host, and y <- the peek."""
    scale = tl.div_rn(rho, tl.load(norm_ptr) + 1e-12)
    tl.store(x_save_ptr + offs, x_raw, mask=mask)
    tl.store(x_ptr + offs, (x + scale * gy).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def perturb_kernel(x_ptr, g_ptr, norm_ptr, inv_ptr, n, rho, UNSCALE: tl.constexpr,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    if UNSCALE:
        g = g * tl.load(inv_ptr)         # 1 / loss scale, from the device
    scale = tl.div_rn(rho, tl.load(norm_ptr) + 1e-12)
    tl.store(x_ptr + offs, (x + scale * g).to(x_ptr.dtype.element_ty), mask=mask)


def perturb(x, g, norm, rho: float, cfg: KernelConfig, inv_scale=None) -> None:
    """x <- x + rho g / (norm + eps), g multiplied by `inv_scale` (a 1-element
    fp32 device tensor) first when given; `norm` is then that of the unscaled g."""
    n = x.numel()
    if n == 0:
        return
    perturb_kernel[(triton.cdiv(n, cfg.block),)](
        x, g, norm, norm if inv_scale is None else inv_scale, n, float(rho),
        UNSCALE=inv_scale is not None, BLOCK=cfg.block, num_warps=cfg.num_warps)
