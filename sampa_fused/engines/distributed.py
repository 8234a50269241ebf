"""The distributed engine: SAMPa's two gradients on two halves of a
torch.distributed process group (NCCL on GPUs, gloo on CPU), started with
torchrun.

World size 2k. Ranks [0, k) compute the x̃ gradient (the user's model, held
batch), ranks [k, 2k) the y gradient (the private y-model, new batch); each
half is data-parallel over its shard of the batch (dim 0). Every rank keeps
the full x, base state and gy and applies the identical update, so replicas
stay identical without any parameter traffic: only gradients move.

Communication runs on flat buffers only, in buckets (contiguous ranges of a
flat slab) started from post-accumulate-grad hooks while backward still runs,
always in the same bucket order on every rank:

- k = 1 (2 ranks): each rank sends its own gradient buffer to the other
  (x̃-rank: g -> peer's g; y-rank: gy_new -> peer's gy_new). P values sent per
  rank per step: half of a DDP all-reduce of 2P.
- k > 1: x̃-ranks hold their weighted gradient in g and zero in gy_new, y-ranks
  the reverse; both buffers are all-reduced (SUM) over all 2k ranks: the bytes
  of a DDP all-reduce of 2P, no more.
- SAM (plain data parallelism over every rank, any world size): g is
  all-reduced, as DDP does.

Besides the gradients, per pass: one small float64 all-reduce after backward
(the status: the two losses, so every rank takes the same finite/non-finite
decision and returns the same global loss; one error flag per rank; each
rank's model-buffer byte count and layout digest) and, where the model has
buffers (batch-norm statistics), one broadcast of them from rank 0 so that
evaluating the model gives the same result on every rank. The host reads the
status once per pass (gloo blocks on the pass's collectives anyway; with NCCL
this is one host synchronisation per pass).

Errors: both batches are validated on every rank before any collective
(sizes, shares, accumulation steps), so bad input raises the same ValueError
everywhere. An exception that hits one rank only (inside loss_fn, backward,
or with sharded_batches its own shard) is caught; that rank still runs the
pass's fixed collective schedule with its error flag set, then re-raises its
own exception, and every other rank raises a RuntimeError naming it. Either
way the optimizer refuses (rolls back) the step on every rank, so replicas
never drift apart. Buffers that change size in forward (so rank 0's broadcast
would not fit the others) raise a RuntimeError on every rank the same way.

Replicas: construction (after checking that every rank built the same model
and optimizer) broadcasts rank 0's parameters, base state, gy, ||gy||^2, step
counters, GradScaler state, model buffers and parameters outside the
optimizer, as DDP does at construction; `load_state_dict` does it again via
`sync_replicas()`, so it must run on every rank (rank 0's values win).

Process group: each engine creates one; `close()` destroys it (also done when
the engine is garbage collected, unless a collective failed).

Gradient accumulation (accumulation_steps, MicroBatches) and a GradScaler
work as in the serial engine: each rank cuts its shard into micro-batches, and
only the last micro-batch's backward starts the exchange (gradients are final
only then).

Waiting: the end of each pass waits for its collectives. With NCCL that is a
stream dependency (no host synchronisation); with gloo, `work.wait()` blocks
the host, which is acceptable only there, once per pass.

Dead or stuck ranks: the engine's collectives run on a process group of its
own, created with `timeout` (default DEFAULT_TIMEOUT_S seconds). A rank whose
peer died gets an error as soon as the connection drops (gloo) and, at the
latest, when the timeout expires; the error names the rank and says what to
do. With NCCL, the NCCL watchdog aborts the communicator after the timeout and
ends the process (torch's default TORCH_NCCL_ASYNC_ERROR_HANDLING).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import sys
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..batching import MicroBatches, micro_batches
from .serial import check_one_device

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_BUCKET_BYTES = 4 << 20      # several buckets even for small models, so backward overlaps
_BUFFER_ALIGN = 64                  # bytes; lets the packed-buffer views take any dtype


class _CommError(RuntimeError):
    """A collective failed: the group is unusable, no protocol can follow."""


def _as_timedelta(timeout) -> datetime.timedelta:
    if timeout is None:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    if isinstance(timeout, datetime.timedelta):
        td = timeout
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        td = datetime.timedelta(seconds=float(timeout))
    else:
        raise TypeError(f"distributed engine: timeout must be a number of seconds or a "
                        f"datetime.timedelta, got {timeout!r}")
    if not td.total_seconds() > 0:
        raise ValueError(f"distributed engine: timeout must be positive, got {timeout!r}")
    return td


# ------------------------------------------------------------------ batches
_LEAF_TYPES = (int, float, complex, bool, str, bytes, type(None))


def _batch_sizes(batch, out: List[int]) -> None:
    if isinstance(batch, torch.Tensor):
        if batch.dim() >= 1:
            out.append(batch.shape[0])
    elif isinstance(batch, dict):
        for v in batch.values():
            _batch_sizes(v, out)
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            _batch_sizes(v, out)
    elif not isinstance(batch, _LEAF_TYPES):
        raise TypeError(f"distributed engine: cannot shard a batch containing a "
                        f"{type(batch).__name__}; batches must be tensors or tuples/lists/dicts of "
                        "them (numbers and strings pass unchanged). Otherwise shard the batch per "
                        "rank yourself and pass sharded_batches=True")


def _slice(batch, start: int, end: int):
    if isinstance(batch, torch.Tensor):
        return batch[start:end] if batch.dim() >= 1 else batch
    if isinstance(batch, dict):
        return type(batch)((k, _slice(v, start, end)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):        # namedtuple
        return type(batch)(*(_slice(v, start, end) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(v, start, end) for v in batch)
    return batch


def batch_length(batch) -> int:
    """The common size along dim 0 of the batch's tensors."""
    sizes: List[int] = []
    _batch_sizes(batch, sizes)
    if not sizes:
        raise TypeError("distributed engine: the batch holds no tensor with a batch dimension to "
                        "shard along dim 0; pass sharded_batches=True and shard it yourself")
    n = sizes[0]
    if any(s != n for s in sizes):
        raise ValueError(f"distributed engine: cannot shard the batch along dim 0: its tensors "
                         f"have different sizes there ({sorted(set(sizes))}); make them agree, or "
                         "shard per rank yourself and pass sharded_batches=True")
    return n


def shard_batch(batch, index: int, parts: int) -> Tuple[Any, float]:
    """Shard `index` of `parts` along dim 0 (the first N % parts shards get one
    more sample) and its weight n_i / N, so that the weighted sum of per-shard
    mean losses is the full-batch mean."""
    if parts == 1:
        return batch, 1.0
    n = batch_length(batch)
    if n < parts:
        raise ValueError(f"distributed engine: a batch of {n} samples cannot be split over {parts} "
                         f"data-parallel ranks; use a batch of at least {parts} samples")
    q, r = divmod(n, parts)
    start = index * q + min(index, r)
    size = q + (1 if index < r else 0)
    return _slice(batch, start, start + size), size / n


# ------------------------------------------------------------------ buckets
class _Bucket:
    __slots__ = ("slab", "start", "end", "params", "pending")

    def __init__(self, slab: int, start: int, end: int, params: List[int]):
        self.slab, self.start, self.end, self.params = slab, start, end, params
        self.pending = len(params)


def plan_buckets(slabs, bucket_bytes: int) -> List[_Bucket]:
    """Tile every slab with contiguous ranges of whole parameters of about
    `bucket_bytes` (padding included, so the buckets cover each slab exactly),
    ordered as backward usually produces gradients: last parameters first."""
    buckets: List[_Bucket] = []
    for si, slab in enumerate(slabs):
        cap = max(1, bucket_bytes // slab.dtype.itemsize)
        cur: List[int] = []
        start = 0
        for i, off, shape in zip(slab.index, slab.offsets, slab.shapes):
            if cur and off - start + shape.numel() > cap:
                buckets.append(_Bucket(si, start, off, cur))
                cur, start = [], off
            cur.append(i)
        if cur or slab.numel:
            buckets.append(_Bucket(si, start, slab.numel, cur))
    buckets.sort(key=lambda b: -max(b.params, default=-1))
    return buckets


# ------------------------------------------------------------------ the engine
class DistributedEngine:
    """Options (keyword arguments of SAMPa / SAM):

    process_group    the group to run on (default: the default group; if
                     torch.distributed is not initialized yet, it is initialized
                     from torchrun's environment: nccl for CUDA parameters,
                     gloo otherwise)
    sharded_batches  False: every rank passes the same global batch and the
                     engine takes its shard along dim 0, weighting shards by
                     size (exactly the full-batch mean for mean losses).
                     True: each rank passes its own shard; with SAMPa, ranks r
                     and r + k must get the SAME shard (use `data_rank` and
                     `data_world_size` for a DistributedSampler); shards count
                     equally, as in DDP
    timeout          seconds (or timedelta) a collective may wait for peers
                     before it fails (default DEFAULT_TIMEOUT_S)
    bucket_bytes     bucket size of the gradient exchange (default 4 MiB)
    overlap          True: start each bucket from backward hooks; False: send
                     everything after backward (for models whose parameters
                     receive gradients more than once per backward, e.g.
                     reentrant checkpointing)
    """

    name = "distributed"

    def __init__(self, opt, process_group=None, sharded_batches: bool = False, timeout=None,
                 bucket_bytes: Optional[int] = None, overlap: bool = True):
        self.opt = opt
        self.method = type(opt).__name__
        if not isinstance(sharded_batches, bool):
            raise TypeError(f"distributed engine: sharded_batches must be True or False, got {sharded_batches!r}")
        if not isinstance(overlap, bool):
            raise TypeError(f"distributed engine: overlap must be True or False, got {overlap!r}")
        if bucket_bytes is None:
            bucket_bytes = DEFAULT_BUCKET_BYTES
        if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes <= 0:
            raise ValueError(f"distributed engine: bucket_bytes must be a positive int, got {bucket_bytes!r}")
        self.sharded_batches, self.overlap, self.bucket_bytes = sharded_batches, overlap, bucket_bytes
        self.timeout = _as_timedelta(timeout)
        self.device = check_one_device(opt, self.name)
        if not dist.is_available():
            raise RuntimeError("engine='distributed' needs torch.distributed, which this torch build lacks")

        parent = self._parent_group(process_group)
        self.rank = dist.get_rank(parent)
        if self.rank < 0:
            raise ValueError("distributed engine: this process is not a member of the process_group "
                             "it was given; build the optimizer only on the group's ranks")
        self.world_size = dist.get_world_size(parent)
        self._who = f"{self.method} distributed engine (rank {self.rank} of {self.world_size})"
        if opt._sampa and self.world_size % 2:
            raise ValueError(
                f"{self._who}: SAMPa needs an even world size 2k (ranks [0, k) compute the x̃ "
                f"gradient, ranks [k, 2k) the y gradient), got {self.world_size}; launch an even "
                "number of processes, e.g. torchrun --nproc-per-node 2")
        backend = str(dist.get_backend(parent))
        if self.device.type == "cuda":
            if "nccl" not in backend:
                raise ValueError(f"{self._who}: parameters are on {self.device}, and the process "
                                 f"group's backend is {backend!r}; CUDA parameters need "
                                 "backend='nccl' (one GPU per rank)")
        elif self.device.type != "cpu":
            raise ValueError(f"{self._who}: runs on CPU parameters (gloo) or CUDA parameters "
                             f"(nccl), not on {self.device}")
        elif "gloo" not in backend:
            raise ValueError(f"{self._who}: parameters are on {self.device}, which the process "
                             f"group's backend {backend!r} cannot exchange; initialize the process "
                             "group with backend='gloo' (or move the model to the GPU for nccl)")
        self._nccl = self.device.type == "cuda" and "nccl" in backend
        ranks = dist.get_process_group_ranks(parent)
        # A group of our own: the engine's timeout holds whatever the user's
        # group was created with, and our traffic never interleaves with theirs.
        whole = parent is dist.group.WORLD or self.world_size == dist.get_world_size()
        self.group = dist.new_group(ranks=ranks, timeout=self.timeout, backend=backend,
                                    use_local_synchronization=not whole)
        self._global = ranks                       # group rank -> global rank
        self._broken = False                       # a collective failed: never destroy politely

        if opt._sampa:
            self.k = self.world_size // 2
            self.role = "x" if self.rank < self.k else "y"
            self.data_rank, self.data_world_size = self.rank % self.k, self.k
            self.mode = "p2p" if self.k == 1 else "allreduce2"
        else:
            self.k = self.world_size
            self.role = "x"
            self.data_rank, self.data_world_size = self.rank, self.world_size
            self.mode = "allreduce"
        self._armed = False
        # As the peer engine's: False skips the gradient exchange (wrong results),
        # only to time a step without it (bench_comm.py --engine-step).
        self.exchange = True
        # Where buckets were started (tests and benchmarks read these).
        self.stats = {"buckets_during_backward": 0, "buckets_after_backward": 0}
        self._bufs_ref = None
        self._hooks: List[Any] = []
        self._setup_buffers()
        self._ensure_layout()
        # As DDP: rank 0's parameters, state and buffers on every rank, so that
        # different seeds cannot diverge.
        self._sync_values()

    # ---------------------------------------------------------------- set-up
    def _parent_group(self, process_group):
        if process_group is not None:
            if not dist.is_initialized():
                raise RuntimeError("distributed engine: a process_group was given but "
                                   "torch.distributed is not initialized")
            return process_group
        if not dist.is_initialized():
            if not all(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
                raise RuntimeError(
                    "engine='distributed' needs torch.distributed: launch the script with torchrun "
                    "(e.g. torchrun --standalone --nproc-per-node 2 train.py) or call "
                    "torch.distributed.init_process_group(...) before building the optimizer")
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend, timeout=self.timeout)
        return dist.group.WORLD

    def _setup_buffers(self) -> None:
        self._modules = list(self.opt.model.modules())
        self._msig = None
        self._mflat = None
        self._mdigest = 0
        self._mbufs: List[torch.Tensor] = []

    def _current_buffers(self) -> Tuple[int, int]:
        """The model's buffers now (a module may replace a buffer object in
        its forward), packed into one flat byte buffer for one broadcast per
        pass (no per-tensor collectives). Returns their byte count and a
        digest of their shapes and dtypes (exact in float64), for the status."""
        if self.world_size == 1:
            return 0, 0
        bufs = [t for m in self._modules for t in m._buffers.values() if t is not None and t.numel() > 0]
        sig = [(t.shape, t.dtype, t.device) for t in bufs]
        if sig != self._msig:
            if any(t.device != self.device for t in bufs):
                raise ValueError(f"{self._who}: the model's buffers must be on the parameters' "
                                 f"device {self.device}; move the whole model there")
            offs, n = [], 0
            for t in bufs:
                n = -(-n // _BUFFER_ALIGN) * _BUFFER_ALIGN
                offs.append(n)
                n += t.numel() * t.element_size()
            self._mflat = torch.zeros(n, dtype=torch.uint8, device=self.device) if bufs else None
            self._mviews = [self._mflat[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                            for o, t in zip(offs, bufs)]
            self._msig = sig
            desc = repr([(tuple(t.shape), str(t.dtype)) for t in bufs]).encode()
            self._mdigest = int.from_bytes(hashlib.sha256(desc).digest()[:6], "little")
        self._mbufs = bufs
        return (self._mflat.numel() if bufs else 0), self._mdigest

    def _ensure_layout(self) -> None:
        """(Re)build buckets and hooks for the optimizer's current flat layout
        (again after add_param_group), and check that every rank agrees."""
        opt = self.opt
        if self._bufs_ref is opt._bufs:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._bufs_ref = opt._bufs
        self._buckets = plan_buckets([b.slab for b in opt._bufs], self.bucket_bytes)
        self._pending0 = [b.pending for b in self._buckets]
        self._bucket_of = {}
        for j, bk in enumerate(self._buckets):
            for i in bk.params:
                self._bucket_of[i] = j
        self._check_fingerprint()
        self._find_unused = True          # until a pass shows that every parameter is used
        if self.overlap:
            for i, p in enumerate(self._role_params()):
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(i)))
        self._reset_pass()

    def _make_hook(self, i: int):
        def hook(_param):
            if self._armed:
                self._grad_ready(i)
        return hook

    # ----------------------------------------------------------- fingerprint
    def _components(self) -> List[Tuple[str, str]]:
        opt = self.opt

        def val(v):
            if isinstance(v, torch.Tensor):
                return repr(v.tolist())
            return repr(v)

        names = opt._names
        scaler = getattr(opt, "grad_scaler", None)
        if scaler is None:
            sc = "none"
        else:
            sc = (f"{type(scaler).__name__} enabled={scaler.is_enabled()}"
                  # (the scale itself is broadcast from rank 0 by sync_replicas)
                  + (f" growth_factor={scaler.get_growth_factor()!r} "
                     f"backoff_factor={scaler.get_backoff_factor()!r} "
                     f"growth_interval={scaler.get_growth_interval()!r}" if scaler.is_enabled() else ""))
        comps = [("method", self.method),
                 ("base optimizer", f"{type(opt.base).__module__}.{type(opt.base).__qualname__}"),
                 ("nonfinite mode", opt.nonfinite),
                 ("training options",
                  f"accumulation_steps={getattr(opt, 'accumulation_steps', 1)} "
                  f"max_grad_norm={getattr(opt, 'max_grad_norm', None)} "
                  f"grad_scaler={type(scaler).__name__}"),
                 ("GradScaler settings", sc),
                 ("engine options", f"sharded_batches={self.sharded_batches} overlap={self.overlap} "
                                    f"bucket_bytes={self.bucket_bytes}"),
                 ("device type", self.device.type),
                 ("number of param groups", str(len(opt.param_groups)))]
        for gi, g in enumerate(opt.param_groups):
            hp = "; ".join(f"{k}={val(v)}" for k, v in sorted(g.items()) if k != "params")
            comps.append((f"hyperparameters of param group {gi}", hp))
            ps = "; ".join(f"{names.get(id(p), '?')} {tuple(p.shape)} {p.dtype}" for p in g["params"])
            comps.append((f"parameters of param group {gi}", ps))
        mb = "; ".join(f"{n} {tuple(b.shape)} {b.dtype}" for n, b in opt.model.named_buffers())
        comps.append(("model buffers", mb))
        # parameters outside the optimizer are broadcast with the buffers
        mp = "; ".join(f"{n} {tuple(q.shape)} {q.dtype}" for n, q in opt.model.named_parameters())
        comps.append(("model parameters", mp))
        comps.append(("flat layout", "; ".join(f"{b.slab.dtype} {b.slab.numel}" for b in opt._bufs)))
        comps.append(("buckets", "; ".join(f"{b.slab}:{b.start}-{b.end}" for b in self._buckets)))
        return comps

    def _check_fingerprint(self) -> None:
        """Exchange a digest of layout and hyperparameters once; on mismatch,
        exchange the details and raise the same error on every rank."""
        comps = self._components()
        digest = hashlib.sha256(repr(comps).encode()).digest()
        mine = torch.tensor(list(digest), dtype=torch.uint8, device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        with self._on_device():
            try:
                dist.all_gather(every, mine, group=self.group)
            except Exception as e:
                raise self._comm_error("fingerprint exchange", e) from e
            if all(torch.equal(e, every[0]) for e in every):
                return
            allcomps: List[Any] = [None] * self.world_size
            try:
                dist.all_gather_object(allcomps, comps, group=self.group)
            except Exception as e:
                raise self._comm_error("fingerprint exchange", e) from e
        ref = dict(allcomps[0])
        for r, rc in enumerate(allcomps):
            d = dict(rc)
            for label in list(ref) + [k for k in d if k not in ref]:
                if ref.get(label) != d.get(label):
                    a, b = _first_difference(ref.get(label), d.get(label))
                    raise RuntimeError(
                        f"{self._who}: ranks disagree on the {label}: rank 0 has {a}, rank {r} has "
                        f"{b}. Every rank must build the same model and optimizer (same parameters, "
                        "param groups, hyperparameters and engine options)")
        raise RuntimeError(f"{self._who}: the ranks' fingerprints of parameter layout and "
                           "hyperparameters differ; build the same model and optimizer on every rank")

    def _on_device(self):
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    # ------------------------------------------------------------ one pass
    def _reset_pass(self) -> None:
        for bk, n in zip(self._buckets, self._pending0):
            bk.pending = n
        self._next = 0
        self._fired = bytearray(len(self.opt._params))
        self._works: List[Tuple[str, Any]] = []

    def _mark_unused(self, loss: torch.Tensor) -> None:
        """Mark parameters that this pass's graph does not reach as ready, so
        that their buckets do not hold back the buckets behind them (buckets
        go out in a fixed order). Only while unused parameters are seen: the
        graph walk is Python; correctness never depends on it, since whatever
        is not sent during backward is sent right after it."""
        if not (self.overlap and self._find_unused):
            return
        reached, seen, stack = set(), set(), [loss.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            var = getattr(fn, "variable", None)
            if var is not None:
                reached.add(id(var))
            stack.extend(f for f, _ in fn.next_functions)
        unused = [i for i, p in enumerate(self._role_params()) if id(p) not in reached]
        self._find_unused = bool(unused)
        self._armed = True
        try:
            for i in unused:
                self._grad_ready(i)
        finally:
            self._armed = False

    def _role_params(self):
        return self.opt._yparams if self.role == "y" else self.opt._params

    def _grad_ready(self, i: int) -> None:
        j = self._bucket_of.get(i)
        if j is None:
            return
        bk = self._buckets[j]
        if self._fired[i]:
            raise RuntimeError(
                f"{self._who}: parameter {self.opt._names.get(id(self.opt._params[i]), i)} received "
                "its gradient twice in one backward pass (e.g. reentrant activation checkpointing); "
                "its bucket was already sent. Pass overlap=False to exchange gradients after backward")
        self._fired[i] = 1
        bk.pending -= 1
        # Strict bucket order, the same on every rank, whatever order the hooks fire in.
        while self._next < len(self._buckets) and self._buckets[self._next].pending == 0:
            self._launch(self._next)
            self._next += 1
            self.stats["buckets_during_backward"] += 1

    def _launch(self, j: int) -> None:
        if not self.exchange:     # the status all-reduce and buffer broadcast still run
            return
        bk = self._buckets[j]
        b = self.opt._bufs[bk.slab]
        s = slice(bk.start, bk.end)
        try:
            if self.mode == "p2p":
                own, other = (b.g, b.gy_new) if self.role == "x" else (b.gy_new, b.g)
                peer = self._global[1 - self.rank]
                ops = [dist.P2POp(dist.isend, own[s], peer, self.group, j),
                       dist.P2POp(dist.irecv, other[s], peer, self.group, j)]
                for w in dist.batch_isend_irecv(ops):
                    self._works.append(("gradient exchange", w))
            else:
                flats = (b.g, b.gy_new) if self.mode == "allreduce2" else (b.g,)
                for f in flats:
                    w = dist.all_reduce(f[s], op=dist.ReduceOp.SUM, group=self.group, async_op=True)
                    self._works.append(("gradient all-reduce", w))
        except Exception as e:
            raise self._comm_error("gradient exchange", e) from e

    def _pass(self, model, parts, which: str, slot: int, failure: Optional[Exception] = None):
        """Forward/backward over this rank's (micro-batch, weight) parts, as
        the optimizer's own _forward_backward does (GradScaler included),
        with the exchange started during the last backward. Returns the
        global losses (x̃, y), in the loss's dtype promoted to at least float32.

        `parts` may be a callable making them (so that a local error there
        follows the failure protocol). A local exception does not stop the
        pass's collectives: they all run, in the same order as on every
        other rank, and the status all-reduce tells every rank who failed."""
        opt = self.opt
        scaler = getattr(opt, "grad_scaler", None)
        total = None
        if failure is None:
            try:
                if callable(parts):
                    parts = parts()
                last = len(parts) - 1
                for n, (part, weight) in enumerate(parts):
                    with torch.enable_grad():      # also when step() is called under no_grad
                        loss = opt._loss(model, part, which)
                    if weight != 1.0:
                        loss = loss * weight
                    total = loss.detach() if total is None else total + loss.detach()
                    if n == last:
                        self._mark_unused(loss)
                    # Gradients are final only in the last backward: only it sends.
                    self._armed = self.overlap and n == last
                    try:
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                    finally:
                        self._armed = False
            except _CommError:
                raise
            except Exception as e:  # noqa: BLE001 - re-raised below, after the collectives
                failure = e
        if failure is None and self.overlap and not all(self._fired):
            self._find_unused = True      # e.g. a branch skipped this time: walk the graph next pass
        # Buckets whose parameters got no gradient (unused in this forward,
        # or this rank failed) and, without overlap, all of them: send in the
        # same order. What a failed rank sends is discarded: the step is refused.
        while self._next < len(self._buckets):
            self._launch(self._next)
            self._next += 1
            self.stats["buckets_after_backward"] += 1
        status = self._status(total, slot, failure)
        self._wait()
        self._check_status(status, failure, which)
        if self._mbufs:
            self._broadcast_buffers()
        dtype = torch.promote_types(total.dtype, torch.float32)
        return status[0].to(dtype), status[1].to(dtype)

    def _status(self, total: Optional[torch.Tensor], slot: int,
                failure: Optional[Exception]) -> torch.Tensor:
        """Start the status all-reduce (float64 whatever the loss dtype: a
        failed rank does not know it, and the sizes must match): the losses
        in slots 0 and 1, then per rank an error flag, its model-buffer byte
        count and a digest of its buffers' shapes and dtypes."""
        w = self.world_size
        status = torch.zeros(2 + 3 * w, dtype=torch.float64, device=self.device)
        if failure is None:
            status[slot] = total.to(torch.float64)
            nbytes, digest = self._current_buffers()
        else:
            status[2 + self.rank] = 1.0
            nbytes, digest = 0, 0
        status[2 + w + self.rank] = float(nbytes)
        status[2 + 2 * w + self.rank] = float(digest)
        try:
            work = dist.all_reduce(status, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        except Exception as e:
            raise self._comm_error("status all-reduce", e) from e
        self._works.append(("status all-reduce", work))
        return status

    def _check_status(self, status: torch.Tensor, failure: Optional[Exception], which: str) -> None:
        """The one host read of a pass. Raise the same way on every rank."""
        w = self.world_size
        st = status.tolist()
        failed = [r for r in range(w) if st[2 + r] != 0]
        if failure is not None:
            self._mbufs = []
            raise failure
        if failed:
            self._mbufs = []
            who = ", ".join(str(r) for r in failed)
            raise RuntimeError(
                f"{self._who}: rank{'s' if len(failed) > 1 else ''} {who} raised an error in the "
                f"{which} (see that rank's own exception); the step was refused on every rank "
                "(parameters, optimizer state and held batch unchanged), and the ranks remain "
                "in step: training may continue once the cause is fixed")
        sizes, digests = st[2 + w:2 + 2 * w], st[2 + 2 * w:]
        if any(n != sizes[0] or d != digests[0] for n, d in zip(sizes, digests)):
            self._mbufs = []
            desc = ", ".join(f"rank {r}: {int(n)} bytes" for r, n in enumerate(sizes))
            raise RuntimeError(
                f"{self._who}: after the {which}, the model's buffers differ between ranks in "
                f"size, shape or dtype ({desc}): a forward that creates or resizes buffers (e.g. "
                "a cache grown to the input length) runs on some ranks only, so rank 0's buffers "
                "cannot be broadcast to the others. The step was refused on every rank. Create "
                "such buffers at their final size in __init__, or keep them out of the module's "
                "buffers (a plain attribute)")

    def _broadcast_buffers(self) -> None:
        """Rank 0's model buffers (batch-norm statistics...) to every rank,
        packed in one flat buffer."""
        try:
            if self.rank == 0:
                torch._foreach_copy_(self._mviews, self._mbufs)
            work = dist.broadcast(self._mflat, src=self._global[0], group=self.group, async_op=True)
        except Exception as e:
            raise self._comm_error("model-buffer broadcast", e) from e
        self._works.append(("model-buffer broadcast", work))
        self._wait()
        if self.rank != 0:
            torch._foreach_copy_(self._mbufs, self._mviews)
        self._mbufs = []

    def _wait(self) -> None:
        works, self._works = self._works, []
        for what, w in works:
            try:
                if self._nccl:
                    w.wait()                 # a stream dependency, no host sync
                else:
                    w.wait(self.timeout)     # gloo: blocks the host
            except Exception as e:
                raise self._comm_error(what, e) from e

    def _comm_error(self, what: str, e: BaseException) -> RuntimeError:
        self._broken = True
        return _CommError(
            f"{self._who}: the {what} failed: a peer rank died, raised an error, or did not reach "
            f"the same point within the timeout ({self.timeout.total_seconds():g} s, the engine's "
            "`timeout` option). This process group cannot be used any more: stop this process and "
            f"restart all ranks (torchrun does so with --max-restarts). Cause: {type(e).__name__}: {e}")

    def _validate(self, batch, what: str) -> None:
        """Checks that depend only on the global batch, run on EVERY rank for
        both batches before any collective: each rank then raises the same
        error, instead of some ranks raising while the others wait in a
        collective. (With sharded_batches, each rank's shard is its own:
        errors there follow the failure protocol of _pass.)"""
        if self.sharded_batches:
            return
        acc = getattr(self.opt, "accumulation_steps", 1)
        parts = self.data_world_size
        try:
            if parts == 1:
                micro_batches(batch, acc)         # views only; raises as the serial engine does
                return
            if isinstance(batch, MicroBatches):
                if len(batch) == 0:
                    raise ValueError("MicroBatches is empty")
                for mb in batch:
                    n = batch_length(mb)
                    if n < parts:
                        raise ValueError(f"a micro-batch of {n} samples cannot be split over {parts} "
                                         f"data-parallel ranks; give micro-batches of at least "
                                         f"{parts} samples")
                return
            n = batch_length(batch)
            if n < parts:
                raise ValueError(f"a batch of {n} samples cannot be split over {parts} data-parallel "
                                 f"ranks; use a batch of at least {parts} samples")
            if n // parts < acc:
                raise ValueError(f"a batch of {n} samples gives shares of {n // parts} samples to "
                                 f"some of the {parts} data-parallel ranks, fewer than "
                                 f"accumulation_steps={acc}; use a batch of at least {parts * acc} "
                                 "samples or fewer accumulation steps")
        except (TypeError, ValueError) as e:
            raise type(e)(f"{self._who}: the {what}: {e}") from None

    def _parts(self, batch) -> List[Tuple[Any, float]]:
        """This rank's (micro-batch, weight) pairs: its shard, cut into the
        optimizer's micro-batches, weighted so that the weighted losses summed
        over ranks and micro-batches are the global batch's mean loss."""
        acc = getattr(self.opt, "accumulation_steps", 1)
        if self.sharded_batches:
            w = 1.0 / self.data_world_size     # shards count equally, as in DDP
            return [(p, pw * w if w != 1.0 else pw) for p, pw in micro_batches(batch, acc)]
        if self.data_world_size == 1:
            return micro_batches(batch, acc)
        if isinstance(batch, MicroBatches):    # shard each given micro-batch
            if len(batch) == 0:
                raise ValueError("MicroBatches is empty")
            sizes = [batch_length(mb) for mb in batch]
            total = sum(sizes)
            out = []
            for mb, n in zip(batch, sizes):
                part, w = shard_batch(mb, self.data_rank, self.data_world_size)
                out.append((part, w * n / total))
            return out
        shard, w = shard_batch(batch, self.data_rank, self.data_world_size)
        return [(p, pw * w) for p, pw in micro_batches(shard, acc)]

    def _fail_pass(self) -> None:
        self._armed = False
        self._works = []
        self._mbufs = []
        self._reset_pass()

    def _start(self) -> None:
        if self.group is None:
            raise RuntimeError(f"{self._who}: the engine was closed (close() destroyed its process "
                               "group); create the optimizer again")
        self._ensure_layout()
        self._reset_pass()

    # ---------------------------------------------------------- the interface
    def sampa_gradients(self, held, batch):
        opt = self.opt
        self._start()
        self._validate(held, "held batch")
        self._validate(batch, "new batch")
        try:
            for b in opt._bufs:
                if self.mode == "allreduce2":
                    b.g.zero_()
                    b.gy_new.zero_()
                elif self.role == "x":        # the peer's gradient overwrites the other buffer
                    b.g.zero_()
                else:
                    b.gy_new.zero_()
            if self.role == "x":
                return self._pass(opt.model, lambda: self._parts(held), "x̃-pass", 0)
            ymodel = opt._ymodel
            if ymodel.training != opt.model.training:
                ymodel.train(opt.model.training)
            parts = lambda: self._parts(batch)  # noqa: E731
            if opt._t == 0:
                return self._first_y_pass(parts)
            return self._pass(ymodel, parts, "y-pass", 1)
        except BaseException:
            self._fail_pass()
            raise

    def _first_y_pass(self, parts):
        # As in the serial engine: a loss_fn that ignores its model argument
        # fails the requires_grad check instead of silently using xt.
        opt = self.opt
        with opt._user_params_frozen():
            return self._pass(opt._ymodel, parts, "y-pass", 1)

    def gradient(self, batch, which: str):
        """SAM: one pass, data-parallel over every rank, mean gradient in g."""
        opt = self.opt
        self._start()
        self._validate(batch, "batch")
        try:
            for b in opt._bufs:
                b.g.zero_()
            return self._pass(opt.model, lambda: self._parts(batch), which, 0)[0]
        except BaseException:
            self._fail_pass()
            raise

    # ------------------------------------------------------------ replicas
    def _broadcast_packed(self, tensors: List[torch.Tensor], what: str) -> None:
        """Rank 0's values of small tensors of any dtypes, in ONE broadcast
        of a byte buffer (no per-tensor collectives)."""
        tensors = [t for t in tensors if t.numel() > 0]
        if not tensors:
            return
        offs, n = [], 0
        for t in tensors:
            n = -(-n // _BUFFER_ALIGN) * _BUFFER_ALIGN
            offs.append(n)
            n += t.numel() * t.element_size()
        packed = torch.zeros(n, dtype=torch.uint8, device=self.device)
        views = [packed[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                 for o, t in zip(offs, tensors)]
        with torch.no_grad():
            if self.rank == 0:
                torch._foreach_copy_(views, [t.to(self.device) for t in tensors])
            self._broadcast(packed, what)
            if self.rank != 0:
                for t, v in zip(tensors, views):
                    t.copy_(v)

    def _broadcast(self, t: torch.Tensor, what: str) -> None:
        try:
            work = dist.broadcast(t, src=self._global[0], group=self.group, async_op=True)
        except Exception as e:
            raise self._comm_error(what, e) from e
        self._works.append((what, work))
        self._wait()

    def sync_replicas(self) -> None:
        """Make every rank hold rank 0's replica: x (the parameters), the flat
        base state, gy and ||gy||^2, the step counters, the GradScaler's scale
        and growth tracker, the model's buffers and its parameters outside the
        optimizer. One broadcast per flat buffer (x, each state buffer, gy of
        each slab) plus one for everything small, packed. Collective: call it
        on every rank (construction and load_state_dict do)."""
        if self.group is None:
            raise RuntimeError(f"{self._who}: the engine was closed; create the optimizer again")
        # The ranks must agree on layout and settings (a state dict may carry
        # other hyperparameters): check again, then broadcast.
        if self._bufs_ref is self.opt._bufs:
            self._check_fingerprint()
        else:
            self._ensure_layout()
        self._sync_values()

    def _sync_values(self) -> None:
        opt = self.opt
        self._works = []
        with torch.no_grad(), self._on_device():
            for b in opt._bufs:
                flats = [b.x] + list(b.state.values()) + ([b.gy] if opt._sampa else [])
                for f in flats:
                    self._broadcast(f, "replica broadcast")
            small: List[torch.Tensor] = []
            sqs = getattr(opt, "_gy_sqs", None)  # absent while the optimizer is being built
            if opt._sampa and sqs:
                small.append(sqs[0])
            counters = torch.tensor([opt._t, opt.skipped_steps] + list(opt._steps) + list(opt._state_steps),
                                    dtype=torch.int64)
            small.append(counters)
            scaler = getattr(opt, "grad_scaler", None)
            if scaler is not None and scaler.is_enabled():
                if scaler._scale is None:      # lazily made by torch on first use
                    scaler._lazy_init_scale_growth_tracker(self.device)
                small += [scaler._scale, scaler._growth_tracker]
            laid_out = {id(p) for p in opt._params}
            small += [p.data for p in opt.model.parameters() if id(p) not in laid_out]
            small += [t for m in self._modules for t in m._buffers.values() if t is not None]
            self._broadcast_packed(small, "replica broadcast")
        if self.rank != 0:
            c = counters.tolist()
            g = len(opt._steps)
            opt._t, opt.skipped_steps = c[0], c[1]
            steps, state_steps = c[2:2 + g], c[2 + g:]
            changed = state_steps != list(opt._state_steps)
            opt._steps, opt._state_steps = steps, state_steps
            if changed:
                opt._publish_state()       # state views and AdamW's step counts follow
        # the y-model's parameters follow x at the next step (sampa_pre)

    def relayout(self) -> None:
        """After the optimizer laid out its parameters again (add_param_group,
        requires_grad changes): new buckets, hooks and fingerprint check, and
        rank 0's values of any newly added parameters on every rank."""
        self._ensure_layout()
        self._sync_values()

    def close(self) -> None:
        """Destroy the engine's own process group (each engine creates one).
        Local, not collective. The engine cannot step afterwards."""
        group, self.group = getattr(self, "group", None), None
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []
        if group is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group(group)

    def __del__(self):
        # Guarded: never at interpreter shutdown, and never on a group whose
        # collective failed (its shutdown may block on a dead peer).
        if getattr(self, "_broken", True) or sys.is_finalizing():
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 - a destructor must not raise
            pass

    def __repr__(self) -> str:
        return (f"DistributedEngine(method={self.method}, rank={self.rank}, world_size={self.world_size}, "
                f"role={self.role}, mode={self.mode}, buckets={len(self._buckets)}, "
                f"timeout={self.timeout.total_seconds():g}s)")


def _first_difference(a: Optional[str], b: Optional[str], n: int = 300) -> Tuple[str, str]:
    """The first differing item of two '; '- or ', '-separated descriptions."""
    if a is None or b is None:
        return repr(a)[:n], repr(b)[:n]
    for sep in ("; ", ", "):
        ia, ib = a.split(sep), b.split(sep)
        if len(ia) > 1 or len(ib) > 1:
            for x, y in zip(ia, ib):
                if x != y:
                    return x[:n], y[:n]
            if len(ia) != len(ib):
                return f"{len(ia)} entries", f"{len(ib)} entries"
    return a[:n], b[:n]
