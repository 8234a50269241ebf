"""SAMPa and SAM as torch.optim.Optimizers over flat parameter buffers.

`SAMPa.step` and `SAM.step` read as SPEC section 1: the elementwise work is
the update layer's (`update/`), the gradient passes the engine's
(`engines/`), the layout and `opt.state` the flat state's (`state.py`), the
accept-or-refuse decision the step guard's (`guard.py`).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from . import tree
from .engines import ENGINE_OPTIONS, make_engine
from .engines.base import Context
from .guard import NONFINITE_MODES, Progress, StepGuard
from .passes import PassRunner
from .state import FlatState
from .update import make_update, rule_for
from .update.common import check_number
from .ymodel import ModelReplica, PrivateBuffers, YPass, swapped

CHECKPOINT_FORMAT = 2


@dataclass
class StepOut:
    """What one step leaves on the device (static outputs under a CUDA graph)."""
    loss: torch.Tensor          # the x̃-pass loss (SAM: the perturbed pass's), 0-dim
    flags: torch.Tensor         # [losses finite, gradients finite]
    outputs: Any                # the x̃-pass's loss_fn outputs
    got: Optional[List[bool]]   # per parameter: a gradient in either pass


class _Sharpness(torch.optim.Optimizer):
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
        self.progress = Progress()
        self.guard = StepGuard(model, nonfinite, grad_scaler, cls)
        self.grad_scaler = self.guard.scaler
        self.passes = PassRunner(loss_fn, accumulation_steps, self.guard.scale, cls)
        self._private = PrivateBuffers(model)
        self._rule = rule_for(base)
        params, groups, names = self._param_list()
        self.flat = FlatState(params, groups, names, self._buffer_names,
                              self._rule if self._rule is not None else _no_state, backend)
        self.update = make_update(base, self.flat, adaptive, self.max_grad_norm)
        self._flags = self._grad_flags()
        self._step_tensors: Dict[int, torch.Tensor] = {}
        self._ctx = self._context()
        self._after_layout()
        self.engine = make_engine(engine, self._ctx, **engine_options)
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
        self._after_layout()
        self.engine.relayout()

    def _after_layout(self) -> None:
        ctx = self._ctx
        ctx.params, ctx.names, ctx.primary = self.flat.layout.params, self.flat.layout.names, self.flat.primary
        self._n_groups = len(self.param_groups)
        self._flags = self._grad_flags()
        self._bind_method()
        self._publish()

    def _bind_method(self) -> None:
        pass

    def _ensure_layout(self) -> None:
        """Per step: follow what the user did to the parameters since the last
        step (a storage, shape or dtype replaced: lay out again, keeping the
        state; a gradient replaced: bind it again; trainable set changed:
        the engine follows)."""
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
        if closure is not None:
            if batch is None:
                raise TypeError(f"{cls}.step(closure=...): the optimizer computes both gradients "
                                "itself by calling loss_fn(model, batch): pass the batch, "
                                "opt.step(batch) (a closure from a trainer is then run first)")
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
    def _context(self) -> Context:
        """The engine's view of the optimizer. Its callables hold the optimizer
        weakly: no reference cycle, so an optimizer the user drops is freed at
        once (and its engine closes its process group) at the same point of
        the program on every rank, not whenever the garbage collector runs."""
        me = weakref.ref(self)

        def call(name):
            def method(*args, **kwargs):
                return getattr(me(), name)(*args, **kwargs)
            return method

        model, flat = self.model, self.flat
        return Context(method=type(self).__name__, model=model, params=[], names=[], primary=None,
                       accumulation_steps=self.accumulation_steps, fused=self.update.fused,
                       has_scaler=self.grad_scaler is not None, base_name=type(self.base).__name__,
                       run_pass=self.passes.run, first_step=lambda: me().progress.t == 0,
                       rollback=call("_rollback"), make_replica=flat.make_replica,
                       replicate_model=lambda device, where="": ModelReplica(model, device, where),
                       private_buffers=call("_private_buffers"), y_pass=call("_y_pass"),
                       y_leaves=call("_y_leaves"), sync_payload=call("_sync_payload"),
                       fingerprint=call("_fingerprint"))

    @contextlib.contextmanager
    def _private_buffers(self):
        """The user's model with private copies of its buffers: a pass whose
        buffer updates are discarded (SAM's perturbed pass)."""
        self._private.sync()
        with swapped((), self._private.slots()):
            yield self.model

    def _y_pass(self):
        raise NotImplementedError(f"{type(self).__name__} has no y-pass")

    def _y_leaves(self):
        raise NotImplementedError(f"{type(self).__name__} has no y-pass")

    def _sync_payload(self):
        """What an engine that keeps replicas on other ranks broadcasts: the
        flat buffers, the small tensors (norms, counters, GradScaler, the
        model's other parameters and buffers), and what to do after."""
        rep = self.flat.primary
        flats = []
        for b in rep.slabs:
            flats += [b.x] + list(b.state.values()) + [getattr(b, n) for n in ("gy",) if n in self._buffer_names]
        counters = torch.tensor([self.progress.t, self.progress.skipped] + self.flat.counts, dtype=torch.int64)
        laid_out = {id(p) for p in self.flat.layout.params}
        small = [rep.gy_sq, counters] + self.guard.scaler_tensors()
        small += [p.data for p in self.model.parameters() if id(p) not in laid_out]
        small += [t for m in self.model.modules() for t in m._buffers.values() if t is not None]

        def after() -> None:
            c = counters.tolist()
            self.progress.t, self.progress.skipped = c[0], c[1]
            if c[2:] != self.flat.counts:
                self.flat.set_counts(c[2:])
                self._publish()
        return flats, small, after

    def _fingerprint(self) -> List[tuple]:
        """Layout and settings that every rank of a group must agree on."""
        def val(v):
            return repr(v.tolist()) if isinstance(v, torch.Tensor) else repr(v)
        names = self._names
        comps = [("method", type(self).__name__),
                 ("base optimizer", f"{type(self.base).__module__}.{type(self.base).__qualname__}"),
                 ("nonfinite mode", self.nonfinite),
                 ("training options", f"accumulation_steps={self.accumulation_steps} "
                                      f"max_grad_norm={self.max_grad_norm} adaptive={self.adaptive}"),
                 ("GradScaler settings", self.guard.scaler_settings()),
                 ("number of param groups", str(len(self.param_groups)))]
        for gi, g in enumerate(self.param_groups):
            hp = "; ".join(f"{k}={val(v)}" for k, v in sorted(g.items()) if k != "params")
            comps.append((f"hyperparameters of param group {gi}", hp))
            ps = "; ".join(f"{names.get(id(p), '?')} {tuple(p.shape)} {p.dtype}" for p in g["params"])
            comps.append((f"parameters of param group {gi}", ps))
        mb = "; ".join(f"{n} {tuple(b.shape)} {b.dtype}" for n, b in self.model.named_buffers())
        comps.append(("model buffers", mb))
        mp = "; ".join(f"{n} {tuple(q.shape)} {q.dtype}" for n, q in self.model.named_parameters())
        comps.append(("model parameters", mp))
        comps.append(("flat layout", "; ".join(f"{b.slab.dtype} {b.slab.numel}" for b in self.flat.primary.slabs)))
        return comps

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
        sd = self.base.state_dict()
        # Compact copies: a checkpoint holds its own bytes, not views of the flat buffers.
        sd["state"] = {k: {n: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                           for n, v in st.items()} for k, st in sd["state"].items()}
        extra = {"format": CHECKPOINT_FORMAT, "method": type(self).__name__,
                 "base": f"{type(self.base).__module__}.{type(self.base).__qualname__}",
                 "t": self.progress.t, "skipped_steps": self.progress.skipped,
                 "counts": list(self.flat.counts), "params": len(self.flat.layout.params),
                 "shapes": [list(p.shape) for p in self.flat.layout.params]}
        extra.update(self._extra_state())
        sd["sampa_fused"] = extra
        return sd

    def _extra_state(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Everything is checked first; then the checkpoint is applied as a
        whole. On any error nothing changes."""
        cls = type(self).__name__
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(f"{cls}.load_state_dict: expected an optimizer state dict with 'state' "
                             "and 'param_groups'")
        sd = dict(state_dict)
        extra = sd.pop("sampa_fused", None)
        params = self.flat.layout.params
        self._validate_checkpoint(sd, extra, params)
        self.base.load_state_dict(sd)            # torch checks the groups again and applies atomically
        self.param_groups, self.state = self.base.param_groups, self.base.state
        for group in self.param_groups:          # a plain torch checkpoint has no rho / lam
            for k in self._group_keys:
                group.setdefault(k, self.defaults[k])
        if extra is not None:
            counts = list(extra["counts"])
            self.progress.t, self.progress.skipped = int(extra["t"]), int(extra.get("skipped_steps", 0))
        else:   # a plain base-optimizer checkpoint: warm start from its state
            counts = [self._count_from_base(p) for p in params]
            self.progress.t, self.progress.skipped = 0, 0
        with torch.no_grad():
            for rep in (self.engine.replicas if self.update.fused else ()):
                for b in rep.slabs:
                    names = set(b.state)
                    for i, p in enumerate(params):
                        for n, v in self.state.get(p, {}).items():
                            if isinstance(v, torch.Tensor) and v.dim() > 0 and n not in names:
                                b.ensure_state([n])
                                names.add(n)
                    for n, flat in b.state.items():
                        views = b.slab.views(flat)
                        for k, i in enumerate(b.slab.index):
                            v = self.state.get(params[i], {}).get(n)
                            views[k].copy_(v) if v is not None else views[k].zero_()
        self._load_extra(extra)
        self.flat.set_counts(counts)
        if self.update.fused:
            for st in self.state.values():
                st.clear()
        self._publish()
        # engines keeping copies of x elsewhere take the loaded values too
        self.engine.sync_replicas()

    def _validate_checkpoint(self, sd, extra, params) -> None:
        cls = type(self).__name__
        where = f"{cls}.load_state_dict"
        if extra is not None:
            if extra.get("method") != cls:
                raise ValueError(f"{where}: this state dict was saved by {extra.get('method')}, not {cls}")
            mine = f"{type(self.base).__module__}.{type(self.base).__qualname__}"
            if extra.get("base", mine) != mine:
                raise ValueError(f"{where}: this state dict was saved with base optimizer "
                                 f"{extra['base']}, this optimizer uses {mine}")
            if extra.get("params", len(params)) != len(params) or len(extra.get("counts", ())) != len(params):
                raise ValueError(f"{where}: the checkpoint has {extra.get('params')} parameters, this "
                                 f"optimizer {len(params)}")
            for i, (p, shape) in enumerate(zip(params, extra.get("shapes", [list(p.shape) for p in params]))):
                if list(p.shape) != list(shape):
                    raise ValueError(f"{where}: parameter {self.flat.layout.names[i]} has shape "
                                     f"{tuple(p.shape)}, the checkpoint's has {tuple(shape)}")
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{where}: the checkpoint has {len(groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}")
        for gi, (a, b) in enumerate(zip(groups, self.param_groups)):
            if len(a["params"]) != len(b["params"]):
                raise ValueError(f"{where}: param group {gi} has {len(a['params'])} parameters in the "
                                 f"checkpoint, {len(b['params'])} here")
        ids = [i for g in groups for i in g["params"]]
        by_id = dict(zip(ids, [p for g in self.param_groups for p in g["params"]]))
        for k, st in sd["state"].items():
            p = by_id.get(k)
            if p is None:
                raise ValueError(f"{where}: the checkpoint has state for parameter id {k}, which is in "
                                 "none of its param groups")
            for n, v in st.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                    raise ValueError(f"{where}: state {n!r} of parameter {self._names.get(id(p), k)} has "
                                     f"shape {tuple(v.shape)}, the parameter {tuple(p.shape)}")
                if self._rule is not None and n != "step" and n not in ("momentum_buffer", "exp_avg",
                                                                        "exp_avg_sq", "max_exp_avg_sq"):
                    raise ValueError(f"{where}: state {n!r} of parameter {self._names.get(id(p), k)} "
                                     f"is not {type(self.base).__name__} state; was the checkpoint "
                                     "saved with another base optimizer?")
        self._validate_extra(extra, params)

    def _validate_extra(self, extra, params) -> None:
        pass

    def _load_extra(self, extra) -> None:
        pass

    def _count_from_base(self, p) -> int:
        """A parameter's count from a plain torch optimizer's state: its 'step'
        entry, or 1 for state without one (SGD's momentum buffer: started,
        count unknown and unused), 0 without state."""
        st = self.state.get(p)
        if not st:
            return 0
        return int(float(st["step"])) if "step" in st else 1

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


class SAMPa(_Sharpness):
    """Sharpness-aware minimization, parallelized (Xie, Pethick, Cevher, 2024).

    opt = SAMPa(model, loss_fn, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9)
    loss = opt.step(batch)   # the x̃-pass loss, on the held (previous) batch

    `loss_fn(model, batch)` returns the loss (or (loss, outputs), a mapping
    with "loss", an object with .loss). Both gradients of a step are
    independent: the engine may run them at the same time.
    """

    _buffer_names = ("x", "x_save", "g", "y", "gy_new", "gy")
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
        if not hasattr(self, "_ypass"):
            self._ypass = YPass(self.model, self.flat.layout.params, self._private)
        else:
            self._ypass.params = list(self.flat.layout.params)
        self._ypass.bind(self.flat.primary.slabs)

    def _y_pass(self):
        return self._ypass.swapped_in()

    def _y_leaves(self):
        return self._ypass.leaves

    def step(self, batch=None, closure=None, **extra):
        batch = self._begin(batch, closure, extra)
        held = self._held_for(batch)                       # first call: B_0 = B_1
        out = self.engine.run_step(self._step, held, batch, self._structure)
        return self._end(out, batch)

    def _step(self, held, batch) -> StepOut:
        """What one step queues on the device, in SPEC section 1's order."""
        reps = self.engine.replicas
        self.guard.save_buffers()
        # 1. xt = x + rho gy / (||gy|| + eps)  -> the model
        # 2. y  = peek(x, s, gy)               -> the y parameters
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
        inactive = _inactive(grads.got)
        self.update.sampa_post(reps, checks, invs, inactive)
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

    def _extra_state(self) -> dict:
        gy: List[Optional[torch.Tensor]] = [None] * len(self.flat.layout.params)
        for b in self.flat.primary.slabs:
            for i, v in zip(b.slab.index, b.slab.views(b.gy)):
                gy[i] = v.detach().clone()
        progress = self.progress
        held = progress.held_saved if progress.held_saved is not None else (
            tree.encode(tree.clone(progress.held)) if progress.held is not None else None)
        return {"gy": gy, "gy_sq": self.flat.primary.gy_sq.detach().clone(), "held_batch": held}

    def _validate_extra(self, extra, params) -> None:
        if extra is None:
            return
        where = f"{type(self).__name__}.load_state_dict"
        for key in ("gy", "gy_sq", "held_batch"):
            if key not in extra:
                raise ValueError(f"{where}: the checkpoint lacks {key!r} (was it saved by another "
                                 "version or edited?)")
        gy = extra["gy"]
        if len(gy) != len(params):
            raise ValueError(f"{where}: the checkpoint has gy for {len(gy)} parameters, this "
                             f"optimizer has {len(params)}")
        for i, (p, t) in enumerate(zip(params, gy)):
            if t is not None and tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{where}: gy of parameter {self.flat.layout.names[i]} has shape "
                                 f"{tuple(t.shape)}, the parameter {tuple(p.shape)}")
        held = extra["held_batch"]
        if held is not None and not (isinstance(held, dict) and "k" in held):
            raise ValueError(f"{where}: the checkpoint's held batch is not in this version's format")

    def _load_extra(self, extra) -> None:
        rep = self.flat.primary
        with torch.no_grad():
            for b in rep.slabs:
                if extra is not None:
                    b.slab.gather([t.to(b.gy.device) if t is not None else None for t in extra["gy"]], b.gy)
                else:
                    b.gy.zero_()
            rep.gy_sq.copy_(extra["gy_sq"] if extra is not None else torch.zeros(()))
        self.progress.held = None
        self.progress.held_saved = extra["held_batch"] if extra is not None else None


class SAM(_Sharpness):
    """Sharpness-aware minimization (Foret et al., 2021), the baseline: two
    sequential gradients per step, same interface as SAMPa. Batch-norm
    statistics follow the pass at x only (the perturbed pass's updates are
    discarded, as davda54/sam's recipe does)."""

    _buffer_names = ("x", "x_save", "g")

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
        self.update.sam_save(reps)                                       # x_save <- x
        first = self.engine.gradient(batch, "first pass")                # g = grad f(x, b)
        checks0 = self.update.check(reps, (first.loss,), ("g",), "g", invs)
        self.update.sam_perturb(reps, checks0, invs)                     # xt = x + rho g/(||g|| + eps)
        second = self.engine.gradient(batch, "perturbed pass", private_buffers=True)   # g = grad f(xt, b)
        checks1 = self.update.check(reps, (), ("g",), None, invs)
        checks = [(ok0 & ok1, sq) for (ok0, sq), (ok1, _) in zip(checks0, checks1)]
        got = [a or b for a, b in zip(first.got, second.got)] if first.got and second.got else None
        self.update.sam_post(reps, checks, invs, _inactive(got))         # x, s = base_step(x, s, g)
        # an overflowed first gradient poisons the perturbed pass: that is the
        # first pass's fault, not a non-finite loss
        loss_ok = self.update.finite(reps[0], first.loss) & (self.update.finite(reps[0], second.loss)
                                                             | ~checks0[0][0])
        flags = self.update.flags(reps[0], loss_ok, checks)
        return StepOut(second.loss.detach(), flags, first.outputs, got)


def _inactive(got: Optional[List[bool]]):
    if got is None or all(got):
        return None
    return frozenset(i for i, g in enumerate(got) if not g)
