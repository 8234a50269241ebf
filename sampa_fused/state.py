"""The optimizer's flat state: the layout of its parameters, the buffers of
each replica, the base-optimizer state counts, and `opt.state` as torch
shows it.

Buffers of one (device, dtype) slab, per replica (README, 'Exactly what it computes' and 'What a step moves'):
    x       the model's parameters (views): x, written only by an accepted step
    g       the model's gradients (views): gxt (SAM: the pass's gradient)
    xt      the x̃ pass buffer: the leaves swapped into the model for the
            x̃-pass (SAM: the perturbed pass); their gradients land in g
    y       the y pass buffer (views of the y leaves)           (SAMPa)
    gy_new  their gradients: gy_{t+1}                           (SAMPa)
    gy      gy_t, committed only when a step is accepted        (SAMPa)
    state   base-optimizer state by name (momentum_buffer, exp_avg, ...)

Which pass buffers a replica holds is the engine's `BufferPlan`: the serial
engine forms xt, runs the x̃-pass, then forms y in the same buffer; engines
that run both passes at once hold both; a replica that runs one pass holds
its own. x is never overwritten by a pass, so a refused step restores nothing.

Counts: each parameter's state has taken `count` steps (AdamW's step, the
steps that fed SGD's momentum buffer). Parameters with the same param group
and count share a row of the hyperparameter table; a step that gives a
parameter no gradient leaves its count behind, as torch's optimizers do for a
parameter whose grad is None. Runs are the contiguous ranges of a slab that
one kernel launch updates: one per (row, with or without a gradient).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import _cuda
from .flat import Slab, build_slabs
from .update import backend_for
from .update.ops import family
from .update.table import HyperTable


@dataclass(frozen=True)
class BufferPlan:
    """The pass buffers a replica holds, declared by its engine.

    `points`: which points it forms and runs a pass at: "xt" (the x̃-pass,
    SAM's perturbed pass) and/or "y" (SAMPa's y-pass). `shared`: one buffer
    serves both, xt first (the engine forms y only after the x̃-pass is done).
    `in_place`: the engine runs the x̃-pass on the model's own parameters
    (`Context.params`): xt is written into x and x is kept in x_save, copied
    back after the step (the layout before pass buffers; any engine that does
    not declare a plan gets it)."""
    points: Tuple[str, ...] = ("xt", "y")
    shared: bool = False
    in_place: bool = False

    def __post_init__(self):
        bad = [p for p in self.points if p not in ("xt", "y")]
        if bad or not self.points:
            raise ValueError(f"BufferPlan: points must be 'xt' and/or 'y', got {self.points!r}")

    def allocation(self, names: Sequence[str], generic: bool = False
                   ) -> Tuple[List[str], Dict[str, str], Tuple[str, ...]]:
        """(buffers to allocate, aliases {name: the buffer it shares}, points)
        for a method whose kept buffers are `names` (SAMPa's hold "gy").
        `generic`: the base optimizer runs its own step on the parameters, so
        its peek needs a copy of x (x_save)."""
        sampa = "gy" in names
        points = tuple(p for p in self.points if sampa or p == "xt") or ("xt",)
        out, aliases = list(names), {}
        for p in points:
            if self.in_place and p == "xt":
                aliases["xt"] = "x"
            elif self.shared and p == "y" and "xt" in points and not self.in_place:
                aliases["y"] = "xt"
            else:
                out.append(p)
        if (self.in_place or generic) and "x_save" not in out:
            out.append("x_save")
        return out, aliases, points


LEGACY_PLAN = BufferPlan(in_place=True)


@dataclass(frozen=True)
class Run:
    """Elements [start, end) of slab `slab`, updated with table row `row`."""
    slab: int
    start: int
    end: int
    row: int
    active: bool = True          # False: no parameter of the run got a gradient this step


class SlabBuffers:
    def __init__(self, slab: Slab, names: Sequence[str], state_names: Sequence[str],
                 device: Optional[torch.device] = None, aliases: Optional[Dict[str, str]] = None):
        self.slab = slab
        self.dtype = slab.dtype
        self._device = device
        self.names: Tuple[str, ...] = ()
        self.provide(names, aliases or {})
        self.state: Dict[str, torch.Tensor] = {n: slab.zeros(device=device) for n in state_names}

    def provide(self, names: Sequence[str], aliases: Dict[str, str]) -> None:
        """Hold exactly `names` (new ones zeroed, others freed) and the aliases."""
        old_aliases = getattr(self, "aliases", {})
        for n in (set(self.names) - set(names)) | set(aliases) | set(old_aliases):
            self.__dict__.pop(n, None)
        for n in names:
            if n not in self.__dict__:
                setattr(self, n, self.slab.zeros(device=self._device))
        for a, owner in aliases.items():
            setattr(self, a, getattr(self, owner))
        self.names, self.aliases = tuple(names) + tuple(aliases), dict(aliases)

    def ensure_state(self, names: Sequence[str]) -> None:
        """Allocate state buffers needed now (a scheduler may switch momentum on)."""
        for n in names:
            if n not in self.state:
                self.state[n] = self.slab.zeros(device=self._device)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class Replica:
    """The flat buffers of one device (or rank) that keeps x and the state,
    with its hyperparameter tables and ||gy||^2 (or ||g||^2) on the device."""

    def __init__(self, layout: "Layout", names: Sequence[str], state_names: Sequence[Sequence[str]],
                 logical: torch.device, backend: str, plan: Optional[BufferPlan] = None,
                 generic: bool = False):
        self.logical = logical                                # the engine's view of the device
        self.device = device = _cuda.physical(logical)        # where its tensors live
        self.names = tuple(names)
        self._apply_plan(plan, generic)
        with _cuda.on_device(self.logical):
            self.slabs = [SlabBuffers(s, self._alloc, sn, device, self.aliases)
                          for s, sn in zip(layout.slabs, state_names)]
            self.gy_sq = torch.zeros((), dtype=torch.float32, device=device)
        pin = device.type == "cuda"
        self.tables = {d: HyperTable(device, d, pin) for d in {compute_dtype(s.dtype) for s in layout.slabs}}
        self.backend = backend_for(backend, device, [s.dtype for s in layout.slabs])
        self.ops = family(self.backend)                       # the update's registered ops, chosen once

    def _apply_plan(self, plan: Optional[BufferPlan], generic: bool) -> None:
        if plan is None:          # the names say it all (kernel tests, benchmarks)
            self._alloc, self.aliases = list(self.names), {}
            self.points = tuple(p for p in ("xt", "y") if p in self.names)
            self.in_place = self.shared = False
        else:
            self._alloc, self.aliases, self.points = plan.allocation(self.names, generic)
            self.in_place, self.shared = plan.in_place, "y" in self.aliases
        self.plan, self.generic = plan, generic

    def replan(self, plan: BufferPlan) -> None:
        """Hold the buffers of another plan (an engine narrowing its replica
        to its role): kept buffers keep their values, new ones start at zero."""
        self._apply_plan(plan, self.generic)
        with _cuda.on_device(self.logical):
            for b in self.slabs:
                b.provide(self._alloc, self.aliases)

    def x_of(self, b: "SlabBuffers") -> torch.Tensor:
        """The x the update reads and commits: the model's own buffer, or its
        saved copy while an in-place x̃-pass holds xt there."""
        return b.x_save if self.in_place else b.x

    def table(self, dtype: torch.dtype) -> HyperTable:
        return self.tables[compute_dtype(dtype)]

    def zero(self, *names: str) -> None:
        for b in self.slabs:
            for n in names:
                getattr(b, n).zero_()

    def flats(self, name: str) -> List[torch.Tensor]:
        return [getattr(b, name) for b in self.slabs]


class Layout:
    """Which parameters are laid out where. Rebuilt (a new object) when the
    set of parameters, their shapes, dtypes or devices change."""

    def __init__(self, params: Sequence[nn.Parameter], groups: Sequence[int], names: Sequence[str]):
        self.params = list(params)
        self.groups = list(groups)
        self.names = list(names)
        self.slabs = build_slabs(self.params, self.groups)
        # (slab, position in the slab) of each parameter
        self.where: List[Tuple[int, int]] = [(0, 0)] * len(self.params)
        for s, slab in enumerate(self.slabs):
            for k, i in enumerate(slab.index):
                self.where[i] = (s, k)


class FlatState:
    """Layout, replicas, counts and runs, and the `opt.state` views."""

    def __init__(self, params: Sequence[nn.Parameter], groups: Sequence[int], names: Sequence[str],
                 buffer_names: Sequence[str], rule, backend: str, plan: Optional[BufferPlan] = None,
                 generic: bool = False):
        self.rule = rule
        self.buffer_names = tuple(buffer_names)
        self.backend = backend
        self.plan, self.generic = plan, generic
        self._hps: Optional[List[dict]] = None
        self._pending_counts: List[int] = [0] * len(params)
        self._build(params, groups, names, keep=None)

    # ------------------------------------------------------------- layout
    def _state_names(self, slab: Slab, hps: Optional[List[dict]]) -> List[str]:
        names: List[str] = []
        for seg in slab.segments:
            hp = hps[seg.group] if hps is not None and seg.group < len(hps) else None
            for n in (self.rule.state_names(hp) if hp is not None else ()):
                if n not in names:
                    names.append(n)
        return names

    def _build(self, params, groups, names, keep) -> None:
        self.layout = Layout(params, groups, names)
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(f"the parameters are on several devices ({sorted(map(str, devices))}); "
                             "move the model to one device")
        device = devices.pop()
        sn = [self._state_names(s, self._hps) for s in self.layout.slabs]
        self.primary = Replica(self.layout, self.buffer_names, sn, _cuda.logical(device), self.backend,
                               self.plan, self.generic)
        with torch.no_grad():
            for b in self.primary.slabs:
                b.slab.gather([p.detach() for p in self.layout.params], b.x)
                b.slab.bind_data(self.layout.params, b.x)
                b.slab.bind_grad(self.layout.params, b.g)
            if keep is not None:
                self._restore(keep)
        self.version = getattr(self, "version", 0) + 1
        self._expect = self._expected()
        self.set_counts(self._pending_counts)

    def _expected(self):
        """What each parameter must look like between steps (checked every step)."""
        out = []
        for b in self.primary.slabs:
            gviews = b.slab.views(b.g)
            for k, i in enumerate(b.slab.index):
                out.append((i, gviews[k]))
        out.sort(key=lambda e: e[0])
        views = [g for _, g in out]
        ptrs = []
        for b in self.primary.slabs:
            for k, i in enumerate(b.slab.index):
                ptrs.append((i, b.x.data_ptr() + b.slab.offsets[k] * b.x.element_size()))
        ptrs.sort(key=lambda e: e[0])
        return [p for _, p in ptrs], views

    def snapshot(self) -> Dict[str, Dict[int, torch.Tensor]]:
        """Per-parameter copies of every buffer that must survive a relayout
        (gy and the base state), keyed by the parameter's position."""
        out: Dict[str, Dict[int, torch.Tensor]] = {}
        for b in self.primary.slabs:
            named = dict(b.state)
            if "gy" in self.buffer_names:
                named["gy"] = b.gy
            for name, flat in named.items():
                d = out.setdefault(name, {})
                for i, v in zip(b.slab.index, b.slab.views(flat)):
                    d[i] = v.detach().clone()
        return out

    def _restore(self, keep: Dict[str, Dict[int, Optional[torch.Tensor]]]) -> None:
        for b in self.primary.slabs:
            for name, per in keep.items():
                if name == "gy":
                    flat = b.gy
                else:
                    b.ensure_state([name])
                    flat = b.state[name]
                b.slab.gather([per.get(i) for i in range(len(self.layout.params))], flat)

    def relayout(self, params, groups, names, keep_from: Optional[List[int]] = None) -> None:
        """Lay out again (new parameters, or a parameter's storage, dtype or
        device changed), keeping gy, the state and the counts of every
        parameter that stays. `keep_from[i]`: the old position of new
        parameter i, or -1 for a new parameter."""
        old = self.snapshot()
        old_counts = self.counts
        if keep_from is None:
            keep_from = list(range(len(params)))
        keep = {name: {i: per[j] for i, j in enumerate(keep_from) if j >= 0 and j in per}
                for name, per in old.items()}
        self._pending_counts = [old_counts[j] if j >= 0 else 0 for j in keep_from]
        gy_sq = self.primary.gy_sq.clone()          # ||gy||^2 stays: gy does
        self._build(params, groups, names, keep)
        self.primary.gy_sq.copy_(gy_sq)

    # ------------------------------------------------------------- checks
    def check_params(self) -> Optional[str]:
        """Per step: rebind gradients a user replaced or dropped, and say
        whether the parameters must be laid out again ('relayout': a storage,
        shape, dtype or device changed) or cannot be used ('meta')."""
        ptrs, views = self._expect
        params = self.layout.params
        if all(p.data_ptr() == q for p, q in zip(params, ptrs)):
            if not all(p.grad is v for p, v in zip(params, views)):
                for p, v in zip(params, views):
                    if p.grad is not v:
                        p.grad = v
            return None
        for p, name in zip(params, self.layout.names):
            if p.device.type == "meta":
                return f"meta:{name}"
        return "relayout"

    def allocate_state(self, hps: List[dict], replicas: Sequence[Replica]) -> None:
        """State buffers the groups need with these hyperparameters."""
        self._hps = hps
        for rep in replicas:
            with _cuda.on_device(rep.logical):
                for b in rep.slabs:
                    b.ensure_state(self._state_names(b.slab, hps))

    # --------------------------------------------------------- counts, rows, runs
    @property
    def counts(self) -> List[int]:
        """Per parameter: the steps its state has taken."""
        return [self.rows[r][1] for r in self.row_of]

    def set_counts(self, counts: Sequence[int]) -> None:
        """Rows of the hyperparameter table: one per distinct (group, count)."""
        keys: Dict[Tuple[int, int], int] = {}
        self.row_of = [keys.setdefault((g, int(c)), len(keys)) for g, c in zip(self.layout.groups, counts)]
        self.rows: List[Tuple[int, int]] = list(keys)
        self._runs_cache: Dict[Optional[FrozenSet[int]], List[List[Run]]] = {}

    def runs(self, inactive: Optional[FrozenSet[int]] = None) -> List[List[Run]]:
        """Per slab, the runs of one update; `inactive`: parameters that got
        no gradient this step (their runs only restore x)."""
        key = inactive or None
        cached = self._runs_cache.get(key)
        if cached is not None:
            return cached
        out = []
        for s, slab in enumerate(self.layout.slabs):
            runs: List[Run] = []
            for k, i in enumerate(slab.index):
                row, act = self.row_of[i], not (key and i in key)
                start = 0 if k == 0 else slab.offsets[k]
                if runs and runs[-1].row == row and runs[-1].active == act:
                    continue
                if runs:
                    prev = runs[-1]
                    runs[-1] = Run(s, prev.start, start, prev.row, prev.active)
                runs.append(Run(s, start, start, row, act))
            if runs:
                last = runs[-1]
                runs[-1] = Run(s, last.start, slab.numel, last.row, last.active)
            out.append(runs)
        self._runs_cache[key] = out
        return out

    def structure(self) -> tuple:
        """What the launches of a step depend on besides the table's values."""
        return (self.version, tuple(g for g, _ in self.rows), tuple(tuple(r) for r in self.runs()))

    def advance(self, uses_state: Sequence[bool], inactive: Optional[FrozenSet[int]] = None) -> bool:
        """After an accepted step: the counts of parameters that stepped with
        state go up. Returns True when some state started (count 0 -> 1) or
        the rows were rebuilt (the `opt.state` views must be published again)."""
        if not inactive:
            # The common case: every row steps together; rows keep their parameters.
            started = False
            for r, (g, c) in enumerate(self.rows):
                if uses_state[g]:
                    started |= c == 0
                    self.rows[r] = (g, c + 1)
            return started
        counts = self.counts
        for i, g in enumerate(self.layout.groups):
            if uses_state[g] and i not in inactive:
                counts[i] += 1
        self.set_counts(counts)
        return True

    # ------------------------------------------------------------ opt.state
    def publish(self, state: dict, rule, step_tensors: Dict[int, torch.Tensor]) -> None:
        """`opt.state[p]` as torch's optimizer would hold it: views of the
        flat state (no copies) for parameters whose state has started, and
        AdamW's 'step' as one CPU tensor per row, updated in place."""
        counts = self.counts
        for b in self.primary.slabs:
            views = {n: b.slab.views(flat) for n, flat in b.state.items()}
            for k, i in enumerate(b.slab.index):
                p = self.layout.params[i]
                if counts[i] == 0:       # no state yet, as torch: no entry
                    state.pop(p, None)
                    continue
                st = state[p]
                st.clear()
                for n in views:
                    st[n] = views[n][k]
                if rule.NAME == "adamw":
                    row = self.row_of[i]
                    t = step_tensors.get(row)
                    if t is None:
                        t = step_tensors[row] = torch.tensor(0.0, dtype=torch.float32)
                    t.fill_(float(counts[i]))
                    st["step"] = t

    def update_step_tensors(self, step_tensors: Dict[int, torch.Tensor]) -> None:
        for row, t in step_tensors.items():
            if row < len(self.rows):
                t.fill_(float(self.rows[row][1]))

    # ------------------------------------------------------------ replicas
    def replan(self, plan: BufferPlan) -> None:
        """The primary replica's buffers by another plan (kept across
        relayouts)."""
        self.plan = plan
        self.primary.replan(plan)

    def make_replica(self, device: torch.device, backend: Optional[str] = None,
                     plan: Optional[BufferPlan] = None) -> Replica:
        """Buffers of the same layout on another (logical) device (values:
        zero; the engine copies them), by `plan` (default: the primary's)."""
        sn = [list(b.state) for b in self.primary.slabs]
        return Replica(self.layout, self.buffer_names, sn, device, backend or self.backend,
                       plan or self.plan, self.generic)
