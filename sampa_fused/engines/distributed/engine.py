"""The distributed engine: SAMPa's two gradients on two halves of a
torch.distributed process group (NCCL on GPUs, gloo on CPU), started with
torchrun.

World size 2k. Ranks [0, k) compute the x̃ gradient (the user's model, held
batch), ranks [k, 2k) the y gradient (y swapped into their model, new batch);
each half is data-parallel over its shard of the batch (dim 0). Every rank
keeps the full x, base state and gy and applies the identical update, so
replicas stay identical without any parameter traffic: only gradients move.

Communication runs on flat buffers only, in buckets (engines/buckets.py)
started from post-accumulate-grad hooks while backward still runs, always in
the same bucket order on every rank:

- k = 1 (2 ranks): each rank sends its own gradient buffer to the other
  (x̃-rank: g -> peer's g; y-rank: gy_new -> peer's gy_new). P values sent per
  rank per step: half of a DDP all-reduce of 2P.
- k > 1: x̃-ranks hold their weighted gradient in g and zero in gy_new, y-ranks
  the reverse; both buffers are all-reduced (SUM) over all 2k ranks: the bytes
  of a DDP all-reduce of 2P, no more.
- SAM (plain data parallelism over every rank, any world size): g is
  all-reduced, as DDP does.

Besides the gradients, per pass: one small all-reduce after backward (the
status, status.py: the losses, so every rank takes the same decision and
returns the same global loss; per rank an error flag, a pass sequence number,
its global batch size and its model-buffer layout; which parameters got a
gradient) and, where the model has buffers, one broadcast of rank 0's
(packing.py), so that evaluating the model gives the same result on every
rank. The host reads the status once per pass.

Errors: both batches are validated on every rank before any collective, so
bad input raises the same error everywhere. An exception that hits one rank
only (inside loss_fn, backward, its own shard; a KeyboardInterrupt too) is
caught; that rank still runs the pass's fixed collective schedule with its
error flag set, then re-raises its own exception, and every other rank raises
a RuntimeError naming it and the pass it ran. Either way the optimizer
refuses (rolls back) the step on every rank. Ranks that got out of step (one
skipped a step whose error it caught) see different sequence numbers, and
all raise.

Dead or stuck ranks: the engine's collectives run on a process group of its
own, created with `timeout` (default DEFAULT_TIMEOUT_S seconds), or on the
caller's group when that spans only some ranks (then its timeout holds); a collective
that fails makes the group unusable (restart all ranks, e.g. torchrun
--max-restarts, and resume from a checkpoint).
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
import weakref
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

from ... import _cuda
from ...passes import PassResult
from ..base import Context, Engine, Gradients, check_one_device
from ..buckets import BucketExchange
from . import fingerprint
from .packing import BufferPack, Packed
from .sharding import check_global_batch, global_size, rank_parts
from .status import Status

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_BUCKET_BYTES = 4 << 20      # several buckets even for small models, so backward overlaps


class _CommError(RuntimeError):
    """A collective failed: the group is unusable, no protocol can follow."""


# Engines still open at exit. A script that just ends (no close()) would leave
# gloo's threads to static destructors, which abort ("terminate called without
# an active exception") in about one run of eight: close them first.
_LIVE: "weakref.WeakSet[DistributedEngine]" = weakref.WeakSet()
_OWN_WORLD: List[bool] = [False]         # the engine called init_process_group itself


def _close_at_exit() -> None:
    for engine in list(_LIVE):
        if not getattr(engine, "_broken", True):
            with contextlib.suppress(Exception):
                engine.close()
    if _OWN_WORLD[0] and dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


atexit.register(_close_at_exit)


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


class DistributedEngine(Engine):
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

    def __init__(self, ctx: Context, process_group=None, sharded_batches: bool = False, timeout=None,
                 bucket_bytes: Optional[int] = None, overlap: bool = True):
        super().__init__(ctx)
        self.method = ctx.method
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
        self.device = check_one_device(ctx, self.name)
        if not dist.is_available():
            raise RuntimeError("engine='distributed' needs torch.distributed, which this torch build lacks")

        parent = self._parent_group(process_group)
        self.rank = dist.get_rank(parent)
        if self.rank < 0:
            raise ValueError("distributed engine: this process is not a member of the process_group "
                             "it was given; build the optimizer only on the group's ranks")
        self.world_size = dist.get_world_size(parent)
        self._who = f"{self.method} distributed engine (rank {self.rank} of {self.world_size})"
        sampa = self.method == "SAMPa"
        if sampa and self.world_size % 2:
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
        # Over the whole world, a group of our own: the engine's timeout holds
        # whatever the user's group was created with, and our traffic never
        # interleaves with theirs. On a subgroup we use the user's group: a
        # group of only some ranks needs torch's local synchronisation, whose
        # group names hash each rank's count of live groups, so a group freed
        # earlier on one rank than another (garbage collection) hangs its
        # creation.
        whole = parent is dist.group.WORLD or self.world_size == dist.get_world_size()
        self._owns_group = whole
        if whole:
            self.group = dist.new_group(ranks=ranks, timeout=self.timeout, backend=backend)
        else:
            self.group = parent
        self._global = ranks                       # group rank -> global rank
        _LIVE.add(self)
        self._broken = False                       # a collective failed: never destroy politely
        self._desync: Optional[str] = None         # the ranks lost step: every step raises this

        if sampa:
            self.k = self.world_size // 2
            self.role = "x" if self.rank < self.k else "y"
            self.data_rank, self.data_world_size = self.rank % self.k, self.k
            self.mode = "p2p" if self.k == 1 else "allreduce2"
        else:
            self.k = self.world_size
            self.role = "x"
            self.data_rank, self.data_world_size = self.rank, self.world_size
            self.mode = "allreduce"
        self.exchange = True      # False only to time a step without the gradient exchange (wrong results)
        self._seq = 0             # passes run, the same on every rank
        self._works: List[Tuple[str, Any]] = []
        self._buffers = BufferPack(_cuda.physical(self.device))
        self._modules = list(ctx.model.modules())
        self._ex: Optional[BucketExchange] = None
        self._sent = [0, 0]       # buckets sent during / after backward, over all layouts
        self.relayout()

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
            _OWN_WORLD[0] = True
        return dist.group.WORLD

    @property
    def stats(self) -> dict:
        """Where gradient buckets were started (tests and benchmarks read these)."""
        ex = self._ex
        during = self._sent[0] + (ex.sent_during_backward if ex else 0)
        after = self._sent[1] + (ex.sent_after_backward if ex else 0)
        return {"buckets_during_backward": during, "buckets_after_backward": after}

    def _leaves(self):
        return self.ctx.y_leaves() if self.role == "y" else self.ctx.params

    def relayout(self) -> None:
        """(Re)build buckets and hooks for the current layout (at construction,
        after add_param_group and whenever the trained set changes), check
        that every rank agrees, and take rank 0's values everywhere."""
        if self.group is None:
            raise RuntimeError(f"{self._who}: the engine was closed; create the optimizer again")
        if self._ex is not None:
            self._sent[0] += self._ex.sent_during_backward
            self._sent[1] += self._ex.sent_after_backward
            self._ex.close()
        slabs = [b.slab for b in self.ctx.primary.slabs]
        self._ex = BucketExchange(self._leaves(), slabs, self.bucket_bytes, self._send,
                                  strict_order=True, twice="raise", on_twice=self._twice)
        self._check_fingerprint()
        self._sync_values()

    def _twice(self, i: int) -> Exception:
        return RuntimeError(
            f"{self._who}: parameter {self.ctx.names[i]} received its gradient twice in one backward "
            "pass (e.g. reentrant activation checkpointing); its bucket was already sent. Pass "
            "overlap=False to exchange gradients after backward")

    def _components(self) -> List[Tuple[str, str]]:
        buckets = "; ".join(f"{b.slab}:{b.start}-{b.end}" for b in self._ex.buckets)
        return self.ctx.fingerprint() + [
            ("engine options", f"sharded_batches={self.sharded_batches} overlap={self.overlap} "
                               f"bucket_bytes={self.bucket_bytes}"),
            ("device type", self.device.type), ("buckets", buckets)]

    def _check_fingerprint(self) -> None:
        with self._on_device():
            fingerprint.check(self._components(), self.group, self.world_size,
                              _cuda.physical(self.device), self._who, self._comm_error)

    def _on_device(self):
        return _cuda.on_device(self.device)

    # ------------------------------------------------------------ collectives
    def _send(self, slab: int, start: int, end: int) -> None:
        """One bucket of the gradient exchange (the same order on every rank)."""
        if not self.exchange:
            return
        b = self.ctx.primary.slabs[slab]
        s = slice(start, end)
        try:
            if self.mode == "p2p":
                own, other = (b.g, b.gy_new) if self.role == "x" else (b.gy_new, b.g)
                peer = self._global[1 - self.rank]
                self._tag += 1
                ops = [dist.P2POp(dist.isend, own[s], peer, self.group, self._tag),
                       dist.P2POp(dist.irecv, other[s], peer, self.group, self._tag)]
                for w in dist.batch_isend_irecv(ops):
                    self._works.append(("gradient exchange", w))
            else:
                flats = (b.g, b.gy_new) if self.mode == "allreduce2" else (b.g,)
                for f in flats:
                    w = dist.all_reduce(f[s], op=dist.ReduceOp.SUM, group=self.group, async_op=True)
                    self._works.append(("gradient all-reduce", w))
        except Exception as e:
            raise self._comm_error("gradient exchange", e) from e

    def _collective(self, what: str, fn, *args, **kwargs) -> None:
        try:
            work = fn(*args, group=self.group, async_op=True, **kwargs)
        except Exception as e:
            raise self._comm_error(what, e) from e
        self._works.append((what, work))

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

    # ------------------------------------------------------------ one pass
    def _start(self) -> None:
        if self.group is None:
            raise RuntimeError(f"{self._who}: the engine was closed (close() destroyed its process "
                               "group); create the optimizer again")
        if self._desync is not None:
            raise RuntimeError(self._desync)

    def _pass(self, module, parts_fn, which: str, slot: int, leaves, sizes, buffers=None):
        """Forward/backward over this rank's (micro-batch, weight) parts, with
        the exchange started during the last backward; then the status.
        Returns (global losses (x̃, y), which parameters got a gradient on
        some rank, this rank's outputs).

        A local exception does not stop the pass's collectives: they all run,
        in the same order as on every other rank, and the status tells every
        rank who failed."""
        ctx, ex = self.ctx, self._ex
        self._seq += 1
        self._works, self._tag = [], 0
        ex.reset()
        failure: Optional[BaseException] = None
        res: Optional[PassResult] = None
        try:
            parts = parts_fn()
            res = ctx.run_pass(module, None, which, leaves=leaves, parts=parts,
                               on_last_backward=ex.start if self.overlap else None)
        except _CommError:
            raise
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the collectives
            failure = e
        finally:
            ex.armed = False
        # Buckets whose parameters got no gradient (or this rank failed) and,
        # without overlap, all of them: in the same order on every rank. What
        # a failed rank sends is discarded: the step is refused.
        ex.flush() if self.overlap else ex.send_all()
        status = Status(self.world_size, len(ctx.params), _cuda.physical(self.device))
        # The model's own buffers after this rank's forward (`buffers`: taken
        # before a pass that runs on private copies and leaves them as they are).
        nbytes, digest = (buffers or self._buffers.current(self._modules)) if failure is None else (0, 0)
        status.fill(self.rank, res.loss if res is not None else None, slot, failure is not None,
                    self._seq, sizes, nbytes, digest, res.got if res is not None else None)
        self._collective("status all-reduce", dist.all_reduce, status.tensor, op=dist.ReduceOp.SUM)
        self._wait()
        view = status.read()                     # the one host read of a pass
        self._check_status(view, failure, which)
        dtype = torch.promote_types(res.loss.dtype, torch.float32)
        losses = [torch.tensor(v, dtype=dtype, device=_cuda.physical(self.device)) for v in view.losses]
        got = view.got if res.got is not None else None
        return losses, got, res.outputs

    def _role_of(self, rank: int) -> str:
        if self.method != "SAMPa":
            return ""
        return "x̃-pass" if rank < self.k else "y-pass"

    def _check_status(self, view, failure: Optional[BaseException], which: str) -> None:
        """Raise the same way on every rank."""
        if failure is not None:
            raise failure
        if view.failed:
            who = ", ".join(str(r) for r in view.failed)
            passes = sorted({self._role_of(r) or which for r in view.failed})
            raise RuntimeError(
                f"{self._who}: rank{'s' if len(view.failed) > 1 else ''} {who} raised an error in the "
                f"{' and the '.join(passes)} (see that rank's own exception); the step was refused on "
                "every rank (parameters, optimizer state and held batch unchanged), and the ranks "
                "remain in step: training may continue once the cause is fixed")
        if any(s != view.seqs[0] for s in view.seqs):
            desc = ", ".join(f"rank {r} at pass {s}" for r, s in enumerate(view.seqs))
            self._desync = (
                f"{self._who}: the ranks are at different steps ({desc}): a rank skipped or repeated "
                "a step (an exception caught on one rank only before the step reached the engine?). "
                "The step was refused, but the ranks cannot pair their steps again: restart all "
                "ranks and resume from a checkpoint")
            raise RuntimeError(self._desync)
        if not self.sharded_batches and any(b != view.batches[0] for b in view.batches):
            desc = ", ".join(f"rank {r}: {b}" for r, b in enumerate(view.batches))
            raise ValueError(
                f"{self._who}: the ranks passed global batches of different sizes to the {which} "
                f"({desc}); with sharded_batches=False every rank must pass the same global batch "
                "(each takes its share). Give every rank the same batch, or pass "
                "sharded_batches=True with a DistributedSampler. The step was refused on every rank")
        if any(n != view.nbytes[0] or d != view.digests[0] for n, d in zip(view.nbytes, view.digests)):
            desc = ", ".join(f"rank {r}: {int(n)} bytes" for r, n in enumerate(view.nbytes))
            raise RuntimeError(
                f"{self._who}: after the {which}, the model's buffers differ between ranks in "
                f"size, shape or dtype ({desc}): a forward that creates or resizes buffers (e.g. "
                "a cache grown to the input length) runs on some ranks only, so rank 0's buffers "
                "cannot be broadcast to the others. The step was refused on every rank. Create "
                "such buffers at their final size in __init__, or keep them out of the module's "
                "buffers (a plain attribute)")

    def _broadcast_buffers(self) -> None:
        """Rank 0's model buffers (batch-norm statistics...) to every rank,
        packed in one flat buffer (after the pass: the model's own buffers,
        not the y-pass's private copies)."""
        self._buffers.current(self._modules)
        pack, bufs = self._buffers.packed, self._buffers.tensors
        if self.world_size == 1 or pack is None:
            return
        if self.rank == 0:
            pack.fill(bufs)
        self._collective("model-buffer broadcast", dist.broadcast, pack.flat, src=self._global[0])
        self._wait()
        if self.rank != 0:
            with torch.no_grad():
                torch._foreach_copy_(bufs, pack.views)

    # ---------------------------------------------------------- the interface
    def _parts(self, batch):
        return rank_parts(batch, self.sharded_batches, self.data_rank, self.data_world_size,
                          self.ctx.accumulation_steps)

    def _check_batch(self, batch, what: str) -> int:
        if not self.sharded_batches:
            check_global_batch(batch, self.data_world_size, self.ctx.accumulation_steps, what, self._who)
            return global_size(batch)
        return -1

    def sampa_gradients(self, held, batch) -> Gradients:
        ctx = self.ctx
        self._start()
        sizes = self._check_batch(held, "held batch"), self._check_batch(batch, "new batch")
        rep = ctx.primary
        if self.mode == "allreduce2":
            rep.zero("g", "gy_new")
        elif self.role == "x":                # the peer's gradient overwrites the other buffer
            rep.zero("g")
        else:
            rep.zero("gy_new")
        if self.role == "x":
            losses, got, outputs = self._pass(ctx.model, lambda: self._parts(held), "x̃-pass", 0,
                                              ctx.params, sizes)
        else:
            buffers = self._buffers.current(self._modules)
            with ctx.y_pass() as model:
                losses, got, outputs = self._pass(model, lambda: self._parts(batch), "y-pass", 1,
                                                  ctx.y_leaves(), sizes, buffers)
        self._broadcast_buffers()
        return Gradients(losses[0], losses[1], outputs, got)

    def gradient(self, batch, which: str, private_buffers: bool = False) -> PassResult:
        """SAM: one pass, data-parallel over every rank, mean gradient in g."""
        ctx = self.ctx
        self._start()
        sizes = (self._check_batch(batch, "batch"), -1)
        ctx.primary.zero("g")
        buffers = self._buffers.current(self._modules) if private_buffers else None
        with ctx.private_buffers() if private_buffers else contextlib.nullcontext():
            losses, got, outputs = self._pass(ctx.model, lambda: self._parts(batch), which, 0,
                                              ctx.params, sizes, buffers)
        if not private_buffers:
            self._broadcast_buffers()
        return PassResult(losses[0], outputs, got)

    # ------------------------------------------------------------ replicas
    def _broadcast_packed(self, tensors: List[torch.Tensor], what: str) -> None:
        tensors = [t for t in tensors if t.numel() > 0]
        if not tensors:
            return
        pack = Packed(tensors, _cuda.physical(self.device))
        with torch.no_grad():
            if self.rank == 0:
                pack.fill(tensors)
            self._collective(what, dist.broadcast, pack.flat, src=self._global[0])
            self._wait()
            if self.rank != 0:
                pack.spill(tensors)

    def sync_replicas(self) -> None:
        """Make every rank hold rank 0's replica: x, the flat state, gy and
        ||gy||^2, the step counters, the GradScaler's scale and growth tracker,
        the model's buffers and its parameters outside the optimizer.
        Collective: call it on every rank (construction and load_state_dict do)."""
        if self.group is None:
            raise RuntimeError(f"{self._who}: the engine was closed; create the optimizer again")
        self._check_fingerprint()   # a state dict may carry other hyperparameters
        self._sync_values()

    def _sync_values(self) -> None:
        flats, small, after = self.ctx.sync_payload()
        self._works = []
        with torch.no_grad(), self._on_device():
            for f in flats:
                self._collective("replica broadcast", dist.broadcast, f, src=self._global[0])
                self._wait()
            self._broadcast_packed(small, "replica broadcast")
        if self.rank != 0:
            after()

    def close(self) -> None:
        """Destroy the engine's own process group (a caller's subgroup is left
        alone). Local, not collective. The engine cannot step afterwards."""
        group, self.group = getattr(self, "group", None), None
        if getattr(self, "_ex", None) is not None:
            self._ex.close()
        if (group is not None and getattr(self, "_owns_group", False) and dist.is_available()
                and dist.is_initialized()):
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
                f"role={self.role}, mode={self.mode}, buckets={len(self._ex.buckets)}, "
                f"timeout={self.timeout.total_seconds():g}s)")
