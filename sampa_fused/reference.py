"""The algorithm one parameter at a time: a slow, readable SAMPa and SAM.

What `sampa_fused.SAMPa` and `SAM` compute (README, "Exactly what it computes")
without flat buffers, kernels or engines; the tests compare every engine and
backend against it. The peek and the base step are the base torch optimizer's
own `step()`, so it is exact for any base optimizer. Use it as the fast ones:
`ref = reference.SAMPa(model, loss_fn, torch.optim.SGD, rho=0.05, lam=0.2, lr=0.1)`,
then `loss = ref.step(batch)`. Param groups (`params=`) may carry their own
"rho" and "lam"; every trainable parameter is assumed to get a gradient.
"""
from __future__ import annotations

import copy

import torch

EPS = 1e-12


def global_norm(tensors) -> torch.Tensor:
    """One L2 norm over all tensors, accumulated in fp32."""
    return torch.sqrt(sum((t.float() ** 2).sum() for t in tensors))


class _Reference:
    def __init__(self, model, loss_fn, base_cls, rho=0.05, params=None, max_grad_norm=None,
                 adaptive=False, **base_kwargs):
        self.model, self.loss_fn, self.rho = model, loss_fn, rho
        self.max_grad_norm, self.adaptive = max_grad_norm, adaptive
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self.base = base_cls(params, **base_kwargs)
        self.params = [p for g in self.base.param_groups for p in g["params"]]

    def per_param(self, key):
        """A group's own value of `key`, else the default given at construction."""
        return [g.get(key, getattr(self, key)) for g in self.base.param_groups for _ in g["params"]]

    def grads(self, model_params, loss_fn, model, batch):
        for p in model_params:
            p.grad = None
        loss = loss_fn(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model_params]

    @torch.no_grad()
    def perturb(self, g):
        """x <- x + rho T^2 g / (||T g|| + eps), T = |x| (adaptive) or 1."""
        t = [p.float().abs() if self.adaptive else 1.0 for p in self.params]
        norm = global_norm([ti * gi.float() for ti, gi in zip(t, g)])
        for p, gi, ti, r in zip(self.params, g, t, self.per_param("rho")):
            p.copy_(p.float() + r / (norm + EPS) * (ti * ti * gi.float()))

    def base_step(self, x, g):
        """Back to x, then the base optimizer's own step with p.grad = g (clipped)."""
        with torch.no_grad():
            for p, v, gi in zip(self.params, x, g):
                p.copy_(v)
                p.grad = gi.to(p.dtype)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.base.step()


class SAM(_Reference):
    """g = grad f(x, b); xt = x + rho g/(||g|| + eps); x, s = base_step(x, s, grad f(xt, b))."""

    def step(self, batch):
        _, g = self.grads(self.params, self.loss_fn, self.model, batch)
        x = [p.detach().clone() for p in self.params]
        self.perturb(g)
        loss, gxt = self.grads(self.params, self.loss_fn, self.model, batch)
        self.base_step(x, gxt)
        return loss


class SAMPa(_Reference):
    """Keeps gy_t = grad f(y_t, B_t) and the held batch B_t between steps."""

    def __init__(self, model, loss_fn, base_cls, rho=0.05, lam=0.2, **kwargs):
        super().__init__(model, loss_fn, base_cls, rho, **kwargs)
        self.lam = lam
        self.ymodel = copy.deepcopy(model)   # the y-pass's model: its buffer updates stay here
        self.yparams = self._ycopies(self.params)
        self.gy = [torch.zeros_like(p) for p in self.params]   # gy_0 = 0
        self.held = None

    def _ycopies(self, params):
        names = {id(p): n for n, p in self.model.named_parameters()}
        ynamed = dict(self.ymodel.named_parameters())
        return [ynamed[names[id(p)]] for p in params]

    def add_param_group(self, group):
        self.base.add_param_group(group)
        new = self.base.param_groups[-1]["params"]
        self.params += new
        self.yparams += self._ycopies(new)
        self.gy += [torch.zeros_like(p) for p in new]

    def peek(self):
        """y = what the base optimizer would produce from (x, s) with gradient gy; s untouched."""
        x = [p.detach().clone() for p in self.params]
        state = copy.deepcopy(self.base.state_dict())
        for p, g in zip(self.params, self.gy):
            p.grad = g.clone()
        self.base.step()
        y = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, v in zip(self.params, x):
                p.copy_(v)
        self.base.load_state_dict(state)
        return x, y

    def step(self, batch):
        held = batch if self.held is None else self.held          # B_0 = B_1
        with torch.no_grad():   # the y-pass sees the model's modes and current buffers
            for m, ym in zip(self.model.modules(), self.ymodel.modules()):
                ym.training = m.training
            for b, yb in zip(self.model.buffers(), self.ymodel.buffers()):
                yb.copy_(b)
        x, y = self.peek()                                         # 2. y_{t+1}
        self.perturb(self.gy)                                      # 1. xt_t
        with torch.no_grad():
            for q, v in zip(self.yparams, y):
                q.copy_(v)
        loss, gxt = self.grads(self.params, self.loss_fn, self.model, held)        # 3.
        _, gy_new = self.grads(self.yparams, self.loss_fn, self.ymodel, batch)
        lam = self.per_param("lam")
        g = [(1 - lm) * a.float() + lm * b.float() for a, b, lm in zip(gxt, gy_new, lam)]   # 4.
        self.base_step(x, g)                                       # 5.
        self.gy, self.held = gy_new, batch                         # 6.
        return loss
