"""What the optimizer shows its engine: the narrow `Context` of
engines/base.py, and the two things an engine that keeps replicas on other
ranks needs from it (what to broadcast, what every rank must agree on)."""
from __future__ import annotations

import weakref
from typing import List

import torch

from .engines.base import Context
from .ymodel import ModelReplica


def build(opt) -> Context:
    """The engine's view of the optimizer. Its callables hold the optimizer
    weakly: no reference cycle, so an optimizer the user drops is freed at
    once (and its engine closes its process group) at the same point of
    the program on every rank, not whenever the garbage collector runs."""
    me = weakref.ref(opt)

    def call(name):
        def method(*args, **kwargs):
            return getattr(me(), name)(*args, **kwargs)
        return method

    model, flat = opt.model, opt.flat
    return Context(method=type(opt).__name__, model=model, params=[], names=[], primary=None,
                   accumulation_steps=opt.accumulation_steps, fused=opt.update.fused,
                   has_scaler=opt.grad_scaler is not None, base_name=type(opt.base).__name__,
                   run_pass=opt.passes.run, first_step=lambda: me().progress.t == 0,
                   rollback=call("_rollback"), make_replica=flat.make_replica,
                   replicate_model=lambda device, where="": ModelReplica(model, device, where),
                   private_buffers=call("_private_buffers"), y_pass=call("_y_pass"),
                   y_leaves=call("_y_leaves"), x_pass=call("_x_pass"), x_leaves=call("_x_leaves"),
                   form=call("_form"), set_buffer_plan=call("_set_buffer_plan"),
                   sync_payload=lambda: sync_payload(me()), fingerprint=lambda: fingerprint(me()),
                   param_groups=lambda: me().param_groups)


def sync_payload(opt):
    """What an engine that keeps replicas on other ranks broadcasts: the
    flat buffers, the small tensors (norms, counters, GradScaler, the
    model's other parameters and buffers), and what to do after."""
    rep = opt.flat.primary
    flats = []
    for b in rep.slabs:
        flats += [b.x] + list(b.state.values()) + [getattr(b, n) for n in ("gy",) if n in opt._buffer_names]
    counters = torch.tensor([opt.progress.t, opt.progress.skipped] + opt.flat.counts, dtype=torch.int64)
    laid_out = {id(p) for p in opt.flat.layout.params}
    small = [rep.gy_sq, counters] + opt.guard.scaler_tensors()
    small += [p.data for p in opt.model.parameters() if id(p) not in laid_out]
    small += [t for m in opt.model.modules() for t in m._buffers.values() if t is not None]

    def after() -> None:
        c = counters.tolist()
        opt.progress.t, opt.progress.skipped = c[0], c[1]
        if c[2:] != opt.flat.counts:
            opt.flat.set_counts(c[2:])
            opt._publish()
    return flats, small, after


def fingerprint(opt) -> List[tuple]:
    """Layout and settings that every rank of a group must agree on."""
    def val(v):
        return repr(v.tolist()) if isinstance(v, torch.Tensor) else repr(v)
    names = opt._names
    comps = [("method", type(opt).__name__),
             ("base optimizer", f"{type(opt.base).__module__}.{type(opt.base).__qualname__}"),
             ("nonfinite mode", opt.nonfinite),
             ("training options", f"accumulation_steps={opt.accumulation_steps} "
                                  f"max_grad_norm={opt.max_grad_norm} adaptive={opt.adaptive}"),
             ("GradScaler settings", opt.guard.scaler_settings()),
             ("number of param groups", str(len(opt.param_groups)))]
    for gi, g in enumerate(opt.param_groups):
        hp = "; ".join(f"{k}={val(v)}" for k, v in sorted(g.items()) if k != "params")
        comps.append((f"hyperparameters of param group {gi}", hp))
        ps = "; ".join(f"{names.get(id(p), '?')} {tuple(p.shape)} {p.dtype}" for p in g["params"])
        comps.append((f"parameters of param group {gi}", ps))
    mb = "; ".join(f"{n} {tuple(b.shape)} {b.dtype}" for n, b in opt.model.named_buffers())
    comps.append(("model buffers", mb))
    mp = "; ".join(f"{n} {tuple(q.shape)} {q.dtype}" for n, q in opt.model.named_parameters())
    comps.append(("model parameters", mp))
    comps.append(("flat layout", "; ".join(f"{b.slab.dtype} {b.slab.numel}" for b in opt.flat.primary.slabs)))
    return comps
