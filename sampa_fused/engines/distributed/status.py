"""The message a pass ends with: every rank's status, and rank 0's model
buffers, in one byte buffer allocated once per layout.

Layout (bytes):

    rows     one float64 row per rank, written by that rank only (ROW fields
             plus one hyperparameter digest per param group)
    got      one byte per parameter: 1 where that rank's pass gave it a gradient
    buffers  rank 0's model buffers (batch-norm statistics...), packed

Every section has one writer per byte except `got`, where every rank writes
0 or 1. So the message combines exactly by a byte-wise MAX: over an
all-reduce (MAX on uint8) it gathers every row, ORs `got` and carries rank
0's buffers unchanged; over a send/recv pair each rank reads its own row and
the peer's. No float sums: what a rank reads is bit for bit what each rank wrote.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .packing import ALIGN

# per-rank row: device values first (written by device copies), host values after
LOSS = 0
BATCH_FP = slice(1, 4)        # batch fingerprint: (elements, sum, norm) in float64
CHECKSUM = slice(4, 6)        # parameter checksum (two 48-bit integer sums), when HAS_CHECKSUM
HOST = 6                      # first host-written field
FAILED, SEQ, HELD, NEW, BUF_BYTES, BUF_DIGEST, HAS_CHECKSUM, LOADED, BUF_SENT, HYPER = range(6, 16)
ROW = HYPER                   # then one hyperparameter digest per param group


class Message:
    """One rank's view of a pass's message. `flat` is what it sends (and, for
    an all-reduce, what is reduced in place)."""

    def __init__(self, world: int, n_params: int, n_groups: int, buffer_bytes: int,
                 device: torch.device):
        self.world, self.n_params, self.n_groups = world, n_params, n_groups
        self.row = ROW + n_groups
        rows = world * self.row * 8
        self.got_at = rows
        self.buf_at = -(-(rows + n_params) // ALIGN) * ALIGN
        self.head = -(-(rows + n_params) // 8) * 8     # what the host reads (8-aligned: rows view as float64)
        self.buffer_bytes = buffer_bytes
        self.nbytes = self.buf_at + buffer_bytes
        self.device = device
        self.flat = torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
        self.rows = self.flat[:rows].view(torch.float64).view(world, self.row)
        self.got = self.flat[self.got_at:self.got_at + n_params]
        self.buffers = self.flat[self.buf_at:]
        self._got_written: Optional[List[bool]] = None

    def clear_rows(self) -> None:
        self.rows.zero_()

    def fill(self, rank: int, loss: Optional[torch.Tensor], batch_fp: Optional[torch.Tensor],
             checksum: Optional[torch.Tensor], host: Sequence[float],
             got: Optional[Sequence[bool]], reset_got: bool) -> None:
        """This rank's row, and its `got` bytes (rewritten only when they
        changed, unless the buffer was reduced over since)."""
        row = self.rows[rank]
        row[:HOST].zero_()
        if loss is not None:
            row[LOSS].copy_(loss.detach().reshape(()))
        # Host values go up without a stream sync (non_blocking from pageable
        # memory is staged at once): the host reads once per pass, later.
        if batch_fp is not None:
            row[BATCH_FP].copy_(batch_fp, non_blocking=True)
        if checksum is not None:
            row[CHECKSUM].copy_(checksum)
        row[HOST:].copy_(torch.tensor(host, dtype=torch.float64), non_blocking=True)
        want = list(got) if got is not None else [False] * self.n_params
        if reset_got or want != self._got_written:
            self.got.copy_(torch.tensor(want, dtype=torch.uint8), non_blocking=True)
            self._got_written = want

    def host_head(self) -> torch.Tensor:
        """The rows and `got` on the host: the one host read of a pass."""
        return self.flat[:self.head].cpu()


class View:
    """The combined status on the host, rank by rank."""

    def __init__(self, msgs: Sequence[Message], heads: Sequence[torch.Tensor], owner: Sequence[int]):
        # owner[r]: which message holds rank r's row
        m = msgs[0]
        self.world, self.n_groups = m.world, m.n_groups
        rows = [h[:m.got_at].view(torch.float64).view(m.world, m.row) for h in heads]
        self.rows = [rows[owner[r]][r].tolist() for r in range(m.world)]
        got = None
        for h in heads:
            g = h[m.got_at:m.got_at + m.n_params]
            got = g if got is None else torch.maximum(got, g)
        self.got = [v != 0 for v in got.tolist()] if got is not None else []

    def field(self, k: int) -> list:
        return [r[k] for r in self.rows]

    @property
    def failed(self) -> List[int]:
        return [r for r, v in enumerate(self.field(FAILED)) if v != 0]

    @property
    def seqs(self) -> List[int]:
        return [int(v) for v in self.field(SEQ)]

    @property
    def batches(self) -> List[tuple]:
        return [(int(r[HELD]), int(r[NEW])) for r in self.rows]

    def hyper(self, rank: int) -> list:
        return self.rows[rank][HYPER:HYPER + self.n_groups]
