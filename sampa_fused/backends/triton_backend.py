"""The fused backend: each elementwise stage of a step is one Triton kernel
launch per param-group segment of a flat slab (SPEC section 3).

- sampa_pre:   x_save, xt and the peek y in one pass over x, gy and the state
- sampa_post:  the mix (1-lam) gxt + lam gy_new, the base step and the gy commit
               in one pass
- sam_perturb: x += rho g / (||g|| + eps) in one pass
- sam_post:    the base step in one pass
- check:       finite check + sum of squares in one pass per slab, then a
               one-program deterministic second stage

With a GradScaler (`inv_scale`, a device tensor holding 1 / scale) the
gradient buffers keep their scaled values: the kernels multiply them by
inv_scale as they load them, in the same pass.

Norms and flags stay on the device: nothing in a step synchronises with the
host. On CPU tensors the same kernels run in Triton's interpreter
(TRITON_INTERPRET=1), which is how CI exercises them.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional, Sequence

import torch


def _require(device: torch.device) -> None:
    """Raise a RuntimeError that says what to change when the kernels cannot
    run on `device` here."""
    if device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"backend='triton' runs on CUDA tensors (and on CPU tensors under "
                           f"TRITON_INTERPRET=1), not on {device.type}; use backend='torch'")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"backend='triton' needs the triton package ({e}); install it "
                           "(pip install triton) or use backend='torch'") from None
    from ..kernels import interpret_requested, kernels_interpreted
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
    else:
        if not torch.cuda.is_available():
            raise RuntimeError(f"backend='triton': the parameters are on {device} but CUDA is not "
                               "available in this process; use backend='torch'")
        if kernels_interpreted():
            warnings.warn("backend='triton' on CUDA tensors with TRITON_INTERPRET=1: the kernels run "
                          "in the interpreter on the host (slow, and it synchronises); unset "
                          "TRITON_INTERPRET for real GPU kernels", RuntimeWarning, stacklevel=3)


class TritonBackend:
    name = "triton"

    def __init__(self, device, config=None):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        _require(device)
        from ..kernels import adamw, default_config, perturb, reduce, sgd
        self._sgd, self._adamw, self._perturb, self._reduce = sgd, adamw, perturb, reduce
        self.device = device
        self.config = config if config is not None else default_config(device)
        self._cuda_index: Optional[int] = device.index if device.type == "cuda" else None

    # ------------------------------------------------------------- helpers
    def _guard(self):
        # Triton launches on the current CUDA device and its current stream:
        # make it the slab's device (the peer engine keeps a replica per device).
        if self._cuda_index is not None and torch.cuda.current_device() != self._cuda_index:
            return torch.cuda.device(self._cuda_index)
        return contextlib.nullcontext()

    def _norm(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.float32:
            raise TypeError(f"TritonBackend: {what} must be a 1-element fp32 tensor on the device "
                            f"(the kernel reads it from device memory), got {type(t).__name__}"
                            + (f" {t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else ""))
        if t.device != self.device:
            raise ValueError(f"TritonBackend: {what} is on {t.device}, the slab on {self.device}")
        return t

    def _inv(self, inv_scale) -> Optional[torch.Tensor]:
        return None if inv_scale is None else self._norm(inv_scale, "inv_scale")

    @staticmethod
    def _unsupported(rule) -> Exception:
        return NotImplementedError(f"TritonBackend: no fused kernels for the {rule.name!r} rule; the "
                                   "fused backends cover torch.optim.SGD and torch.optim.AdamW (other "
                                   "base optimizers run through their own step())")

    # ------------------------------------------------------------- SAMPa
    def sampa_pre(self, b, seg, rule, hp, step, rho, gy_norm):
        s = slice(seg.start, seg.end)
        norm = self._norm(gy_norm, "gy_norm")
        with self._guard():
            if rule.name == "sgd":
                buf = b.state.get("momentum_buffer")
                self._sgd.sgd_pre(b.x[s], b.x_save[s], b.y[s], b.gy[s], None if buf is None else buf[s],
                                  norm, rho, hp, step, self.config)
            elif rule.name == "adamw":
                self._adamw.adamw_pre(b.x[s], b.x_save[s], b.y[s], b.gy[s],
                                      {k: v[s] for k, v in b.state.items()}, norm, rho, hp, step,
                                      self.config)
            else:
                raise self._unsupported(rule)

    def sampa_post(self, b, seg, rule, hp, step, lam, inv_scale=None):
        self._post(b, seg, rule, hp, step, mix=True, lam=lam, inv_scale=inv_scale)

    # ------------------------------------------------------------- SAM
    def sam_perturb(self, b, seg, rho, g_norm, inv_scale=None):
        s = slice(seg.start, seg.end)
        norm = self._norm(g_norm, "g_norm")
        inv = self._inv(inv_scale)
        with self._guard():
            self._perturb.perturb(b.x[s], b.g[s], norm, rho, self.config, inv_scale=inv)

    def sam_post(self, b, seg, rule, hp, step, inv_scale=None):
        self._post(b, seg, rule, hp, step, mix=False, lam=0.0, inv_scale=inv_scale)

    def _post(self, b, seg, rule, hp, step, mix: bool, lam: float, inv_scale=None):
        s = slice(seg.start, seg.end)
        inv = self._inv(inv_scale)
        gy_new = b.gy_new[s] if mix else None
        gy = b.gy[s] if mix else None
        with self._guard():
            if rule.name == "sgd":
                buf = b.state.get("momentum_buffer")
                self._sgd.sgd_post(b.x[s], b.x_save[s], b.g[s], None if buf is None else buf[s],
                                   hp, step, self.config, gy_new=gy_new, gy=gy, lam=lam,
                                   inv_scale=inv)
            elif rule.name == "adamw":
                self._adamw.adamw_post(b.x[s], b.x_save[s], b.g[s], {k: v[s] for k, v in b.state.items()},
                                       hp, step, self.config, gy_new=gy_new, gy=gy, lam=lam,
                                       inv_scale=inv)
            else:
                raise self._unsupported(rule)

    # ------------------------------------------------------------- check
    def check(self, slabs: Sequence, losses: Sequence[torch.Tensor], grads_attr: Sequence[str],
              sq_attr: Optional[str], inv_scale=None):
        inv = self._inv(inv_scale)
        for b in slabs:
            if b.x.device != self.device:
                raise ValueError(f"TritonBackend.check: a slab is on {b.x.device}, this backend "
                                 f"runs on {self.device}")
        # The squared buffer needs no separate finite check: a NaN or inf in it
        # makes the sum of squares non-finite (also once multiplied by a finite
        # inv_scale), which refuses the step as well.
        buffers = [(getattr(b, sq_attr) if sq_attr is not None else None,
                    [getattr(b, a) for a in grads_attr if a != sq_attr]) for b in slabs]
        ls = [loss.detach().reshape(()).to(self.device, non_blocking=True) for loss in losses]
        with self._guard():
            return self._reduce.check(buffers, ls, self.device, self.config, inv_scale=inv)
