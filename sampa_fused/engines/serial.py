"""The serial engine: one device, the x̃-pass then the y-pass. Same math as
every other engine and no speed-up; the baseline and the CPU path.

One pass buffer serves both passes: xt is formed, the x̃-pass runs on it,
then y is formed in the same buffer and the y-pass runs on it."""
from __future__ import annotations

import contextlib

from ..state import BufferPlan
from .base import Context, Engine, Gradients, check_one_device, union


class SerialEngine(Engine):
    name = "serial"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.device = check_one_device(ctx, self.name)

    @classmethod
    def buffer_plan(cls, method: str) -> BufferPlan:
        return BufferPlan(points=("xt", "y"), shared=True)

    def x_pass(self, held):
        """gxt = grad f(xt, B_t) into g (xt swapped into the model)."""
        ctx = self.ctx
        ctx.primary.zero("g")
        with ctx.x_pass() as model:
            return ctx.run_pass(model, held, "x̃-pass", leaves=ctx.x_leaves())

    def y_pass(self, batch):
        """gy_{t+1} = grad f(y, B_{t+1}) into gy_new (y swapped into the model)."""
        ctx = self.ctx
        ctx.primary.zero("gy_new")
        with ctx.y_pass() as model:
            return ctx.run_pass(model, batch, "y-pass", leaves=ctx.y_leaves())

    def sampa_gradients(self, held, batch) -> Gradients:
        self.ctx.form(("xt",))
        x = self.x_pass(held)
        self.ctx.form(("y",))           # the x̃-pass is done with the buffer
        y = self.y_pass(batch)
        return Gradients(x.loss, y.loss, x.outputs, union(x.got, y.got))

    def gradient(self, batch, which: str, private_buffers: bool = False, point=None):
        """One pass into g: at x (the model), or at the xt pass buffer
        (point='xt', SAM's perturbed pass)."""
        ctx = self.ctx
        ctx.primary.zero("g")
        with ctx.private_buffers() if private_buffers else contextlib.nullcontext():
            if point == "xt":
                with ctx.x_pass() as model:
                    return ctx.run_pass(model, batch, which, leaves=ctx.x_leaves())
            return ctx.run_pass(ctx.model, batch, which, leaves=ctx.params)
