"""SAM's perturbation over one segment: x <- x + rho g / (||g|| + eps), the
norm read from device memory. (x_save already holds x.)"""
from __future__ import annotations

import triton
import triton.language as tl

from . import KernelConfig


@triton.jit
def perturb_kernel(x_ptr, g_ptr, norm_ptr, n, rho, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    scale = tl.div_rn(rho, tl.load(norm_ptr) + 1e-12)
    tl.store(x_ptr + offs, (x + scale * g).to(x_ptr.dtype.element_ty), mask=mask)


def perturb(x, g, norm, rho: float, cfg: KernelConfig) -> None:
    n = x.numel()
    if n == 0:
        return
    perturb_kernel[(triton.cdiv(n, cfg.block),)](x, g, norm, n, float(rho),
                                                  BLOCK=cfg.block, num_warps=cfg.num_warps)
