"""What SAMPa and SAM share: construction and its checks, the torch.optim
plumbing (param groups, add_param_group, zero_grad, state_dict), and what a
step does before and after its device work (hyperparameters, the layout
checks, the one host read and the bookkeeping)."""
from __future__ import annotations

import contextlib
import numbers
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from . import checkpoint, context, tree
from .engines import ENGINE_OPTIONS, engine_class, make_engine
from .guard import NONFINITE_MODES, Progress, StepGuard
from .passes import PassRunner
from .saving import CompactStateDict
from .state import LEGACY_PLAN, FlatState
from .statewatch import Watch, watched
from .update import make_update, rule_for
from .update.common import check_number
from .update.generic import NoRule
from .wrapped import reduces_own_parameters, refuse_wrapped, resolved_engine
from .ymodel import PrivateBuffers, YPass, swapped


@dataclass
class StepOut:
    """What one step leaves on the device (static outputs under a CUDA graph)."""
    loss: torch.Tensor          # the x̃-pass loss (SAM: the perturbed pass's), 0-dim
    flags: torch.Tensor         # [losses finite, gradients finite]
    outputs: Any                # the x̃-pass's loss_fn outputs
    got: Optional[List[bool]]   # per parameter: a gradient in either pass


def inactive(got: Optional[List[bool]]):
    """The parameters that got no gradient in either pass (None: all did)."""
    if got is None or all(got):
        return None
    return frozenset(i for i, g in enumerate(got) if not g)


class Sharpness(torch.optim.Optimizer):
    """What SAMPa and SAM share: construction, the torch.optim plumbing
    (param groups, state_dict, add_param_group), the layout checks of a step."""

    _buffer_names: tuple = ()      # flat buffers per slab, by method
    _group_keys: tuple = ("rho",)  # keys this method adds to every param group
    # GradScaler.step(opt) hands its state to the optimizer instead of
    # unscaling; step() then explains what to do instead.
    _step_supports_amp_scaling = True

    def __init__(self, model: nn.Module, loss_fn: Callable, base_optimizer: type, *, rho: float,
                 engine: str, backend: str, params=None, nonfinite: str = "raise", grad_scaler=None,
                 max_grad_norm: Optional[float] = None, accumulation_steps: int = 1,
                 adaptive: bool = False, **base_kwargs):
        cls = type(self).__name__
        self._check_arguments(model, loss_fn, base_optimizer, nonfinite, grad_scaler, max_grad_norm,
                              accumulation_steps, adaptive, base_kwargs)
        check_rho_lam({"rho": rho, **self._defaults_extra()}, cls)
        refuse_wrapped(model, resolved_engine(engine), cls)    # DDP, FSDP, Fabric: before any collective
        engine_options = {k: base_kwargs.pop(k) for k in ENGINE_OPTIONS if k in base_kwargs}
        if params is None:   # as torch.optim.SGD(model.parameters()): frozen ones too
            params = [p for p in model.parameters() if p.is_floating_point()]
            if not any(p.requires_grad for p in params):
                raise ValueError(f"{cls}: the model has no trainable parameters "
                                 "(none with requires_grad=True)")
        self.model = model
        self._names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}

        self._building = True
        base = base_optimizer(params, **base_kwargs)
        if base.defaults.get("differentiable", False):
            raise ValueError(f"{cls}: a differentiable base optimizer (differentiable=True) is not "
                             "supported: the step updates flat buffers in place, outside autograd")
        extra = {"rho": rho, **self._defaults_extra()}
        for group in base.param_groups:
            for k, v in extra.items():
                group.setdefault(k, v)
        base.defaults.update(extra)
        super().__init__(base.param_groups, base.defaults)
        self._building = False
        self._engine_stale = False
        # The base optimizer's own objects: schedulers and edits act on both.
        self.base = base
        self.param_groups, self.state, self.defaults = base.param_groups, base.state, base.defaults
        self.nonfinite = nonfinite
        self.max_grad_norm = None if max_grad_norm is None else _number(max_grad_norm)
        self.accumulation_steps = accumulation_steps
        self.adaptive = adaptive
        self.last_outputs: Any = None     # the x̃-pass's loss_fn outputs of the last step
        self.last_loss: Optional[torch.Tensor] = None
        self.progress = Progress()
        self.guard = StepGuard(model, nonfinite, grad_scaler, cls)
        self.grad_scaler = self.guard.scaler
        self.passes = PassRunner(loss_fn, accumulation_steps, self.guard.scale, cls)
        self._private = PrivateBuffers(model)
        self._rule = rule_for(base)
        self._watch = Watch()
        # What a step would refuse is refused now (e.g. lr=nan, which torch accepts).
        for gi, group in enumerate(self.param_groups):
            self._group_hyper(group, f"{cls} param group {gi}")
        params, groups, names = self._param_list()
        # The engine says which pass buffers it needs before they are laid out.
        engine_cls = engine_class(engine, SimpleNamespace(method=cls, params=params,
                                                          fused=self._rule is not None))
        plan = LEGACY_PLAN if reduces_own_parameters(model) else engine_cls.buffer_plan(cls)
        self.flat = FlatState(params, groups, names, self._buffer_names,
                              self._rule if self._rule is not None else NoRule, backend,
                              plan=plan, generic=self._rule is None)
        self.update = make_update(base, self.flat, adaptive, self.max_grad_norm)
        self._requires_grad = self._requires_grad_now()
        self._step_tensors: Dict[int, torch.Tensor] = {}
        # model.state_dict() gives compact copies of the flat parameter views (saving.py)
        self._compact = CompactStateDict(self, model)
        self._ctx = context.build(self)
        self._after_layout()
        self.engine = make_engine(engine_cls, self._ctx, **engine_options)
        if not self.update.fused and len(self.engine.replicas) > 1:
            raise ValueError(f"{cls}: the {self.engine.name} engine keeps replicas of the optimizer "
                             "state and needs torch.optim.SGD or torch.optim.AdamW as base optimizer, "
                             f"not {type(base).__name__}")

    # ------------------------------------------------------------ arguments
    def _defaults_extra(self) -> dict:
        return {}

    def _check_arguments(self, model, loss_fn, base_optimizer, nonfinite, grad_scaler, max_grad_norm,
                         accumulation_steps, adaptive, base_kwargs) -> None:
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
        if issubclass(base_optimizer, torch.optim.LBFGS):
            raise ValueError(f"{cls}: {base_optimizer.__name__}.step needs a closure that "
                             "re-evaluates the loss several times per step, which SAM/SAMPa's "
                             "two-gradient step cannot offer; use a first-order optimizer "
                             "(SGD, AdamW, ...)")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"{cls}: nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if grad_scaler is not None and not (hasattr(grad_scaler, "scale") and hasattr(grad_scaler, "update")
                                            and hasattr(grad_scaler, "is_enabled")):
            raise TypeError(f"{cls}: grad_scaler must be a torch.amp.GradScaler, got "
                            f"{type(grad_scaler).__name__}")
        if max_grad_norm is not None and not (_number(max_grad_norm) or 0) > 0:
            raise ValueError(f"{cls}: max_grad_norm must be a number > 0 (or None), got {max_grad_norm!r}")
        if isinstance(accumulation_steps, bool) or not (isinstance(accumulation_steps, int)
                                                        and accumulation_steps >= 1):
            raise ValueError(f"{cls}: accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        if not isinstance(adaptive, bool):
            raise TypeError(f"{cls}: adaptive must be True or False, got {adaptive!r}")

    # ------------------------------------------------------------ layout
    def _check_param(self, p: torch.Tensor, where: str = "") -> None:
        cls = type(self).__name__ + where
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{cls}: a param group holds {type(p).__name__}, not a parameter")
        if id(p) not in self._names:      # a module added to the model since: look again
            self._names = {id(q): n for n, q in self.model.named_parameters(remove_duplicate=True)}
        if id(p) not in self._names:
            raise ValueError(f"{cls}: a parameter of shape {tuple(p.shape)} is not a parameter of "
                             "the model; every optimized parameter must belong to `model`")
        if not p.is_floating_point():
            raise TypeError(f"{cls}: parameter {self._names[id(p)]} has dtype {p.dtype}; "
                            "only floating-point parameters are supported")
        if p.layout != torch.strided or p.is_sparse:
            raise TypeError(f"{cls}: parameter {self._names[id(p)]} is not a dense tensor")

    def _param_list(self):
        params, groups, seen = [], [], set()
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                self._check_param(p, f" param group {gi}")
                if id(p) in seen:
                    raise ValueError(f"{type(self).__name__} param group {gi}: parameter "
                                     f"{self._names[id(p)]} appears in more than one param group")
                seen.add(id(p))
                params.append(p)
                groups.append(gi)
        return params, groups, [self._names[id(p)] for p in params]

    def _requires_grad_now(self):
        return tuple(p.requires_grad for p in self.flat.layout.params)

    def _relayout(self, keep_from: Optional[List[int]] = None) -> None:
        """Lay out again (a new param group, a storage or dtype changed),
        keeping gy, the state and the counts of every parameter that stays."""
        params, groups, names = self._param_list()
        self.flat.relayout(params, groups, names, keep_from)
        self._compact.install(self.model)
        self._after_layout()
        # An engine that cannot follow (peer: the model copy lacks a new
        # parameter) raises; it is asked again before every step until the
        # layout is one it can run, so no step runs on a half-built engine.
        self._engine_stale = True
        self.engine.relayout()
        self._engine_stale = False

    def _after_layout(self) -> None:
        ctx = self._ctx
        ctx.params, ctx.names, ctx.primary = self.flat.layout.params, self.flat.layout.names, self.flat.primary
        self._n_groups = len(self.param_groups)
        self._group_ids = [list(map(id, g["params"])) for g in self.param_groups]
        modules = list(self.model.modules())          # modules added since take part too
        self._private._modules = self.guard._modules = modules
        self._requires_grad = self._requires_grad_now()
        self._owners = self._param_owners()
        self._bind_method()
        self._publish()

    def _param_owners(self) -> list:
        """Per laid-out parameter, the module's parameter dict and key holding
        it: model.to('meta'), to_empty() or `module.weight = Parameter(...)`
        put a NEW object there, which the optimizer would never see."""
        modules = dict(self.model.named_modules())
        owners = []
        for p, name in zip(self.flat.layout.params, self.flat.layout.names):
            mod, _, leaf = name.rpartition(".")
            owner = modules.get(mod)
            ok = owner is not None and owner._parameters.get(leaf) is p
            owners.append((owner._parameters, leaf, name) if ok else None)
        return owners

    def _bind_method(self) -> None:
        """The xt leaves over the pass buffer (again after a relayout); none
        where the engine runs the x̃-pass on the model's own parameters."""
        rep = self.flat.primary
        if rep.in_place or "xt" not in rep.points:
            self._xpoint = None
            return
        if getattr(self, "_xpoint", None) is None:
            self._xpoint = YPass(self.model, self.flat.layout.params, None, every=True)
        else:
            self._xpoint.params = list(self.flat.layout.params)
        self._xpoint.bind(rep.slabs, "xt", "g")

    def _set_buffer_plan(self, plan) -> None:
        """The optimizer's replica by another plan (an engine narrowing it to
        its role, in its constructor)."""
        self.flat.replan(plan)
        self._bind_method()

    def _form(self, points) -> None:
        """xt and/or y into the pass buffers of every replica (engines call
        this before the pass that reads them)."""
        self.update.sampa_pre(self.engine.replicas, points)

    def _ensure_layout(self) -> None:
        """Per step: follow what the user did to the parameters since the last
        step (a storage, shape or dtype replaced: lay out again, keeping the
        state; a gradient replaced: bind it again; trainable set changed:
        the engine follows)."""
        if self._engine_stale:
            self._relayout_by_identity()
        self._follow_param_lists()
        if any(owner is not None and owner[0].get(owner[1]) is not p
               for p, owner in zip(self.flat.layout.params, self._owners)):
            self._follow_registrations()
        what = self.flat.check_params()
        if what is not None and what.startswith("meta:"):
            raise RuntimeError(f"{type(self).__name__}: parameter {what[5:]} is on the meta device "
                               "(model.to('meta')); move the model back to its device before stepping")
        if what == "relayout":
            device = self.flat.primary.device
            for p, n in zip(self.flat.layout.params, self.flat.layout.names):
                if p.device != device:
                    raise RuntimeError(
                        f"{type(self).__name__}: parameter {n} moved from {device} to {p.device} "
                        "after the optimizer was built; move the model before building the "
                        "optimizer (or build it again and load its state_dict)")
            self._relayout()
        now = self._requires_grad_now()
        if now != self._requires_grad:
            self._requires_grad = now
            self.engine.relayout()

    def _follow_param_lists(self) -> None:
        """Edits of a group's params list (append, remove, a new list) act at
        the next step, as in torch: lay out again, keeping the state of every
        parameter that stays. A list that cannot be used is refused, naming
        its group, before anything changes."""
        groups = self.param_groups
        if len(groups) == self._n_groups and all(
                type(g["params"]) is list and list(map(id, g["params"])) == ids
                for g, ids in zip(groups, self._group_ids)):
            return
        if len(groups) != self._n_groups:
            raise RuntimeError(f"{type(self).__name__}: param groups changed without add_param_group; "
                               "use opt.add_param_group(...)")
        for gi, g in enumerate(groups):
            ps = g.get("params")
            if isinstance(ps, torch.Tensor):
                ps = [ps]
            elif not isinstance(ps, list):
                try:
                    ps = list(ps)
                except TypeError:
                    raise TypeError(f"{type(self).__name__} param group {gi}: 'params' must be a list of "
                                    f"parameters, got {type(ps).__name__}") from None
            g["params"] = ps                  # torch's add_param_group keeps a list too
        params = self._param_list()[0]        # refuses, naming the group
        if not params:
            raise ValueError(f"{type(self).__name__}: the param groups hold no parameter any more")
        self._relayout_by_identity()

    def _relayout_by_identity(self) -> None:
        """Lay out the param groups' parameters as they are now, keeping the
        state of each parameter already laid out (matched by identity)."""
        old = {id(p): i for i, p in enumerate(self.flat.layout.params)}
        self._relayout([old.get(id(p), -1) for p in self._param_list()[0]])

    def _follow_registrations(self) -> None:
        """A laid-out parameter is no longer in its module slot. The same
        object registered under another name (torch.nn.utils.prune moves
        `weight` to `weight_orig`) is followed; a new object in the slot or
        a parameter gone from the model is refused."""
        cls = type(self).__name__
        now_names = {id(q): n for n, q in self.model.named_parameters(remove_duplicate=True)}
        for p, owner in zip(self.flat.layout.params, self._owners):
            if owner is None or owner[0].get(owner[1]) is p or id(p) in now_names:
                continue
            now = owner[0].get(owner[1])
            if now is not None and now.device.type == "meta":
                raise RuntimeError(
                    f"{cls}: parameter {owner[2]} of the model is on the meta device "
                    "(model.to('meta')); the optimizer holds the old one and would train it "
                    "unseen. Build the optimizer again on the model as it is now and load "
                    "opt.state_dict() into it")
            if isinstance(now, torch.Tensor):
                raise RuntimeError(
                    f"{cls}: parameter {owner[2]} of the model was replaced by a new Parameter "
                    "object (model.to_empty(), a meta round trip, or an assignment to the "
                    "module's attribute); the optimizer holds the old one and would train it "
                    "unseen. Take sd = opt.state_dict(), build the optimizer again on the model "
                    "as it is now, and call load_state_dict(sd) on it (same parameter order "
                    "and shapes)")
            gi = next(i for i, grp in enumerate(self.param_groups)
                      if any(q is p for q in grp["params"]))
            raise RuntimeError(
                f"{cls}: parameter {owner[2]} is no longer a parameter of the model (removed from "
                f"its module); the optimizer would train it unseen. Remove it from its param "
                f"group (opt.param_groups[{gi}]['params'] = [q for q in opt.param_groups[{gi}]['params'] "
                f"if q is not p]) to go on without it, or "
                "register it on the model again")
        self._names = now_names           # re-registered under new names: follow them
        self._relayout()

    # ------------------------------------------------------------ per step
    def _group_hyper(self, group: dict, where: str):
        """One group's (base hyperparameters, rho, lam), validated; numpy
        scalars and 1-element tensors count as numbers, as in torch."""
        for k in self._group_keys:
            if k not in group:
                raise ValueError(f"{where}: the hyperparameter {k!r} is missing; set it again "
                                 f"(opt.param_groups[i][{k!r}] = ...)")
        check_rho_lam(group, where)
        plain = {k: _plain(v) for k, v in group.items() if k != "params"}
        hp = self._rule.hyper(plain, where) if self._rule is not None else _generic_hyper(plain, where)
        return hp, _number(group["rho"]), _number(group.get("lam", 0.0))

    def _hyper(self):
        """Per group: (base hyperparameters, rho, lam), validated at every step
        since users and schedulers edit groups between steps."""
        cls = type(self).__name__
        if len(self.param_groups) != self._n_groups:
            raise RuntimeError(f"{cls}: param groups changed without add_param_group; use "
                               "opt.add_param_group(...)")
        return [self._group_hyper(group, f"{cls} param group {gi}")
                for gi, group in enumerate(self.param_groups)]

    def _begin(self, batch, closure, extra):
        cls = type(self).__name__
        batch, closure = _batch_from_wrapper(batch, closure)
        if extra:
            raise TypeError(f"{cls}.step() got unexpected arguments {sorted(extra)}")
        if "grad_scale" in self.__dict__ or "found_inf" in self.__dict__:
            raise RuntimeError(
                f"{cls}: scaler.step(opt) does not fit this optimizer: it runs both backward passes "
                "itself. Give the GradScaler to the optimizer (grad_scaler=scaler) and call "
                "opt.step(batch) alone; it scales, unscales, skips overflows and calls "
                "scaler.update() itself")
        _refuse_accelerate_accumulation(cls)
        if closure is not None:
            if batch is None:
                raise TypeError(f"{cls}.step(closure=...): the optimizer computes both gradients "
                                "itself by calling loss_fn(model, batch): pass the batch, "
                                "opt.step(batch) (a closure from a trainer is then run first). "
                                "Lightning: use manual optimization (self.automatic_optimization "
                                "= False) and call self.optimizers().step(batch=batch) in "
                                "training_step")
            with torch.enable_grad():
                closure()                     # trainers' closures: run, result ignored (README, Use)
        if batch is None:
            raise TypeError(f"{cls}.step(batch): pass the next batch; the optimizer calls "
                            "loss_fn(model, batch) itself (closures are not used)" + _trainer_hint())
        if callable(batch) and not isinstance(batch, (torch.Tensor, nn.Module)) and \
                not tree.tensors(batch):
            raise TypeError(f"{cls}.step(closure): the optimizer computes both gradients itself "
                            "by calling loss_fn(model, batch), so torch's opt.step(closure) idiom "
                            "does not apply: pass the batch, opt.step(batch)")
        _refuse_empty(batch, cls)
        hyper = self._hyper()
        hps = [h for h, _, _ in hyper]
        if self.update.fused and self._watch.dirty:   # opt.state was edited since the last step
            self.flat.allocate_state(hps, self.engine.replicas)
            self._apply_state_edits(hps)              # before a relayout would publish over them
        self._ensure_layout()
        if self.update.fused:
            self.flat.allocate_state(hps, self.engine.replicas)
        self._structure = (self.update.refresh(hyper, self.engine.replicas),
                           self.model.training, torch.is_grad_enabled(), self.loss_fn,
                           self.accumulation_steps, self.grad_scaler is not None)
        if getattr(self.engine, "graph", None) is not None:
            # A CUDA graph replays the tensor hooks it captured: a hook added or
            # removed since is another structure (run eagerly, then captured again).
            self._structure += (tuple(tuple(h) if h else () for h in
                                      (p._backward_hooks for p in self.flat.layout.params)),)
        self.guard.init_scaler(self.flat.primary.device)
        return batch

    def _end(self, out: StepOut, batch) -> torch.Tensor:
        """The one host read of the step; bookkeeping if it was accepted."""
        progress = self.progress
        accepted = self.guard.decide(out.flags, progress.t, progress)
        if accepted:
            inactive = (frozenset(i for i, g in enumerate(out.got) if not g)
                        if out.got is not None else None)
            if self.flat.advance(self.update.uses_state(), inactive or None):
                self._publish()
            else:
                self.flat.update_step_tensors(self._step_tensors)
            progress.t += 1
            self._keep(batch)
            self.last_outputs = out.outputs
            self.last_loss = out.loss         # accelerate's wrapper drops step's return value
        return out.loss

    def _keep(self, batch) -> None:
        pass

    def _rollback(self) -> None:
        """Undo a step that raised before its end: x on every replica, and the
        model's buffers (state and gy were not written)."""
        with torch.no_grad():
            self.update.restore_x(self.engine.replicas)
            self.guard.restore_buffers()

    def _invs(self):
        return self.guard.inv_scales([rep.device for rep in self.engine.replicas])

    def _reset_state(self) -> None:
        for rep in self.engine.replicas:
            for b in rep.slabs:
                for flat in b.state.values():
                    flat.zero_()
        self.flat.set_counts([0] * len(self.flat.layout.params))
        self._step_tensors = {}

    def _publish(self) -> None:
        if self.update.fused:
            self._step_tensors = {}
            self.flat.publish(self.state, self._rule, self._step_tensors)
            # a state a checkpoint load or the user put in place is watched too
            self.state = self.base.state = watched(self.base.state, self._watch)
            self._watch.dirty = False

    def _apply_state_edits(self, hps: List[dict]) -> None:
        """What the user did to `opt.state` since the last step, as torch's
        optimizer would take it at its next step: a tensor assigned into an
        entry is copied into the flat state (same shape and dtype, else
        refused); an entry deleted (or cleared, or missing one of its
        tensors) starts afresh; a state given to a parameter without one is
        used. Everything is checked before anything changes."""
        cls = type(self).__name__
        flat, rule, layout = self.flat, self._rule, self.flat.layout
        counts = flat.counts
        new_counts = list(counts)
        copies, fresh = [], []          # (param index, state name, tensor); param indices
        for i, p in enumerate(layout.params):
            st = dict.get(self.state, p)
            names = rule.state_names(hps[layout.groups[i]])
            s, k = layout.where[i]
            where = f"{cls}: opt.state[p] of parameter {layout.names[i]}"
            if counts[i] and (not st or any(n not in st for n in names)):
                fresh.append(i)         # torch: no state (or no buffer) -> initialised again
                new_counts[i] = 0
                continue
            if not st:
                continue
            primary = flat.primary.slabs[s]
            given = {}
            for n in names:
                v = st.get(n)
                if v is None:
                    continue
                view = primary.slab.views(primary.state[n])[k]
                if not isinstance(v, torch.Tensor):
                    raise TypeError(f"{where}: {n!r} must be a tensor, got {type(v).__name__}")
                if tuple(v.shape) != tuple(view.shape):
                    raise ValueError(f"{where}: {n!r} has shape {tuple(v.shape)}, the parameter's "
                                     f"is {tuple(view.shape)}; assign a tensor of the parameter's shape")
                if v.dtype != view.dtype:
                    raise ValueError(f"{where}: {n!r} has dtype {v.dtype}, the state's is {view.dtype}; "
                                     f"assign a tensor of dtype {view.dtype}")
                if not (v.data_ptr() == view.data_ptr() and v.stride() == view.stride()
                        and v.device == view.device):
                    given[n] = v
            step = _count_of(st.get("step"), counts[i] if rule.NAME == "adamw" else None, where)
            if counts[i] == 0 and given:      # a state for a parameter that had none
                missing = [n for n in names if n not in given]
                if missing or (rule.NAME == "adamw" and step is None):
                    need = missing + (["step"] if rule.NAME == "adamw" and step is None else [])
                    raise ValueError(f"{where} sets {sorted(given)} but not {need}; set all of "
                                     f"{names + (['step'] if rule.NAME == 'adamw' else [])}, or none")
                new_counts[i] = step if rule.NAME == "adamw" else 1
            elif counts[i] and rule.NAME == "adamw" and step is not None:
                new_counts[i] = step
            copies += [(i, n, v) for n, v in given.items()]
        with torch.no_grad():
            for rep in self.engine.replicas:
                views: Dict[tuple, list] = {}

                def view_of(i, n):
                    s, k = layout.where[i]
                    key = (s, n)
                    if key not in views:
                        b = rep.slabs[s]
                        views[key] = b.slab.views(b.state[n])
                    return views[key][k]
                for i in fresh:
                    for n in rule.state_names(hps[layout.groups[i]]):
                        view_of(i, n).zero_()
                for i, n, v in copies:
                    view_of(i, n).copy_(v)
        if new_counts != counts:
            flat.set_counts(new_counts)
        self._publish()

    # ------------------------------------------------------------ context
    @contextlib.contextmanager
    def _private_buffers(self):
        """The user's model with private copies of its buffers: a pass whose
        buffer updates are discarded (SAM's perturbed pass)."""
        self._private.sync()
        with swapped((), self._private.slots()):
            yield self.model

    def _y_pass(self):
        raise NotImplementedError(f"{type(self).__name__} has no y-pass")

    def _x_pass(self):
        """The user's model with the xt leaves swapped in (its own buffers)."""
        if self._xpoint is None:
            raise RuntimeError(f"{type(self).__name__}: the {self.engine.name} engine runs the "
                               "x̃-pass on the model's own parameters (no xt pass buffer)")
        return self._xpoint.swapped_in()

    def _x_leaves(self):
        return self._xpoint.current() if self._xpoint is not None else []

    def _y_leaves(self):
        raise NotImplementedError(f"{type(self).__name__} has no y-pass")

    # ------------------------------------------------------- introspection
    @property
    def loss_fn(self) -> Callable:
        """loss_fn(model, batch): may be replaced between steps."""
        return self.passes.loss_fn

    @loss_fn.setter
    def loss_fn(self, fn: Callable) -> None:
        if not callable(fn):
            raise TypeError(f"{type(self).__name__}: loss_fn must be callable as loss_fn(model, batch)")
        self.passes.loss_fn = fn

    @property
    def step_count(self) -> int:
        """Steps taken (refused and skipped ones do not count)."""
        return self.progress.t

    @property
    def skipped_steps(self) -> int:
        """Steps refused for non-finite values (nonfinite='skip', GradScaler overflows)."""
        return self.progress.skipped

    @property
    def backend(self) -> str:
        """'torch' or 'triton': what the update runs on (the optimizer's own replica)."""
        return self.flat.primary.backend

    # ------------------------------------------------------- torch.optim API
    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_building", True):
            return super().add_param_group(param_group)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            self._check_param(p, ".add_param_group")
        group = dict(param_group, params=params)
        for k in self._group_keys:
            group.setdefault(k, self.defaults[k])
        where = f"{type(self).__name__}.add_param_group"
        check_rho_lam(group, where)
        self._group_hyper({**self.defaults, **group}, where)
        old = {id(p): i for i, p in enumerate(self.flat.layout.params)}
        self.base.add_param_group(group)
        self.param_groups = self.base.param_groups
        new_params = self._param_list()[0]
        try:
            self._relayout([old.get(id(p), -1) for p in new_params])
        except Exception:
            # the engine refused the new layout: back to the old one, as if never
            # added (an engine that still refuses is asked again at the next step)
            self.param_groups.pop()
            with contextlib.suppress(Exception):
                self._relayout_by_identity()
            raise

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffer. Gradients stay views into it whatever
        `set_to_none` says: step() computes its own gradients, and one flat
        buffer is what makes its update one launch."""
        for b in self.flat.primary.slabs:
            b.g.zero_()

    def state_dict(self) -> Dict[str, Any]:
        return checkpoint.state_dict(self)

    def _extra_state(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Everything is checked first; then the checkpoint is applied as a
        whole. On any error nothing changes."""
        checkpoint.load_state_dict(self, state_dict)

    def _validate_extra(self, extra, params) -> None:
        pass

    def _load_extra(self, extra) -> None:
        pass

    def __deepcopy__(self, memo):
        raise TypeError(f"{type(self).__name__} cannot be deep-copied: its parameters are views "
                        "into its flat buffers and its engine holds streams and process groups. "
                        "Build a new optimizer for the copied model and load "
                        "opt.state_dict() into it")

    def __getstate__(self):
        raise TypeError(f"{type(self).__name__} cannot be pickled; save opt.state_dict() instead")

    def __repr__(self) -> str:
        p = sum(b.slab.numel for b in self.flat.primary.slabs)
        return (f"{type(self).__name__}(base={type(self.base).__name__}, engine={self.engine.name}, "
                f"backend={self.backend}, groups={len(self.param_groups)}, "
                f"slabs={len(self.flat.primary.slabs)}, elements={p})")


def _plain(v):
    """numpy scalars and 0-dim arrays as Python numbers (torch's optimizers
    take them); pairs such as betas element by element; anything else as is."""
    if isinstance(v, (bool, int, float, str, torch.Tensor)) or v is None:
        return v
    if isinstance(v, (tuple, list)):
        return type(v)(_plain(x) for x in v)
    if isinstance(v, numbers.Number) or (getattr(v, "ndim", None) == 0 and hasattr(v, "item")):
        return v.item() if hasattr(v, "item") else v
    return v


def check_rho_lam(group: dict, where: str) -> None:
    """rho a finite number >= 0 and, where the group has one, lam in [0, 1]
    (numpy scalars and 1-element tensors count as numbers)."""
    rho = _number(group.get("rho"))
    if rho is None or not 0 <= rho < float("inf"):
        raise ValueError(f"{where}: rho must be a finite number >= 0, got {group.get('rho')!r}")
    if "lam" in group:
        lam = _number(group["lam"])
        if lam is None or not 0 <= lam <= 1:
            raise ValueError(f"{where}: lam must be a number in [0, 1], got {group['lam']!r}")


def _number(v) -> Optional[float]:
    """A real number given as a Python number, a numpy scalar or a 1-element
    tensor, as a float; None for anything else."""
    v = _plain(v)
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.dtype == torch.bool or v.is_complex():
            return None
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _count_of(step, current: Optional[int], where: str) -> Optional[int]:
    """AdamW's 'step' entry as a count: None where it is absent or unchanged."""
    if step is None or current is None:
        return None
    n = _number(step)
    if n is None or not (n >= 0 and n == int(n)):
        raise ValueError(f"{where}: 'step' must be a whole number >= 0, got {step!r}")
    return None if int(n) == current else int(n)


def _refuse_empty(batch, cls: str) -> None:
    """A batch whose tensors are all empty gives a NaN mean loss: say so by name
    (the first non-empty tensor ends the look)."""
    ts = tree.tensors(batch)
    if ts and all(t.numel() == 0 for t in ts):
        shapes = ", ".join(str(tuple(t.shape)) for t in ts[:4])
        raise ValueError(f"{cls}.step(batch): the batch is empty (tensors of shape {shapes}); "
                         "skip empty batches (e.g. DataLoader(..., drop_last=True) or a check "
                         "before step)")


def _generic_hyper(group: dict, where: str) -> dict:
    for k in ("lr", "weight_decay"):
        if k in group and not isinstance(group[k], (bool, type(None))):
            check_number(group, k, where)
    return {}


def _batch_from_wrapper(batch, closure):
    """Optimizer wrappers (Lightning Fabric's) pass step's one argument on as
    `closure=`: opt.step(batch) arrives as step(closure=batch). A closure that
    cannot be called is that batch."""
    if batch is None and closure is not None and not callable(closure):
        return closure, None
    return batch, closure


def _trainer_hint() -> str:
    """A trainer that calls opt.step() with nothing, after its own backward."""
    if "transformers.trainer" in sys.modules:
        return (". Hugging Face Trainer: use sampa_fused.integrations.huggingface.SAMPaTrainer, "
                "whose training_step calls opt.step(inputs)")
    return ""


def _refuse_accelerate_accumulation(cls: str) -> None:
    """accelerate's accumulate() skips optimizer.step on all but every k-th
    batch, which here would drop those batches from training unseen."""
    state = sys.modules.get("accelerate.state")
    shared = getattr(getattr(state, "GradientState", None), "_shared_state", None) or {}
    steps = (shared.get("plugin_kwargs") or {}).get("num_steps", 1)
    if steps > 1:
        raise RuntimeError(
            f"{cls}: accelerate's gradient accumulation (gradient_accumulation_steps={steps}) would "
            f"skip {steps - 1} of every {steps} batches: this optimizer computes its gradients "
            f"itself. Build the Accelerator without gradient_accumulation_steps, drop "
            f"accelerator.accumulate(...), and pass accumulation_steps={steps} to {cls}")
