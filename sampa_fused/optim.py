"""SAMPa and SAM: the algorithm of README.md's "Exactly what it computes", one step each.

The elementwise work is the update layer's (`update/`), the gradient passes
the engine's (`engines/`), the layout and `opt.state` the flat state's
(`state.py`), the accept-or-refuse decision the step guard's (`guard.py`),
the torch.optim plumbing the shared base's (`sharpness.py`).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from . import checkpoint, tree
from .sharpness import Sharpness, StepOut, inactive
from .ymodel import YPass


class SAMPa(Sharpness):
    """Sharpness-aware minimization, parallelized (Xie, Pethick, Cevher, 2024).

    opt = SAMPa(model, loss_fn, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9)
    loss = opt.step(batch)   # the x̃-pass loss, on the held (previous) batch

    `loss_fn(model, batch)` returns the loss (or (loss, outputs), a mapping
    with "loss", an object with .loss). Both gradients of a step are
    independent: the engine may run them at the same time.
    """

    # kept buffers; the pass buffers (xt, y) are the engine's plan (state.BufferPlan)
    _buffer_names = ("x", "g", "gy_new", "gy")
    _group_keys = ("rho", "lam")

    def __init__(self, model: nn.Module, loss_fn: Callable, base_optimizer: type, *,
                 rho: float = 0.05, lam: float = 0.2, engine: str = "serial",
                 backend: str = "auto", **kwargs):
        if lam is None:
            raise ValueError("SAMPa: lam must be a number in [0, 1], got None")
        self._lam = lam
        super().__init__(model, loss_fn, base_optimizer, rho=rho, engine=engine, backend=backend, **kwargs)

    def _defaults_extra(self) -> dict:
        return {"lam": self._lam}

    def _bind_method(self) -> None:
        super()._bind_method()
        if "y" not in self.flat.primary.points:       # the y-pass runs on another replica
            self._ypass = None
            return
        if getattr(self, "_ypass", None) is None:
            self._ypass = YPass(self.model, self.flat.layout.params, self._private)
        else:
            self._ypass.params = list(self.flat.layout.params)
        self._ypass.bind(self.flat.primary.slabs)

    def _y_pass(self):
        return self._ypass.swapped_in()

    def _y_leaves(self):
        return self._ypass.leaves if self._ypass is not None else []

    def step(self, batch=None, closure=None, **extra):
        batch = self._begin(batch, closure, extra)
        held = self._held_for(batch)                       # first call: B_0 = B_1
        out = self.engine.run_step(self._step, held, batch, self._structure)
        return self._end(out, batch)

    def _step(self, held, batch) -> StepOut:
        """What one step queues on the device, in the README algorithm's order."""
        reps = self.engine.replicas
        self.guard.save_buffers()
        # 1. xt = x + rho gy / (||gy|| + eps)  -> the xt pass buffer
        # 2. y  = peek(x, s, gy)               -> the y pass buffer
        #    (formed by the engine, each before the pass that reads it; an
        #    in-place engine gets both here, xt written into the model's x)
        if self.flat.primary.in_place:
            self.update.save_x(reps)
            self.update.sampa_pre(reps)
        self._private.sync()
        # 3. gxt = grad f(xt, B_t) and gy_{t+1} = grad f(y, B_{t+1}), independent
        grads = self.engine.sampa_gradients(held, batch)
        #    losses and both gradients finite? ||gy_{t+1}||^2 for the next step
        invs = self._invs()
        checks = self.update.check(reps, (grads.loss_x, grads.loss_y), ("g", "gy_new"), "gy_new", invs)
        # 4. g = (1 - lam) gxt + lam gy_{t+1}
        # 5. x, s = base_step(x, s, g)
        # 6. keep gy_{t+1}           (only where the step is accepted: else x, s, gy stay)
        self.update.sampa_post(reps, checks, invs, inactive(grads.got))
        loss_ok = self.update.finite(reps[0], grads.loss_x, grads.loss_y)
        flags = self.update.flags(reps[0], loss_ok, checks)
        return StepOut(grads.loss_x.detach(), flags, grads.outputs, grads.got)

    def _held_for(self, batch):
        progress = self.progress
        if progress.held_saved is not None:      # from a checkpoint: rebuilt with this batch's types
            progress.held = tree.decode_like(progress.held_saved, batch, "held batch")
            progress.held_saved = None
        return batch if progress.held is None else progress.held

    def _keep(self, batch) -> None:
        self.progress.held = self.engine.keep_batch(batch)

    @property
    def held_batch(self):
        """B_t, the batch the next step's x̃-pass runs on (None before the first step)."""
        return self.progress.held

    # the checkpoint holds gy, ||gy||^2 and the held batch too
    def _extra_state(self) -> dict:
        return checkpoint.y_extra(self)

    def _validate_extra(self, extra, params) -> None:
        checkpoint.validate_y_extra(self, extra, params)

    def _load_extra(self, extra) -> None:
        checkpoint.load_y_extra(self, extra)


class SAM(Sharpness):
    """Sharpness-aware minimization (Foret et al., 2021), the baseline: two
    sequential gradients per step, same interface as SAMPa. Batch-norm
    statistics follow the pass at x only (the perturbed pass's updates are
    discarded, as davda54/sam's recipe does)."""

    _buffer_names = ("x", "g")     # and the xt pass buffer

    def __init__(self, model: nn.Module, loss_fn: Callable, base_optimizer: type, *,
                 rho: float = 0.05, engine: str = "serial", backend: str = "auto", **kwargs):
        if "lam" in kwargs:
            raise TypeError("SAM takes no lam: it has one gradient per pass and no mix; lam is "
                            "SAMPa's interpolation ratio (use SAMPa(..., lam=...))")
        super().__init__(model, loss_fn, base_optimizer, rho=rho, engine=engine, backend=backend, **kwargs)

    def step(self, batch=None, closure=None, **extra):
        batch = self._begin(batch, closure, extra)
        out = self.engine.run_step(self._step, None, batch, self._structure)
        return self._end(out, batch)

    def _step(self, _held, batch) -> StepOut:
        reps = self.engine.replicas
        invs = self._invs()
        self.guard.save_buffers()
        in_place = self.flat.primary.in_place
        self.update.save_x(reps)                                         # (in place only) x_save <- x
        first = self.engine.gradient(batch, "first pass")                # g = grad f(x, b)
        checks0 = self.update.check(reps, (first.loss,), ("g",), "g", invs)
        self.update.sam_perturb(reps, checks0, invs)                     # xt = x + rho g/(||g|| + eps)
        at = {} if in_place else {"point": "xt"}                         # the xt leaves, or x itself
        second = self.engine.gradient(batch, "perturbed pass", private_buffers=True, **at)  # g = grad f(xt, b)
        checks1 = self.update.check(reps, (), ("g",), None, invs)
        checks = [(ok0 & ok1, sq) for (ok0, sq), (ok1, _) in zip(checks0, checks1)]
        got = [a or b for a, b in zip(first.got, second.got)] if first.got and second.got else None
        self.update.sam_post(reps, checks, invs, inactive(got))         # x, s = base_step(x, s, g)
        # an overflowed first gradient poisons the perturbed pass: that is the
        # first pass's fault, not a non-finite loss
        loss_ok = self.update.finite(reps[0], first.loss) & (self.update.finite(reps[0], second.loss)
                                                             | ~checks0[0][0])
        flags = self.update.flags(reps[0], loss_ok, checks)
        return StepOut(second.loss.detach(), flags, first.outputs, got)
