"""The streams engine: one CUDA device, the x̃-pass and the y-pass of a SAMPa
step on two CUDA streams so that they overlap (SPEC section 4).

    SAMPa(model, loss_fn, torch.optim.SGD, engine="streams", lr=0.1, momentum=0.9)
    SAMPa(..., engine="streams", graph=True, warmup_steps=3)

graph=False: the optimizer runs its own step (fused update kernels on the
current stream); the engine only forks the two passes onto its side streams
and joins them back with events. Buffers are those of SPEC section 1: the
user's model (holding xt) accumulates into `g`, the private y-model into
`gy_new`; nothing is shared between the passes but read-only inputs.

graph=True: the engine takes over the whole step (`whole_step`). The first
`warmup_steps` steps run eagerly; the next one is captured as one CUDA graph
(both update stages, both passes, the finite check) and every later step
copies its batch into the graph's static input buffers and replays it.
Hyperparameters (lr, rho, lam, momentum, AdamW's bias corrections, ...) live
in a small device table that the graph reads, refreshed from the host before
each replay, so schedulers and edits between steps take effect. Batches of
another structure or shape (a short last batch), a switch of
train()/eval(), or a change of a structural option (nesterov, amsgrad,
maximize, momentum or weight decay switched on/off, max_grad_norm) run
eagerly through the same code; a new structure that persists for
`warmup_steps` steps is captured in place of the old graph. What cannot be
captured (host synchronisation in the model or loss_fn: `.item()`,
`.cpu()`, data-dependent shapes, BatchNorm with momentum=None, ...) raises a
RuntimeError naming the reason and leaves the optimizer as it was.

Graph mode needs torch.optim.SGD or torch.optim.AdamW as base optimizer (its
update is written here with device-resident hyperparameters) and no
GradScaler. The step still reads one pair of flags on the host (loss and
gradients finite), after the work is queued, like every engine.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..backends import EPS
from ..backends.torch_backend import TorchBackend
from .. import _cuda
from .serial import SerialEngine, check_one_device

# --------------------------------------------------------------------------
# Device-resident hyperparameters

# One row per param group; the names say what the graph multiplies by.
_COMMON = ("rho", "lam", "oml")                                   # oml = 1 - lam
_SGD = ("neg_lr", "mu", "omd", "wd", "first")                     # omd = 1 - dampening
_ADAMW = ("neg_step_size", "omlw", "omb1", "b2", "omb2", "eps", "bc2")
SLOTS: Dict[str, int] = {n: i for i, n in enumerate(_COMMON + _SGD + _ADAMW)}
ROW = len(SLOTS)


def host_row(rule_name: str, hp: dict, rho: float, lam: Optional[float], step: int
             ) -> Tuple[List[float], tuple]:
    """One param group's device scalars and its structural flags.

    The scalars are the same double-precision host expressions the torch rules
    (sampa_fused.rules) evaluate, so that the device math sees the same fp32
    constants. `step` is the number of steps the group has taken. The flags
    decide which ops run at all; a change of them changes a captured graph.
    """
    row = [0.0] * ROW
    row[SLOTS["rho"]] = float(rho)
    if lam is not None:
        row[SLOTS["lam"]] = float(lam)
        row[SLOTS["oml"]] = 1.0 - lam
    if rule_name == "sgd":
        row[SLOTS["neg_lr"]] = -hp["lr"]
        row[SLOTS["mu"]] = hp["momentum"]
        row[SLOTS["omd"]] = 1.0 - hp["dampening"]
        row[SLOTS["wd"]] = hp["weight_decay"]
        row[SLOTS["first"]] = 1.0 if step == 0 else 0.0
        flags = ("sgd", hp["momentum"] != 0, bool(hp["nesterov"]), bool(hp["maximize"]),
                 hp["weight_decay"] != 0)
    elif rule_name == "adamw":
        t = step + 1
        lr, b1, b2 = hp["lr"], hp["beta1"], hp["beta2"]
        row[SLOTS["neg_step_size"]] = -(lr / (1 - b1 ** t))
        row[SLOTS["omlw"]] = 1 - lr * hp["weight_decay"]
        row[SLOTS["omb1"]] = 1 - b1
        row[SLOTS["b2"]] = b2
        row[SLOTS["omb2"]] = 1 - b2
        row[SLOTS["eps"]] = hp["eps"]
        row[SLOTS["bc2"]] = (1 - b2 ** t) ** 0.5
        flags = ("adamw", bool(hp["amsgrad"]), bool(hp["maximize"]), hp["weight_decay"] != 0)
    else:
        raise ValueError(f"no device-scalar update for base-optimizer rule {rule_name!r}")
    return row, flags


class DeviceHyper:
    """The hyperparameter table on the device: one fp32 row per param group.

    Captured kernels read it by address, so it is allocated once (again only
    when the number of groups changes, which bumps `version`) and refreshed in
    place by a small copy from pinned memory, only when a value changed."""

    def __init__(self, device: torch.device):
        self.device = device
        self.table: Optional[torch.Tensor] = None
        self.version = 0
        self._views: List[Dict[str, torch.Tensor]] = []
        self._last: Optional[List[float]] = None

    def upload(self, rows: Sequence[Sequence[float]]) -> None:
        flat = [float(v) for r in rows for v in r]
        if self.table is None or self.table.numel() != len(flat):
            self.table = torch.zeros(len(flat), dtype=torch.float32, device=_cuda.physical(self.device))
            self._views = [{n: self.table[g * ROW + i] for n, i in SLOTS.items()}
                           for g in range(len(rows))]
            self.version += 1
            self._last = None
        if flat != self._last:
            src = torch.tensor(flat, dtype=torch.float32)
            if _cuda.physical(self.device).type == "cuda":
                # The caching host allocator keeps a pinned block alive until the
                # copy that reads it has run, so the host never overwrites it early.
                src = src.pin_memory()
            self.table.copy_(src, non_blocking=True)
            self._last = flat

    def group(self, gi: int) -> Dict[str, torch.Tensor]:
        return self._views[gi]


# --------------------------------------------------------------------------
# The base-optimizer updates with 0-dim device tensors as hyperparameters.
# Out of place and in fp32 like sampa_fused.rules; addcmul(a, b, s) stands for
# torch's a.add(b, alpha=s) (one rounding, like the fused multiply-add there).

def sgd_update(x: torch.Tensor, g: torch.Tensor, state: Dict[str, torch.Tensor],
               h: Dict[str, torch.Tensor], flags: tuple):
    _, has_momentum, nesterov, maximize, has_wd = flags
    if maximize:
        g = -g
    if has_wd:
        g = torch.addcmul(g, x, h["wd"])
    new_state = {}
    if has_momentum:
        buf = state["momentum_buffer"].float()
        # First step: the buffer starts as the gradient itself (torch.optim.SGD).
        buf = torch.where(h["first"] != 0, g, torch.addcmul(buf * h["mu"], g, h["omd"]))
        new_state["momentum_buffer"] = buf
        g = torch.addcmul(g, buf, h["mu"]) if nesterov else buf
    return torch.addcmul(x, g, h["neg_lr"]), new_state


def adamw_update(x: torch.Tensor, g: torch.Tensor, state: Dict[str, torch.Tensor],
                 h: Dict[str, torch.Tensor], flags: tuple):
    _, amsgrad, maximize, has_wd = flags
    if maximize:
        g = -g
    if has_wd:
        x = x * h["omlw"]
    m = state["exp_avg"].float().lerp(g, h["omb1"])
    v = torch.addcmul(state["exp_avg_sq"].float() * h["b2"], g * h["omb2"], g)
    new_state = {"exp_avg": m, "exp_avg_sq": v}
    if amsgrad:
        v = torch.maximum(state["max_exp_avg_sq"].float(), v)
        new_state["max_exp_avg_sq"] = v
    denom = (v.sqrt() / h["bc2"]).add_(h["eps"])
    return torch.addcmul(x, m / denom, h["neg_step_size"]), new_state


UPDATES = {"sgd": sgd_update, "adamw": adamw_update}


# --------------------------------------------------------------------------
# Batches as static buffers

_TENSOR = "T"


def flatten_batch(obj: Any, leaves: List[torch.Tensor]):
    """The structure of a batch (nested tuple/list/dict; tensors described by
    shape, dtype and device; anything else kept by value) and its tensors in
    order. Two batches with equal structures fit the same static buffers."""
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
        return (_TENSOR, tuple(obj.shape), obj.dtype, obj.device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return ("namedtuple", type(obj), tuple(flatten_batch(v, leaves) for v in obj))
    if isinstance(obj, (tuple, list)):
        return ("seq", type(obj), tuple(flatten_batch(v, leaves) for v in obj))
    if isinstance(obj, dict):
        return ("dict", type(obj), tuple(obj.keys()), tuple(flatten_batch(v, leaves) for v in obj.values()))
    return ("value", obj)


def rebuild_batch(spec, leaves) -> Any:
    it = iter(leaves)

    def build(s):
        kind = s[0]
        if kind == _TENSOR:
            return next(it)
        if kind == "namedtuple":
            return s[1](*[build(c) for c in s[2]])
        if kind == "seq":
            items = [build(c) for c in s[2]]
            return tuple(items) if s[1] is tuple else s[1](items)
        if kind == "dict":
            values = [build(c) for c in s[3]]
            try:
                return s[1](zip(s[2], values))
            except TypeError:       # dict subclasses with another constructor
                return dict(zip(s[2], values))
        return s[1]

    return build(spec)


def same_structure(a, b) -> bool:
    """Equality that a value leaf without a plain == (an array, say) makes False."""
    try:
        r = a == b
    except Exception:
        return False
    return r if isinstance(r, bool) else False


# --------------------------------------------------------------------------
# The whole step

class _Captured:
    """A captured step: the graph, its static inputs and outputs, and what it
    was captured for."""

    def __init__(self, key, bufs, graph, held, new, loss, flags, carries):
        self.key, self.bufs, self.graph = key, bufs, graph
        self.held, self.new = held, new          # static input tensors
        self.loss, self.flags = loss, flags      # static outputs
        self.carries = carries                   # the graph ends with held <- new (SAMPa)


class WholeStep:
    """A whole SAMPa or SAM step with device-resident hyperparameters, run
    eagerly or captured once as a CUDA graph and replayed.

    `passes(held, batch) -> (loss_x, loss_y)` runs both SAMPa gradient passes
    (grads into `g` and `gy_new`, zeroing them first); `one_pass(batch, which)
    -> loss` one pass of the user's model into `g` (SAM). With graph=False the
    step runs eagerly on any device (that is how the CPU tests check it).
    """

    def __init__(self, opt, device: torch.device, passes: Optional[Callable], one_pass: Callable,
                 graph: bool = False, warmup_steps: int = 3,
                 on_capture_failure: Optional[Callable[[], None]] = None):
        cls = type(opt).__name__
        if opt.rule.name not in UPDATES:
            raise ValueError(
                f"{cls}: graph=True needs torch.optim.SGD or torch.optim.AdamW as base optimizer "
                f"(their update is written with hyperparameters in device memory); "
                f"{type(opt.base).__name__} runs its own step() with host values that a CUDA graph "
                "would freeze. Use graph=False.")
        if getattr(opt, "grad_scaler", None) is not None:
            raise ValueError(f"{cls}: graph=True does not take a GradScaler (its scale and skip "
                             "decisions live on the host); use bf16 autocast or graph=False")
        self.opt, self.device = opt, device
        self.passes, self.one_pass = passes, one_pass
        self.graph, self.warmup_steps = graph, warmup_steps
        self.on_capture_failure = on_capture_failure
        self.hyper = DeviceHyper(device)
        # The stream eager graph-mode steps and the capture run on (None on CPU).
        self._stream = _cuda.Stream(device) if _cuda.is_cuda(device) else None
        self.captures = 0                         # graphs captured so far
        self.replays = 0                          # steps that ran as a graph replay
        self._check = TorchBackend().check
        self._update = UPDATES[opt.rule.name]
        self._cap: Optional[_Captured] = None
        self._pending = None                      # the structure of the last eager steps ...
        self._pending_n = 0                       # ... and how many in a row
        self._held_src = None                     # the batch the static held buffers hold
        self._gy_sq: Optional[torch.Tensor] = None
        self._hps: List[dict] = []
        self._flags: List[tuple] = []
        self._clip: Optional[float] = None

    # ---------------------------------------------------------------- host side
    def step(self, batch):
        opt = self.opt
        if batch is None:
            raise TypeError(f"{type(opt).__name__}.step(batch): pass the next batch")
        key = self._prepare()
        held = (batch if opt._held is None else opt._held) if opt._sampa else None
        if self.graph:
            key = self._structure(key, held, batch)
            cap = self._cap
            if cap is not None and cap.bufs is opt._bufs and same_structure(cap.key, key) \
                    and not (opt._sampa and opt._t == 0):
                self._pending, self._pending_n = None, 0   # warm-up counts steps in a row
                return self._replay(cap, held, batch)
            if same_structure(self._pending, key):
                self._pending_n += 1
            else:
                self._pending, self._pending_n = key, 1
            # SAMPa's first step runs once, eagerly (it checks loss_fn's use of its model).
            if self._pending_n > self.warmup_steps and not (opt._sampa and opt._t == 0):
                self._cap = None                  # free the old graph's memory first
                self._held_src = None             # new static buffers: nothing in them yet
                self._cap = self._capture(key, held, batch)
                return self._replay(self._cap, held, batch)
        return self._eager(held, batch)

    def _prepare(self):
        """Validate and upload this step's hyperparameters; returns what a
        captured graph depends on besides the batch."""
        opt = self.opt
        hyper = opt._hyper()
        opt._ensure_layout()
        self._hyper_list = hyper
        rows, self._flags, self._hps = [], [], []
        for gi, (hp, rho, lam) in enumerate(hyper):
            row, flags = host_row(opt.rule.name, hp, rho, lam, opt._state_steps[gi])
            rows.append(row)
            self._flags.append(flags)
            self._hps.append(hp)
        self.hyper.upload(rows)
        clip = getattr(opt, "max_grad_norm", None)
        self._clip = None if clip is None else float(clip)
        if opt._sampa:
            if self._gy_sq is None:
                self._gy_sq = torch.zeros((), dtype=torch.float32, device=_cuda.physical(self.device))
            # The table the graph reads is ours; load_state_dict copies into it in place.
            if opt._gy_sqs[0] is not self._gy_sq:
                self._gy_sq.copy_(opt._gy_sqs[0])
                opt._gy_sqs = [self._gy_sq]
        return (self.hyper.version, tuple(self._flags), self._clip, opt.model.training,
                torch.is_grad_enabled(), opt.loss_fn, getattr(opt, "accumulation_steps", 1))

    def _structure(self, key, held, batch):
        specs = []
        for what, b in (("held batch", held), ("batch", batch)):
            if b is None:
                continue
            leaves: List[torch.Tensor] = []
            specs.append(flatten_batch(b, leaves))
            for i, t in enumerate(leaves):
                if _cuda.logical(t.device) != self.device:
                    raise ValueError(
                        f"{type(self.opt).__name__} with graph=True: every tensor of the batch must "
                        f"already be on {self.device}, but tensor {i} of the {what} (shape "
                        f"{tuple(t.shape)}) is on {t.device}; move the batch to the GPU before "
                        "opt.step(batch) (e.g. t.cuda(non_blocking=True)), or use graph=False")
        return key + tuple(specs)

    def _eager(self, held, batch):
        self._held_src = None                     # the static held buffers are stale now
        s = self._stream
        if s is None:
            loss, flags = self._run(held, batch, rollback=True)
            return self._finish(loss, flags, batch)
        # Warm up on the stream the capture will use (cuBLAS/cuDNN state is per
        # stream), forked from and joined back to the current stream.
        cur = _cuda.current_stream(self.device)
        s.wait_stream(cur)
        try:
            with _cuda.stream(s):
                loss, flags = self._run(held, batch, rollback=True)
        finally:
            cur.wait_stream(s)
        _cuda.record_stream(loss, cur)
        _cuda.record_stream(flags, cur)
        return self._finish(loss, flags, batch)

    def _replay(self, cap: _Captured, held, batch):
        opt = self.opt
        with torch.no_grad():
            if opt._sampa and self._held_src is not held:
                _copy_into(cap.held, held)
            _copy_into(cap.new, batch)
        cap.graph.replay()
        self.replays += 1
        # After the graph's last copy (held <- new) the static held batch is this batch.
        self._held_src = batch if cap.carries else None
        return self._finish(cap.loss.clone(), cap.flags, batch)

    def _finish(self, loss, flags, batch):
        opt = self.opt
        t, steps, state_steps = opt._t, list(opt._steps), list(opt._state_steps)
        opt._advance(self._hyper_list)            # host bookkeeping while the device works
        loss_ok, grad_ok = flags.tolist()         # the one host read of a step
        if loss_ok and grad_ok:
            if opt._sampa:
                opt._held = batch           # the graph copied it into its static buffer
            return loss
        # Refused: the device kept the state and gy (selected on the flag);
        # undo the bookkeeping and restore x and the model's buffers.
        opt._t = t
        opt._steps[:] = steps
        opt._state_steps[:] = state_steps
        for gi, tensor in opt._step_tensors.items():
            tensor.fill_(float(state_steps[gi]))
        opt._publish_state()
        self._held_src = None
        opt._rollback()
        if opt.nonfinite == "raise":
            what = "loss" if not loss_ok else "gradient"
            raise FloatingPointError(
                f"{type(opt).__name__}: non-finite {what} at step {opt._t}; the step was refused "
                "and parameters, optimizer state and the held batch are unchanged. Lower the "
                "learning rate, check the data, or pass nonfinite='skip' to skip such steps.")
        opt.skipped_steps += 1
        return loss

    # ------------------------------------------------------------- capture
    def _capture(self, key, held, batch) -> _Captured:
        opt = self.opt
        new_src: List[torch.Tensor] = []
        new_spec = flatten_batch(batch, new_src)
        # Filled with this step's values: the buffers hold meaningful data from
        # the start (a capture records, it does not run; the replay copies again).
        new = [t.detach().clone() for t in new_src]
        held_static: List[torch.Tensor] = []
        held_tree = None
        if opt._sampa:
            held_src: List[torch.Tensor] = []
            held_spec = flatten_batch(held, held_src)
            held_static = [t.detach().clone() for t in held_src]
            held_tree = rebuild_batch(held_spec, held_static)
        new_tree = rebuild_batch(new_spec, new)
        # B_{t+1} becomes the next step's held batch: when the shapes allow,
        # the graph keeps it on the device itself.
        carries = bool(opt._sampa and held_static and
                       [(t.shape, t.dtype) for t in held_static] == [(t.shape, t.dtype) for t in new])

        def body():
            loss, flags = self._run(held_tree, new_tree, rollback=False)
            if carries:
                torch._foreach_copy_(held_static, new)
            return loss, flags

        try:
            graph, (loss, flags) = self._record(body)
        except Exception as e:
            if self.on_capture_failure is not None:
                self.on_capture_failure()
            raise RuntimeError(
                f"{type(opt).__name__} with graph=True: the step could not be captured as a CUDA "
                f"graph ({type(e).__name__}: {e}). Typical causes: a host synchronisation in the "
                "model or loss_fn (.item(), .cpu(), .tolist(), printing a tensor, Python control "
                "flow on tensor values, data-dependent shapes such as nonzero or boolean masks, "
                "BatchNorm with momentum=None), or CPU tensors created inside the model. Nothing "
                "was changed by this step; use graph=False for this model.") from e
        self.captures += 1
        return _Captured(key, opt._bufs, graph, held_static, new, loss, flags, carries)

    def _record(self, body):
        """Capture `body` (queues one step, returns its loss and flags) as a
        CUDA graph without running it. Returns (graph, static outputs)."""
        graph = _cuda.CUDAGraph()
        stream = self._stream
        cur = _cuda.current_stream(self.device)
        stream.wait_stream(cur)
        try:
            # thread_local: CUDA calls of other threads (a DataLoader's pinning
            # thread) do not break the capture; this thread's are still checked,
            # and a host read on a capturing stream always fails.
            with _cuda.graph(graph, stream, capture_error_mode="thread_local"):
                out = body()
        except Exception:
            # torch.cuda.graph leaves its stream current when ending the capture fails.
            _cuda.set_stream(cur)
            self._stream = _cuda.Stream(self.device)   # start clean after a failed capture
            raise
        cur.wait_stream(stream)
        return graph, out

    # ------------------------------------------------------------ the step
    def _run(self, held, batch, rollback: bool):
        if self.opt._sampa:
            return self._sampa_body(held, batch, rollback)
        return self._sam_body(batch, rollback)

    def _state(self, b, seg) -> Dict[str, torch.Tensor]:
        names = self.opt.rule.state_names(self._hps[seg.group])
        return {n: b.state[n][seg.start:seg.end] for n in names}

    def _sampa_body(self, held, batch, rollback: bool):
        opt = self.opt
        bufs = opt._bufs
        with torch.no_grad():
            opt._save_buffers()
            opt._sync_ymodel()
            inv = (self._gy_sq.sqrt() + EPS).reciprocal()      # 1 / (||gy_t|| + eps)
            for b in bufs:
                b.x_save.copy_(b.x)
                for seg in b.slab.segments:
                    h, flags = self.hyper.group(seg.group), self._flags[seg.group]
                    x = b.x[seg.start:seg.end]
                    xf, gy = x.float(), b.gy[seg.start:seg.end].float()
                    # y_{t+1} = peek(x_t, s_t, gy_t): the state is read, not written
                    y, _ = self._update(xf, gy, self._state(b, seg), h, flags)
                    b.y[seg.start:seg.end].copy_(y)
                    # xt = x + rho gy / (||gy|| + eps)
                    x.copy_(torch.addcmul(xf, gy, inv * h["rho"]))
        try:
            loss_x, loss_y = self.passes(held, batch)
        except BaseException:
            if rollback:
                opt._rollback()
            raise
        with torch.no_grad():
            grad_ok, sq = self._check(bufs, (), ("g", "gy_new"), "gy_new")
            loss_ok = torch.isfinite(loss_x.detach()) & torch.isfinite(loss_y.detach())
            ok = loss_ok & grad_ok
            self._post(ok, mix=True)
            for b in bufs:                                       # keep gy_{t+1}
                b.gy.copy_(torch.where(ok, b.gy_new, b.gy))
            self._gy_sq.copy_(torch.where(ok, sq, self._gy_sq))
            return loss_x.detach().reshape(()), torch.stack([loss_ok.reshape(()), grad_ok.reshape(())])

    def _sam_body(self, batch, rollback: bool):
        opt = self.opt
        bufs = opt._bufs
        with torch.no_grad():
            opt._save_buffers()
            for b in bufs:
                b.x_save.copy_(b.x)
        try:
            loss0 = self.one_pass(batch, "first pass")           # g = grad f(x, b)
            with torch.no_grad():
                ok0, g_sq = self._check(bufs, (), ("g",), "g")
                inv = (g_sq.sqrt() + EPS).reciprocal()
                for b in bufs:                                   # xt = x + rho g / (||g|| + eps)
                    for seg in b.slab.segments:
                        x = b.x[seg.start:seg.end]
                        rho = self.hyper.group(seg.group)["rho"]
                        x.copy_(torch.addcmul(x.float(), b.g[seg.start:seg.end].float(), inv * rho))
            loss = self.one_pass(batch, "perturbed pass")        # g = grad f(xt, b)
        except BaseException:
            if rollback:
                opt._rollback()
            raise
        with torch.no_grad():
            ok1, _ = self._check(bufs, (), ("g",), None)
            loss_ok = torch.isfinite(loss0.detach()) & torch.isfinite(loss.detach())
            grad_ok = ok1 & ok0
            self._post(loss_ok & grad_ok, mix=False)
            return loss.detach().reshape(()), torch.stack([loss_ok.reshape(()), grad_ok.reshape(())])

    def _post(self, ok: torch.Tensor, mix: bool) -> None:
        """x, s = base_step(x_save, s, g) with g = (1 - lam) g + lam gy_new
        (SAMPa) or g (SAM), clipped to max_grad_norm if set. The state is
        written only where the step is accepted (`ok`), so a refused step needs
        no copy of it; x is restored from x_save by the caller."""
        opt = self.opt
        grads = []
        for b in opt._bufs:
            for seg in b.slab.segments:
                g = b.g[seg.start:seg.end].float()
                if mix:
                    h = self.hyper.group(seg.group)
                    g = torch.addcmul(g * h["oml"], b.gy_new[seg.start:seg.end].float(), h["lam"])
                grads.append(g)
        if self._clip is not None:
            norm = torch.stack([g.square().sum() for g in grads]).sum().sqrt()
            coef = torch.clamp(self._clip / (norm + 1e-6), max=1.0)
            grads = [g * coef for g in grads]
        k = 0
        for b in opt._bufs:
            for seg in b.slab.segments:
                h, flags = self.hyper.group(seg.group), self._flags[seg.group]
                state = self._state(b, seg)
                x_new, state_new = self._update(b.x_save[seg.start:seg.end].float(), grads[k], state, h, flags)
                k += 1
                b.x[seg.start:seg.end].copy_(x_new)
                for n, v in state_new.items():
                    state[n].copy_(torch.where(ok, v, state[n]))


def _copy_into(static: List[torch.Tensor], batch) -> None:
    leaves: List[torch.Tensor] = []
    flatten_batch(batch, leaves)
    if leaves:
        torch._foreach_copy_(static, leaves)


# --------------------------------------------------------------------------
# The engine

class StreamsEngine(SerialEngine):
    """Two CUDA streams of one device: the x̃-pass on one, the y-pass on the
    other, forked from and joined back to the current stream with events."""

    name = "streams"

    def __init__(self, opt, graph: bool = False, warmup_steps: int = 3):
        if not isinstance(graph, bool):
            raise TypeError(f"engine='streams': graph must be True or False, got {graph!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"engine='streams': warmup_steps must be an int >= 1 (eager steps "
                             f"before the capture), got {warmup_steps!r}")
        if not _cuda.available():
            raise RuntimeError("engine='streams' needs a CUDA device, and torch.cuda.is_available() "
                               "is False on this machine; use engine='serial' (the same math on "
                               "one device, CPU included)")
        self.opt = opt
        self.device = _cuda.logical(check_one_device(opt, self.name))
        if not _cuda.is_cuda(self.device):
            raise ValueError(f"engine='streams' runs on one CUDA device, but the parameters are on "
                             f"{self.device}; move the model to the GPU (model.cuda()) before "
                             "building the optimizer")
        self._new_streams()
        self.graph = graph
        self.whole_step: Optional[Callable] = None
        self._whole: Optional[WholeStep] = None
        if graph:
            self._whole = WholeStep(opt, self.device, self._two_passes, self._one_pass, graph=True,
                                    warmup_steps=warmup_steps, on_capture_failure=self._new_streams)
            self.whole_step = self._whole.step

    def _new_streams(self) -> None:
        # Also after a failed capture: streams that took part in it start clean.
        self.streams = (_cuda.Stream(self.device), _cuda.Stream(self.device))

    def _hook_missing(self):
        return RuntimeError(
            "engine='streams' with graph=True runs the whole step itself, but the optimizer called "
            "the engine for its gradients only: SAMPa.step / SAM.step must start with "
            "`if getattr(self.engine, 'whole_step', None) is not None: return self.engine.whole_step(batch)`")

    def sampa_gradients(self, held, batch):
        if self.whole_step is not None:
            raise self._hook_missing()
        return self._two_passes(held, batch)

    def gradient(self, batch, which: str):
        if self.whole_step is not None:
            raise self._hook_missing()
        return self._one_pass(batch, which)

    def _one_pass(self, batch, which: str):
        return SerialEngine.gradient(self, batch, which)

    def _two_passes(self, held, batch):
        opt = self.opt
        cur = _cuda.current_stream(self.device)
        sx, sy = self.streams
        capturing = _cuda.is_capturing()
        # Fork: both passes start after the pre-gradient update queued on `cur`.
        sx.wait_stream(cur)
        sy.wait_stream(cur)
        try:
            # Backward ops run on the stream of their forward ops, so each pass
            # (forward and backward) stays on its stream.
            with _cuda.stream(sx):
                for b in opt._bufs:
                    b.g.zero_()
                loss_x = opt._forward_backward(opt.model, held, "x̃-pass")
            ymodel = opt._ymodel
            if ymodel.training != opt.model.training:
                ymodel.train(opt.model.training)
            with _cuda.stream(sy):
                for b in opt._bufs:
                    b.gy_new.zero_()
                with opt._user_params_frozen() if opt._t == 0 else contextlib.nullcontext():
                    loss_y = opt._forward_backward(ymodel, batch, "y-pass")
        finally:
            # Join, also on error: nothing may still write buffers that a
            # rollback on `cur` restores.
            cur.wait_stream(sx)
            cur.wait_stream(sy)
        if not capturing:
            # Tell the caching allocator which streams used memory that another
            # stream allocated, so that it is not reused too early.
            _cuda.record_stream(loss_x, cur)
            _cuda.record_stream(loss_y, cur)
            for tree, s in ((held, sx), (batch, sy)):
                leaves: List[torch.Tensor] = []
                flatten_batch(tree, leaves)
                for t in leaves:
                    _cuda.record_stream(t, s)
        return loss_x, loss_y
