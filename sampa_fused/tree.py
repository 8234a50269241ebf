"""Batches as trees, walked in one place.

A batch is a tensor, or a container of batches: list, tuple (namedtuples
too), any Mapping (dict, `collections.UserDict`, Hugging Face's
`BatchEncoding`), or a dataclass instance. Anything else is a leaf kept as it
is (numbers, strings, None...). Everything here rebuilds a container as its
own type, so a loss_fn that reads `batch.input_ids` keeps working.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, List, Optional, Tuple

import torch

_KINDS = ("tensor", "mapping", "namedtuple", "sequence", "dataclass", "leaf")


def _kind(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return "tensor"
    if isinstance(obj, Mapping):
        return "mapping"
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return "namedtuple"
    if isinstance(obj, (list, tuple)):
        return "sequence"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return "dataclass"
    return "leaf"


def _children(obj, kind: str) -> Tuple[tuple, list]:
    """(keys, children) of a container."""
    if kind == "mapping":
        keys = tuple(obj.keys())
        return keys, [obj[k] for k in keys]
    if kind in ("namedtuple", "sequence"):
        return tuple(range(len(obj))), list(obj)
    if kind == "dataclass":
        keys = tuple(f.name for f in dataclasses.fields(obj) if f.init)
        return keys, [getattr(obj, k) for k in keys]
    return (), []


def _rebuild(template, kind: str, keys: tuple, children: list):
    """A container like `template` holding `children`."""
    cls = type(template)
    if kind == "mapping":
        items = list(zip(keys, children))
        try:
            return cls(items)
        except TypeError:
            try:
                return cls(dict(items))
            except TypeError:            # a Mapping whose constructor takes something else
                return dict(items)
    if kind == "namedtuple":
        return cls(*children)
    if kind == "sequence":
        try:
            return cls(children)
        except TypeError:
            return list(children) if isinstance(template, list) else tuple(children)
    if kind == "dataclass":
        return dataclasses.replace(template, **dict(zip(keys, children)))
    return template


def map_tensors(fn: Callable[[torch.Tensor], Any], batch):
    """The batch with every tensor replaced by fn(tensor); same structure and types."""
    kind = _kind(batch)
    if kind == "tensor":
        return fn(batch)
    if kind == "leaf":
        return batch
    keys, children = _children(batch, kind)
    return _rebuild(batch, kind, keys, [map_tensors(fn, c) for c in children])


def tensors(batch) -> List[torch.Tensor]:
    """The batch's tensors, in a fixed order."""
    out: List[torch.Tensor] = []

    def walk(obj):
        kind = _kind(obj)
        if kind == "tensor":
            out.append(obj)
        elif kind != "leaf":
            for c in _children(obj, kind)[1]:
                walk(c)
    walk(batch)
    return out


def clone(batch):
    """A copy of the batch's tensors: a data pipeline may reuse its buffers."""
    return map_tensors(lambda t: t.detach().clone(), batch)


def structure(batch):
    """A hashable description (containers, keys, tensor shapes/dtypes/devices,
    leaf values): two batches of equal structure fit the same static buffers."""
    kind = _kind(batch)
    if kind == "tensor":
        return ("T", tuple(batch.shape), batch.dtype, batch.device)
    if kind == "leaf":
        try:
            hash(batch)
        except TypeError:
            return ("unhashable", object())      # equal to nothing: never the same structure
        return ("leaf", type(batch), batch)
    keys, children = _children(batch, kind)
    return (kind, type(batch), keys, tuple(structure(c) for c in children))


def rebuild(template, leaves: List[torch.Tensor]):
    """`template` with its tensors replaced, in order, by `leaves`."""
    it = iter(leaves)
    return map_tensors(lambda _t: next(it), template)


def first_tensor(batch) -> Optional[torch.Tensor]:
    ts = tensors(batch)
    return ts[0] if ts else None


def batch_size(batch) -> int:
    """The size along dim 0 of the batch's first tensor."""
    t = first_tensor(batch)
    if t is None or t.dim() == 0:
        raise ValueError("cannot find the batch size: the batch needs a tensor with a leading "
                         "batch dimension")
    return t.shape[0]


def sizes(batch) -> List[int]:
    """dim 0 of every tensor of the batch (0-dim tensors are skipped)."""
    return [t.shape[0] for t in tensors(batch) if t.dim() >= 1]


def unknown_leaves(batch) -> List[str]:
    """Type names of leaves that are neither tensors nor plain values."""
    plain = (int, float, complex, bool, str, bytes, type(None))
    out: List[str] = []

    def walk(obj):
        kind = _kind(obj)
        if kind == "leaf":
            if not isinstance(obj, plain):
                out.append(type(obj).__name__)
        elif kind != "tensor":
            for c in _children(obj, kind)[1]:
                walk(c)
    walk(batch)
    return out


def split(batch, parts: int, n: int) -> list:
    """The batch cut into `parts` pieces along dim 0 (tensors whose dim 0 is
    `n`; the first n % parts pieces get one more); other leaves repeat."""
    def cut(t):
        if t.dim() == 0 or t.shape[0] != n:
            return [t] * parts
        return list(torch.tensor_split(t, parts))
    pieces = [map_tensors(lambda t, i=i: cut(t)[i], batch) for i in range(parts)]
    return pieces


def narrow(batch, start: int, end: int):
    """Samples [start, end) of every tensor with a batch dimension."""
    return map_tensors(lambda t: t[start:end] if t.dim() >= 1 else t, batch)


# ------------------------------------------------------------ checkpoints
def encode(batch) -> dict:
    """The batch as plain data for a checkpoint that `torch.load` reads with
    its defaults (weights_only=True): containers become lists and dicts of
    tensors, numbers and strings. `decode_like` rebuilds it with the types of
    a live batch of the same structure (no class is imported by name)."""
    kind = _kind(batch)
    if kind == "tensor":
        return {"k": "tensor", "v": batch}
    if kind == "leaf":
        return {"k": "leaf", "v": batch}
    keys, children = _children(batch, kind)
    return {"k": kind, "type": f"{type(batch).__module__}.{type(batch).__qualname__}",
            "keys": list(keys), "v": [encode(c) for c in children]}


def decode_like(data: dict, template, where: str = "batch"):
    """Rebuild `encode`d data with the container types of `template`."""
    kind = data["k"]
    if kind == "tensor":
        return data["v"]
    if kind == "leaf":
        return data["v"]
    tkind = _kind(template)
    tkeys, tchildren = _children(template, tkind) if tkind not in ("tensor", "leaf") else ((), [])
    if tkind != kind or list(tkeys) != list(data["keys"]):
        raise ValueError(
            f"the {where} saved in the checkpoint is a {data['type']} with keys {data['keys']}, "
            f"but the batch passed now is a {type(template).__module__}."
            f"{type(template).__qualname__} ({tkind}) with keys {list(tkeys)}; pass batches of "
            "the structure the checkpoint was made with")
    children = [decode_like(d, t, where) for d, t in zip(data["v"], tchildren)]
    return _rebuild(template, kind, tkeys, children)
