"""SAMPa and SAM for models that do not fit replicated: the two passes over
FSDP2-sharded halves.

Layout. A world of 2k ranks is a (pass, shard) = (2, k) device mesh. Half 0
(ranks [0, k)) runs the x̃-pass, half 1 (ranks [k, 2k)) the y-pass; inside
each half the model is `fully_shard`ed over that half's k ranks, so rank r
and rank r + k (a *pair*) hold the same shard of every parameter.

Every rank keeps, for its shard only: x, gy, the base state, one pass
buffer (xt on half 0, y on half 1) and the two gradients of a step. A step:

    1-2  the pass point from local shards (xt on half 0, y on half 1), copied
         into the half's sharded parameters
    3    each half's forward/backward (FSDP2 reduce-scatters within the half);
         its gradient shard into the flat buffer; the local finite check and
         ||gy_new||^2 of the local shard
         one small all-reduce over all 2k ranks: losses, failures, non-finite
         counts and the global ||gy_new||^2 (the one host read of a step)
         rank r and r + k swap their gradient shards (one send/recv each way)
    4-6  the λ-mix and the base step on local shards, identically on both
         ranks of a pair

The elementwise stages are the registered update ops (`update/ops.py`), run
on the flat buffer of this rank's local shards: no formula is repeated here.

SAM (the baseline) runs data-parallel over all 2k ranks on the same
sharding: each half's reduce-scattered gradient shard is averaged with its
pair's (the same swap), then the perturbation and the base step run on local
shards.
"""
from __future__ import annotations

import datetime
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import tree
from .passes import split_loss
from .sharpness import _number, check_rho_lam
from .update import RULES, backend_for
from .update.common import EPS, default_config
from .update.ops import config_list, family
from .update.table import LAM, OML, RHO, HyperTable

MESH_DIMS = ("pass", "shard")


# ------------------------------------------------------------------ layout
def make_mesh(device_type: Optional[str] = None):
    """The (pass, shard) = (2, k) mesh over the whole world (torchrun's)."""
    from torch.distributed.device_mesh import init_device_mesh
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sampa_fused.shard: torch.distributed is not initialised; start with "
                           "torchrun and call dist.init_process_group() first (gloo on CPU, nccl on GPUs)")
    world = dist.get_world_size()
    if world < 2 or world % 2:
        raise ValueError(f"sampa_fused.shard: the (pass, shard) layout needs an even world of at "
                         f"least 2 ranks (two halves of k), got {world}")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (2, world // 2), mesh_dim_names=MESH_DIMS)


def _blocks(model: nn.Module) -> List[nn.Module]:
    """The modules sharded one by one: every module below the root that holds
    parameters of its own (FSDP2 users shard their blocks; without knowing
    the blocks, a module with direct parameters is the finest unit that
    keeps one all-gather per layer)."""
    return [m for m in model.modules() if m is not model and any(True for _ in m.parameters(recurse=False))]


def shard(model: nn.Module, mesh=None, *, blocks=None, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` in place for ShardedSAMPa / ShardedSAM and return it.

    mesh: a 2-D DeviceMesh with dims ("pass", "shard") and size 2 along
    "pass"; None builds it from the initialised world (2 x world/2).
    blocks: the modules to `fully_shard` one by one before the root (None:
    every module with parameters of its own; pass e.g. the transformer
    blocks)."""
    from torch.distributed.fsdp import fully_shard
    if mesh is None:
        mesh = make_mesh()
    _check_mesh(mesh)
    sub = mesh["shard"]
    for m in (_blocks(model) if blocks is None else list(blocks)):
        fully_shard(m, mesh=sub, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=sub, reshard_after_forward=reshard_after_forward)
    model._sampa_mesh = mesh
    return model


def _check_mesh(mesh) -> None:
    names = tuple(mesh.mesh_dim_names or ())
    if names != MESH_DIMS or mesh.mesh.shape[0] != 2:
        raise ValueError(f"sampa_fused.shard: the mesh must be 2-D with dims {MESH_DIMS} and size 2 "
                         f"along 'pass', got dims {names} and shape {tuple(mesh.mesh.shape)}; build it "
                         "with init_device_mesh(device, (2, k), mesh_dim_names=('pass', 'shard'))")
    if mesh.mesh.flatten().tolist() != list(range(dist.get_world_size())):
        raise ValueError("sampa_fused.shard: the mesh must span the whole world in rank order "
                         "(half 0 = ranks [0, k), half 1 = ranks [k, 2k))")


def _half_layout(params, who: str):
    """(k, half, shard index) of this rank from the sharded parameters, or a
    clear error for a model sharded any other way."""
    from torch.distributed.tensor import DTensor, Shard
    world, rank = dist.get_world_size(), dist.get_rank()
    if world < 2 or world % 2:
        raise ValueError(f"{who}: needs an even world of at least 2 ranks, got {world}")
    k = world // 2
    half = rank // k
    expect = list(range(half * k, half * k + k))
    for i, p in enumerate(params):
        if not isinstance(p, DTensor):
            raise ValueError(f"{who}: parameter {i} is not sharded (a plain tensor); shard the model "
                             "first with sampa_fused.shard(model) (fully_shard over the 'shard' "
                             "dimension of a (pass, shard) = (2, k) mesh)")
        ranks = p.device_mesh.mesh.flatten().tolist()
        if p.device_mesh.ndim != 1 or ranks != expect or tuple(p.placements) != (Shard(0),):
            raise ValueError(
                f"{who}: parameter {i} is sharded as {tuple(p.placements)} over ranks {ranks}, but this "
                f"layout needs it fully_shard-ed (Shard(0)) over this half's ranks {expect} only; "
                "use sampa_fused.shard(model), or fully_shard(module, mesh=mesh['shard']) on a "
                "(pass, shard) = (2, k) mesh (a 2-D/HSDP sharding would mix the two halves' gradients)")
    return k, half, rank % k


# ------------------------------------------------------------------ the optimizer
class _ShardedBase(torch.optim.Optimizer):
    method = "sharded"

    def __init__(self, model: nn.Module, loss_fn: Callable, base_optimizer: type, *, rho: float,
                 lam: Optional[float], params=None, nonfinite: str = "raise", backend: str = "auto",
                 timeout: Optional[float] = None, **kwargs):
        who = self.method
        if not callable(loss_fn):
            raise TypeError(f"{who}: loss_fn must be callable as loss_fn(model, batch)")
        check_rho_lam({"rho": rho} if lam is None else {"rho": rho, "lam": lam}, who)
        rho = _number(rho)
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"{who}: nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f"{who}: timeout must be a positive number of seconds, got {timeout!r}")
        self.model, self.loss_fn, self.nonfinite = model, loss_fn, nonfinite
        if params is None:
            params = [p for p in model.parameters() if p.is_floating_point()]
        base = base_optimizer(params, **kwargs)
        self.rule = RULES.get(type(base))
        if self.rule is None or base.defaults.get("differentiable", False):
            raise ValueError(f"{who}: the sharded step runs torch.optim.SGD or torch.optim.AdamW "
                             f"(their update ops over local shards); got {base_optimizer.__name__}")
        for g in base.param_groups:
            g.setdefault("rho", float(rho))
            if lam is not None:
                g.setdefault("lam", _number(lam))
        self.base = base
        self.params = [p for g in base.param_groups for p in g["params"]]
        for i, p in enumerate(self.params):
            if not p.requires_grad:
                raise ValueError(f"{who}: parameter {i} does not require grad; the sharded step "
                                 "needs a gradient for every optimized parameter: leave frozen ones out "
                                 "of params")
        self.k, self.half, self.index = _half_layout(self.params, who)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.pair = (self.rank + self.k) % self.world
        self._group = dist.new_group(timeout=datetime.timedelta(seconds=timeout)) if timeout else None
        locals_ = [p.to_local() for p in self.params]
        dtypes = {t.dtype for t in locals_}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"{who}: all optimized parameters must share one floating dtype, got {dtypes}")
        self.dtype = dtypes.pop()
        self.device = locals_[0].device
        self.ops = family(backend_for(backend, self.device, [self.dtype]))
        self.cfg = config_list(default_config(self.device))
        # one flat buffer per role over this rank's local shards, in group order
        sizes = [t.numel() for t in locals_]
        self.n = sum(sizes)
        self.segments = []
        start = 0
        for g in base.param_groups:
            end = start + sum(p.to_local().numel() for p in g["params"])
            self.segments.append(slice(start, end))
            start = end
        buf = lambda: torch.zeros(self.n, dtype=self.dtype, device=self.device)  # noqa: E731
        self.x = buf()
        self.g = buf()                 # gxt (SAM: the pass's gradient); also the post op's scratch
        # the base state the groups use now (AdamW: 2P/k, 3P/k with amsgrad); more on demand
        self.state_bufs = {n: buf() for g in base.param_groups
                           for n in self.rule.state_names(self.rule.hyper(g, who))}
        self.counts = [0] * len(base.param_groups)
        self.table = HyperTable(self.device, self.dtype if self.dtype == torch.float64 else torch.float32,
                                pin=False)
        self._locals = locals_
        # the model's buffers (running statistics), by slot: a forward may replace them
        self._buffer_slots = [(m, n) for m in model.modules() for n, b in m._buffers.items() if b is not None]
        self._views = {}
        with torch.no_grad():
            torch._foreach_copy_(self._view_list(self.x), locals_)
        self.steps_taken = 0
        self.skipped_steps = 0
        super().__init__(self.params, dict(base.defaults, rho=float(rho)))
        self.param_groups = base.param_groups
        self.defaults = base.defaults

    # ---------------------------------------------------------------- helpers
    def _view_list(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """flat cut into views shaped as the local shards (cached per buffer)."""
        key = flat.data_ptr()
        views = self._views.get(key)
        if views is None:
            views, o = [], 0
            for t in self._locals:
                views.append(flat[o:o + t.numel()].view(t.shape))
                o += t.numel()
            self._views[key] = views
        return views

    def _load_point(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self._locals, self._view_list(flat))

    def _refresh(self) -> None:
        rows, self._hps, self._flags = [], [], []
        for i, g in enumerate(self.param_groups):
            hp = self.rule.hyper(g, self.method)
            lam = float(g.get("lam", 0.0))
            r = {RHO: float(g["rho"]), LAM: lam, OML: 1.0 - lam}
            r.update(self.rule.row(hp, self.counts[i]))
            rows.append([r.get(j, 0.0) for j in range(max(r) + 1)])
            self._hps.append(hp)
            self._flags.append(list(self.rule.flags(hp)))
        self.table.upload(rows)

    def _state(self, i: int, sl: slice) -> List[torch.Tensor]:
        names = self.rule.state_order(tuple(self._flags[i]))
        for n in names:
            if n not in self.state_bufs:          # a hyperparameter edit turned it on
                self.state_bufs[n] = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        return [self.state_bufs[n][sl] for n in names]

    def _batch_part(self, batch, index: int, parts: int):
        """Part `index` of `parts` equal parts along dim 0: FSDP2 averages the
        parts' gradients with equal weights, so equal parts give the whole
        batch's mean gradient."""
        odd = tree.unknown_leaves(batch)
        if odd:
            raise TypeError(f"{self.method}: cannot split a batch containing a {odd[0]}; batches must "
                            "be tensors or containers of them")
        sizes = set(tree.sizes(batch))
        if len(sizes) != 1:
            raise ValueError(f"{self.method}: the batch's tensors must share one size along dim 0 to "
                             f"be split over the ranks, got sizes {sorted(sizes)}")
        n = sizes.pop()
        if n % parts or n == 0:
            raise ValueError(f"{self.method}: a batch of {n} samples does not split into {parts} equal "
                             f"parts (one per data-parallel rank); use a batch size that is a multiple "
                             f"of {parts}")
        m = n // parts
        return tree.narrow(batch, index * m, (index + 1) * m)

    def _run_pass(self, batch, which: str):
        """loss_fn on this rank's part, backward (FSDP2 reduce-scatters within
        the half): (loss, failure)."""
        try:
            with torch.enable_grad():
                loss, _ = split_loss(self.loss_fn(self.model, batch), self.method, which)
                loss.backward()
            return loss.detach().to(torch.float64), None
        except Exception as e:  # noqa: BLE001 - reported to every rank, re-raised after the status
            return torch.zeros((), dtype=torch.float64, device=self.device), e

    def _take_grads(self, into: torch.Tensor) -> bool:
        """This rank's reduce-scattered gradient shards into `into`; False
        where a parameter got none."""
        grads = [p.grad for p in self.params]
        got = all(gr is not None for gr in grads)
        if got:
            with torch.no_grad():
                torch._foreach_copy_(self._view_list(into), [gr.to_local() for gr in grads])
        for p in self.params:
            p.grad = None
        return got

    def _status(self, loss, failure, got: bool, ok: torch.Tensor, sq: torch.Tensor):
        """The one host read of a pass: [loss sums per half, ||.||^2 sum, non-finite
        ranks, ranks without a gradient, failed per rank], summed over all ranks."""
        t = torch.zeros(5 + self.world, dtype=torch.float64, device=self.device)
        t[self.half] = loss
        t[2] = sq.to(torch.float64)
        t[3] = (~ok).to(torch.float64)
        t[4] = 0.0 if got else 1.0
        if failure is not None:
            t[5 + self.rank] = 1.0
        try:
            dist.all_reduce(t, group=self._group)
        except Exception as e:
            raise RuntimeError(f"{self.method}: the status all-reduce failed (a rank died or did not "
                               f"reach the step in time): {e}") from e
        v = t.tolist()
        failed = [r for r in range(self.world) if v[5 + r] != 0]
        if failure is not None:
            raise failure
        if failed:
            raise RuntimeError(f"{self.method}: rank{'s' if len(failed) > 1 else ''} "
                               f"{', '.join(map(str, failed))} raised an error in a pass; the step was "
                               "refused on every rank and parameters and state are unchanged")
        if v[4]:
            raise RuntimeError(f"{self.method}: a parameter got no gradient in a pass; the sharded step "
                               "needs a gradient for every optimized parameter (leave unused ones out "
                               "of params); the step was refused on every rank")
        return v

    def _buffers(self) -> List[torch.Tensor]:
        return [m._buffers[n] for m, n in self._buffer_slots]

    def _restore_buffers(self, saved: List[torch.Tensor]) -> None:
        for (m, n), b in zip(self._buffer_slots, saved):
            m._buffers[n] = b

    def _swap(self, send: torch.Tensor, recv: torch.Tensor, buffers: bool = False) -> None:
        """Rank r and r + k trade their gradient shards (P/k values each way);
        with `buffers`, half 0 also sends the model's buffers to half 1 (the
        x̃-pass's running statistics replace the y-pass's, as the y-pass's
        updates are private)."""
        ops = [dist.P2POp(dist.isend, send, self.pair, group=self._group),
               dist.P2POp(dist.irecv, recv, self.pair, group=self._group)]
        if buffers:
            op = dist.isend if self.half == 0 else dist.irecv
            ops += [dist.P2POp(op, b, self.pair, group=self._group) for b in self._buffers()]
        try:
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        except Exception as e:
            raise RuntimeError(f"{self.method}: the gradient swap with rank {self.pair} failed: {e}") from e

    def _nonfinite(self, v) -> bool:
        """True to go on with the step; raises or counts a skip otherwise."""
        if not v[3]:
            return True
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"{self.method}: non-finite loss or gradient at step {self.steps_taken}; the step was "
                "refused on every rank and parameters, optimizer state and the held batch are unchanged. "
                "Lower the learning rate, check the data, or pass nonfinite='skip'.")
        self.skipped_steps += 1
        return False

    def _post(self, mixing: bool, gy_new=None, gy=None) -> None:
        ok = torch.ones((), dtype=torch.bool, device=self.device)
        for i, sl in enumerate(self.segments):
            self.ops.post[self.rule.NAME](
                self.x[sl], self.g[sl], gy_new[sl] if mixing else None, gy[sl] if mixing else None,
                self._state(i, sl), self.g[sl], None, ok, None, self.table.row(i), self._flags[i],
                int(self.counts[i] == 0), 1, True, self.cfg)
        self.counts = [c + 1 for c in self.counts]
        self.steps_taken += 1
        self._accepted = True

    def step(self, batch=None, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        if batch is None:
            raise TypeError(f"{self.method}: step(batch) needs the batch")
        saved = [b.clone() for b in self._buffers()]
        self._accepted = False
        try:
            return self._step(batch)
        finally:
            self._load_point(self.x)           # the model holds x between steps, whatever happened
            if not self._accepted:             # a refused or failed step: the buffers as they were
                self._restore_buffers(saved)

    # ---------------------------------------------------------------- checkpoints
    def _sharded(self, flat: torch.Tensor) -> dict:
        """flat's local shards as DTensors shaped and placed as the parameters
        (keys: the parameter's index), for torch.distributed.checkpoint."""
        from torch.distributed.tensor import DTensor
        return {str(i): DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                           run_check=False)
                for i, (v, p) in enumerate(zip(self._view_list(flat), self.params))}

    def _flats(self) -> dict:
        """Every flat buffer a checkpoint holds, by name."""
        out = {"x": self.x}
        out.update({f"state.{n}": b for n, b in self.state_bufs.items()})
        return out

    def _meta(self) -> dict:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return dict(method=self.method, counts=list(self.counts), steps=self.steps_taken,
                    skipped=self.skipped_steps, groups=groups, k=self.k,
                    sizes=[list(p.shape) for p in self.params])

    def state_dict(self) -> dict:
        """The optimizer's state as a torch.distributed.checkpoint state dict:
        x, the base state (and gy) as DTensors sharded as the parameters (each
        rank writes its shards; the two halves hold the same, written once),
        the rest (step counts, hyperparameters, the held batch) as one small
        object. Save with dcp.save(opt.state_dict(), checkpoint_id=dir); load with
        sd = opt.state_dict(); dcp.load(sd, checkpoint_id=dir); opt.load_state_dict(sd)."""
        import io
        buf = io.BytesIO()
        torch.save(self._meta(), buf)
        out = {name: self._sharded(flat) for name, flat in self._flats().items()}
        out["meta"] = buf.getvalue()
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore from state_dict() filled by dcp.load (on the same layout).
        Everything is checked before anything is written; x goes into the
        model's parameters too."""
        import io
        meta = state_dict.get("meta")
        if not isinstance(meta, (bytes, bytearray)):
            raise ValueError(f"{self.method}: load_state_dict expects the dict of opt.state_dict() "
                             "filled by torch.distributed.checkpoint.load (its 'meta' entry is missing)")
        meta = torch.load(io.BytesIO(meta), weights_only=False)
        mine = self._meta()
        for key in ("method", "k", "sizes"):
            if meta.get(key) != mine[key]:
                raise ValueError(f"{self.method}: the checkpoint was saved with {key}={meta.get(key)!r}, this "
                                 f"optimizer has {mine[key]!r}; load it on the same model and layout")
        if len(meta["groups"]) != len(self.param_groups):
            raise ValueError(f"{self.method}: the checkpoint has {len(meta['groups'])} param groups, this "
                             f"optimizer {len(self.param_groups)}")
        srcs = {}
        for name, flat in self._flats().items():
            part = state_dict.get(name)
            if not isinstance(part, dict) or set(part) != {str(i) for i in range(len(self.params))}:
                raise ValueError(f"{self.method}: the checkpoint's {name!r} entry does not match this "
                                 "optimizer's parameters")
            locs = [part[str(i)].to_local() for i in range(len(self.params))]
            if [t.shape for t in locs] != [t.shape for t in self._view_list(flat)]:
                raise ValueError(f"{self.method}: the checkpoint's {name!r} shards have other shapes "
                                 "than this rank's; load it on the same layout")
            srcs[name] = locs
        extra = self._load_extra_check(meta)
        with torch.no_grad():
            for name, flat in self._flats().items():
                torch._foreach_copy_(self._view_list(flat), srcs[name])
        for g, saved in zip(self.param_groups, meta["groups"]):
            g.update(saved)
        self.counts = list(meta["counts"])
        self.steps_taken, self.skipped_steps = meta["steps"], meta["skipped"]
        self._load_extra(extra)
        self._load_point(self.x)

    def _load_extra_check(self, meta: dict):
        return None

    def _load_extra(self, extra) -> None:
        pass

    def full_state_dict(self) -> dict:
        """The unsharded state for export: {name: [full tensor per parameter]}
        on every rank (an all-gather within each half per tensor)."""
        return {name: [d.full_tensor() for d in self._sharded(flat).values()]
                for name, flat in self._flats().items()}

    # torch.optim.Optimizer's own step/zero_grad semantics do not apply
    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


class ShardedSAMPa(_ShardedBase):
    """SAMPa over FSDP2-sharded halves (see the module docstring):

        model = sampa_fused.shard(model)            # under torchrun, world 2k
        opt = ShardedSAMPa(model, loss_fn, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1)
        loss = opt.step(batch)                      # the same full batch on every rank

    Half 0 splits the held batch over its k ranks, half 1 the new one."""

    method = "ShardedSAMPa"

    def __init__(self, model, loss_fn, base_optimizer, *, rho: float = 0.05, lam: float = 0.2, **kwargs):
        if lam is None:
            raise ValueError(f"{self.method}: lam must be a number in [0, 1], got None")
        super().__init__(model, loss_fn, base_optimizer, rho=rho, lam=lam, **kwargs)
        self.gy = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        self.gy_new = torch.zeros_like(self.gy)
        # the pass point lives in the buffer the swap fills later (free until then):
        # xt in gy_new on half 0, y in g on half 1; no buffer of its own
        self.point = self.gy_new if self.half == 0 else self.g
        self.gy_sq = torch.zeros((), dtype=torch.float32, device=self.device)
        self.held = None

    def _flats(self) -> dict:
        out = super()._flats()
        out["gy"] = self.gy
        return out

    def _meta(self) -> dict:
        out = super()._meta()
        out.update(gy_sq=float(self.gy_sq), held=self.held)
        return out

    def _load_extra_check(self, meta: dict):
        return meta["gy_sq"], meta["held"]

    def _load_extra(self, extra) -> None:
        self.gy_sq.fill_(extra[0])
        self.held = extra[1]

    def _step(self, batch):
        held = batch if self.held is None else self.held            # first call: B_0 = B_1
        # both batches checked on every rank (each half runs on one of them), so
        # bad input raises the same error everywhere, before any collective
        parts = [self._batch_part(b, self.index, self.k) for b in (held, batch)]
        part = parts[self.half]
        self._refresh()
        # 1-2. xt = x + rho gy/(||gy|| + eps) on half 0, y = peek(x, s, gy) on half 1
        norm = self.gy_sq.sqrt()
        for i, sl in enumerate(self.segments):
            xt = self.point[sl] if self.half == 0 else None
            y = self.point[sl] if self.half == 1 else None
            self.ops.pre[self.rule.NAME](self.x[sl], xt, y, self.gy[sl], self._state(i, sl), norm,
                                         self.table.row(i), self._flags[i], int(self.counts[i] == 0),
                                         False, self.cfg)
        self._load_point(self.point)
        # 3. this half's pass; its gradient shard into g (half 0) or gy_new (half 1)
        loss, failure = self._run_pass(part, "x̃-pass" if self.half == 0 else "y-pass")
        own = self.g if self.half == 0 else self.gy_new
        got = failure is None and self._take_grads(own)
        squared = [self.gy_new] if self.half == 1 else []
        checked = [self.g] if self.half == 0 else []
        ok, sq = self.ops.check(squared, checked, [loss.float()], None, 1, self.cfg)
        v = self._status(loss, failure, got, ok, sq)
        if not self._nonfinite(v):
            return torch.tensor(v[0] / self.k, dtype=torch.float32)
        self._swap(own, self.gy_new if self.half == 0 else self.g, buffers=True)
        # 4-6. x, s = base_step(x, s, (1 - lam) gxt + lam gy_new); gy <- gy_new
        self._post(True, self.gy_new, self.gy)
        self.gy_sq.fill_(v[2])
        self.held = tree.clone(batch)
        return torch.tensor(v[0] / self.k, dtype=torch.float32)


class ShardedSAM(_ShardedBase):
    """SAM data-parallel over all 2k ranks on the same sharding (the
    baseline): each rank takes its 1/2k of the batch."""

    method = "ShardedSAM"

    def __init__(self, model, loss_fn, base_optimizer, *, rho: float = 0.05, **kwargs):
        if "lam" in kwargs:
            raise TypeError("ShardedSAM takes no lam (SAMPa's interpolation ratio)")
        super().__init__(model, loss_fn, base_optimizer, rho=rho, lam=None, **kwargs)
        self.other = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        self.point = self.other        # xt, formed after the first swap, before the second

    def _pass_mean(self, part, which: str):
        """One data-parallel pass over 2k ranks: g <- the mean gradient shard."""
        loss, failure = self._run_pass(part, which)
        got = failure is None and self._take_grads(self.g)
        ok, _ = self.ops.check([], [self.g], [loss.float()], None, 1, self.cfg)
        v = self._status(loss, failure, got, ok, torch.zeros((), device=self.device))
        if v[3]:
            return v, False
        self._swap(self.g, self.other)
        # (g_half0 + g_half1) / 2, the same bits on both ranks of the pair (+ commutes)
        self.g.add_(self.other).mul_(0.5)
        return v, True

    def _step(self, batch):
        part = self._batch_part(batch, self.half * self.k + self.index, 2 * self.k)
        self._refresh()
        v0, fine = self._pass_mean(part, "first pass")
        if not fine:
            self._nonfinite(v0)
            return torch.tensor((v0[0] + v0[1]) / self.world, dtype=torch.float32)
        # ||g||^2 over all shards: each pair holds one copy, counted by half 0 only
        sq = torch.dot(self.g, self.g).to(torch.float64) if self.half == 0 else \
            torch.zeros((), dtype=torch.float64, device=self.device)
        dist.all_reduce(sq, group=self._group)
        norm = sq.to(torch.float32).sqrt()
        for i, sl in enumerate(self.segments):
            self.ops.perturb(self.x[sl], self.point[sl], self.g[sl], norm, None, self.table.row(i),
                             False, self.cfg)
        self._load_point(self.point)
        at_x = [b.clone() for b in self._buffers()]     # the perturbed pass's buffer updates are discarded
        v1, fine = self._pass_mean(part, "perturbed pass")
        self._restore_buffers(at_x)
        if not fine and not self._nonfinite(v1):
            return torch.tensor((v1[0] + v1[1]) / self.world, dtype=torch.float32)
        self._post(False)
        return torch.tensor((v1[0] + v1[1]) / self.world, dtype=torch.float32)


__all__ = ["shard", "make_mesh", "ShardedSAMPa", "ShardedSAM", "EPS"]
