"""The hyperparameters of a step, in device memory.

One row per (param group, state count): rho, lam, 1 - lam, then the base
optimizer's own scalars (each rule module names its slots from RULE on and
computes them on the host in double precision, as torch does). The Triton
kernels and the torch reference both read the row, so schedulers and edits
need no recompilation, and a captured CUDA graph reads this step's values.

The table is allocated once (again only when the number of rows changes,
which bumps `version`: a captured graph reads it by address) and refreshed in
place by one small host-to-device copy, only when a value changed.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

RHO, LAM, OML = 0, 1, 2          # common slots: rho, lam, 1 - lam
RULE = 3                         # the rule's slots start here
ROW = 12                         # floats per row, every rule


class HyperTable:
    def __init__(self, device: torch.device, dtype: torch.dtype, pin: bool):
        self.device, self.dtype, self.pin = device, dtype, pin
        self.tensor: Optional[torch.Tensor] = None
        self.version = 0
        self._last: Optional[List[float]] = None

    def upload(self, rows: Sequence[Sequence[float]]) -> None:
        flat = [float(v) for r in rows for v in (list(r) + [0.0] * (ROW - len(r)))]
        if self.tensor is None or self.tensor.numel() != len(flat):
            self.tensor = torch.zeros(len(rows), ROW, dtype=self.dtype, device=self.device)
            self.version += 1
            self._last = None
        if flat != self._last:
            src = torch.tensor(flat, dtype=self.dtype).view(len(rows), ROW)
            if self.pin:
                # The caching host allocator keeps a pinned block alive until the
                # copy that reads it has run, so the host never overwrites it early.
                src = src.pin_memory()
            self.tensor.copy_(src, non_blocking=self.pin)
            self._last = flat

    def row(self, i: int) -> torch.Tensor:
        return self.tensor[i]
