"""One forward/backward pass, the same for every engine: loss_fn over the
micro-batches of a batch (weighted, so a mean loss matches the whole batch),
each loss scaled by the GradScaler if any, backward into the bound flat
gradient buffer; which parameters got a gradient; a hook at the start of the
last backward (engines start their exchange there); the first-step freeze.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import nn

from . import tree
from .batching import micro_batches

_will_execute = torch._C._will_engine_execute_node


@dataclass
class PassResult:
    loss: torch.Tensor                 # the (unscaled, weighted) loss of the batch, detached, 0-dim
    outputs: Any = None                # what loss_fn returned besides the loss (None: nothing)
    got: Optional[List[bool]] = None   # per leaf: received a gradient (None: not asked)


def split_loss(out, method: str, which: str):
    """(loss, outputs) from what loss_fn returned: the loss alone, (loss,
    outputs...), a mapping with "loss", or an object with `.loss` (Hugging
    Face's ModelOutput)."""
    outputs = None
    loss = out
    if isinstance(out, torch.Tensor):
        pass
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        loss, outputs = out[0], (out[1] if len(out) == 2 else tuple(out[1:]))
    elif hasattr(out, "keys") and "loss" in out:
        loss, outputs = out["loss"], out
    elif hasattr(out, "loss") and isinstance(getattr(out, "loss"), torch.Tensor):
        loss, outputs = out.loss, out
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{method}: loss_fn must return a tensor ({which}): the loss, (loss, "
                        f"outputs), a mapping with 'loss' or an object with .loss; got "
                        f"{type(out).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{method}: loss_fn must return a scalar loss ({which}), got shape "
                         f"{tuple(loss.shape)}; reduce it, e.g. with .mean()")
    if not loss.is_floating_point():
        raise TypeError(f"{method}: loss_fn returned a {loss.dtype} loss ({which}); it must be "
                        "floating point")
    if not loss.requires_grad:
        raise ValueError(f"{method}: the loss of the {which} does not depend on the parameters "
                         "(requires_grad is False): loss_fn must compute the loss with the model it "
                         "is given as first argument, under grad mode")
    return loss.reshape(()), outputs


def _detach(outputs):
    """Outputs without their autograd graph (kept past the step, they would
    hold it). A plain object (one with `.loss`) is copied with its tensor
    attributes detached."""
    if outputs is None:
        return None
    if not tree.tensors(outputs) and hasattr(outputs, "__dict__"):
        outputs = copy.copy(outputs)
        for name, value in vars(outputs).items():
            if isinstance(value, torch.Tensor):
                setattr(outputs, name, value.detach())
        return outputs
    return tree.map_tensors(lambda t: t.detach(), outputs)


class PassRunner:
    def __init__(self, loss_fn: Callable, accumulation_steps: int, scale: Callable, method: str):
        self.loss_fn, self.accumulation_steps = loss_fn, accumulation_steps
        self.scale, self.method = scale, method
        self._nodes: dict = {}

    def loss(self, module: nn.Module, batch, which: str):
        with torch.enable_grad():      # also when step() is called under no_grad
            return split_loss(self.loss_fn(module, batch), self.method, which)

    def _accumulators(self, leaves: Sequence[torch.Tensor]):
        """The autograd nodes that accumulate the leaves' gradients, held so
        that autograd keeps using them (None for a leaf without grad)."""
        key = tuple(id(t) for t in leaves)
        flags = tuple(t.requires_grad for t in leaves)
        cached = self._nodes.get(key)
        if cached is None or cached[0] != flags:
            nodes = [torch.autograd.graph.get_gradient_edge(t).node if t.requires_grad else None
                     for t in leaves]
            cached = self._nodes[key] = (flags, nodes)
        return cached[1]

    def run(self, module: nn.Module, batch, which: str, leaves: Optional[Sequence[torch.Tensor]] = None,
            freeze: Sequence[torch.Tensor] = (), on_last_backward: Optional[Callable] = None,
            parts=None) -> PassResult:
        """loss_fn(module, micro-batch) and backward for each micro-batch.

        `leaves`: the tensors this pass's gradients go to; `got` then says
        which got one (in any micro-batch). `freeze`: tensors that must not
        take part (their requires_grad is off during the pass: a loss_fn that
        uses them instead of its model argument then fails clearly).
        `on_last_backward(got)`: called as the last backward starts, with
        which leaves this backward will reach. `parts`: (micro-batch, weight)
        pairs to use instead of cutting `batch`."""
        parts = micro_batches(batch, self.accumulation_steps) if parts is None else parts
        nodes = self._accumulators(leaves) if leaves is not None else None
        got = [False] * len(nodes) if nodes is not None else None
        total, outs = None, []
        with frozen(freeze):
            last = len(parts) - 1
            for k, (part, weight) in enumerate(parts):
                loss, outputs = self.loss(module, part, which)
                if weight != 1.0:
                    loss = loss * weight
                scaled = self.scale(loss)
                if nodes is not None or (on_last_backward is not None and k == last):
                    scaled.grad_fn.register_prehook(self._at_start(nodes, got, on_last_backward
                                                                   if k == last else None))
                with torch.enable_grad():
                    scaled.backward()
                total = loss.detach() if total is None else total + loss.detach()
                outs.append(_detach(outputs))
        return PassResult(total, outs[0] if len(outs) == 1 else (outs if any(o is not None for o in outs)
                                                                 else None), got)

    @staticmethod
    def _at_start(nodes, got, callback):
        def hook(_grad_outputs):
            if nodes is not None:
                now = [n is not None and _will_execute(n) for n in nodes]
                got[:] = [a or b for a, b in zip(got, now)]
            else:
                now = None
            if callback is not None:
                callback(now)
        return hook


@contextlib.contextmanager
def frozen(tensors: Sequence[torch.Tensor]):
    flags = [t.requires_grad for t in tensors]
    try:
        for t in tensors:
            t.requires_grad_(False)
        yield
    finally:
        for t, f in zip(tensors, flags):
            t.requires_grad_(f)
