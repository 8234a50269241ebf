"""Both passes run on the user's own module with a pass buffer swapped in:
for the duration of the y-pass the module's slots of the optimized
parameters hold the y leaves (views of the flat y buffer whose gradients
land in gy_new), and its buffers are private copies, as
`torch.func.functional_call` swaps them; the x̃-pass (and SAM's perturbed
pass) swaps in the xt leaves (views of the xt buffer, gradients in g) and
keeps the model's buffers, so x itself is never overwritten. Hooks, wrappers
(`model.forward` replaced after construction, accelerate's autocast),
train/eval and frozen weights are then always the user's, and buffer updates
of the y-pass (batch-norm statistics) are never written back. Each pass leaf
(xt or y) shares its parameter's tensor-hook dict (`p.register_hook`), so a hook on a
parameter acts on its gradient in both passes, added or removed at any time.

Engines that run the y-pass on another device keep a replica of the model
(`ModelReplica`), synced every step.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import _cuda


class PrivateBuffers:
    """Private copies of a module's buffers, refreshed from the module's
    current values before each pass that uses them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._modules = list(model.modules())
        self._copies: Dict[Tuple[int, str], torch.Tensor] = {}

    def sync(self) -> None:
        """Copy the module's buffers into the private ones (queued on the
        current stream, before the passes fork)."""
        dst, src = [], []
        for m in self._modules:
            for n, t in m._buffers.items():
                if t is None:
                    continue
                key = (id(m), n)
                c = self._copies.get(key)
                if c is None or c.shape != t.shape or c.dtype != t.dtype or c.device != t.device:
                    self._copies[key] = t.detach().clone()
                else:
                    dst.append(c)
                    src.append(t)
        if dst:
            torch._foreach_copy_(dst, src)

    def slots(self) -> List[Tuple[nn.Module, str, torch.Tensor]]:
        return [(m, n, self._copies[(id(m), n)]) for m in self._modules for n, t in m._buffers.items()
                if t is not None and (id(m), n) in self._copies]


@contextlib.contextmanager
def swapped(params: Sequence[Tuple[nn.Module, str, torch.Tensor]],
            buffers: Sequence[Tuple[nn.Module, str, torch.Tensor]] = ()):
    """Put tensors into module slots for the block; the originals come back
    after it (also what the block assigned to those slots is discarded)."""
    saved_p = [(m, n, m._parameters[n]) for m, n, _ in params]
    saved_b = [(m, n, m._buffers[n]) for m, n, _ in buffers]
    try:
        for m, n, t in params:
            m._parameters[n] = t
        for m, n, t in buffers:
            m._buffers[n] = t
        yield
    finally:
        for m, n, t in saved_p:
            m._parameters[n] = t
        for m, n, t in saved_b:
            m._buffers[n] = t


class YPass:
    """The leaves of one pass buffer (y by default) of the optimized
    parameters and where they go in the user's module.

    `buffers`: the private buffers the pass runs with (None: the model's
    own). `every`: swap every optimized parameter, a frozen one as a leaf
    without grad (the x̃ point: frozen parameters are laid out at xt as
    well); else only the trainable ones (a frozen one keeps the user's value,
    as torch's peek would: its grad is None)."""

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter], buffers: Optional[PrivateBuffers],
                 every: bool = False):
        self.model = model
        self.params = list(params)
        self.buffers = buffers
        self.every = every
        self.leaves: List[nn.Parameter] = []
        self._slots: List[Tuple[nn.Module, str, torch.Tensor]] = []
        self._requires_grad: tuple = ()

    def bind(self, slabs, y_name: str = "y", g_name: str = "gy_new") -> None:
        """y leaves as views of the replica's y buffers, their gradients as
        views of gy_new (again after a relayout)."""
        self.leaves = [None] * len(self.params)
        for b in slabs:
            ys, gs = b.slab.views(getattr(b, y_name)), b.slab.views(getattr(b, g_name))
            for k, i in enumerate(b.slab.index):
                leaf = nn.Parameter(ys[k], requires_grad=True)
                leaf.grad = gs[k]
                self.leaves[i] = leaf
        self._grads = [leaf.grad for leaf in self.leaves]
        self._requires_grad = ()

    def _refresh_slots(self) -> None:
        """Slots of the parameters that train now (requires_grad); frozen ones
        keep the user's values, as torch's peek would (their grad is None)."""
        now = tuple(p.requires_grad for p in self.params)
        if now == self._requires_grad:
            return
        if self.every:
            for leaf, f in zip(self.leaves, now):
                leaf.requires_grad_(f)
        index = {id(p): i for i, p in enumerate(self.params) if p.requires_grad or self.every}
        self._slots = [(m, n, self.leaves[index[id(p)]]) for m in self.model.modules()
                       for n, p in m._parameters.items() if p is not None and id(p) in index]
        self._requires_grad = now

    def current(self) -> List[nn.Parameter]:
        """The leaves, their requires_grad following the parameters'."""
        self._refresh_slots()
        return self.leaves

    @contextlib.contextmanager
    def swapped_in(self):
        """The user's module holding the pass buffer (and the private buffers) for the block."""
        self._refresh_slots()
        for p, leaf, g in zip(self.params, self.leaves, self._grads):
            if leaf.grad is not g:         # something dropped or replaced it: rebind
                leaf.grad = g
            hooks = p._backward_hooks      # made on the first register_hook: share it then
            if leaf._backward_hooks is not hooks:
                leaf._backward_hooks = hooks
        with swapped(self._slots, self.buffers.slots() if self.buffers is not None else ()):
            yield self.model


class ModelReplica:
    """A copy of the model on another device whose optimized parameters are
    views of that device's y buffer (their gradients of gy_new). The other
    parameters and the buffers follow the user's model at every step."""

    def __init__(self, model: nn.Module, device: torch.device, where: str):
        try:
            self.module = _cuda.move_module(copy.deepcopy(model), device)
        except Exception as e:
            raise TypeError(f"SAMPa needs a copy of the model for the y-pass {where}, and "
                            f"copy.deepcopy(model) failed: {e}") from e
        for p in self.module.parameters():
            p.grad = None
        self.model, self.device, self.where = model, device, where
        self.params: List[nn.Parameter] = []
        self._follow: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._users: List[Tuple[str, nn.Parameter]] = []

    def rebind(self, names: Sequence[str]) -> None:
        """The replica's parameters for the optimized names (again after a relayout)."""
        named = dict(self.module.named_parameters(remove_duplicate=True))
        users = dict(self.model.named_parameters(remove_duplicate=True))
        missing = [n for n in list(names) + list(users) if n not in named]
        if missing:       # the user's model has grown (or a parameter was renamed) since
            raise RuntimeError(f"parameter '{missing[0]}' is not in the replica of the model made at "
                               "construction; modules added to the model later (and parameters "
                               "registered under a new name) are not supported by the engine that "
                               f"runs the y-pass {self.where}: undo the change, or build the "
                               "optimizer again on the model as it is now")
        self.params = [named[n] for n in names]
        ours = set(names)
        self._users = [(n, users[n]) for n in names]
        self._follow = [(named[n], p) for n, p in users.items() if n not in ours]

    def bind(self, slabs) -> None:
        with torch.no_grad():
            for b in slabs:
                b.slab.bind_data(self.params, b.y)
                b.slab.bind_grad(self.params, b.gy_new)
        for q in self.params:
            q.requires_grad_(True)

    def sync(self) -> None:
        """The user's current buffers, modes and other parameters (frozen, or
        trained by another optimizer) into the replica."""
        for n, p in self._users:
            if p is not None and p._backward_hooks:
                raise RuntimeError(
                    f"parameter {n} has a tensor hook (p.register_hook); the y-pass runs on a copy "
                    f"of the model {self.where}, where the hook cannot act on its gradient. Remove "
                    "the hook (handle.remove()), or use engine='serial' or 'streams', which honour it")
        dst, src = [], []
        for m, r in zip(self.model.modules(), self.module.modules()):
            r.training = m.training
            for n, t in m._buffers.items():
                rt = r._buffers.get(n)
                if t is None or rt is None:
                    continue
                if rt.shape != t.shape or rt.dtype != t.dtype:
                    r._buffers[n] = _cuda.to_device(t.detach().clone(), self.device)
                else:
                    dst.append(rt)
                    src.append(t)
        for q, p in self._follow:
            dst.append(q.data)
            src.append(p.data)
        if dst:
            with torch.no_grad():
                torch._foreach_copy_(dst, src)
