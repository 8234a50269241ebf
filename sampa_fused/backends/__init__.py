"""Backends: where the elementwise work of a step runs.

A backend implements, per flat slab `b` (see `sampa_fused.optim.SlabBuffers`)
and per param-group segment `seg` of it (`b.x[seg.start:seg.end]`, ...):

- `sampa_pre(b, seg, rule, hp, step, rho, gy_norm)`: SPEC 1 steps 1-2.
  x_save <- x;  x <- x + rho * gy / (gy_norm + eps);  y <- peek(x, state, gy)
- `sampa_post(b, seg, rule, hp, step, lam)`: SPEC 1 steps 4-6.
  x, state <- base_step(x_save, state, (1 - lam) * g + lam * gy_new);  gy <- gy_new
- `sam_perturb(b, seg, rho, g_norm)`: x <- x + rho * g / (g_norm + eps)  (x_save holds x)
- `sam_post(b, seg, rule, hp, step)`: x, state <- base_step(x_save, state, g)
- `check(slabs, losses, grads_attr, sq_attr)`: one device flag, True when the
  losses and every gradient are finite, and the fp32 sum of squares of the
  slabs' `sq_attr` buffers (the next norm). No host synchronisation.

`gy_norm` / `g_norm` are 0-dim fp32 tensors on the slab's device: scales are
read from device memory, never from the host.

With a GradScaler, `check`, `sampa_post`, `sam_perturb` and `sam_post` take
`inv_scale` (a 0-dim fp32 device tensor, 1 / loss scale): the gradient buffers
hold scaled values and are unscaled on the fly (the sum of squares and the
committed gy are of unscaled values); the buffers themselves stay as they are.
"""
from __future__ import annotations

import torch

EPS = 1e-12


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def make_backend(name: str, device: torch.device, dtypes=()):
    # the kernels do fp32 math: float64 parameters stay on the torch backend
    wide = torch.float64 in set(dtypes)
    if name == "auto":
        name = "triton" if device.type == "cuda" and not wide and _triton_importable() else "torch"
    if name == "triton" and wide:
        raise ValueError("backend='triton' computes in fp32 and would round float64 parameters; "
                         "use backend='torch' (backend='auto' does) for float64 models")
    if name == "torch":
        from .torch_backend import TorchBackend
        return TorchBackend()
    if name == "triton":
        from .triton_backend import TritonBackend
        return TritonBackend(device)
    raise ValueError(f"unknown backend {name!r}: choose 'torch', 'triton' or 'auto'")
