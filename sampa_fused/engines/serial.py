"""The serial engine: one device, the x̃-pass then the y-pass. Same math as
every other engine and no speed-up; the baseline and the CPU path."""
from __future__ import annotations

import contextlib

from .base import Context, Engine, Gradients, check_one_device, union


class SerialEngine(Engine):
    name = "serial"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.device = check_one_device(ctx, self.name)

    def x_pass(self, held):
        """gxt = grad f(xt, B_t) into g (the model holds xt)."""
        ctx = self.ctx
        ctx.primary.zero("g")
        return ctx.run_pass(ctx.model, held, "x̃-pass", leaves=ctx.params)

    def y_pass(self, batch):
        """gy_{t+1} = grad f(y, B_{t+1}) into gy_new (y swapped into the model)."""
        ctx = self.ctx
        ctx.primary.zero("gy_new")
        with ctx.y_pass() as model:
            return ctx.run_pass(model, batch, "y-pass", leaves=ctx.y_leaves())

    def sampa_gradients(self, held, batch) -> Gradients:
        x = self.x_pass(held)
        y = self.y_pass(batch)
        return Gradients(x.loss, y.loss, x.outputs, union(x.got, y.got))

    def gradient(self, batch, which: str, private_buffers: bool = False):
        ctx = self.ctx
        ctx.primary.zero("g")
        with ctx.private_buffers() if private_buffers else contextlib.nullcontext():
            return ctx.run_pass(ctx.model, batch, which, leaves=ctx.params)
