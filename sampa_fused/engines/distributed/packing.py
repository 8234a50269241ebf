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


def signature(tensors: Sequence[torch.Tensor]) -> list:
    """Shapes, dtypes and devices: what decides the packed layout."""
    return [(t.shape, t.dtype, t.device) for t in tensors]


def digest(sig: list) -> int:
    """A digest of shapes and dtypes, exact in float64 (48 bits)."""
    desc = repr([(tuple(s), str(d)) for s, d, _ in sig]).encode()
    return int.from_bytes(hashlib.sha256(desc).digest()[:6], "little")


class BufferPack:
    """The model's buffers (batch-norm statistics...) and their layout,
    followed as modules replace them (a forward may assign a new tensor).
    The digest is computed again only when the layout changed."""

    def __init__(self):
        self._sig: Optional[list] = None
        self.digest = 0
        self.nbytes = 0
        self.tensors: List[torch.Tensor] = []

    def current(self, modules) -> Tuple[int, int]:
        """Take the buffers as they are now; returns (bytes, digest)."""
        bufs = [t for m in modules for t in m._buffers.values() if t is not None and t.numel() > 0]
        sig = signature(bufs)
        if sig != self._sig:
            self._sig, self.digest = sig, digest(sig)
            self.nbytes = packed_bytes(bufs)
        self.tensors = bufs
        return self.nbytes, self.digest

    @property
    def signature(self) -> Optional[list]:
        return self._sig


def packed_bytes(tensors: Sequence[torch.Tensor]) -> int:
    n = 0
    for t in tensors:
        n = -(-n // ALIGN) * ALIGN + t.numel() * t.element_size()
    return n


def views(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Views of `flat` (uint8) laid out as Packed lays out `like`."""
    out, n = [], 0
    for t in like:
        n = -(-n // ALIGN) * ALIGN
        nb = t.numel() * t.element_size()
        out.append(flat[n:n + nb].view(t.dtype).view(t.shape))
        n += nb
    return out
