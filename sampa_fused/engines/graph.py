"""The whole step as one CUDA graph (engine="streams", graph=True).

The graph captures the optimizer's own step: the fused update kernels, both
passes on their streams, the check, the accepted-or-not post update. What
the step reads from the host changes through device memory only: the
hyperparameter table (refreshed before each replay), the norms and flags.
This module adds what a graph needs around that step:

- warm-up: the first `warmup_steps` steps of a structure run eagerly (on the
  stream the capture will use), then the next one is captured and replayed;
- static inputs: the batch is copied into the graph's own buffers before
  each replay; B_{t+1} stays there as the next step's held batch;
- fallbacks: another structure (batch shapes, train/eval, a structural
  hyperparameter such as nesterov or weight decay switched on, a change of
  which parameters train) runs eagerly with the same math; one that lasts
  `warmup_steps` steps is captured in place of the old graph;
- failures: what cannot be captured (a host read in the model or loss_fn,
  data-dependent shapes...) raises a RuntimeError saying why, with nothing
  changed.

A replayed step runs exactly what was captured, including which parameters
get a gradient: a model whose set of used parameters changes from step to
step belongs with graph=False.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch

from .. import _cuda, tree


class _Captured:
    def __init__(self, key, graph, held: List[torch.Tensor], held_tree, new: List[torch.Tensor], out,
                 carries: bool):
        self.key, self.graph = key, graph
        self.held, self.held_tree, self.new = held, held_tree, new
        self.out, self.carries = out, carries


def _same(a, b) -> bool:
    """Equality that a value leaf without a plain == (an array, say) makes False."""
    try:
        r = a == b
    except Exception:
        return False
    return r if isinstance(r, bool) else False


class GraphRunner:
    def __init__(self, ctx, device: torch.device, warmup_steps: int,
                 on_capture_failure: Optional[Callable[[], None]] = None):
        self.ctx, self.device, self.warmup_steps = ctx, device, warmup_steps
        self.on_capture_failure = on_capture_failure
        self.stream = _cuda.Stream(device)
        self.captures = 0                 # graphs captured so far
        self.replays = 0                  # steps that ran as a graph replay
        self._cap: Optional[_Captured] = None
        self._pending: Any = None         # the structure of the last eager steps ...
        self._pending_n = 0               # ... and how many in a row
        self._carried: Any = None         # the held batch whose values the static held buffers hold
        self._replayed = False            # the last step was a replay

    # ------------------------------------------------------------ a step
    def run(self, step: Callable, held, batch, structure):
        key = (structure, self._batch_key(held, "held batch"), self._batch_key(batch, "batch"))
        first = self.ctx.first_step()
        cap = self._cap
        if cap is not None and _same(cap.key, key) and not first:
            self._pending, self._pending_n = None, 0   # warm-up counts steps in a row
            return self._replay(cap, held, batch)
        if _same(self._pending, key):
            self._pending_n += 1
        else:
            self._pending, self._pending_n = key, 1
        # SAMPa's first step runs once, eagerly (B_0 = B_1, gy_0 = 0).
        if self._pending_n > self.warmup_steps and not first:
            self._cap = None                  # free the old graph's memory first
            self._carried = None
            self._cap = self._capture(step, key, held, batch)
            return self._replay(self._cap, held, batch)
        return self._eager(step, held, batch)

    def keep_batch(self, batch):
        """The held batch for the next (accepted) step: the static buffers
        themselves when the graph kept B_{t+1} there, else a copy."""
        cap = self._cap
        if cap is not None and cap.carries and self._replayed:
            self._replayed = False
            self._carried = cap.held_tree
            return cap.held_tree
        self._carried = None
        return tree.clone(batch)

    def _batch_key(self, batch, what: str):
        if batch is None:
            return None
        for i, t in enumerate(tree.tensors(batch)):
            if _cuda.logical(t.device) != self.device:
                raise ValueError(
                    f"{self.ctx.method} with graph=True: every tensor of the batch must already be on "
                    f"{self.device}, but tensor {i} of the {what} (shape {tuple(t.shape)}) is on "
                    f"{t.device}; move the batch to the GPU before opt.step(batch) (e.g. "
                    "t.cuda(non_blocking=True)), or use graph=False")
        return tree.structure(batch)

    def _eager(self, step, held, batch):
        """Warm-up and fallback steps, on the capture's stream (cuBLAS/cuDNN
        state is per stream), forked from and joined back to the current one."""
        self._carried, self._replayed = None, False
        cur = _cuda.current_stream(self.device)
        s = self.stream
        s.wait_stream(cur)
        try:
            with _cuda.stream(s):
                out = step(held, batch)
        except BaseException:
            cur.wait_stream(s)
            self.ctx.rollback()
            raise
        cur.wait_stream(s)
        for t in (out.loss, out.flags):
            _cuda.record_stream(t, cur)
        return out

    def _replay(self, cap: _Captured, held, batch):
        with torch.no_grad():
            if held is not None and held is not self._carried:
                torch._foreach_copy_(cap.held, tree.tensors(held))
            new = tree.tensors(batch)
            if new:
                torch._foreach_copy_(cap.new, new)
        cap.graph.replay()
        self.replays += 1
        # A refused step keeps its held batch: the graph carries B_{t+1} over
        # only where the step was accepted, and until then holds `held`.
        self._carried, self._replayed = held, True
        out = cap.out
        return type(out)(out.loss.clone(), out.flags.clone(),
                         tree.map_tensors(lambda t: t.clone(), out.outputs), out.got)

    # ------------------------------------------------------------ capture
    def _capture(self, step, key, held, batch) -> _Captured:
        # Static buffers filled with this step's values: meaningful from the
        # start (a capture records, it does not run; the replay copies again).
        new = [t.detach().clone() for t in tree.tensors(batch)]
        new_tree = tree.rebuild(batch, new)
        held_static: List[torch.Tensor] = []
        held_tree = None
        if held is not None:
            held_static = [t.detach().clone() for t in tree.tensors(held)]
            held_tree = tree.rebuild(held, held_static)
        # B_{t+1} becomes the next step's held batch: when the shapes allow,
        # the graph keeps it on the device itself.
        carries = bool(held_static and [(t.shape, t.dtype) for t in held_static] ==
                       [(t.shape, t.dtype) for t in new]
                       and tree.structure(held) == tree.structure(batch))

        def body():
            out = step(held_tree, new_tree)
            if carries:             # B_{t+1} is the next held batch, if this step is accepted
                ok = out.flags.all()
                torch._foreach_copy_(held_static, [torch.where(ok, n, h) for n, h in zip(new, held_static)])
            return out

        graph = _cuda.CUDAGraph()
        cur = _cuda.current_stream(self.device)
        self.stream.wait_stream(cur)
        try:
            # thread_local: CUDA calls of other threads (a DataLoader's pinning
            # thread) do not break the capture; this thread's are still checked.
            with _cuda.graph(graph, self.stream, capture_error_mode="thread_local"):
                out = body()
        except Exception as e:
            _cuda.set_stream(cur)          # torch.cuda.graph leaves its stream current on failure
            self.stream = _cuda.Stream(self.device)
            if self.on_capture_failure is not None:
                self.on_capture_failure()
            raise RuntimeError(
                f"{self.ctx.method} with graph=True: the step could not be captured as a CUDA "
                f"graph ({type(e).__name__}: {e}). Typical causes: a host synchronisation in the "
                "model or loss_fn (.item(), .cpu(), .tolist(), printing a tensor, Python control "
                "flow on tensor values, data-dependent shapes such as nonzero or boolean masks, "
                "BatchNorm with momentum=None), or CPU tensors created inside the model. Nothing "
                "was changed by this step; use graph=False for this model.") from e
        cur.wait_stream(self.stream)
        self.captures += 1
        return _Captured(key, graph, held_static, held_tree, new, out, carries)
