"""A batch split over the data-parallel ranks of one half: each rank takes
its share along dim 0, weighted by size so that the weighted sum of per-share
mean losses is the whole batch's mean."""
from __future__ import annotations

from typing import Any, List, Tuple

from ... import tree
from ...batching import MicroBatches, micro_batches


def batch_length(batch) -> int:
    """The common size along dim 0 of the batch's tensors."""
    odd = tree.unknown_leaves(batch)
    if odd:
        raise TypeError(f"distributed engine: cannot shard a batch containing a {odd[0]}; batches "
                        "must be tensors or containers of them (numbers and strings pass "
                        "unchanged). Otherwise shard the batch per rank yourself and pass "
                        "sharded_batches=True")
    sizes = tree.sizes(batch)
    if not sizes:
        raise TypeError("distributed engine: the batch holds no tensor with a batch dimension to "
                        "shard along dim 0; pass sharded_batches=True and shard it yourself")
    n = sizes[0]
    if any(s != n for s in sizes):
        raise ValueError(f"distributed engine: cannot shard the batch along dim 0: its tensors "
                         f"have different sizes there ({sorted(set(sizes))}); make them agree, or "
                         "shard per rank yourself and pass sharded_batches=True")
    return n


def shard_batch(batch, index: int, parts: int) -> Tuple[Any, float]:
    """Shard `index` of `parts` along dim 0 (the first N % parts shards get one
    more sample) and its weight n_i / N."""
    if parts == 1:
        return batch, 1.0
    n = batch_length(batch)
    if n < parts:
        raise ValueError(f"distributed engine: a batch of {n} samples cannot be split over {parts} "
                         f"data-parallel ranks; use a batch of at least {parts} samples")
    q, r = divmod(n, parts)
    start = index * q + min(index, r)
    size = q + (1 if index < r else 0)
    return tree.narrow(batch, start, start + size), size / n


def check_global_batch(batch, parts: int, acc: int, what: str, who: str) -> None:
    """Checks that depend only on the global batch, run on EVERY rank for both
    batches before any collective: each rank then raises the same error."""
    try:
        if parts == 1:
            micro_batches(batch, acc)         # views only; raises as the serial engine does
            return
        if isinstance(batch, MicroBatches):
            if len(batch) == 0:
                raise ValueError("MicroBatches is empty")
            for mb in batch:
                n = batch_length(mb)
                if n < parts:
                    raise ValueError(f"a micro-batch of {n} samples cannot be split over {parts} "
                                     f"data-parallel ranks; give micro-batches of at least "
                                     f"{parts} samples")
            return
        n = batch_length(batch)
        if n < parts:
            raise ValueError(f"a batch of {n} samples cannot be split over {parts} data-parallel "
                             f"ranks; use a batch of at least {parts} samples")
        if n // parts < acc:
            raise ValueError(f"a batch of {n} samples gives shares of {n // parts} samples to "
                             f"some of the {parts} data-parallel ranks, fewer than "
                             f"accumulation_steps={acc}; use a batch of at least {parts * acc} "
                             "samples or fewer accumulation steps")
    except (TypeError, ValueError) as e:
        raise type(e)(f"{who}: the {what}: {e}") from None


def global_size(batch) -> int:
    """What the ranks compare to see that they got the same global batch (-1: unknown)."""
    try:
        if isinstance(batch, MicroBatches):
            return sum(batch_length(mb) for mb in batch)
        return batch_length(batch)
    except (TypeError, ValueError):
        return -1


def rank_parts(batch, sharded: bool, data_rank: int, data_world: int, acc: int
               ) -> List[Tuple[Any, float]]:
    """This rank's (micro-batch, weight) pairs: its shard, cut into the
    optimizer's micro-batches, weighted so that the weighted losses summed
    over ranks and micro-batches are the global batch's mean loss."""
    if sharded:
        w = 1.0 / data_world     # shards count equally, as in DDP
        return [(p, pw * w if w != 1.0 else pw) for p, pw in micro_batches(batch, acc)]
    if data_world == 1:
        return micro_batches(batch, acc)
    if isinstance(batch, MicroBatches):    # shard each given micro-batch
        if len(batch) == 0:
            raise ValueError("MicroBatches is empty")
        sizes = [batch_length(mb) for mb in batch]
        total = sum(sizes)
        out = []
        for mb, n in zip(batch, sizes):
            part, w = shard_batch(mb, data_rank, data_world)
            out.append((part, w * n / total))
        return out
    shard, w = shard_batch(batch, data_rank, data_world)
    return [(p, pw * w) for p, pw in micro_batches(shard, acc)]
