"""Flat parameter buffers: every tensor of a list becomes a view into one
contiguous buffer per (device, dtype), ordered by param group so that each
group is one contiguous segment of its buffer.

The update math then runs once per (buffer, range) instead of once per
tensor, and gradients accumulate in place into a flat gradient buffer. A
tensor keeps its memory format (channels_last...): its view has its strides,
over its own dense range of the buffer; every flat buffer of a slab uses the
same layout, so elementwise work pairs the right elements.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# Each tensor starts on a 64-byte boundary so that per-parameter views stay as
# aligned as a fresh allocation would be for vectorized and library kernels.
ALIGN_BYTES = 64


def plan_layout(numels: Sequence[int], keys: Sequence[int], aligns: Sequence[int]
                ) -> Tuple[List[int], List[int], List[int]]:
    """Assign each tensor a (slab, offset); tensors keep their input order.

    `keys[i]` names the (device, dtype) slab of tensor i, `aligns[i]` its
    alignment in elements. Returns (slab index per tensor, offset per tensor,
    size per slab); slabs are numbered in order of first appearance.
    """
    if not len(numels) == len(keys) == len(aligns):
        raise ValueError(f"plan_layout: numels, keys and aligns differ in length "
                         f"({len(numels)}, {len(keys)}, {len(aligns)})")
    slab_of_key: Dict[int, int] = {}
    sizes: List[int] = []
    slab_ids, offsets = [], []
    for n, k, a in zip(numels, keys, aligns):
        if n < 0 or a <= 0:
            raise ValueError(f"bad layout entry: numel={n}, align={a}")
        s = slab_of_key.setdefault(k, len(sizes))
        if s == len(sizes):
            sizes.append(0)
        off = -(-sizes[s] // a) * a
        slab_ids.append(s)
        offsets.append(off)
        sizes[s] = off + n
    return slab_ids, offsets, sizes


def dense_strides(t: torch.Tensor) -> Optional[Tuple[int, ...]]:
    """`t`'s strides if it covers a dense range of memory in another order
    than contiguous (channels_last or any other permutation); None for
    contiguous tensors and for those that are not dense (they are laid out
    contiguous)."""
    shape, stride = tuple(t.shape), tuple(t.stride())
    if t.is_contiguous() or 0 in shape:
        return None
    order = sorted(range(len(shape)), key=lambda d: (stride[d], shape[d]))
    expect = 1
    for d in order:
        if shape[d] != 1 and stride[d] != expect:
            return None
        expect *= shape[d]
    return stride


@dataclass
class Segment:
    """A contiguous range [start, end) of a slab owned by one param group."""
    group: int
    start: int
    end: int


@dataclass
class Slab:
    """One flat buffer's layout: which tensors live where, by param group."""
    device: torch.device
    dtype: torch.dtype
    numel: int
    index: List[int] = field(default_factory=list)     # position in the param list
    offsets: List[int] = field(default_factory=list)
    shapes: List[torch.Size] = field(default_factory=list)
    strides: List[Optional[Tuple[int, ...]]] = field(default_factory=list)   # None: contiguous
    segments: List[Segment] = field(default_factory=list)

    def zeros(self, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        return torch.zeros(self.numel, dtype=dtype or self.dtype,
                           device=self.device if device is None else device)

    def views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        out = []
        for o, s, st in zip(self.offsets, self.shapes, self.strides):
            v = flat[o:o + s.numel()]
            out.append(v.view(s) if st is None else v.as_strided(s, st))
        return out

    def ranges(self) -> List[Tuple[int, int]]:
        """[start, end) of each tensor in the buffer (slab order)."""
        return [(o, o + s.numel()) for o, s in zip(self.offsets, self.shapes)]

    def gather(self, tensors: Sequence, flat: torch.Tensor) -> torch.Tensor:
        """Copy `tensors` (in param-list order; None: leave as is) into `flat`.
        Set-up and load time only."""
        with torch.no_grad():
            for view, i in zip(self.views(flat), self.index):
                if tensors[i] is not None:
                    view.copy_(tensors[i])
        return flat

    def bind_data(self, tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
        """Make each tensor's storage a view of `flat` (identity of the Python object kept)."""
        for view, i in zip(self.views(flat), self.index):
            tensors[i].data = view

    def bind_grad(self, tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
        for view, i in zip(self.views(flat), self.index):
            tensors[i].grad = view


def build_slabs(tensors: Sequence[torch.Tensor], groups: Sequence[int]) -> List[Slab]:
    """Lay `tensors` out in flat slabs, one per (device, dtype).

    `groups[i]` is the param-group index of tensor i. Tensors are taken group
    by group, so that each group is one contiguous segment within each slab.
    """
    order = sorted(range(len(tensors)), key=lambda i: groups[i])  # stable
    key_ids: Dict[Tuple[torch.device, torch.dtype], int] = {}
    keys, numels, aligns = [], [], []
    for i in order:
        t = tensors[i]
        keys.append(key_ids.setdefault((t.device, t.dtype), len(key_ids)))
        numels.append(t.numel())
        aligns.append(max(1, ALIGN_BYTES // t.element_size()))
    slab_ids, offsets, sizes = plan_layout(numels, keys, aligns)
    by_id = {v: k for k, v in key_ids.items()}
    # Slabs are numbered by first appearance, as are keys: slab s has key s.
    slabs = [Slab(by_id[s][0], by_id[s][1], sizes[s]) for s in range(len(sizes))]
    for pos, i in enumerate(order):
        slab = slabs[slab_ids[pos]]
        slab.index.append(i)
        slab.offsets.append(offsets[pos])
        slab.shapes.append(tensors[i].shape)
        slab.strides.append(dense_strides(tensors[i]))
        g = groups[i]
        if slab.segments and slab.segments[-1].group == g:
            slab.segments[-1].end = offsets[pos] + numels[pos]
        else:
            start = slab.segments[-1].end if slab.segments else 0
            slab.segments.append(Segment(g, start, offsets[pos] + numels[pos]))
    # Every segment starts and ends on the alignment (the padding after a
    # group's last tensor belongs to it; it stays zero under every update), so
    # the kernels see aligned pointers and lengths and use vector accesses.
    for slab in slabs:
        align = max(1, ALIGN_BYTES // torch.empty((), dtype=slab.dtype, device="meta").element_size())
        for a, b in zip(slab.segments, slab.segments[1:]):
            a.end = b.start = -(-a.end // align) * align
        slab.numel = -(-slab.numel // align) * align
        if slab.segments:
            slab.segments[-1].end = slab.numel
    return slabs
