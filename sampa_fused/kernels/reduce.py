"""The step's check: are the losses and the named gradient buffers finite, and
the fp32 sum of squares of one buffer (the next step's ||gy||^2), fused in one
read of each buffer.

Stage 1 (one launch per slab): each program reduces a fixed chunk of
`reduce_block * reduce_iters` elements to one partial sum of squares and one
"saw a non-finite value" flag, written to its own slot of a partials buffer.
Stage 2 (one program): sums the partials in a fixed order and checks the
losses. No atomics: the result depends only on the data and the launch config,
so two devices holding the same data compute bit-identical norms. Under a
GradScaler the squared buffer is multiplied by 1 / scale (read from device
memory) as it is loaded, so the norm is of the unscaled gradient.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import KernelConfig

INF = tl.constexpr(float("inf"))


@triton.jit
def check_partials_kernel(sq_ptr, a_ptr, b_ptr, parts_ptr, inv_ptr, n, slot, n_slots,
                          SQ: tl.constexpr, UNSCALE: tl.constexpr, N_CHECK: tl.constexpr,
                          BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    base = pid * (BLOCK * ITERS)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.float32)
    if UNSCALE:
        inv = tl.load(inv_ptr)           # 1 / loss scale: the norm is of the unscaled values
    for i in tl.static_range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if SQ:
            s = tl.load(sq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if UNSCALE:
                s = s * inv
            acc += s * s
        if N_CHECK >= 1:
            a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            bad = tl.maximum(bad, tl.where(tl.abs(a) < INF, 0.0, 1.0))   # NaN fails too
        if N_CHECK >= 2:
            b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            bad = tl.maximum(bad, tl.where(tl.abs(b) < INF, 0.0, 1.0))
    tl.store(parts_ptr + slot + pid, tl.sum(acc, axis=0))
    tl.store(parts_ptr + n_slots + slot + pid, tl.max(bad, axis=0))


@triton.jit
def check_final_kernel(parts_ptr, n_slots, loss0_ptr, loss1_ptr, sq_out_ptr, ok_out_ptr,
                       N_LOSS: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_slots, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_slots
        acc += tl.load(parts_ptr + offs, mask=mask, other=0.0)
        bad = tl.maximum(bad, tl.load(parts_ptr + n_slots + offs, mask=mask, other=0.0))
    sq = tl.sum(acc, axis=0)
    # An overflowing (or NaN) sum of squares also refuses the step.
    ok = (tl.max(bad, axis=0) == 0.0) & (sq < INF)
    if N_LOSS >= 1:
        ok = ok & (tl.abs(tl.load(loss0_ptr)) < INF)   # in the loss's own dtype
    if N_LOSS >= 2:
        ok = ok & (tl.abs(tl.load(loss1_ptr)) < INF)
    tl.store(sq_out_ptr, sq)
    tl.store(ok_out_ptr, ok)


def check(buffers: Sequence[Tuple[Optional[torch.Tensor], Sequence[torch.Tensor]]],
          losses: Sequence[torch.Tensor], device: torch.device, cfg: KernelConfig,
          inv_scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """`buffers`: per slab, (the buffer to square or None, the buffers to check
    for finiteness). `losses`: 0-dim tensors on `device`. `inv_scale`: None or
    a 1-element fp32 tensor on `device` (1 / loss scale) that multiplies the
    squared buffer's values before squaring; the finite checks are unaffected.
    Returns (ok, sq): a 0-dim bool and a 0-dim fp32 tensor on `device`. No host
    synchronisation."""
    per_prog = cfg.reduce_block * cfg.reduce_iters
    launches: List[tuple] = []
    n_slots = 0
    for sq, checks in buffers:
        chunks = [list(checks[i:i + 2]) for i in range(0, len(checks), 2)] or [[]]
        for k, chunk in enumerate(chunks):
            s = sq if k == 0 else None
            if s is None and not chunk:
                continue
            n = (s if s is not None else chunk[0]).numel()
            for t in chunk:
                if t.numel() != n:
                    raise ValueError(f"check: buffers of one slab differ in size ({t.numel()} != {n})")
            if n == 0:
                continue
            nprog = triton.cdiv(n, per_prog)
            launches.append((s, chunk, n, n_slots, nprog))
            n_slots += nprog
    parts = torch.empty(max(2 * n_slots, 1), dtype=torch.float32, device=device)
    for s, chunk, n, slot, nprog in launches:
        first = s if s is not None else chunk[0]
        a = chunk[0] if chunk else first
        b = chunk[1] if len(chunk) > 1 else first
        unscale = s is not None and inv_scale is not None
        check_partials_kernel[(nprog,)](first, a, b, parts, inv_scale if unscale else parts,
                                        n, slot, n_slots,
                                        SQ=s is not None, UNSCALE=unscale, N_CHECK=len(chunk),
                                        BLOCK=cfg.reduce_block, ITERS=cfg.reduce_iters,
                                        num_warps=cfg.reduce_warps)
    sq_out = torch.empty((), dtype=torch.float32, device=device)
    ok_out = torch.empty((), dtype=torch.bool, device=device)
    l0 = losses[0] if len(losses) > 0 else sq_out
    l1 = losses[1] if len(losses) > 1 else l0
    check_final_kernel[(1,)](parts, n_slots, l0, l1, sq_out, ok_out,
                             N_LOSS=min(len(losses), 2), BLOCK=cfg.final_block,
                             num_warps=cfg.final_warps)
    if len(losses) > 2:   # not used by the optimizer (at most two losses a check)
        ok_out = ok_out & torch.isfinite(torch.stack([l.double() for l in losses[2:]])).all()
    return ok_out, sq_out
