"""Every rank must build the same model and optimizer: a digest of the
layout and settings is exchanged once; on a mismatch the details are, and
every rank raises the same error naming the first difference."""
from __future__ import annotations

import hashlib
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist


def check(comps: List[Tuple[str, str]], group, world: int, device: torch.device, who: str,
          comm_error: Callable[[str, BaseException], Exception]) -> None:
    digest = hashlib.sha256(repr(comps).encode()).digest()
    mine = torch.tensor(list(digest), dtype=torch.uint8, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    try:
        dist.all_gather(every, mine, group=group)
    except Exception as e:
        raise comm_error("fingerprint exchange", e) from e
    if all(torch.equal(e, every[0]) for e in every):
        return
    allcomps: List[Any] = [None] * world
    try:
        dist.all_gather_object(allcomps, comps, group=group)
    except Exception as e:
        raise comm_error("fingerprint exchange", e) from e
    ref = dict(allcomps[0])
    for r, rc in enumerate(allcomps):
        d = dict(rc)
        for label in list(ref) + [k for k in d if k not in ref]:
            if ref.get(label) != d.get(label):
                a, b = first_difference(ref.get(label), d.get(label))
                raise RuntimeError(
                    f"{who}: ranks disagree on the {label}: rank 0 has {a}, rank {r} has "
                    f"{b}. Every rank must build the same model and optimizer (same parameters, "
                    "param groups, hyperparameters and engine options)")
    raise RuntimeError(f"{who}: the ranks' fingerprints of parameter layout and "
                       "hyperparameters differ; build the same model and optimizer on every rank")


def first_difference(a: Optional[str], b: Optional[str], n: int = 300) -> Tuple[str, str]:
    """The first differing item of two '; '- or ', '-separated descriptions."""
    if a is None or b is None:
        return repr(a)[:n], repr(b)[:n]
    for sep in ("; ", ", "):
        ia, ib = a.split(sep), b.split(sep)
        if len(ia) > 1 or len(ib) > 1:
            for x, y in zip(ia, ib):
                if x != y:
                    return x[:n], y[:n]
            if len(ia) != len(ib):
                return f"{len(ia)} entries", f"{len(ib)} entries"
    return a[:n], b[:n]
