"""What every base optimizer's update shares: the perturbation, the mix and
unscale of the gradients, the clipping coefficient, and the step's check
(losses and gradients finite, and the next perturbation's norm), each once in
torch ops and once as Triton code.

Triton is optional: without it the torch reference runs everywhere. Whether
`@triton.jit` builds GPU or interpreter kernels is decided when this module
is imported (TRITON_INTERPRET=1 for CPU tensors).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .. import _cuda
from .table import LAM, OML, RHO

try:
    import triton
    import triton.language as tl
except ImportError:                       # the torch reference still runs
    triton = None

EPS = 1e-12                               # in ||g|| + eps (README algorithm)
CLIP_EPS = 1e-6                           # in max_norm / (||g|| + eps), as clip_grad_norm_


# ------------------------------------------------------------------ torch
def upcast(t: torch.Tensor) -> torch.Tensor:
    """fp32 math for 16-bit tensors; fp32 and fp64 keep their precision."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def unscaled(t: torch.Tensor, inv: Optional[torch.Tensor]) -> torch.Tensor:
    """The gradient in fp32 math, divided by the loss scale if any."""
    t = upcast(t)
    return t if inv is None else t * inv


def check_number(group: dict, key: str, where: str, value=None) -> float:
    """A hyperparameter as a finite float, or a ValueError naming it and its group."""
    if value is None:
        if key not in group:
            raise ValueError(f"{where}: the hyperparameter {key!r} is missing from the param group; "
                             f"set it again (e.g. opt.param_groups[i][{key!r}] = ...)")
        value = group[key]
    v = value
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{where}: {key} must be a number or a 1-element tensor, got a tensor "
                             f"of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: {key} must be a finite number, got {value!r}")
    return float(v)


def wide(dtype: torch.dtype) -> bool:
    """fp32 or fp64: the torch backend computes in the buffer's own dtype, in place."""
    return dtype in (torch.float32, torch.float64)


def perturb_into(xt: torch.Tensor, x: torch.Tensor, g: torch.Tensor, inv: Optional[torch.Tensor],
                 h: torch.Tensor, norm: torch.Tensor, adaptive: bool) -> None:
    """xt <- x + rho g / (||g|| + eps) (adaptive: rho x^2 g / ...), g divided
    by the loss scale when `inv`: written into xt, no temporary."""
    scale = h[RHO] / (norm + EPS)
    if inv is None and not adaptive:
        torch.addcmul(x, g, scale, out=xt)
        return
    torch.mul(g, inv, out=xt) if inv is not None else xt.copy_(g)
    if adaptive:
        xt.mul_(x).mul_(x)
    xt.mul_(scale).add_(x)


def losses_finite(losses: Sequence[torch.Tensor], device) -> torch.Tensor:
    """Every loss finite, as a bool tensor on `device` (no host read)."""
    ok = torch.ones((), dtype=torch.bool, device=device)
    for loss in losses:
        ok &= torch.isfinite(loss.detach()).reshape(()).to(device, non_blocking=True)
    return ok


def lean_check(slabs: Sequence, losses: Sequence[torch.Tensor], grads: Sequence[str],
               sq: Optional[str], inv: Optional[torch.Tensor], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """torch_check in one reduction per buffer and no full-size temporary:
    finiteness from the buffer's min and max (NaN propagates), the sum of
    squares as a dot product (its own finiteness checks the squared buffer).
    16-bit buffers and unscaling (a GradScaler) take torch_check's way."""
    ok = losses_finite(losses, device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for b in slabs:
        for name in grads:
            t = getattr(b, name)
            if name == sq or t.numel() == 0:
                continue
            if wide(t.dtype):
                lo, hi = torch.aminmax(t)
                ok &= torch.isfinite(lo) & torch.isfinite(hi)
            else:
                ok &= torch.isfinite(t).all()
        if sq is not None:
            t = getattr(b, sq)
            if inv is None and wide(t.dtype) and t.numel():
                total += torch.dot(t, t).float()
            else:
                total += unscaled(t, inv).float().square().sum()
    ok &= torch.isfinite(total)
    return ok, total


def perturbation(x: torch.Tensor, g: torch.Tensor, h: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """x + rho g / (||g|| + eps), rho from the row `h`, ||g|| on the device."""
    return upcast(x) + (h[RHO] / (norm + EPS)) * g


def mix(g: torch.Tensor, gy_new: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(1 - lam) g + lam gy_new (README algorithm, step 4)."""
    return g * h[OML] + gy_new * h[LAM]


def clip_coef(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6))."""
    return torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)


def torch_check(slabs: Sequence, losses: Sequence[torch.Tensor], grads: Sequence[str],
                sq: Optional[str], inv: Optional[torch.Tensor], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ok, sum of squares): every loss and every named gradient buffer
    finite, and the fp32 sum of squares of the `sq` buffers (unscaled)."""
    ok = losses_finite(losses, device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for b in slabs:
        for name in grads:
            ok &= torch.isfinite(getattr(b, name)).all()
        if sq is not None:
            total += unscaled(getattr(b, sq), inv).float().square().sum()
    ok &= torch.isfinite(total)
    return ok, total


# ------------------------------------------------------------------ Triton
@dataclass(frozen=True)
class KernelConfig:
    """Launch shape of the kernels on one device type.

    ``block``: elements per program of the elementwise kernels. ``reduce_block``
    x ``reduce_iters``: elements per program of the check pass, i.e. per
    partial sum. ``final_block``: lanes of the one-program second stage. The
    partial sums, and so the norm bits, depend only on these and on the data:
    two devices with the same config and data give bit-identical norms.
    """
    block: int = 2048
    num_warps: int = 8
    reduce_block: int = 1024
    reduce_iters: int = 8
    reduce_warps: int = 8
    final_block: int = 1024
    final_warps: int = 8

    def __post_init__(self):
        for name in ("block", "reduce_block", "final_block"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {v}")
        for name in ("num_warps", "reduce_warps", "final_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 1, got {v}")
        if self.reduce_iters < 1:
            raise ValueError(f"KernelConfig.reduce_iters must be >= 1, got {self.reduce_iters}")


# CUDA: 8 fp32 per thread per buffer (two 16-byte accesses per thread), and
# one partial sum per 8192 elements so the one-program second stage stays short
# (~30k partials at 2.5e8 elements). Picked without a GPU at hand: tune it with
# `python bench/bench_kernels.py --block B --num-warps W` on the target GPU.
CUDA_CONFIG = KernelConfig()
# Interpreter: each program costs ~1 ms of Python, whatever its size, so few
# large programs.
INTERPRETER_CONFIG = KernelConfig(block=16384, num_warps=1, reduce_block=16384, reduce_iters=1,
                                  reduce_warps=1, final_block=1024, final_warps=1)


def interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_config(device: torch.device) -> KernelConfig:
    return INTERPRETER_CONFIG if device.type == "cpu" or interpret_requested() else CUDA_CONFIG


def kernels_interpreted() -> bool:
    """True when this module's kernels are interpreter kernels (CPU tensors)."""
    return triton is not None and type(check_partials_kernel).__name__ == "InterpretedFunction"


def device_scalar(t, what: str, like, dtype=torch.float32):
    """A kernel's scalar read from device memory: a 1-element tensor of `dtype`
    on the buffers' device (None passes through)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != dtype:
        got = (f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor)
               else type(t).__name__)
        kind = {torch.float32: "fp32", torch.bool: "bool"}.get(dtype, str(dtype))
        raise TypeError(f"Triton kernels: {what} must be a 1-element {kind} tensor on the "
                        f"device (the kernel reads it from device memory), got {got}")
    device = like.device if isinstance(like, torch.Tensor) else torch.device(like)
    if t.device != device:
        raise ValueError(f"Triton kernels: {what} is on {t.device}, the buffers on {device}")
    return t


def launch(kernel, n_programs: int, args: tuple, meta: dict) -> None:
    """Every Triton launch goes through the CUDA runtime seam (see _cuda),
    from inside a registered op (ops.py) whose schema says what it writes."""
    _cuda.launch(kernel, (n_programs,), args, meta)


if triton is not None:
    INF = tl.constexpr(float("inf"))
    _RHO = tl.constexpr(RHO)
    _LAM = tl.constexpr(LAM)
    _OML = tl.constexpr(OML)

    @triton.jit
    def store_xt(xt_ptr, norm_ptr, hp_ptr, offs, mask, x, gy, ADAPTIVE: tl.constexpr):
        """The x̃ pass buffer <- xt = x + rho gy / (||gy|| + eps) (adaptive: rho
        x^2 gy / (||x gy|| + eps)), the norm read from the device, never the
        host. x itself is not written: the x̃-pass runs on the pass buffer."""
        scale = tl.div_rn(tl.load(hp_ptr + _RHO), tl.load(norm_ptr) + 1e-12)
        if ADAPTIVE:
            gy = gy * x * x
        tl.store(xt_ptr + offs, (x + scale * gy).to(xt_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def post_gradient(g_ptr, gy_new_ptr, gy_ptr, inv_ptr, coef_ptr, hp_ptr, offs, mask, ok,
                      MIX: tl.constexpr, UNSCALE: tl.constexpr, CLIP: tl.constexpr):
        """The gradient a post kernel steps with: gxt, unscaled by the
        GradScaler's 1/scale (from device memory) when UNSCALE, mixed
        (1 - lam) gxt + lam gy_new when MIX, which also commits gy <- gy_new
        (unscaled) where the step is accepted, times the clipping factor
        when CLIP."""
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        if UNSCALE:
            inv = tl.load(inv_ptr)
            g = g * inv
        if MIX:
            gy_raw = tl.load(gy_new_ptr + offs, mask=mask)
            if UNSCALE:
                gy_new = gy_raw.to(tl.float32) * inv
                tl.store(gy_ptr + offs, gy_new.to(gy_ptr.dtype.element_ty), mask=mask & ok)
            else:
                gy_new = gy_raw.to(tl.float32)
                tl.store(gy_ptr + offs, gy_raw, mask=mask & ok)      # bit-exact commit
            g = g * tl.load(hp_ptr + _OML) + tl.load(hp_ptr + _LAM) * gy_new
        if CLIP:
            g = g * tl.load(coef_ptr)
        return g

    @triton.jit
    def perturb_kernel(x_ptr, xt_ptr, g_ptr, norm_ptr, inv_ptr, hp_ptr, n, UNSCALE: tl.constexpr,
                       ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr):
        """SAM: the pass buffer xt <- x + rho g / (||g|| + eps) (adaptive: rho
        x^2 g / (||x g|| + eps)); x is only read."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        if UNSCALE:
            g = g * tl.load(inv_ptr)         # 1 / loss scale, from the device
        if ADAPTIVE:
            g = g * x * x
        scale = tl.div_rn(tl.load(hp_ptr + _RHO), tl.load(norm_ptr) + 1e-12)
        tl.store(xt_ptr + offs, (x + scale * g).to(xt_ptr.dtype.element_ty), mask=mask)

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


def triton_perturb(x, xt, g, norm, hp, cfg: KernelConfig, inv=None, adaptive: bool = False) -> None:
    norm, inv = device_scalar(norm, "norm", x), device_scalar(inv, "inv_scale", x)
    n = x.numel()
    if n:
        launch(perturb_kernel, triton.cdiv(n, cfg.block),
               (x, xt, g, norm, norm if inv is None else inv, hp, n),
               dict(UNSCALE=inv is not None, ADAPTIVE=adaptive, BLOCK=cfg.block,
                    num_warps=cfg.num_warps))


def require_triton(device: torch.device) -> None:
    """Raise a RuntimeError that says what to change when the kernels cannot
    run on `device` here."""
    if device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"backend='triton' runs on CUDA tensors (and on CPU tensors under "
                           f"TRITON_INTERPRET=1), not on {device.type}; use backend='torch'")
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package; install it "
                           "(pip install triton) or use backend='torch'")
    if device.type == "cpu":
        if not interpret_requested():
            raise RuntimeError("backend='triton' on CPU tensors runs the kernels in Triton's "
                               "interpreter: set the environment variable TRITON_INTERPRET=1 before "
                               "importing triton and sampa_fused, or use backend='torch' "
                               "(backend='auto' picks it for CPU tensors)")
        if not kernels_interpreted():
            raise RuntimeError("backend='triton' on CPU tensors: the kernels were imported before "
                               "TRITON_INTERPRET=1 was set, so they were built for the GPU; set "
                               "TRITON_INTERPRET=1 before the first import of triton and sampa_fused")
    elif not torch.cuda.is_available():
        raise RuntimeError(f"backend='triton': the parameters are on {device} but CUDA is not "
                           "available in this process; use backend='torch'")
    elif kernels_interpreted():
        import warnings
        warnings.warn("backend='triton' on CUDA tensors with TRITON_INTERPRET=1: the kernels run "
                      "in the interpreter on the host (slow, and it synchronises); unset "
                      "TRITON_INTERPRET for real GPU kernels", RuntimeWarning, stacklevel=4)


def triton_check(slabs: Sequence, losses: Sequence[torch.Tensor], grads: Sequence[str],
                 sq: Optional[str], inv: Optional[torch.Tensor], device,
                 cfg: KernelConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """torch_check in two deterministic stages. Stage 1 (one launch per slab
    and pair of buffers): each program reduces a fixed chunk to one partial
    sum of squares and one "saw a non-finite value" flag in its own slot.
    Stage 2 (one program) sums the partials in a fixed order and checks the
    losses. No atomics: the result depends only on the data and the config.
    The squared buffer needs no finite check of its own: a NaN or inf makes
    the sum of squares non-finite, which refuses the step as well."""
    if len(losses) > 2:   # the final kernel has two loss slots: a step checks at most two
        raise ValueError(f"triton_check checks at most two losses (a step's x̃- and y-pass), got {len(losses)}")
    if inv is not None:
        inv = device_scalar(inv, "inv_scale", device)
    per_prog = cfg.reduce_block * cfg.reduce_iters
    launches: List[tuple] = []
    n_slots = 0
    for b in slabs:
        s_buf = getattr(b, sq) if sq is not None else None
        checks = [getattr(b, a) for a in grads if a != sq]
        chunks = [checks[i:i + 2] for i in range(0, len(checks), 2)] or [[]]
        for k, chunk in enumerate(chunks):
            s = s_buf if k == 0 else None
            if s is None and not chunk:
                continue
            n = (s if s is not None else chunk[0]).numel()
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
        unscale = s is not None and inv is not None
        launch(check_partials_kernel, nprog,
               (first, a, b, parts, inv if unscale else parts, n, slot, n_slots),
               dict(SQ=s is not None, UNSCALE=unscale, N_CHECK=len(chunk), BLOCK=cfg.reduce_block,
                    ITERS=cfg.reduce_iters, num_warps=cfg.reduce_warps))
    sq_out = torch.empty((), dtype=torch.float32, device=device)
    ok_out = torch.empty((), dtype=torch.bool, device=device)
    ls = [loss.detach().reshape(()).to(device, non_blocking=True) for loss in losses]
    l0 = ls[0] if len(ls) > 0 else sq_out
    l1 = ls[1] if len(ls) > 1 else l0
    launch(check_final_kernel, 1, (parts, n_slots, l0, l1, sq_out, ok_out),
           dict(N_LOSS=min(len(ls), 2), BLOCK=cfg.final_block, num_warps=cfg.final_warps))
    return ok_out, sq_out
