"""The streams engine: one CUDA device, the x̃-pass and the y-pass of a SAMPa
step on two CUDA streams so that they overlap (README, 'Engines').

    SAMPa(model, loss_fn, torch.optim.SGD, engine="streams", lr=0.1, momentum=0.9)
    SAMPa(..., engine="streams", graph=True, warmup_steps=3)

The update kernels run on the current stream; the passes fork from it after
the pre-gradient update and join back before the check, with events, and no
host synchronisation. graph=True captures the optimizer's whole step as one
CUDA graph (see graph.py); SAM's passes are sequential and run on the
current stream (captured too with graph=True).
"""
from __future__ import annotations

from typing import Optional

from .. import _cuda, tree
from ..state import BufferPlan
from .base import Context, Gradients, union
from .graph import GraphRunner
from .serial import SerialEngine


class StreamsEngine(SerialEngine):
    """Two CUDA streams of one device: the x̃-pass on one, the y-pass on the
    other, forked from and joined back to the current stream."""

    name = "streams"

    def __init__(self, ctx: Context, graph: bool = False, warmup_steps: int = 3):
        if not isinstance(graph, bool):
            raise TypeError(f"engine='streams': graph must be True or False, got {graph!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"engine='streams': warmup_steps must be an int >= 1 (eager steps "
                             f"before the capture), got {warmup_steps!r}")
        if not _cuda.available():
            raise RuntimeError("engine='streams' needs a CUDA device, and torch.cuda.is_available() "
                               "is False on this machine; use engine='serial' (the same math on "
                               "one device, CPU included)")
        super().__init__(ctx)
        self.device = _cuda.logical(self.device)
        if not _cuda.is_cuda(self.device):
            raise ValueError(f"engine='streams' runs on one CUDA device, but the parameters are on "
                             f"{self.device}; move the model to the GPU (model.cuda()) before "
                             "building the optimizer")
        self._new_streams()
        self.graph: Optional[GraphRunner] = None
        if graph:
            if not ctx.fused:
                raise ValueError(
                    f"{ctx.method}: graph=True needs torch.optim.SGD or torch.optim.AdamW as base "
                    f"optimizer (their update reads its hyperparameters from device memory); "
                    f"{ctx.base_name} runs its own step() with host values that a CUDA graph would "
                    "freeze. Use graph=False.")
            if ctx.has_scaler:
                raise ValueError(f"{ctx.method}: graph=True does not take a GradScaler (its growth "
                                 "and skip decisions live on the host); use bf16 autocast or "
                                 "graph=False")
            self.graph = GraphRunner(ctx, self.device, warmup_steps, on_capture_failure=self._new_streams)

    def _new_streams(self) -> None:
        # Also after a failed capture: streams that took part in it start clean.
        self.streams = (_cuda.Stream(self.device), _cuda.Stream(self.device))

    @classmethod
    def buffer_plan(cls, method: str) -> BufferPlan:
        return BufferPlan(points=("xt", "y"))      # both passes at once: one buffer each

    def sampa_gradients(self, held, batch) -> Gradients:
        cur = _cuda.current_stream(self.device)
        sx, sy = self.streams
        self.ctx.form(("xt", "y"))                  # on `cur`, one launch per run
        # Fork: both passes start after the pre-gradient update queued on `cur`.
        sx.wait_stream(cur)
        sy.wait_stream(cur)
        try:
            # Backward runs on the streams of the forward ops, so each pass
            # (forward and backward) stays on its stream.
            with _cuda.stream(sx):
                x = self.x_pass(held)
            with _cuda.stream(sy):
                y = self.y_pass(batch)
        finally:
            # Join, also on error: nothing may still write buffers that a
            # rollback on `cur` restores.
            cur.wait_stream(sx)
            cur.wait_stream(sy)
        if not _cuda.is_capturing():
            # Tell the caching allocator which streams used memory that another
            # stream allocated, so that it is not reused too early.
            for t in (x.loss, y.loss):
                _cuda.record_stream(t, cur)
            for b, s in ((held, sx), (batch, sy)):
                for t in tree.tensors(b):
                    _cuda.record_stream(t, s)
        return Gradients(x.loss, y.loss, x.outputs, union(x.got, y.got))

    def run_step(self, step, held, batch, structure):
        if self.graph is None:
            return super().run_step(step, held, batch, structure)
        return self.graph.run(step, held, batch, structure)

    def keep_batch(self, batch):
        if self.graph is None:
            return super().keep_batch(batch)
        return self.graph.keep_batch(batch)
