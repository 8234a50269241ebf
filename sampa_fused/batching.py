"""Gradient accumulation: a batch as several micro-batches, each pass
accumulating its gradient over them, weighted so that a mean loss over the
micro-batches equals the mean over the whole batch."""
from __future__ import annotations

from typing import Any, List, Tuple

from . import tree


class MicroBatches(list):
    """A step's batch given as a list of micro-batches: `opt.step(MicroBatches([b1, b2]))`.
    Each micro-batch's loss is weighted by its share of the samples (the size
    of dim 0 of its first tensor)."""


def micro_batches(batch: Any, accumulation_steps: int) -> List[Tuple[Any, float]]:
    """(micro-batch, weight) pairs for one pass."""
    if isinstance(batch, MicroBatches):
        if len(batch) == 0:
            raise ValueError("MicroBatches is empty")
        sizes = [tree.batch_size(b) for b in batch]
        total = sum(sizes)
        return [(b, n / total) for b, n in zip(batch, sizes)]
    if accumulation_steps == 1:
        return [(batch, 1.0)]
    n = tree.batch_size(batch)
    if n < accumulation_steps:
        raise ValueError(f"a batch of {n} samples cannot be cut into accumulation_steps="
                         f"{accumulation_steps} micro-batches")
    parts = tree.split(batch, accumulation_steps, n)
    return [(p, tree.batch_size(p) / n) for p in parts]

