"""Small tensors of any dtypes packed into one byte buffer, so that one
collective moves them all (no per-tensor collectives)."""
from __future__ import annotations

import hashlib
from typing import List, Optional, Sequence, Tuple

import torch

ALIGN = 64        # bytes; lets the views take any dtype


class Packed:
    """One uint8 buffer on `device` with a view per tensor of `like`."""

    def __init__(self, like: Sequence[torch.Tensor], device: torch.device):
        offs, n = [], 0
        for t in like:
            n = -(-n // ALIGN) * ALIGN
            offs.append(n)
            n += t.numel() * t.element_size()
        self.flat = torch.zeros(max(n, 1), dtype=torch.uint8, device=device)
        self.views = [self.flat[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                      for o, t in zip(offs, like)]
        self.nbytes = n

    def fill(self, tensors: Sequence[torch.Tensor]) -> None:
        if tensors:
            torch._foreach_copy_(self.views, [t.to(self.flat.device) for t in tensors])

    def spill(self, tensors: Sequence[torch.Tensor]) -> None:
        for t, v in zip(tensors, self.views):
            t.copy_(v)


def signature(tensors: Sequence[torch.Tensor]) -> Tuple[list, int]:
    """(shapes/dtypes/devices, a digest of shapes and dtypes exact in float64)."""
    sig = [(t.shape, t.dtype, t.device) for t in tensors]
    desc = repr([(tuple(t.shape), str(t.dtype)) for t in tensors]).encode()
    return sig, int.from_bytes(hashlib.sha256(desc).digest()[:6], "little")


class BufferPack:
    """The model's buffers (batch-norm statistics...) as one packed buffer,
    rebuilt when their shapes change (a module may replace a buffer)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._sig: Optional[list] = None
        self.packed: Optional[Packed] = None
        self.digest = 0
        self.tensors: List[torch.Tensor] = []

    def current(self, modules) -> Tuple[int, int]:
        """Take the buffers as they are now; returns (bytes, digest)."""
        bufs = [t for m in modules for t in m._buffers.values() if t is not None and t.numel() > 0]
        sig, digest = signature(bufs)
        if sig != self._sig:
            self.packed = Packed(bufs, self.device) if bufs else None
            self._sig, self.digest = sig, digest
        self.tensors = bufs
        return (self.packed.nbytes if self.packed is not None else 0), self.digest
