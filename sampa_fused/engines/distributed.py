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

Besides the gradients, per pass: one all-reduce of two floats (the losses, so
every rank takes the same finite/non-finite decision and returns the same
global loss) and, where the model has buffers (batch-norm statistics), one
broadcast of them from rank 0 so that evaluating the model gives the same
result on every rank.

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

import datetime
import hashlib
import os
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..batching import MicroBatches, micro_batches
from .serial import check_one_device

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_BUCKET_BYTES = 4 << 20      # several buckets even for small models, so backward overlaps
_BUFFER_ALIGN = 64                  # bytes; lets the packed-buffer views take any dtype


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
        # Where buckets were started (tests and benchmarks read these).
        self.stats = {"buckets_during_backward": 0, "buckets_after_backward": 0}
        self._bufs_ref = None
        self._hooks: List[Any] = []
        self._setup_buffers()
        self._ensure_layout()

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
        self._mbufs: List[torch.Tensor] = []

    def _current_buffers(self) -> bool:
        """The model's buffers now (a module may replace a buffer object in
        its forward), packed into one flat byte buffer for one broadcast per
        pass (no per-tensor collectives). False when there is nothing to send."""
        if self.world_size == 1:
            return False
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
        self._mbufs = bufs
        return bool(bufs)

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
        comps = [("method", self.method),
                 ("base optimizer", f"{type(opt.base).__module__}.{type(opt.base).__qualname__}"),
                 ("nonfinite mode", opt.nonfinite),
                 ("training options",
                  f"accumulation_steps={getattr(opt, 'accumulation_steps', 1)} "
                  f"max_grad_norm={getattr(opt, 'max_grad_norm', None)} "
                  f"grad_scaler={type(getattr(opt, 'grad_scaler', None)).__name__}"),
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
                raise self._comm_error("fingerprint exchange at construction", e) from e
            if all(torch.equal(e, every[0]) for e in every):
                return
            allcomps: List[Any] = [None] * self.world_size
            try:
                dist.all_gather_object(allcomps, comps, group=self.group)
            except Exception as e:
                raise self._comm_error("fingerprint exchange at construction", e) from e
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
        import contextlib
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

    def _after_forward(self, loss: torch.Tensor, slot: int) -> torch.Tensor:
        """Start the loss all-reduce and the model-buffer broadcast; returns
        the tensor the global losses land in."""
        losses = torch.zeros(2, dtype=torch.float32, device=self.device)
        losses[slot] = loss.float()
        try:
            w = dist.all_reduce(losses, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
            self._works.append(("loss all-reduce", w))
            if self._current_buffers():
                if self.rank == 0:
                    torch._foreach_copy_(self._mviews, self._mbufs)
                w = dist.broadcast(self._mflat, src=self._global[0], group=self.group, async_op=True)
                self._works.append(("model-buffer broadcast", w))
        except Exception as e:
            raise self._comm_error("loss and model-buffer exchange", e) from e
        return losses

    def _pass(self, model, parts, which: str, slot: int) -> torch.Tensor:
        """Forward/backward over this rank's (micro-batch, weight) parts, as
        the optimizer's own _forward_backward does (GradScaler included),
        with the exchange started during the last backward. Returns the
        tensor the global losses land in."""
        opt = self.opt
        scaler = getattr(opt, "grad_scaler", None)
        total = None
        last = len(parts) - 1
        for n, (part, weight) in enumerate(parts):
            with torch.enable_grad():      # also when step() is called under no_grad
                loss = opt._loss(model, part, which)
            if weight != 1.0:
                loss = loss * weight
            total = loss.detach() if total is None else total + loss.detach()
            if n == last:
                # Gradients are final only in the last backward: only it sends.
                losses = self._after_forward(total, slot)
                self._mark_unused(loss)
            self._armed = self.overlap and n == last
            try:
                (scaler.scale(loss) if scaler is not None else loss).backward()
            finally:
                self._armed = False
        if self.overlap and not all(self._fired):
            self._find_unused = True      # e.g. a branch skipped this time: walk the graph next pass
        # Buckets whose parameters got no gradient (unused in this forward)
        # and, without overlap, all of them: send in the same order.
        while self._next < len(self._buckets):
            self._launch(self._next)
            self._next += 1
            self.stats["buckets_after_backward"] += 1
        self._wait()
        return losses

    def _wait(self) -> None:
        works, self._works = self._works, []
        for what, w in works:
            try:
                if self._nccl:
                    w.wait()                 # a stream dependency, no host sync
                else:
                    w.wait(self.timeout)     # gloo: blocks the host, once per pass
            except Exception as e:
                raise self._comm_error(what, e) from e
        if self._mbufs and self.rank != 0:
            torch._foreach_copy_(self._mbufs, self._mviews)
        self._mbufs = []

    def _comm_error(self, what: str, e: BaseException) -> RuntimeError:
        return RuntimeError(
            f"{self._who}: the {what} failed: a peer rank died, raised an error, or did not reach "
            f"the same point within the timeout ({self.timeout.total_seconds():g} s, the engine's "
            "`timeout` option). This process group cannot be used any more: stop this process and "
            f"restart all ranks (torchrun does so with --max-restarts). Cause: {type(e).__name__}: {e}")

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

    # ---------------------------------------------------------- the interface
    def sampa_gradients(self, held, batch):
        opt = self.opt
        self._ensure_layout()
        self._reset_pass()
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
                losses = self._pass(opt.model, self._parts(held), "x̃-pass", 0)
            else:
                ymodel = opt._ymodel
                if ymodel.training != opt.model.training:
                    ymodel.train(opt.model.training)
                parts = self._parts(batch)
                if opt._t == 0:
                    losses = self._first_y_pass(parts)
                else:
                    losses = self._pass(ymodel, parts, "y-pass", 1)
        except BaseException:
            self._fail_pass()
            raise
        return losses[0], losses[1]

    def _first_y_pass(self, parts):
        # As in the serial engine: a loss_fn that ignores its model argument
        # fails the requires_grad check instead of silently using xt.
        opt = self.opt
        with opt._user_params_frozen():
            return self._pass(opt._ymodel, parts, "y-pass", 1)

    def gradient(self, batch, which: str):
        """SAM: one pass, data-parallel over every rank, mean gradient in g."""
        opt = self.opt
        self._ensure_layout()
        self._reset_pass()
        try:
            for b in opt._bufs:
                b.g.zero_()
            losses = self._pass(opt.model, self._parts(batch), which, 0)
        except BaseException:
            self._fail_pass()
            raise
        return losses[0]

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
