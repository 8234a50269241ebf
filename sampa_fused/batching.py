"""Gradient accumulation: a batch as several micro-batches, each pass
accumulating its gradient over them, weighted so that a mean loss over the
micro-batches equals the mean over the whole batch."""
from __future__ import annotations

from typing import Any, List, Tuple

import torch


class MicroBatches(list):
    """A step's batch given as a list of micro-batches: `opt.step(MicroBatches([b1, b2]))`.
    Each micro-batch's loss is weighted by its share of the samples (the size
    of dim 0 of its first tensor)."""


def _first_tensor(batch) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def batch_size(batch) -> int:
    t = _first_tensor(batch)
    if t is None or t.dim() == 0:
        raise ValueError("cannot find the batch size: the batch needs a tensor with a leading "
                         "batch dimension")
    return t.shape[0]


def _split(batch, k: int, n: int):
    """The batch cut into k parts along dim 0 (tensors whose dim 0 is n); other leaves repeat."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0 or batch.shape[0] != n:
            return [batch] * k
        return list(torch.tensor_split(batch, k))
    if isinstance(batch, dict):
        parts = {key: _split(v, k, n) for key, v in batch.items()}
        return [{key: parts[key][i] for key in batch} for i in range(k)]
    if isinstance(batch, (list, tuple)) and not isinstance(batch, MicroBatches):
        parts = [_split(v, k, n) for v in batch]
        rebuild = (lambda xs: type(batch)(*xs)) if hasattr(batch, "_fields") else type(batch)
        return [rebuild([p[i] for p in parts]) for i in range(k)]
    return [batch] * k


def micro_batches(batch: Any, accumulation_steps: int) -> List[Tuple[Any, float]]:
    """(micro-batch, weight) pairs for one pass."""
    if isinstance(batch, MicroBatches):
        if len(batch) == 0:
            raise ValueError("MicroBatches is empty")
        sizes = [batch_size(b) for b in batch]
        total = sum(sizes)
        return [(b, n / total) for b, n in zip(batch, sizes)]
    if accumulation_steps == 1:
        return [(batch, 1.0)]
    n = batch_size(batch)
    if n < accumulation_steps:
        raise ValueError(f"a batch of {n} samples cannot be cut into accumulation_steps="
                         f"{accumulation_steps} micro-batches")
    parts = _split(batch, accumulation_steps, n)
    return [(p, batch_size(p) / n) for p in parts]


def clone_batch(batch):
    """A copy of the batch's tensors (same structure): the held batch must not
    change when a data pipeline reuses its output buffers for the next batch."""
    if isinstance(batch, torch.Tensor):
        return batch.detach().clone()
    if isinstance(batch, dict):
        return type(batch)((k, clone_batch(v)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        items = [clone_batch(v) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch
