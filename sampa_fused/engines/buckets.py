"""Gradient buckets, shared by the engines that exchange gradients (peer,
distributed): the planner cuts each flat gradient buffer into contiguous
ranges of whole parameters, in the order backward produces them; the
exchange counts each bucket's parameters down in post-accumulate-grad hooks
and sends a bucket as soon as its last gradient is final.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch


@dataclass
class Bucket:
    slab: int
    start: int
    end: int
    params: List[int] = field(default_factory=list)   # positions in the layout's parameter list


def plan_buckets(slabs: Sequence, bucket_bytes: int) -> List[Bucket]:
    """Cut every slab [0, numel) into contiguous buckets of whole parameters.

    Starting at the end of each slab (the layout follows the forward order,
    so backward produces gradients roughly from the end), parameters join
    the current bucket until it holds at least `bucket_bytes`. Buckets cover
    each slab without gaps (alignment padding included), so sending every
    bucket overwrites the whole destination. Returned in backward order:
    the bucket holding the last parameter first.
    """
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be an int >= 1, got {bucket_bytes!r}")
    out: List[Bucket] = []
    for s, slab in enumerate(slabs):
        elems = max(1, bucket_bytes // torch.empty((), dtype=slab.dtype, device="meta").element_size())
        n = len(slab.offsets)
        end, members = slab.numel, []
        for k in range(n - 1, -1, -1):
            members.append(slab.index[k])
            start = 0 if k == 0 else slab.offsets[k]
            if end - start >= elems or k == 0:
                out.append(Bucket(s, start, end, members))
                members, end = [], start
        if n == 0:
            out.append(Bucket(s, 0, slab.numel, []))
    out.sort(key=lambda b: -max(b.params, default=-1))
    return out


class BucketExchange:
    """Sends one side's flat gradient buffers, bucket by bucket, as backward
    produces them. `send(slab, start, end)` queues the copy of one range.

    `start(will)` arms it for one backward: each bucket waits for those of
    its parameters that this backward will reach (`will`, per layout
    position, from the pass's start-of-backward hook; None: every parameter
    that requires grad). With `strict_order` buckets go out in the planned
    order only (the same on every rank of a collective). `flush()` after
    backward sends what was not sent (parameters that got no gradient, or a
    whole side that failed), and what accumulated again after it went out
    (`twice="resend"`), or raises (`twice="raise"`: a collective cannot
    send twice).
    """

    def __init__(self, params: Sequence[torch.Tensor], slabs: Sequence, bucket_bytes: int,
                 send: Callable[[int, int, int], None], strict_order: bool = False,
                 twice: str = "resend", on_twice: Optional[Callable[[int], Exception]] = None):
        self.send, self.strict, self.twice, self.on_twice = send, strict_order, twice, on_twice
        self.buckets = plan_buckets(slabs, bucket_bytes)
        self.bounds: List[List[Tuple[int, int]]] = [[] for _ in slabs]
        for b in self.buckets:
            self.bounds[b.slab].append((b.start, b.end))
        self._bucket_of = {i: j for j, b in enumerate(self.buckets) for i in b.params}
        self._params = list(params)
        self._handles = []
        self.armed = False
        self.sent_during_backward = 0
        self.sent_after_backward = 0
        me = weakref.ref(self)           # hooks must not keep the exchange alive
        for i, p in enumerate(self._params):
            if p.requires_grad and i in self._bucket_of:
                self._handles.append(p.register_post_accumulate_grad_hook(_hook(me, i)))
        self._reset(None)

    def reset(self) -> None:
        """Unarmed, nothing sent: the state at the start of a pass."""
        self._reset(None)
        self.armed = False

    def start(self, will: Optional[Sequence[bool]] = None) -> None:
        """Arm for one backward pass; buckets that wait for nothing go now."""
        self._reset(will)
        self.armed = True
        self._advance()

    def _reset(self, will) -> None:
        self._pending = [0] * len(self.buckets)
        for i, j in self._bucket_of.items():
            if (will[i] if will is not None else self._params[i].requires_grad):
                self._pending[j] += 1
        self._fired = bytearray(len(self._params))
        self._sent = [False] * len(self.buckets)
        self._again: set = set()
        self._next = 0

    def _ready(self, i: int) -> None:
        j = self._bucket_of[i]
        if self._fired[i]:
            if self.twice == "raise":
                raise self.on_twice(i) if self.on_twice else RuntimeError(
                    f"parameter {i} received its gradient twice in one backward pass")
            if self._sent[j]:
                self._again.add(j)
            return
        self._fired[i] = 1
        self._pending[j] -= 1
        self._advance(j)

    def _advance(self, j: Optional[int] = None) -> None:
        if self.strict:
            while self._next < len(self.buckets) and self._pending[self._next] <= 0:
                self._launch(self._next, during=True)
                self._next += 1
        elif j is not None:
            if self._pending[j] <= 0 and not self._sent[j]:
                self._launch(j, during=True)
        else:
            for k, n in enumerate(self._pending):
                if n <= 0 and not self._sent[k]:
                    self._launch(k, during=True)

    def _launch(self, j: int, during: bool) -> None:
        b = self.buckets[j]
        self.send(b.slab, b.start, b.end)
        self._sent[j] = True
        if during:
            self.sent_during_backward += 1
        else:
            self.sent_after_backward += 1

    def flush(self) -> None:
        """After backward: send what has not been sent (or changed since), in order."""
        self.armed = False
        for j in range(len(self.buckets)):
            if not self._sent[j] or j in self._again:
                self._launch(j, during=False)

    def send_all(self) -> None:
        """Whole buffers after backward (no overlap): one range per slab."""
        self.armed = False
        for s, bounds in enumerate(self.bounds):
            if bounds:
                self.send(s, min(a for a, _ in bounds), max(b for _, b in bounds))
                self.sent_after_backward += 1

    def close(self) -> None:
        self.armed = False
        for h in self._handles:
            h.remove()
        self._handles = []


def _hook(ref, i: int):
    def on_grad(_param):
        ex = ref()
        if ex is not None and ex.armed:
            ex._ready(i)
    return on_grad
