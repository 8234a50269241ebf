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

Besides the gradients, one message per pass (status.py), sent right after
the last gradient bucket and waited on with it: with k = 1 in the same
send/recv exchange, otherwise in one byte-wise MAX all-reduce. It carries each
rank's status (its loss, error flag, pass sequence number, global batch
sizes, model-buffer layout digest; which parameters got a gradient), the
drift checks below, and rank 0's model buffers (batch-norm statistics...),
so that evaluating the model gives the same result on every rank. The host
reads the message once per pass (SAMPa: once per step).

Each rank does its role's work only (fused base optimizers): its buffer plan
holds one point, so an x̃-rank forms xt (in x) and neither forms nor keeps y,
a y-rank forms y and never perturbs x (no x_save); and a y-rank keeps a
reference to the batch it is given, not a copy (it never runs the held batch). The update
after the exchange is the same on every rank: replicas stay bit-identical.

Drift: per step the message carries a digest of every param group's
hyperparameters and a fingerprint of the new batch (elements, fp64 sum and
norm, on the device); every `verify_every` steps, at the first
step, after opt.load_state_dict and after model.load_state_dict on any
rank, an exact integer checksum of the parameters. Ranks that should agree
and do not raise the same RuntimeError everywhere, naming what differs and
the ranks; the step is refused.

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
import zlib
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

from ... import _cuda, tree
from ...passes import PassResult
from ...state import BufferPlan
from ..base import Context, Engine, Gradients, check_one_device
from ..buckets import BucketExchange
from . import fingerprint
from .packing import BufferPack, Packed, views
from .sharding import check_global_batch, global_size, rank_parts
from .status import BATCH_FP, BUF_BYTES, BUF_DIGEST, BUF_SENT, CHECKSUM, HAS_CHECKSUM, LOADED, LOSS, Message, View

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_BUCKET_BYTES = 4 << 20      # several buckets even for small models, so backward overlaps
DEFAULT_VERIFY_EVERY = 100          # steps between parameter checksums

_INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MASK48 = (1 << 48) - 1
_FP_RTOL = 1e-9     # batch fingerprints: fp64 sums may round differently with other thread counts
_FP_SAMPLE = 4096   # elements per batch tensor in the per-step fingerprint


def _hyper_value(v) -> str:
    if isinstance(v, torch.Tensor):
        # a device tensor's value would cost a host sync per step: its kind only
        return repr(v.tolist()) if v.device.type == "cpu" else f"tensor{tuple(v.shape)}:{v.dtype}"
    return repr(v)


def _hyper_repr(group: dict) -> str:
    """A param group's hyperparameters (everything but its parameters)."""
    return "; ".join(f"{k}={_hyper_value(v)}" for k, v in sorted(group.items()) if k != "params")


def _same_fingerprint(a, b) -> bool:
    """(elements, sum, norm): exact count, sums within rounding."""
    if a[0] != b[0]:
        return False
    if a == b:
        return True
    r = max(abs(a[2]), abs(b[2]))
    return abs(a[2] - b[2]) <= _FP_RTOL * r and abs(a[1] - b[1]) <= _FP_RTOL * max(a[0], 1.0) ** 0.5 * r


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


def _loaded_hook(ref):
    def hook(_module, _keys) -> None:
        engine = ref()
        if engine is not None:
            engine._on_model_loaded()
    return hook


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
    verify_every     steps between checksums of the parameters, compared
                     over every rank (default DEFAULT_VERIFY_EVERY; 0: only
                     after a load). Also checked at the first step, after
                     opt.load_state_dict and after model.load_state_dict
                     on any rank. Hyperparameters and batches are compared
                     at every step.
    """

    name = "distributed"

    def __init__(self, ctx: Context, process_group=None, sharded_batches: bool = False, timeout=None,
                 bucket_bytes: Optional[int] = None, overlap: bool = True,
                 verify_every: int = DEFAULT_VERIFY_EVERY):
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
        if isinstance(verify_every, bool) or not isinstance(verify_every, int) or verify_every < 0:
            raise ValueError(f"distributed engine: verify_every must be an int >= 0 (steps between "
                             f"parameter checksums; 0: only after loads), got {verify_every!r}")
        self.sharded_batches, self.overlap, self.bucket_bytes = sharded_batches, overlap, bucket_bytes
        self.verify_every = verify_every
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
            if ctx.fused:
                # A rank with one role holds and forms one point: an x̃-rank
                # xt (in x, as the in-place layout does), no y buffer; a
                # y-rank y only, and x is never perturbed there (no x_save).
                ctx.set_buffer_plan(BufferPlan(points=("xt",), in_place=True) if self.role == "x"
                                    else BufferPlan(points=("y",)))
        else:
            self.k = self.world_size
            self.role = "x"
            self.data_rank, self.data_world_size = self.rank, self.world_size
            self.mode = "allreduce"
        self.exchange = True      # False only to time a step without the gradient exchange (wrong results)
        self._seq = 0             # passes run, the same on every rank
        self._works: List[Tuple[str, Any]] = []
        self._buffers = BufferPack()
        self._modules = list(ctx.model.modules())
        self._ex: Optional[BucketExchange] = None
        self._sent = [0, 0]       # buckets sent during / after backward, over all layouts
        self._steps = 0           # steps run (drift passes), the same on every rank
        self._verify_due = True   # check the parameters at the next step (the same on every rank)
        self._loaded = False      # this rank's model.load_state_dict ran since the last check
        self._last_new = (None, -1)      # the last batch validated, and its size
        self._validated = (None, -1)     # the held batch kept from it, and its size
        self._load_hook = ctx.model.register_load_state_dict_post_hook(_loaded_hook(weakref.ref(self)))
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

    def _layout_message(self) -> None:
        """The pass message for the current layout (allocated once per layout):
        its buffer section fits the model's buffers as every rank holds them now."""
        nbytes, _ = self._buffers.current(self._modules)
        self._agreed = self._buffers.signature
        device = _cuda.physical(self.device)
        n_groups = len(self.ctx.param_groups())
        send = nbytes if self.world_size > 1 else 0
        self._msg = Message(self.world_size, len(self.ctx.params), n_groups, send, device)
        self._peer = (Message(self.world_size, len(self.ctx.params), n_groups, send, device)
                      if self.mode == "p2p" else None)
        # the buffers' views in what rank 0 sends and in what the others receive
        got = self._peer if self.mode == "p2p" else self._msg
        self._views = ((views(self._msg.buffers, self._buffers.tensors),
                        views(got.buffers, self._buffers.tensors)) if send else ([], []))

    def _pass(self, module, parts_fn, which: str, slot: int, leaves, sizes, buffers=None,
              drift_batch=None, keeps_buffers: bool = True):
        """Forward/backward over this rank's (micro-batch, weight) parts, with
        the exchange started during the last backward; the pass's message
        goes out with the last gradients and is waited on with them.
        Returns (global losses (x̃, y), which parameters got a gradient on
        some rank, this rank's outputs).

        A local exception does not stop the pass's communication: it all
        runs, in the same order as on every other rank, and the message tells
        every rank who failed. `drift_batch` (a tuple holding the batch):
        this pass carries the step's drift checks."""
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
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the exchange
            failure = e
        finally:
            ex.armed = False
        # Buckets whose parameters got no gradient (or this rank failed) and,
        # without overlap, all of them: in the same order on every rank. What
        # a failed rank sends is discarded: the step is refused.
        ex.flush() if self.overlap else ex.send_all()
        if drift_batch is not None:
            self._steps += 1
        try:
            drift = self._drift(drift_batch) if drift_batch is not None and failure is None else None
        except _CommError:
            raise
        except BaseException as e:  # noqa: BLE001 - as above
            failure, drift = e, None
        msg = self._msg
        # The model's own buffers after this rank's forward (`buffers`: taken
        # before a pass that runs on private copies and leaves them as they are).
        nbytes, digest = (buffers or self._buffers.current(self._modules)) if failure is None else (0, 0)
        sent = 0
        if self.mode != "p2p":
            msg.flat.zero_()          # reduced in place last time: other ranks' bytes are there
        if (keeps_buffers and self.rank == 0 and failure is None and msg.buffer_bytes
                and self._buffers.signature == self._agreed):
            torch._foreach_copy_(self._views[0], self._buffers.tensors)
            sent = 1
        batch_fp = checksum = hyper = None
        has_sum = loaded = 0
        if drift is not None:
            batch_fp, checksum, hyper = drift
            has_sum, loaded = int(checksum is not None), int(self._loaded)
        host = [float(failure is not None), self._seq, sizes[0], sizes[1], nbytes, digest, has_sum,
                loaded, sent] + (hyper if hyper is not None else [0.0] * msg.n_groups)
        msg.fill(self.rank, res.loss if res is not None else None, batch_fp, checksum, host,
                 res.got if res is not None else None, reset_got=self.mode != "p2p")
        self._send_message()
        self._wait()
        view = self._read()                     # the one host read of a pass
        self._check_status(view, failure, which, drift is not None)
        if drift is not None:
            self._verify_due, self._loaded = False, False
        if keeps_buffers:
            self._take_buffers(view)
        dtype = torch.promote_types(res.loss.dtype, torch.float32)
        dev = _cuda.physical(self.device)
        losses = [torch.full((), sum(r[LOSS] for rank, r in enumerate(view.rows) if self._slot(rank) == s),
                             dtype=dtype, device=dev) for s in (0, 1)]
        got = view.got if res.got is not None else None
        return losses, got, res.outputs

    def _slot(self, rank: int) -> int:
        return 1 if self.method == "SAMPa" and rank >= self.k else 0

    def _send_message(self) -> None:
        msg = self._msg
        if self.mode == "p2p":
            # with the last gradient bucket: one wait for both. Rank 0 sends
            # its buffers too; rank 1 only the status part.
            peer = self._global[1 - self.rank]
            own = msg.flat if self.rank == 0 else msg.flat[:msg.buf_at]
            other = self._peer.flat if self.rank == 1 else self._peer.flat[:msg.buf_at]
            self._tag += 1
            try:
                ops = [dist.P2POp(dist.isend, own, peer, self.group, self._tag),
                       dist.P2POp(dist.irecv, other, peer, self.group, self._tag)]
                for w in dist.batch_isend_irecv(ops):
                    self._works.append(("pass message exchange", w))
            except Exception as e:
                raise self._comm_error("pass message exchange", e) from e
        else:
            # one MAX all-reduce of bytes gathers every rank's row (each
            # written by one rank, zero elsewhere) and carries rank 0's buffers
            self._collective("pass message all-reduce", dist.all_reduce, msg.flat, op=dist.ReduceOp.MAX)

    def _read(self) -> View:
        msg = self._msg
        if self.mode == "p2p":
            if msg.flat.device.type == "cpu":
                heads = [msg.flat[:msg.head], self._peer.flat[:msg.head]]
            else:                       # one device-to-host copy
                both = torch.cat([msg.flat[:msg.head], self._peer.flat[:msg.head]]).cpu()
                heads = [both[:msg.head], both[msg.head:]]
            owner = [0 if r == self.rank else 1 for r in range(self.world_size)]
            return View([msg, self._peer], heads, owner)
        return View([msg], [msg.host_head()], [0] * self.world_size)

    def _take_buffers(self, view: View) -> None:
        """Rank 0's buffers, as the message brought them (or, once after
        every rank replaced them by others of a new layout, by a broadcast)."""
        if self.world_size == 1:
            return
        if view.rows[0][BUF_SENT]:
            if self.rank != 0:
                with torch.no_grad():
                    torch._foreach_copy_(self._buffers.tensors, self._views[1])
            return
        if self._buffers.signature != self._agreed:
            self._layout_message()
            self._broadcast_packed(self._buffers.tensors, "model-buffer broadcast")

    # ------------------------------------------------------------ drift
    def _drift(self, batch_box) -> tuple:
        """This step's drift values: the batch fingerprint (on the device),
        the parameter checksum when one is due (on the device), and one
        digest per param group of its hyperparameters."""
        # `due` is the same on every rank; `_loaded` is this rank's own
        due = self._verify_due or (self.verify_every > 0 and self._steps % self.verify_every == 0)
        return (self._batch_fingerprint(batch_box[0], full=due),
                self._checksum() if due or self._loaded else None, self._hyper_digests())

    def _batch_fingerprint(self, batch, full: bool) -> torch.Tensor:
        """(elements, sum, norm) of the batch's tensors, in float64, on the
        device; each tensor weighted by its position (swapped tensors differ).
        Unless `full`, a large tensor contributes about _FP_SAMPLE elements,
        in runs of 16 spread evenly over it (every sample of a batch of
        images is hit): enough to tell different batches apart at a fraction
        of a pass over them; the steps that check the parameters take every
        element."""
        dev = _cuda.physical(self.device)
        parts, n, home = [], 0, None      # computed where the batch is; 3 values moved
        for t in tree.tensors(batch):
            d = t.detach()
            if d.is_complex():
                d = torch.view_as_real(d)
            d = d.reshape(-1)
            if not full and d.numel() > 2 * _FP_SAMPLE:
                # runs of 16 elements (a cache line of fp32), spread evenly:
                # a strided element sample costs one cache miss per element
                rows = d[:d.numel() // 16 * 16].view(-1, 16)
                # (an odd step: the runs fall at different places in each sample)
                d = rows[::rows.shape[0] // (_FP_SAMPLE // 16) | 1].reshape(-1)
            if not d.is_floating_point():
                d = d.to(torch.float64)
            home = d.device if home is None else home
            parts += [d.sum(dtype=torch.float64).to(home), torch.linalg.vector_norm(d, dtype=torch.float64).to(home)]
            n += d.numel()
        if not parts:
            return torch.zeros(3, dtype=torch.float64, device=dev)
        v = torch.stack(parts).view(-1, 2)
        w = torch.arange(1, v.shape[0] + 1, dtype=torch.float64, device=home)
        fp = torch.cat([torch.full((1,), float(n), dtype=torch.float64, device=home), (v * w[:, None]).sum(0)])
        return fp

    def _param_sums(self, per_param: bool = False):
        """Exact integer sums of x's bits (x_save: x as the step found it) and
        of their squares, mod 2^64: independent of summation order, so equal
        bits give equal sums whatever the thread count."""
        out, total = [], None
        rep = self.ctx.primary
        for b in rep.slabs:
            flat = rep.x_of(b)          # x as the step found it (x_save while x holds xt)
            ints = flat.view(_INT_OF[flat.element_size()]).to(torch.int64)
            if per_param:
                for k, v in zip(b.slab.index, b.slab.views(ints)):
                    out.append((k, (int(v.sum()), int((v * v).sum()))))
                continue
            pair = torch.stack([ints.sum(), (ints * ints).sum()])
            total = pair if total is None else total + pair
        return out if per_param else total

    def _checksum(self) -> torch.Tensor:
        total = self._param_sums()
        if total is None:
            return torch.zeros(2, dtype=torch.float64, device=_cuda.physical(self.device))
        return (total & _MASK48).to(torch.float64)     # exact in float64

    def _hyper_digests(self) -> List[float]:
        return [float(zlib.crc32(_hyper_repr(g).encode())) for g in self.ctx.param_groups()]

    def _gather(self, obj, what: str) -> list:
        every: List[Any] = [None] * self.world_size
        try:
            with self._on_device():     # NCCL gathers objects through the current device
                dist.all_gather_object(every, obj, group=self.group)
        except Exception as e:
            raise self._comm_error(what, e) from e
        return every

    def _drift_error(self, what: str, detail: str, advice: str) -> RuntimeError:
        self._verify_due = True            # check the parameters next time too
        return RuntimeError(
            f"{self._who}: the replicas drifted apart: {what} ({detail}). {advice} The step was "
            "refused on every rank")

    def _check_drift(self, view: View) -> None:
        """Hyperparameters, the batch, the parameters: the same on every rank
        that should agree (every rank sees the same view: all raise alike)."""
        world = self.world_size
        digests = [view.hyper(r) for r in range(world)]
        if any(d != digests[0] for d in digests):
            groups = self._gather([_hyper_repr(g) for g in self.ctx.param_groups()], "drift report")
            for gi in range(len(groups[0])):
                for r in range(1, world):
                    if groups[r][gi] != groups[0][gi]:
                        a, b = fingerprint.first_difference(groups[0][gi], groups[r][gi])
                        raise self._drift_error(
                            f"the hyperparameters of param group {gi} differ", f"rank 0 has {a}, rank "
                            f"{r} has {b}",
                            "A scheduler stepped, or a param group edited, on some ranks only? "
                            "Every rank must change hyperparameters alike (step schedulers on "
                            "every rank).")
        for a, b in self._batch_pairs():
            if not _same_fingerprint(view.rows[a][BATCH_FP], view.rows[b][BATCH_FP]):
                fa, fb = view.rows[a][BATCH_FP], view.rows[b][BATCH_FP]
                raise self._drift_error(
                    f"rank {a} and rank {b} were given different batches of the same size",
                    f"fingerprints (elements, sum, norm): rank {a} {fa[0]:.0f}, {fa[1]:.17g}, "
                    f"{fa[2]:.17g}; rank {b} {fb[0]:.0f}, {fb[1]:.17g}, {fb[2]:.17g}",
                    "With sharded_batches=False every rank must pass the same global batch (seed "
                    "every rank's shuffling alike); with sharded_batches=True ranks r and r + k "
                    "must get the same shard (use the engine's data_rank and data_world_size for "
                    "the sampler).")
        has = view.field(HAS_CHECKSUM)
        if not any(has):
            return
        if all(has):
            sums = [tuple(r[CHECKSUM]) for r in view.rows]
        else:
            # some ranks only checked (their model was loaded since the last
            # step): every rank sums now, and they compare (rare: one gather)
            mine = tuple(self._checksum().tolist())
            sums = self._gather(mine, "parameter checksum")
        if all(s == sums[0] for s in sums):
            return
        odd = [r for r, s in enumerate(sums) if s != sums[0]]
        per = self._gather(self._param_sums(per_param=True), "drift report")
        names = self.ctx.names
        differ = sorted({names[i] for r in odd for (i, v), (_, v0) in zip(per[r], per[0]) if v != v0})
        loaded = [r for r, v in enumerate(view.field(LOADED)) if v]
        why = (f" model.load_state_dict ran on rank{'s' if len(loaded) > 1 else ''} "
               f"{', '.join(map(str, loaded))} since the previous step." if loaded else "")
        shown = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
        raise self._drift_error(
            f"the parameters of rank{'s' if len(odd) > 1 else ''} {', '.join(map(str, odd))} differ "
            "from rank 0's", f"{shown or 'no single parameter'}", why.strip() + (" " if why else "") +
            "Change parameters alike on every rank (load model state on every rank, or load the "
            "optimizer's state_dict, which gives every rank rank 0's values).")

    def _batch_pairs(self) -> List[Tuple[int, int]]:
        """The ranks that must have been given the same batch."""
        if not self.sharded_batches:
            return [(0, r) for r in range(1, self.world_size)]
        if self.method == "SAMPa":
            return [(r, r + self.k) for r in range(self.k)]
        return []

    def _on_model_loaded(self) -> None:
        self._loaded = True

    def _role_of(self, rank: int) -> str:
        if self.method != "SAMPa":
            return ""
        return "x̃-pass" if rank < self.k else "y-pass"

    def _check_status(self, view, failure: Optional[BaseException], which: str, drift: bool) -> None:
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
        if drift:
            self._check_drift(view)
        nb, dg = view.field(BUF_BYTES), view.field(BUF_DIGEST)
        if any(n != nb[0] or d != dg[0] for n, d in zip(nb, dg)):
            desc = ", ".join(f"rank {r}: {int(n)} bytes" for r, n in enumerate(nb))
            raise RuntimeError(
                f"{self._who}: after the {which}, the model's buffers differ between ranks in "
                f"size, shape or dtype ({desc}): a forward that creates or resizes buffers (e.g. "
                "a cache grown to the input length) runs on some ranks only, so rank 0's buffers "
                "cannot be broadcast to the others. The step was refused on every rank. Create "
                "such buffers at their final size in __init__, or keep them out of the module's "
                "buffers (a plain attribute)")

    # ---------------------------------------------------------- the interface
    @property
    def points(self) -> tuple:
        """The points this rank forms: xt on an x̃-rank, y on a y-rank."""
        if self.method != "SAMPa":
            return ("xt",)
        return ("xt", "y") if not self.ctx.fused else (("xt",) if self.role == "x" else ("y",))

    def _parts(self, batch):
        return rank_parts(batch, self.sharded_batches, self.data_rank, self.data_world_size,
                          self.ctx.accumulation_steps)

    def _check_batch(self, batch, what: str) -> int:
        if not self.sharded_batches:
            if batch is self._validated[0]:      # the held batch: checked as last step's new batch
                return self._validated[1]
            check_global_batch(batch, self.data_world_size, self.ctx.accumulation_steps, what, self._who)
            n = global_size(batch)
            self._last_new = (batch, n)
            return n
        return -1

    def keep_batch(self, batch):
        """The held batch: the y-ranks never run the x̃-pass, so they keep a
        reference, not a copy (their held_batch is the batch object itself)."""
        kept = batch if (self.method == "SAMPa" and self.role == "y") else tree.clone(batch)
        last = self._last_new
        self._validated = (kept, last[1]) if last[0] is batch else (None, -1)
        return kept

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
                                              ctx.params, sizes, drift_batch=(batch,))
        else:
            if not rep.in_place:
                ctx.form(("y",))               # the optimizer forms points only on in-place replicas
            buffers = self._buffers.current(self._modules)
            with ctx.y_pass() as model:
                losses, got, outputs = self._pass(model, lambda: self._parts(batch), "y-pass", 1,
                                                  ctx.y_leaves(), sizes, buffers, drift_batch=(batch,))
        return Gradients(losses[0], losses[1], outputs, got)

    def gradient(self, batch, which: str, private_buffers: bool = False) -> PassResult:
        """SAM: one pass, data-parallel over every rank, mean gradient in g."""
        ctx = self.ctx
        self._start()
        if private_buffers and batch is self._last_new[0]:     # checked in the first pass
            sizes = (self._last_new[1], -1)
        else:
            sizes = (self._check_batch(batch, "batch"), -1)
        ctx.primary.zero("g")
        buffers = self._buffers.current(self._modules) if private_buffers else None
        with ctx.private_buffers() if private_buffers else contextlib.nullcontext():
            losses, got, outputs = self._pass(ctx.model, lambda: self._parts(batch), which, 0,
                                              ctx.params, sizes, buffers,
                                              drift_batch=None if private_buffers else (batch,),
                                              keeps_buffers=not private_buffers)
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
        self._layout_message()
        # identical now; the next step checks that they still are
        self._verify_due, self._loaded = True, False

    def close(self) -> None:
        """Destroy the engine's own process group (a caller's subgroup is left
        alone). Local, not collective. The engine cannot step afterwards."""
        group, self.group = getattr(self, "group", None), None
        if getattr(self, "_ex", None) is not None:
            self._ex.close()
        if getattr(self, "_load_hook", None) is not None:
            self._load_hook.remove()
            self._load_hook = None
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
