"""SAMPa and SAM as torch.optim.Optimizers over flat parameter buffers.

The algorithm (SPEC section 1) reads top to bottom in `SAMPa.step`; the
elementwise math lives in the backends, the gradient passes in the engines.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .backends import EPS, make_backend
from .batching import clone_batch, micro_batches
from .engines import ENGINE_OPTIONS, make_engine
from .flat import Slab, build_slabs
from .rules import check_group, rule_for, upcast

NONFINITE_MODES = ("raise", "skip")


class SlabBuffers:
    """The flat buffers of one (device, dtype) slab.

    x       the model's parameters (views): x between steps, xt during the x̃-pass
    x_save  x kept bit-exact while the model holds xt
    g       the model's gradients (views): gxt
    y       the y-model's parameters (views)            (SAMPa only)
    gy_new  the y-model's gradients (views): gy_{t+1}    (SAMPa only)
    gy      gy_t, committed only when a step succeeds    (SAMPa only)
    state   base-optimizer state by name (momentum_buffer, exp_avg, ...)
    """

    def __init__(self, slab: Slab, sampa: bool, state_names: Sequence[str]):
        self.slab = slab
        self.x, self.x_save, self.g = slab.empty(), slab.empty(), slab.empty()
        if sampa:
            self.y, self.gy_new, self.gy = slab.empty(), slab.empty(), slab.empty()
        self.state: Dict[str, torch.Tensor] = {n: slab.empty() for n in state_names}


class _FlatSharpness(torch.optim.Optimizer):
    """What SAMPa and SAM share: construction, flat buffers, hyperparameters,
    the failure protocol, and (de)serialisation."""

    _sampa = False

    def __init__(self, model: nn.Module, loss_fn: Callable, base_optimizer: type, *,
                 rho: float, lam: Optional[float], engine: str, backend: str,
                 params=None, nonfinite: str = "raise", grad_scaler=None,
                 max_grad_norm: Optional[float] = None, accumulation_steps: int = 1,
                 **base_kwargs):
        cls = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{cls}: model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"{cls}: loss_fn must be callable as loss_fn(model, batch) -> scalar tensor")
        if isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"{cls}: pass the base optimizer class (e.g. torch.optim.SGD) and its "
                            "keyword arguments, not an optimizer instance")
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(f"{cls}: base_optimizer must be a torch.optim.Optimizer subclass, "
                            f"got {base_optimizer!r}")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"{cls}: nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if grad_scaler is not None and not (hasattr(grad_scaler, "scale") and hasattr(grad_scaler, "update")
                                            and hasattr(grad_scaler, "_scale")):
            raise TypeError(f"{cls}: grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"{cls}: max_grad_norm must be a number > 0 (or None), got {max_grad_norm!r}")
        if not (isinstance(accumulation_steps, int) and accumulation_steps >= 1):
            raise ValueError(f"{cls}: accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        self.grad_scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.accumulation_steps = accumulation_steps
        if self._sampa and lam is None:
            raise ValueError(f"{cls}: lam must be a number in [0, 1], got None")
        defaults_check = {"rho": rho, "lam": lam}
        msg = check_group(defaults_check, None, cls)
        if msg:
            raise ValueError(msg)

        engine_options = {k: base_kwargs.pop(k) for k in ENGINE_OPTIONS if k in base_kwargs}
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"{cls}: the model has no trainable parameters "
                                 "(none with requires_grad=True)")
        self.model, self.loss_fn = model, loss_fn
        self._names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}

        self._building = True
        base = base_optimizer(params, **base_kwargs)
        for group in base.param_groups:
            group.setdefault("rho", rho)
            if self._sampa:
                group.setdefault("lam", lam)
        base.defaults["rho"] = rho
        if self._sampa:
            base.defaults["lam"] = lam
        super().__init__(base.param_groups, base.defaults)
        self._building = False
        # The base optimizer's own objects: schedulers and edits act on both.
        self.base = base
        self.param_groups, self.state, self.defaults = base.param_groups, base.state, base.defaults
        self.rule = rule_for(base)
        self.nonfinite = nonfinite
        self.skipped_steps = 0           # steps refused for non-finite values (nonfinite="skip")
        self._t = 0                      # successful steps
        self._steps: List[int] = [0] * len(self.param_groups)   # steps taken, per param group
        # steps that used the base state, per group: SGD's momentum buffer starts
        # as g' the first time momentum is non-zero (a scheduler may switch it on)
        self._state_steps: List[int] = [0] * len(self.param_groups)
        self._held: Any = None           # the held batch B_t
        self._ymodel: Optional[nn.Module] = None
        self._step_tensors: Dict[int, torch.Tensor] = {}   # AdamW's 'step', one per group
        self._build()
        self._modules = list(model.modules())
        self._buffer_entries: list = []  # (module, name, tensor) saved for a rollback
        self._saved_buffers: List[torch.Tensor] = []
        self.engine = make_engine(engine, self, **engine_options)
        # the y-model the engine runs (the peer engine keeps its own on device B)
        ymodel = getattr(self.engine, "ymodel", None) or self._ymodel
        self._ymodules = list(ymodel.modules()) if self._sampa else []
        self._backend_name = backend
        self._attach_replicas()
        if not self.rule.fused and len(self._replicas) > 1:
            raise ValueError(f"{type(self).__name__}: the {self.engine.name} engine keeps replicas of "
                             f"the optimizer state and needs torch.optim.SGD or torch.optim.AdamW "
                             f"as base optimizer, not {type(self.base).__name__}")

    def _attach_replicas(self) -> None:
        """The flat buffers each update runs on (one list per device or rank
        that keeps x and the state), with a backend and ||gy||^2 for each."""
        self._replicas = getattr(self.engine, "replicas", None) or [self._bufs]
        self._backends = [make_backend(self._backend_name, r[0].x.device, [b.slab.dtype for b in r])
                          for r in self._replicas]
        self.backend = self._backends[0]
        if not hasattr(self, "_gy_sqs") or len(self._gy_sqs) != len(self._replicas):
            self._gy_sqs = [torch.zeros((), dtype=torch.float32, device=r[0].x.device)
                            for r in self._replicas]

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        """Lay out every trainable parameter in flat slabs (again after
        add_param_group or a requires_grad change), keeping current values of
        x, gy and the base state. Frozen parameters stay out, as torch's
        optimizers skip them (their gradient is None)."""
        params, groups = [], []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                self._check_param(p)
                if p.requires_grad:
                    params.append(p)
                    groups.append(gi)
        if not params:
            raise ValueError(f"{type(self).__name__}: no parameter of the param groups requires grad")
        self._flags = self._requires_grad_flags()
        old = self._per_param_values() if hasattr(self, "_bufs") else {}
        slabs = build_slabs(params, groups)
        if self._sampa and self._ymodel is None:
            self._ymodel = self._make_ymodel()
        self._params = params
        self._group_index = groups
        self._bufs = [SlabBuffers(s, self._sampa, self._state_names(s)) for s in slabs]
        if self._sampa:
            named = dict(self._ymodel.named_parameters(remove_duplicate=True))
            self._yparams = [named[self._names[id(p)]] for p in params]
            laid_out = {id(p) for p in params}
            for name, p in self.model.named_parameters(remove_duplicate=True):
                q = named[name]
                if id(p) in laid_out:          # optimized: the y-pass needs its gradient
                    q.requires_grad_(True)
                else:                          # not optimized: read the user's current value
                    q.requires_grad_(False)
                    q.data = p.data
                    q.grad = None
        for b in self._bufs:
            b.slab.gather([p.data for p in params], b.x)
            b.slab.bind_data(params, b.x)
            b.slab.bind_grad(params, b.g)
            if self._sampa:
                b.slab.gather(params, b.y)
                b.slab.bind_data(self._yparams, b.y)
                b.slab.bind_grad(self._yparams, b.gy_new)
                if "gy" in old:
                    b.slab.gather([old["gy"].get(id(p)) for p in params], b.gy)
            for n, flat in b.state.items():
                if n in old:
                    b.slab.gather([old[n].get(id(p)) for p in params], flat)
        if old:
            self._publish_state()

    def _state_names(self, slab: Slab) -> List[str]:
        """The base-state buffers a slab needs with its groups' hyperparameters now."""
        names: List[str] = []
        for seg in slab.segments:
            for n in self.rule.state_names(self.rule.hyper(self.param_groups[seg.group])):
                if n not in names:
                    names.append(n)
        return names

    def _requires_grad_flags(self):
        return tuple(p.requires_grad for g in self.param_groups for p in g["params"])

    def _relayout(self) -> None:
        own_replicas = getattr(self.engine, "replicas", None) is not None
        if own_replicas and not hasattr(self.engine, "relayout"):
            raise NotImplementedError(f"the {self.engine.name} engine cannot change the set of "
                                      "trained parameters (add_param_group or requires_grad "
                                      "changes); create the optimizer again")
        self._build()
        if hasattr(self.engine, "relayout"):
            self.engine.relayout()
        self._attach_replicas()

    def _check_param(self, p: torch.Tensor) -> None:
        cls = type(self).__name__
        if id(p) not in self._names:
            raise ValueError(f"{cls}: a parameter of shape {tuple(p.shape)} is not a parameter of "
                             "the model; every optimized parameter must belong to `model`")
        if not p.is_floating_point():
            raise TypeError(f"{cls}: parameter {self._names[id(p)]} has dtype {p.dtype}; "
                            "only floating-point parameters are supported")
        if p.layout != torch.strided or p.is_sparse:
            raise TypeError(f"{cls}: parameter {self._names[id(p)]} is not a dense tensor")

    def _make_ymodel(self, where: str = "") -> nn.Module:
        """A private copy of the model for the y-pass (its buffers are never
        written back). Engines that run the y-pass elsewhere make theirs here too."""
        try:
            ymodel = copy.deepcopy(self.model)
        except Exception as e:
            raise TypeError(f"SAMPa needs a private copy of the model for the y-pass{where}, and "
                            f"copy.deepcopy(model) failed: {e}") from e
        for p in ymodel.parameters():
            p.grad = None
        return ymodel

    @contextlib.contextmanager
    def _user_params_frozen(self):
        """For the first y-pass: a loss_fn that ignores its model argument would
        silently take the y-gradient at xt. With the user's parameters frozen,
        such a loss fails the requires_grad check of _loss with a clear message."""
        flags = [p.requires_grad for p in self._params]
        try:
            for p in self._params:
                p.requires_grad_(False)
            yield
        finally:
            for p, f in zip(self._params, flags):
                p.requires_grad_(f)

    def _per_param_values(self) -> Dict[str, Dict[int, torch.Tensor]]:
        """Copies of gy and the base state, per parameter (keyed by id(p))."""
        out: Dict[str, Dict[int, torch.Tensor]] = {}
        for b in self._bufs:
            named = dict(b.state)
            if self._sampa:
                named["gy"] = b.gy
            for name, flat in named.items():
                d = out.setdefault(name, {})
                for i, v in zip(b.slab.index, b.slab.views(flat)):
                    d[id(self._params[i])] = v.clone()
        return out

    # ---------------------------------------------------------- hyperparameters
    def _hyper(self):
        """Per group: (base hyperparameters, rho, lam), validated at every step
        since users and schedulers edit groups between steps."""
        if len(self._steps) != len(self.param_groups):
            raise RuntimeError(f"{type(self).__name__}: param groups changed without "
                               "add_param_group; use opt.add_param_group(...)")
        out = []
        for gi, group in enumerate(self.param_groups):
            msg = check_group(group if self._sampa else {"rho": group.get("rho")}, self.rule,
                              f"{type(self).__name__} param group {gi}")
            if msg:
                raise ValueError(msg)
            out.append((self.rule.hyper(group), float(group["rho"]),
                        float(group["lam"]) if self._sampa else None))
        if self.rule.fused:
            if any(self._state_steps) and not self.state:
                self._reset_state()        # the user cleared opt.state: start afresh, as torch would
            for bufs in self._replicas:    # a scheduler may switch momentum on: allocate first
                for b in bufs:
                    for n in self._state_names(b.slab):
                        if n not in b.state:
                            b.state[n] = b.slab.empty()
        return out

    def _reset_state(self) -> None:
        for bufs in self._replicas:
            for b in bufs:
                for flat in b.state.values():
                    flat.zero_()
        self._state_steps = [0] * len(self._state_steps)
        self._step_tensors = {}

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_building", True):
            return super().add_param_group(param_group)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            self._check_param(p)
        if getattr(self.engine, "replicas", None) is not None and not hasattr(self.engine, "relayout"):
            raise NotImplementedError(f"the {self.engine.name} engine does not support "
                                      "add_param_group; create the optimizer with all groups")
        self.base.add_param_group(dict(param_group, params=params))
        self._steps.append(0)
        self._state_steps.append(0)
        self._relayout()

    # ------------------------------------------------------- failure protocol
    def _ensure_layout(self) -> None:
        # requires_grad changed since the layout was made: lay out again.
        if self._requires_grad_flags() != self._flags:
            self._relayout()
        # model.zero_grad() sets p.grad to None, which would send gradients
        # elsewhere than the flat buffer: rebind them.
        elif any(p.grad is None for p in self._params):
            for b in self._bufs:
                b.slab.bind_grad(self._params, b.g)

    @property
    def _model_buffers(self) -> List[torch.Tensor]:
        return [t for m in self._modules for t in m._buffers.values() if t is not None]

    def _save_buffers(self) -> None:
        """Keep the model's buffers (batch-norm statistics...) for a rollback,
        by owner and name: a module may replace a buffer object in its forward."""
        entries = [(m, n, t) for m in self._modules for n, t in m._buffers.items() if t is not None]
        if [(t.shape, t.dtype, t.device) for _, _, t in entries] != \
                [(t.shape, t.dtype, t.device) for t in self._saved_buffers]:
            self._saved_buffers = [t.clone() for _, _, t in entries]
        elif entries:
            torch._foreach_copy_(self._saved_buffers, [t for _, _, t in entries])
        self._buffer_entries = entries

    def _sync_ymodel(self) -> None:
        """The y-model follows the user's model: train/eval per module, and the
        buffers as they are now (its own updates are never written back)."""
        xs, ys = [], []
        for m, ym in zip(self._modules, self._ymodules):
            ym.training = m.training
            for n, t in m._buffers.items():
                yt = ym._buffers.get(n)
                if t is None or yt is None:
                    continue
                if yt.shape != t.shape or yt.dtype != t.dtype or yt.device != t.device:
                    ym._buffers[n] = t.detach().clone()
                else:
                    xs.append(t)
                    ys.append(yt)
        if xs:
            torch._foreach_copy_(ys, xs)

    def _rollback(self) -> None:
        """Undo a step that did not complete: x and the model's buffers."""
        with torch.no_grad():
            for bufs in self._replicas:
                for b in bufs:
                    b.x.copy_(b.x_save)
            for (m, n, t) in self._buffer_entries:
                m._buffers[n] = t
            if self._buffer_entries:
                torch._foreach_copy_([t for _, _, t in self._buffer_entries], self._saved_buffers)

    def _accept(self, loss_ok: torch.Tensor, grad_ok: torch.Tensor) -> bool:
        """Commit or refuse the step. The one host read of a step: two flags,
        after all work is queued. With a GradScaler, a non-finite gradient is an
        overflow: the step is skipped and the scale backs off, as torch does."""
        loss_ok, grad_ok = (bool(v) for v in torch.stack([loss_ok, grad_ok.to(loss_ok.device)]).tolist())
        fine = loss_ok and grad_ok
        overflow = loss_ok and not grad_ok and self.grad_scaler is not None
        if fine or overflow or self.nonfinite == "skip":
            self._update_scaler(found_inf=not fine)
        if fine:
            return True
        self._rollback()
        if not overflow and self.nonfinite == "raise":
            what = "loss" if not loss_ok else "gradient"
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite {what} at step {self._t}; the step was refused "
                "and parameters, optimizer state and the held batch are unchanged. Lower the "
                "learning rate, check the data, or pass nonfinite='skip' to skip such steps.")
        self.skipped_steps += 1
        return False

    # --------------------------------------------------------- mixed precision
    def _loss_scales(self, names: Sequence[str]) -> list:
        """Per replica: 1 / loss scale (a device tensor: no host synchronisation)
        for the backend to unscale the named gradient buffers on the fly, or
        None. Where the gradients are used outside the fused updates (clipping,
        a generic base optimizer) they are unscaled in place here instead."""
        if self.grad_scaler is None:
            return [None] * len(self._replicas)
        inv = self.grad_scaler._scale.double().reciprocal().float()
        invs = [inv.to(bufs[0].x.device, non_blocking=True) for bufs in self._replicas]
        if self.rule.fused and self.max_grad_norm is None:
            return invs
        for bufs, inv_d in zip(self._replicas, invs):
            for b in bufs:
                for n in names:
                    getattr(b, n).mul_(inv_d)
        return [None] * len(self._replicas)

    def _init_scaler(self) -> None:
        """torch creates a GradScaler's scale lazily, on the stream that first
        scales a loss; with the passes on two streams the other pass would
        read it unordered. Create it here, on the current stream, before
        the passes fork."""
        scaler = self.grad_scaler
        if scaler is not None and scaler._scale is None:
            scaler._lazy_init_scale_growth_tracker(self._bufs[0].x.device)

    def _update_scaler(self, found_inf: bool) -> None:
        scaler = self.grad_scaler
        if scaler is None:
            return
        flag = torch.full((), float(found_inf), dtype=torch.float32, device=scaler._scale.device)
        scaler._per_optimizer_states[id(self)]["found_inf_per_device"][flag.device] = flag
        scaler.update()

    def _clip(self, lams: Optional[Sequence[float]]) -> None:
        """Clip the combined gradient (1 - lam) g + lam gy_new to max_grad_norm,
        like torch.nn.utils.clip_grad_norm_, and leave it in g (gy_new, which is
        kept for the next step, is not touched). Callers then combine with lam=0."""
        for bufs in self._replicas:
            combined = []
            for b in bufs:
                for seg in b.slab.segments:
                    g = b.g[seg.start:seg.end]
                    if lams is not None:
                        lam = lams[seg.group]
                        g.copy_(upcast(g).mul(1 - lam).add_(upcast(b.gy_new[seg.start:seg.end]), alpha=lam))
                combined.append(b.g.float().square().sum())
            norm = torch.stack(combined).sum().sqrt()
            coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
            for b in bufs:
                b.g.mul_(coef.to(b.g.dtype))

    def _advance(self, hyper) -> None:
        started = []
        for gi in range(len(self._steps)):
            self._steps[gi] += 1
            if self.rule.fused and self.rule.uses_state(hyper[gi][0]):
                if self._state_steps[gi] == 0:
                    started.append(gi)
                self._state_steps[gi] += 1
                if gi in self._step_tensors:
                    self._step_tensors[gi].fill_(float(self._state_steps[gi]))
        self._t += 1
        if started:   # groups whose state was just created now have state to show
            self._publish_state(started)

    def _publish_state(self, groups: Optional[Sequence[int]] = None) -> None:
        """Expose the flat state in `opt.state[p]` as torch's own optimizer
        would hold it (views, so no copies), for groups that have stepped.
        Runs at set-up, on load and on a group's first step, not every step:
        AdamW's 'step' is one CPU tensor per group, updated in place."""
        if not self.rule.fused:
            return
        for b in self._bufs:
            views = {n: b.slab.views(flat) for n, flat in b.state.items()}
            for k, i in enumerate(b.slab.index):
                gi = self._group_of(i)
                if groups is not None and gi not in groups:
                    continue
                st = self.state[self._params[i]]
                st.clear()
                if self._state_steps[gi] == 0:
                    continue
                for n in views:
                    st[n] = views[n][k]
                if self.rule.name == "adamw":
                    step = self._step_tensors.setdefault(gi, torch.tensor(0.0, dtype=torch.float32))
                    step.fill_(float(self._state_steps[gi]))
                    st["step"] = step

    def _group_of(self, i: int) -> int:
        return self._group_index[i]

    # ------------------------------------------------------------- passes
    def _loss(self, model: nn.Module, batch, which: str) -> torch.Tensor:
        loss = self.loss_fn(model, batch)
        cls = type(self).__name__
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"{cls}: loss_fn must return a tensor ({which}), got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"{cls}: loss_fn must return a scalar loss ({which}), got shape "
                             f"{tuple(loss.shape)}; reduce it, e.g. with .mean()")
        if not loss.is_floating_point():
            raise TypeError(f"{cls}: loss_fn returned a {loss.dtype} tensor ({which}); "
                            "it must be floating point")
        if not loss.requires_grad:
            raise ValueError(f"{cls}: the loss of the {which} does not depend on the parameters "
                             "(requires_grad is False): loss_fn must compute the loss with the "
                             "model it is given as first argument, under grad mode")
        return loss.reshape(())

    def _forward_backward(self, model: nn.Module, batch, which: str) -> torch.Tensor:
        """One pass for an engine: loss_fn over the micro-batches of `batch`
        (weighted, so a mean loss matches the whole batch), each scaled by the
        GradScaler if any, backward into the bound gradient buffer. Returns
        the unscaled loss, detached."""
        total = None
        for part, weight in micro_batches(batch, self.accumulation_steps):
            with torch.enable_grad():      # also when step() is called under no_grad
                loss = self._loss(model, part, which)
            if weight != 1.0:
                loss = loss * weight
            (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

    # ------------------------------------------------------- torch.optim API
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffer (gradients stay views into it)."""
        for b in self._bufs:
            b.g.zero_()

    def state_dict(self) -> Dict[str, Any]:
        sd = self.base.state_dict()
        for st in sd["state"].values():  # a torch optimizer loading this must not share tensors
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()
        extra = {"method": type(self).__name__, "t": self._t, "steps": list(self._steps),
                 "state_steps": list(self._state_steps),
                 "skipped_steps": self.skipped_steps}
        if self._sampa:
            gy: List[Optional[torch.Tensor]] = [None] * len(self._params)
            for b in self._bufs:
                for i, v in zip(b.slab.index, b.slab.views(b.gy)):
                    gy[i] = v.clone()
            extra.update(gy=gy, gy_sq=self._gy_sqs[0].clone(), held_batch=self._held)
        sd["sampa_fused"] = extra
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        sd = dict(state_dict)
        extra = sd.pop("sampa_fused", None)
        cls = type(self).__name__
        if extra is not None and extra.get("method") != cls:
            raise ValueError(f"{cls}.load_state_dict: this state dict was saved by "
                             f"{extra.get('method')}, not {cls}")
        self.base.load_state_dict(sd)
        # torch replaces the group list and the state on load: follow it.
        self.param_groups, self.state = self.base.param_groups, self.base.state
        for group in self.param_groups:   # a plain torch checkpoint has no rho / lam
            group.setdefault("rho", self.defaults["rho"])
            if self._sampa:
                group.setdefault("lam", self.defaults["lam"])
        if extra is not None:
            steps = list(extra["steps"])
            state_steps = list(extra.get("state_steps", steps))
        else:  # a plain base-optimizer checkpoint: warm start from its state
            steps = [self._steps_from_base(gi) for gi in range(len(self.param_groups))]
            state_steps = list(steps)
        if len(steps) != len(self.param_groups):
            raise ValueError(f"{cls}.load_state_dict: {len(steps)} groups of step counts for "
                             f"{len(self.param_groups)} param groups")
        self._steps, self._state_steps = steps, state_steps
        with torch.no_grad():
            for bufs in self._replicas:
                for b in bufs:
                    for n, flat in b.state.items():
                        for view, i in zip(b.slab.views(flat), b.slab.index):
                            v = self.state[self._params[i]].get(n)
                            view.copy_(v) if v is not None else view.zero_()
            if self._sampa:
                for bufs, sq in zip(self._replicas, self._gy_sqs):
                    for b in bufs:
                        if extra is not None:
                            b.slab.gather([t.to(b.gy.device) for t in extra["gy"]], b.gy)
                        else:
                            b.gy.zero_()
                    sq.copy_(extra["gy_sq"] if extra is not None else torch.zeros(()))
                self._held = extra["held_batch"] if extra is not None else None
        self._t = extra["t"] if extra is not None else 0
        self.skipped_steps = extra.get("skipped_steps", 0) if extra is not None else 0
        if self.rule.fused:
            for st in self.state.values():
                st.clear()
        self._step_tensors = {}
        self._publish_state()
        # engines keeping copies of x elsewhere take the loaded values too
        getattr(self.engine, "sync_replicas", lambda: None)()

    def _steps_from_base(self, gi: int) -> int:
        """Step count of a group from a plain torch optimizer's state: its
        'step' entries, or 1 for a state without them (SGD's momentum
        buffer: started, count unknown and unused)."""
        counts = set()
        for p in self.param_groups[gi]["params"]:
            st = self.state.get(p)
            if st:    # parameters that never had a gradient have no state: they do not count
                counts.add(int(float(st["step"])) if "step" in st else 1)
        if len(counts) > 1:
            raise ValueError(f"{type(self).__name__}.load_state_dict: param group {gi} has "
                             "parameters at different step counts; cannot continue it as one group")
        return counts.pop() if counts else 0

    def __repr__(self) -> str:
        p = sum(b.slab.numel for b in self._bufs)
        return (f"{type(self).__name__}(base={type(self.base).__name__}, engine={self.engine.name}, "
                f"backend={self.backend.name}, groups={len(self.param_groups)}, "
                f"slabs={len(self._bufs)}, elements={p})")


class SAMPa(_FlatSharpness):
    """Sharpness-aware minimization, parallelized (Xie, Pethick, Cevher, 2024).

    opt = SAMPa(model, loss_fn, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9)
    loss = opt.step(batch)   # loss at the perturbed point on the held batch

    `loss_fn(model, batch)` returns a scalar loss. Both gradients of a step are
    independent: the engine may run them at the same time.
    """

    _sampa = True

    def __init__(self, model: nn.Module, loss_fn: Callable, base_optimizer: type, *,
                 rho: float = 0.05, lam: float = 0.2, engine: str = "serial",
                 backend: str = "auto", **kwargs):
        super().__init__(model, loss_fn, base_optimizer, rho=rho, lam=lam, engine=engine,
                         backend=backend, **kwargs)

    def step(self, batch=None):  # noqa: C901 - mirrors SPEC section 1
        if batch is None:
            raise TypeError("SAMPa.step(batch): pass the next batch; the optimizer calls "
                            "loss_fn(model, batch) itself (closures are not used)")
        whole = getattr(self.engine, "whole_step", None)
        if whole is not None:              # e.g. the streams engine replaying a CUDA graph
            return whole(batch)
        hyper = self._hyper()
        self._ensure_layout()
        self._init_scaler()
        held = batch if self._held is None else self._held          # first call: B_0 = B_1
        with torch.no_grad():
            self._save_buffers()
            self._sync_ymodel()
            # 1. xt = x + rho * gy / (||gy|| + eps)   -> the model
            # 2. y  = peek(x, s, gy)                  -> the y-model
            if self.rule.fused:
                for backend, bufs, gy_sq in zip(self._backends, self._replicas, self._gy_sqs):
                    gy_norm = gy_sq.sqrt()                        # ||gy_t||, on the device
                    for b in bufs:
                        for seg in b.slab.segments:
                            hp, rho, _ = hyper[seg.group]
                            backend.sampa_pre(b, seg, self.rule, hp, self._state_steps[seg.group], rho, gy_norm)
            else:
                self._generic_pre(hyper, self._gy_sqs[0].sqrt())
        # 3. gxt = grad f(xt, B_t) and gy_{t+1} = grad f(y, B_{t+1}), independent
        try:
            loss_x, loss_y = self.engine.sampa_gradients(held, batch)
        except BaseException:
            self._rollback()
            raise
        with torch.no_grad():
            invs = self._loss_scales(("g", "gy_new"))
            checks = [backend.check(bufs, (), ("g", "gy_new"), "gy_new", inv_scale=inv)
                      for backend, bufs, inv in zip(self._backends, self._replicas, invs)]
            loss_ok = torch.isfinite(loss_x) & torch.isfinite(loss_y).to(loss_x.device)
            if not self._accept(loss_ok, checks[0][0]):
                return loss_x.detach()
            # 4. g = (1 - lam) gxt + lam gy_{t+1}
            # 5. x, s = base_step(x, s, g)
            # 6. keep gy_{t+1} and B_{t+1}
            lams = [h[2] for h in hyper]
            if self.max_grad_norm is not None:
                self._clip(lams)                  # g now holds the clipped combination
                lams = [0.0] * len(lams)
            if self.rule.fused:
                for backend, bufs, inv in zip(self._backends, self._replicas, invs):
                    for b in bufs:
                        for seg in b.slab.segments:
                            hp = hyper[seg.group][0]
                            backend.sampa_post(b, seg, self.rule, hp, self._state_steps[seg.group],
                                               lams[seg.group], inv_scale=inv)
            else:
                self._generic_post(lams)
            self._gy_sqs = [sq for _, sq in checks]
            self._held = clone_batch(batch)    # pipelines may reuse the batch's buffers
            self._advance(hyper)
        return loss_x.detach()

    # Any other base optimizer: its own step() gives the peek and the step.
    def _generic_pre(self, hyper, gy_norm) -> None:
        for b in self._bufs:
            b.x_save.copy_(b.x)
            b.g.copy_(b.gy)
        saved = self._snapshot_base()
        self.base.step()                      # x <- y (the peek) ...
        self._restore_base(saved)             # ... with the state left untouched
        for b in self._bufs:
            b.y.copy_(b.x)
            b.x.copy_(b.x_save)
            for seg in b.slab.segments:
                rho = hyper[seg.group][1]
                x, gy = b.x[seg.start:seg.end], b.gy[seg.start:seg.end]
                x.copy_(upcast(x) + (rho / (gy_norm + EPS)) * upcast(gy))

    def _generic_post(self, lams) -> None:
        for b in self._bufs:
            for seg in b.slab.segments:
                lam = lams[seg.group]
                g = b.g[seg.start:seg.end]
                g.copy_(upcast(g).mul(1 - lam).add_(upcast(b.gy_new[seg.start:seg.end]), alpha=lam))
            b.x.copy_(b.x_save)
        self.base.step()
        for b in self._bufs:
            b.gy.copy_(b.gy_new)

    def _snapshot_base(self):
        state = {p: {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                     for k, v in st.items()} for p, st in self.base.state.items()}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.base.param_groups]
        return state, groups

    def _restore_base(self, saved) -> None:
        state, groups = saved
        self.base.state.clear()
        self.base.state.update(state)
        for g, s in zip(self.base.param_groups, groups):
            g.update(s)


class SAM(_FlatSharpness):
    """Sharpness-aware minimization (Foret et al., 2021), the baseline:
    two sequential gradients per step, same interface as SAMPa."""

    def __init__(self, model: nn.Module, loss_fn: Callable, base_optimizer: type, *,
                 rho: float = 0.05, engine: str = "serial", backend: str = "auto", **kwargs):
        super().__init__(model, loss_fn, base_optimizer, rho=rho, lam=None, engine=engine,
                         backend=backend, **kwargs)

    def step(self, batch=None):
        if batch is None:
            raise TypeError("SAM.step(batch): pass the batch; the optimizer calls "
                            "loss_fn(model, batch) itself (closures are not used)")
        whole = getattr(self.engine, "whole_step", None)
        if whole is not None:              # e.g. the streams engine replaying a CUDA graph
            return whole(batch)
        hyper = self._hyper()
        self._ensure_layout()
        self._init_scaler()
        with torch.no_grad():
            self._save_buffers()
            for bufs in self._replicas:
                for b in bufs:
                    b.x_save.copy_(b.x)
        try:
            loss0 = self.engine.gradient(batch, "first pass")                 # g = grad f(x, b)
            with torch.no_grad():
                invs = self._loss_scales(("g",))
                firsts = []
                for backend, bufs, inv in zip(self._backends, self._replicas, invs):
                    ok0, g_sq = backend.check(bufs, (), ("g",), "g", inv_scale=inv)
                    firsts.append(ok0)
                    g_norm = g_sq.sqrt()
                    for b in bufs:                                             # xt = x + rho g/(||g||+eps)
                        for seg in b.slab.segments:
                            backend.sam_perturb(b, seg, hyper[seg.group][1], g_norm, inv_scale=inv)
            loss = self.engine.gradient(batch, "perturbed pass")              # g = grad f(xt, b)
        except BaseException:
            self._rollback()
            raise
        with torch.no_grad():
            invs = self._loss_scales(("g",))
            ok, _ = self.backend.check(self._replicas[0], (), ("g",), None, inv_scale=invs[0])
            # an overflowed first gradient poisons the perturbed pass: that is
            # the first pass's fault, not a non-finite loss
            loss_ok = torch.isfinite(loss0) & (torch.isfinite(loss) | ~firsts[0])
            if not self._accept(loss_ok, ok & firsts[0]):
                return loss.detach()
            if self.max_grad_norm is not None:
                self._clip(None)
            if self.rule.fused:                                                # x, s = base_step(x, s, g)
                for backend, bufs, inv in zip(self._backends, self._replicas, invs):
                    for b in bufs:
                        for seg in b.slab.segments:
                            hp = hyper[seg.group][0]
                            backend.sam_post(b, seg, self.rule, hp, self._state_steps[seg.group],
                                             inv_scale=inv)
            else:
                for b in self._bufs:
                    b.x.copy_(b.x_save)
                self.base.step()
            self._advance(hyper)
        return loss.detach()
