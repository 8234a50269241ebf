"""What SAMPa and SAM share: construction and its checks, the torch.optim
plumbing (param groups, add_param_group, zero_grad, state_dict), and what a
step does before and after its device work (hyperparameters, the layout
checks, the one host read and the bookkeeping)."""
from __future__ import annotations

import contextlib
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
from .state import FlatState
from .update import make_update, rule_for
from .update.common import check_number
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
        self._check_rho_lam({"rho": rho, **self._defaults_extra()}, cls)
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
        # The base optimizer's own objects: schedulers and edits act on both.
        self.base = base
        self.param_groups, self.state, self.defaults = base.param_groups, base.state, base.defaults
        self.nonfinite = nonfinite
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
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
        params, groups, names = self._param_list()
        # The engine says which pass buffers it needs before they are laid out.
        engine_cls = engine_class(engine, SimpleNamespace(method=cls, params=params,
                                                          fused=self._rule is not None))
        self.flat = FlatState(params, groups, names, self._buffer_names,
                              self._rule if self._rule is not None else _no_state, backend,
                              plan=engine_cls.buffer_plan(cls), generic=self._rule is None)
        self.update = make_update(base, self.flat, adaptive, self.max_grad_norm)
        self._flags = self._grad_flags()
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
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float))
                                              and not isinstance(max_grad_norm, bool) and max_grad_norm > 0):
            raise ValueError(f"{cls}: max_grad_norm must be a number > 0 (or None), got {max_grad_norm!r}")
        if isinstance(accumulation_steps, bool) or not (isinstance(accumulation_steps, int)
                                                        and accumulation_steps >= 1):
            raise ValueError(f"{cls}: accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        if not isinstance(adaptive, bool):
            raise TypeError(f"{cls}: adaptive must be True or False, got {adaptive!r}")

    @staticmethod
    def _check_rho_lam(group: dict, where: str) -> None:
        rho = group.get("rho")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho < float("inf"):
            raise ValueError(f"{where}: rho must be a finite number >= 0, got {rho!r}")
        if "lam" in group:
            lam = group["lam"]
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam <= 1:
                raise ValueError(f"{where}: lam must be a number in [0, 1], got {lam!r}")

    # ------------------------------------------------------------ layout
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

    def _param_list(self):
        params, groups, seen = [], [], set()
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                self._check_param(p)
                if id(p) in seen:
                    raise ValueError(f"{type(self).__name__}: parameter {self._names[id(p)]} appears "
                                     "in more than one param group")
                seen.add(id(p))
                params.append(p)
                groups.append(gi)
        return params, groups, [self._names[id(p)] for p in params]

    def _grad_flags(self):
        return tuple(p.requires_grad for p in self.flat.layout.params)

    def _relayout(self, keep_from: Optional[List[int]] = None) -> None:
        """Lay out again (a new param group, a storage or dtype changed),
        keeping gy, the state and the counts of every parameter that stays."""
        params, groups, names = self._param_list()
        self.flat.relayout(params, groups, names, keep_from)
        self._compact.install(self.model)
        self._after_layout()
        self.engine.relayout()

    def _after_layout(self) -> None:
        ctx = self._ctx
        ctx.params, ctx.names, ctx.primary = self.flat.layout.params, self.flat.layout.names, self.flat.primary
        self._n_groups = len(self.param_groups)
        self._flags = self._grad_flags()
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
        for p, owner in zip(self.flat.layout.params, self._owners):
            if owner is not None and owner[0].get(owner[1]) is not p:
                now = owner[0].get(owner[1])
                how = ("on the meta device (model.to('meta'))" if now is not None and now.device.type == "meta"
                       else "replaced by a new Parameter object (model.to_empty(), a meta round trip, or "
                       "an assignment to the module's attribute)")
                raise RuntimeError(
                    f"{type(self).__name__}: parameter {owner[2]} of the model is {how}; the optimizer "
                    "holds the old one and would train it unseen. Build the optimizer again on the "
                    "model as it is now (and load its state_dict to continue)")
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
        flags = self._grad_flags()
        if flags != self._flags:
            self._flags = flags
            self.engine.relayout()

    # ------------------------------------------------------------ per step
    def _hyper(self):
        """Per group: (base hyperparameters, rho, lam), validated at every step
        since users and schedulers edit groups between steps."""
        cls = type(self).__name__
        if len(self.param_groups) != self._n_groups:
            raise RuntimeError(f"{cls}: param groups changed without add_param_group; use "
                               "opt.add_param_group(...)")
        out = []
        for gi, group in enumerate(self.param_groups):
            where = f"{cls} param group {gi}"
            for k in self._group_keys:
                if k not in group:
                    raise ValueError(f"{where}: the hyperparameter {k!r} is missing; set it again "
                                     f"(opt.param_groups[{gi}][{k!r}] = ...)")
            self._check_rho_lam(group, where)
            hp = self._rule.hyper(group, where) if self._rule is not None else _generic_hyper(group, where)
            out.append((hp, float(group["rho"]), float(group.get("lam", 0.0))))
        return out

    def _begin(self, batch, closure, extra):
        cls = type(self).__name__
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
                closure()                     # trainers' closures: run, result ignored (SPEC 2)
        if batch is None:
            raise TypeError(f"{cls}.step(batch): pass the next batch; the optimizer calls "
                            "loss_fn(model, batch) itself (closures are not used)")
        if callable(batch) and not isinstance(batch, (torch.Tensor, nn.Module)) and \
                not tree.tensors(batch):
            raise TypeError(f"{cls}.step(closure): the optimizer computes both gradients itself "
                            "by calling loss_fn(model, batch), so torch's opt.step(closure) idiom "
                            "does not apply: pass the batch, opt.step(batch)")
        hyper = self._hyper()
        self._ensure_layout()
        if self.update.fused:
            if any(self.flat.counts) and not self.state:
                self._reset_state()           # the user cleared opt.state: start afresh, as torch would
            self.flat.allocate_state([h for h, _, _ in hyper], self.engine.replicas)
        self._hyper_now = hyper
        self._structure = (self.update.refresh(hyper, self.engine.replicas),
                           self.model.training, torch.is_grad_enabled(), self.loss_fn,
                           self.accumulation_steps, self.grad_scaler is not None)
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
            self._check_param(p)
        group = dict(param_group, params=params)
        for k in self._group_keys:
            group.setdefault(k, self.defaults[k])
        self._check_rho_lam(group, f"{type(self).__name__}.add_param_group")
        old = {id(p): i for i, p in enumerate(self.flat.layout.params)}
        self.base.add_param_group(group)
        self.param_groups = self.base.param_groups
        new_params = self._param_list()[0]
        self._relayout([old.get(id(p), -1) for p in new_params])

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


def _generic_hyper(group: dict, where: str) -> dict:
    for k in ("lr", "weight_decay"):
        if k in group and not isinstance(group[k], (bool, type(None))):
            check_number(group, k, where)
    return {}


class _no_state:
    NAME = "generic"

    @staticmethod
    def state_names(hp) -> List[str]:
        return []


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
