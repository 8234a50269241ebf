"""The engine contract: where the gradient passes of a step run.

An engine is built with a `Context` (the optimizer's narrow view for it) and
its options, and implements:

- `sampa_gradients(held, batch) -> Gradients`: the x̃-pass of the user's
  model (holding xt) on the held batch, its gradient into every replica's
  `g`, and the y-pass (y swapped into the model, or a replica elsewhere) on
  the new batch, its gradient into every replica's `gy_new`. The two are
  independent (the README algorithm's step 3). Losses stay on the device.
- `gradient(batch, which, private_buffers) -> PassResult`: one pass of the
  user's model into `g` (SAM), its buffer updates discarded when
  `private_buffers`.
- `replicas`: the flat buffers of every device or rank that keeps its own x
  and base state (default: the optimizer's one). The update runs on each;
  identical inputs give bit-identical replicas. After `sampa_gradients`
  returns, every replica's g and gy_new hold the step's gradients, ordered
  on the streams the updates run on.
- `buffer_plan(method)` (a classmethod, asked before the optimizer lays out
  its buffers): which pass buffers the optimizer's replica holds
  (state.BufferPlan). An engine that runs the x̃-pass on `ctx.x_pass()` with
  `ctx.x_leaves()` forms the points itself with `ctx.form(points)` before
  the pass that reads them (the serial engine: "xt", the x̃-pass, "y", the
  y-pass, in one shared buffer). The default, `in_place`, is for an engine
  that runs the x̃-pass on `ctx.model` with `ctx.params`: the optimizer then
  forms both points before `sampa_gradients` and keeps x in x_save. An
  engine whose replica needs fewer buffers than its class declared (a rank
  with one role) narrows them in its constructor with `ctx.set_buffer_plan`.
- `run_step(step, held, batch, structure)`: runs `step(held, batch)` (all the
  device work of one step) and returns its result; the graph engine captures
  and replays it instead.
- `keep_batch(batch)`: the copy of the batch held for the next step.
- `relayout()` after the optimizer laid its parameters out again,
  `sync_replicas()` after parameters or state changed outside a step,
  `close()` to release what the engine holds.

Engines import neither the optimizer nor its privates: everything they use
is on the `Context`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch

from .. import tree
from ..passes import PassResult
from ..state import LEGACY_PLAN, BufferPlan


@dataclass
class Gradients:
    loss_x: torch.Tensor                 # x̃-pass loss (on the held batch), 0-dim, on the device
    loss_y: torch.Tensor                 # y-pass loss (on the new batch)
    outputs: Any = None                  # the x̃-pass's loss_fn outputs (None on ranks that did not run it)
    got: Optional[List[bool]] = None     # per optimized parameter: a gradient in either pass


def union(a: Optional[List[bool]], b: Optional[List[bool]]) -> Optional[List[bool]]:
    if a is None or b is None:
        return a if b is None else b
    return [u or v for u, v in zip(a, b)]


class Context:
    """What the optimizer gives its engine. Set up by the optimizer; engines
    read it and call its methods, nothing else."""

    method: str                          # "SAMPa" or "SAM"
    model: torch.nn.Module               # the user's model (holds x, or xt in the x̃-pass)
    params: List[torch.nn.Parameter]     # the optimized parameters, in layout order
    names: List[str]                     # their names in the model
    primary: Any                         # the optimizer's Replica
    accumulation_steps: int
    fused: bool                          # the base optimizer has fused kernels (SGD, AdamW)
    has_scaler: bool                     # a GradScaler scales the losses
    base_name: str                       # the base optimizer's class name, for messages

    def __init__(self, **fields):
        self.__dict__.update(fields)

    # set by the optimizer: callables
    run_pass: Callable[..., PassResult]          # (module, batch, which, leaves=..., ...) -> PassResult
    y_pass: Callable                             # context manager: the model with y swapped in
    x_pass: Callable                             # context manager: the model with xt swapped in
    x_leaves: Callable[[], List[torch.Tensor]]   # the xt leaves (their grads are views of g)
    form: Callable                               # (points) -> None: xt and/or y into the pass buffers
    set_buffer_plan: Callable                    # (BufferPlan) -> None: the optimizer's replica by this plan
    y_leaves: Callable[[], List[torch.Tensor]]   # the y leaves (their grads are views of gy_new)
    private_buffers: Callable                    # context manager: the model's buffers private
    first_step: Callable[[], bool]               # no step has succeeded yet
    rollback: Callable[[], None]                 # undo a step that raised (x and buffers)
    make_replica: Callable                       # (device, plan=None) -> Replica with the same layout
    replicate_model: Callable                    # (device) -> ModelReplica
    sync_payload: Callable                       # () -> (flat buffers, small tensors, after-sync callback)
    fingerprint: Callable[[], List[tuple]]       # [(label, description)] of layout and settings
    param_groups: Callable[[], List[dict]]       # the optimizer's param groups (hyperparameters)


class Engine:
    name = "engine"

    def __init__(self, ctx: Context):
        self.ctx = ctx

    @classmethod
    def buffer_plan(cls, method: str) -> BufferPlan:
        return LEGACY_PLAN

    @property
    def replicas(self) -> list:
        return [self.ctx.primary]

    def sampa_gradients(self, held, batch) -> Gradients:
        raise NotImplementedError

    def gradient(self, batch, which: str, private_buffers: bool = False) -> PassResult:
        raise NotImplementedError

    def run_step(self, step: Callable, held, batch, structure):
        try:
            return step(held, batch)
        except BaseException:
            self.ctx.rollback()
            raise

    def keep_batch(self, batch):
        return tree.clone(batch)

    def relayout(self) -> None:
        pass

    def sync_replicas(self) -> None:
        pass

    def close(self) -> None:
        pass


def check_one_device(ctx: Context, engine: str) -> torch.device:
    devices = {p.device for p in ctx.params}
    if len(devices) != 1:
        raise ValueError(f"the {engine} engine runs on one device, but the parameters are on "
                         f"{sorted(map(str, devices))}; move the model to one device")
    return devices.pop()
