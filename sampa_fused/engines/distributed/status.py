"""The status a pass ends with, exchanged by one small all-reduce so that every
rank takes the same decision: the two losses (slot 0: the x̃-pass, slot 1: the
y-pass), and per rank its error flag, its pass sequence number, the sizes of
its global batches (held and new; -1: not known), its model-buffer byte count
and layout digest; then one entry per parameter: whether some rank's pass
gave it a gradient."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

FIELDS = 6      # per rank: failed, seq, held batch, new batch, buffer bytes, buffer digest


class Status:
    def __init__(self, world: int, n_params: int, device: torch.device):
        self.world, self.n_params = world, n_params
        self.tensor = torch.zeros(2 + FIELDS * world + n_params, dtype=torch.float64, device=device)

    def _slot(self, field: int, rank: int) -> int:
        return 2 + field * self.world + rank

    def fill(self, rank: int, loss: Optional[torch.Tensor], slot: int, failed: bool, seq: int,
             batches: Sequence[int], nbytes: int, digest: int, got: Optional[Sequence[bool]]) -> None:
        t = self.tensor
        if loss is not None:
            t[slot] = loss.to(torch.float64)
        for field, v in enumerate((float(failed), seq, batches[0], batches[1], nbytes, digest)):
            t[self._slot(field, rank)] = float(v)
        if got is not None:
            t[2 + FIELDS * self.world:] = torch.tensor([float(g) for g in got], dtype=torch.float64)

    def read(self) -> "StatusView":
        return StatusView(self.tensor.tolist(), self.world)


class StatusView:
    """The all-reduced status on the host (the one host read of a pass)."""

    def __init__(self, values: List[float], world: int):
        w = world

        def field(k):
            return values[2 + k * w:2 + (k + 1) * w]
        self.losses = values[0:2]
        self.failed = [r for r, v in enumerate(field(0)) if v != 0]
        self.seqs = [int(v) for v in field(1)]
        self.batches = list(zip((int(v) for v in field(2)), (int(v) for v in field(3))))
        self.nbytes = [int(v) for v in field(4)]
        self.digests = field(5)
        self.got = [v > 0 for v in values[2 + FIELDS * w:]]
