"""Triton kernels of the fused backend (``backend="triton"``).

One kernel per (rule, stage), specialised with ``tl.constexpr`` flags so that
unused work compiles away:

- ``sgd.py``     SGD pre-gradient (x_save, xt, y peek) and post-gradient (step) kernels
- ``adamw.py``   the same for AdamW
- ``perturb.py`` SAM's perturbation x <- x + rho g / (||g|| + eps)
- ``reduce.py``  the fused finite check + sum of squares, in two deterministic stages

Every kernel reads fp32 / bf16 / fp16 buffers, computes in fp32 and stores in
the buffer's dtype; offsets are int64 so buffers may exceed 2^31 elements.
Scales such as rho / (||gy|| + eps), and a GradScaler's 1 / scale (``UNSCALE``
kernels multiply the gradients by it as they load them), are read from device
memory.

Importing the submodules imports triton. Whether ``@triton.jit`` builds GPU
kernels or interpreter kernels is decided when they are imported (from the
``TRITON_INTERPRET`` environment variable), so set it first for CPU tensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


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
    """True when the imported kernels are interpreter kernels (CPU tensors)."""
    from .sgd import sgd_pre_kernel
    return type(sgd_pre_kernel).__name__ == "InterpretedFunction"
