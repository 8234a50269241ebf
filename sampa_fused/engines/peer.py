"""The peer engine: two CUDA devices in one process (SPEC section 4).

    opt = SAMPa(model, loss_fn, torch.optim.SGD, lr=0.1, momentum=0.9,
                engine="peer", devices=("cuda:0", "cuda:1"))

Device A (devices[0], where the model lives) runs the x̃-pass on the user's
model; device B runs the y-pass on a replica of the model. Both devices keep x,
the base-optimizer state and gy in flat buffers (`replicas`) and run the same
update kernels on them; the only traffic is the two gradient buffers, which
cross once per step (P values each way): A's `g` (gxt) to B and B's `gy_new`
to A. Identical inputs then give bit-identical replicas, with no parameter
traffic.

Both passes are queued (forwards on A's current stream and on a side stream of
B), then one `torch.autograd.backward` over both losses runs them: the
autograd engine has one worker thread per device, so on two devices the two
backward passes are driven concurrently. devices=("cuda:0", "cuda:0") also
works: the y-pass runs on a second stream of the same GPU and the copies are
device-to-device (that is what a one-GPU machine can test).

Overlap (overlap=True): each gradient buffer is cut into buckets of about
`bucket_bytes`, in backward order (the end of the buffer first). A
post-accumulate-grad hook counts each bucket's parameters; when the last one
has its gradient the bucket's copy is queued at once on a dedicated copy
stream, ordered after the stream that produced the gradient by a CUDA event.
Only the last bucket's copy is exposed. overlap=False copies whole buffers
after backward. The copies are the extension's (`sampa_fused._C.PeerLink`:
cudaMemcpyPeerAsync after enabling peer access once per device pair; a staged
copy through pinned host memory when peer access is impossible or
staged=True).

Batches: tensors of the new batch that are on device A are copied to B for
the y-pass (before A's forward is queued, so B need not wait for it); other
leaves (CPU tensors, numbers) are passed as they are, and loss_fn runs under
`torch.cuda.device(B)` for the y-pass, so `.cuda()` inside it lands on B.

Between steps, only `opt.step` may change the parameters: if you load or edit
the model's parameters directly, call `opt.engine.sync_replicas()` so device
B's copy follows. `opt.engine.close()` removes the gradient hooks from the
model's parameters.
"""
from __future__ import annotations

import dataclasses
import warnings
import weakref
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .. import _cuda
from ..batching import micro_batches

DEFAULT_BUCKET_BYTES = 1 << 20
STAGING_BYTES = 8 << 20        # pinned host memory per direction for staged copies (2 slots)


# ---------------------------------------------------------------- buckets
def plan_buckets(offsets: Sequence[int], numel: int, bucket_elems: int
                 ) -> Tuple[List[Tuple[int, int]], List[int]]:
    """Cut a flat buffer [0, numel) into contiguous buckets in backward order.

    `offsets` are the sorted start offsets of the tensors laid out in the
    buffer (the layout follows the forward order, so backward produces them
    roughly from the end). Starting at the end, tensors join the current
    bucket until it holds at least `bucket_elems` elements. Buckets cover
    [0, numel) without gaps (alignment padding included), so copying every
    bucket overwrites the whole destination. Returns (bucket (start, end)
    ranges, first bucket = end of the buffer; the bucket of each tensor).
    """
    if bucket_elems < 1:
        raise ValueError(f"bucket_elems must be >= 1, got {bucket_elems}")
    n = len(offsets)
    bounds: List[Tuple[int, int]] = []
    bucket_of = [0] * n
    members: List[int] = []
    end = numel
    for k in range(n - 1, -1, -1):
        members.append(k)
        start = 0 if k == 0 else offsets[k]
        if end - start >= bucket_elems or k == 0:
            for j in members:
                bucket_of[j] = len(bounds)
            bounds.append((start, end))
            members, end = [], start
    if n == 0:
        bounds.append((0, numel))
    return bounds, bucket_of


class BucketExchange:
    """Sends one side's flat gradient buffers, bucket by bucket, as backward
    produces them. `send(slab, start, end)` queues the copy of one range.

    Each bucket counts its parameters down in a post-accumulate-grad hook and
    is sent when the count reaches zero. Whatever was not sent during backward
    (parameters that got no gradient, or froze since) is sent by `flush`; a
    bucket whose parameter accumulated again after it was sent goes again.
    """

    def __init__(self, params: Sequence[torch.Tensor], slabs: Sequence, bucket_bytes: int,
                 send: Callable[[int, int, int], None]):
        self.send = send
        self.bounds: List[List[Tuple[int, int]]] = []
        self._counts: List[List[int]] = []
        self._always: set = set()        # buckets with a frozen parameter: sent at flush
        self._handles = []
        self.armed = False
        me = weakref.ref(self)           # hooks must not keep the engine alive
        for s, slab in enumerate(slabs):
            elems = max(1, bucket_bytes // torch.empty((), dtype=slab.dtype).element_size())
            bounds, bucket_of = plan_buckets(slab.offsets, slab.numel, elems)
            counts = [0] * len(bounds)
            for k, i in enumerate(slab.index):
                p, b = params[i], bucket_of[k]
                if not p.requires_grad:
                    self._always.add((s, b))
                    continue
                counts[b] += 1
                self._handles.append(p.register_post_accumulate_grad_hook(_hook(me, s, b)))
            self.bounds.append(bounds)
            self._counts.append(counts)
        self.start()
        self.armed = False

    def start(self) -> None:
        """Arm for one backward pass."""
        self._pending = [list(c) for c in self._counts]
        self._sent = [[False] * len(c) for c in self._counts]
        self._again: set = set()
        self.armed = True

    def _ready(self, s: int, b: int) -> None:
        left = self._pending[s][b] - 1
        self._pending[s][b] = left
        if left == 0:
            self.send(s, *self.bounds[s][b])
            self._sent[s][b] = True
        elif left < 0:
            self._again.add((s, b))

    def flush(self) -> None:
        """After backward: send what has not been sent (or changed since)."""
        self.armed = False
        for s, sent in enumerate(self._sent):
            for b, done in enumerate(sent):
                if not done or (s, b) in self._again or (s, b) in self._always:
                    self.send(s, *self.bounds[s][b])

    def send_all(self) -> None:
        """Whole buffers at once (no overlap)."""
        self.armed = False
        for s, bounds in enumerate(self.bounds):
            self.send(s, bounds[-1][0], bounds[0][1])

    def close(self) -> None:
        self.armed = False
        for h in self._handles:
            h.remove()
        self._handles = []


def _hook(ref, s: int, b: int):
    def on_grad(_param):
        ex = ref()
        if ex is not None and ex.armed:
            ex._ready(s, b)
    return on_grad


# ---------------------------------------------------------------- helpers
def _to_device(obj, src: torch.device, dst: torch.device, stream):
    """The batch for device B: tensors on device A are copied over (queued on
    the current streams, before A's forward so B need not wait for it); other
    leaves are kept. On one device the tensors are shared and recorded on the
    y-pass stream for the caching allocator."""
    if isinstance(obj, torch.Tensor):
        if _cuda.logical(obj.device) != src:
            return obj
        if src == dst:
            _cuda.record_stream(obj, stream)
            return obj
        return obj.to(_cuda.physical(dst), non_blocking=True)
    if isinstance(obj, dict):
        return type(obj)((k, _to_device(v, src, dst, stream)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        items = [_to_device(v, src, dst, stream) for v in obj]
        if hasattr(obj, "_fields"):
            return type(obj)(*items)
        try:
            return type(obj)(items)
        except TypeError:
            return items if isinstance(obj, list) else tuple(items)
    return obj


def _parse_devices(devices) -> Optional[Tuple[torch.device, torch.device]]:
    if devices is None:
        return None
    if isinstance(devices, (str, torch.device, int)) or len(devices) != 2:
        raise ValueError("engine='peer': devices must be a pair, e.g. devices=('cuda:0', 'cuda:1'), "
                         f"got {devices!r}")
    out = []
    for d in devices:
        try:
            d = torch.device(d)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"engine='peer': {d!r} is not a device ({e})") from None
        if d.type != "cuda":
            raise ValueError(f"engine='peer' runs on two CUDA devices, got {d}; use "
                             "engine='serial' (or 'distributed' with gloo) on CPU")
        out.append(d)
    return out[0], out[1]


def _resolve(d: torch.device) -> torch.device:
    """The device with its index, checked to exist."""
    d = d if d.index is not None else torch.device("cuda", _cuda.current_device())
    n = _cuda.device_count()
    if d.index >= n:
        raise ValueError(f"engine='peer': device {d} does not exist (this process sees {n} CUDA "
                         "device(s))")
    return d


# ---------------------------------------------------------------- engine
class PeerEngine:
    name = "peer"

    def __init__(self, opt, devices=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 overlap: bool = True, staged: bool = False):
        if not getattr(opt, "_sampa", False):
            raise NotImplementedError(
                f"engine='peer' runs the two independent gradients of a SAMPa step on two "
                f"devices; {type(opt).__name__}'s two passes are sequential. Use engine='serial' "
                "(or 'streams') for SAM")
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"engine='peer': bucket_bytes must be an int >= 1, got {bucket_bytes!r}")
        for name, v in (("overlap", overlap), ("staged", staged)):
            if not isinstance(v, bool):
                raise TypeError(f"engine='peer': {name} must be True or False, got {v!r}")
        pair = _parse_devices(devices)
        if not _cuda.available():
            raise RuntimeError("engine='peer' needs CUDA devices, and torch.cuda.is_available() is "
                               "False on this machine; use engine='serial' here")
        _cuda.require_peer_ops()
        if not opt.rule.fused:
            raise ValueError(f"SAMPa: the peer engine keeps replicas of the optimizer state and "
                             f"needs torch.optim.SGD or torch.optim.AdamW as base optimizer, not "
                             f"{type(opt.base).__name__}")
        where = {_cuda.logical(b.x.device) for b in opt._bufs}
        if pair is None:
            if len(where) != 1 or not _cuda.is_cuda(next(iter(where))):
                raise ValueError("engine='peer': the model's parameters must be on one CUDA device "
                                 f"(devices[0]); they are on {sorted(map(str, where))}")
            a = next(iter(where))
            n = _cuda.device_count()
            pair = (a, torch.device("cuda", (a.index + 1) % n))
        a, b = _resolve(pair[0]), _resolve(pair[1])
        if where != {a}:
            raise ValueError(f"engine='peer': the model's parameters must all be on devices[0]={a}, "
                             f"they are on {sorted(map(str, where))}; move the model with "
                             f"model.to('{a}') before creating the optimizer")
        self.opt, self.devices = opt, (a, b)
        self.bucket_bytes, self.overlap, self.staged = bucket_bytes, overlap, staged
        self.exchange = True      # False only to time a step without the exchange (wrong results)

        # The streams: B's y-pass, and per direction a copy stream on each end
        # (the source end carries peer / device-to-device copies and the
        # device-to-host half of staged copies, the destination end the
        # host-to-device half).
        hi = -1                   # high priority: copies are not queued behind compute
        self.y_stream = _cuda.Stream(b)
        self._copy_streams = {"ab": (_cuda.Stream(a, priority=hi), _cuda.Stream(b, priority=hi)),
                              "ba": (_cuda.Stream(b, priority=hi), _cuda.Stream(a, priority=hi))}
        self.links = {
            "ab": _cuda.peer_link(a.index, b.index, *self._copy_streams["ab"], staged, STAGING_BYTES),
            "ba": _cuda.peer_link(b.index, a.index, *self._copy_streams["ba"], staged, STAGING_BYTES)}
        if a != b and not staged and self.links["ab"].mode == "staged":
            warnings.warn(f"engine='peer': {a} and {b} cannot access each other's memory (no "
                          "peer access); gradients go through pinned host memory, which is slower",
                          RuntimeWarning, stacklevel=3)
        self.ymodel = self._make_ymodel()
        self._exchanges: List[BucketExchange] = []
        self.relayout()

    # ------------------------------------------------------------- set-up
    def _make_ymodel(self):
        with _cuda.device(self.devices[1]):
            return self.opt._make_ymodel(f" on {self.devices[1]}").to(_cuda.physical(self.devices[1]))

    def relayout(self) -> None:
        """(Re)build device B's buffers from device A's layout and values: at
        construction and after add_param_group."""
        from ..optim import SlabBuffers
        opt, b_dev = self.opt, self.devices[1]
        for ex in self._exchanges:
            ex.close()
        self._bufs_a = opt._bufs
        with _cuda.device(b_dev):
            self._bufs_b = [SlabBuffers(dataclasses.replace(bf.slab, device=_cuda.physical(b_dev)),
                                        True, list(bf.state)) for bf in opt._bufs]
        named = dict(self.ymodel.named_parameters(remove_duplicate=True))
        try:
            self._yparams = [named[opt._names[id(p)]] for p in opt._params]
        except KeyError as e:
            raise RuntimeError(f"engine='peer': parameter {e} is not in the replica of the model "
                               "made at construction; modules added to the model later are not "
                               "supported") from None
        for q in self._yparams:
            q.requires_grad_(True)
        for bb in self._bufs_b:
            bb.slab.bind_data(self._yparams, bb.y)
            bb.slab.bind_grad(self._yparams, bb.gy_new)
        self.replicas = [self._bufs_a, self._bufs_b]
        self.sync_replicas()
        send_ab, send_ba = self._sender("ab"), self._sender("ba")
        self._exchanges = [BucketExchange(opt._params, [bf.slab for bf in self._bufs_a],
                                          self.bucket_bytes, send_ab),
                           BucketExchange(self._yparams, [bf.slab for bf in self._bufs_b],
                                          self.bucket_bytes, send_ba)]

    def _sender(self, direction: str):
        link = self.links[direction]
        src_bufs, dst_bufs = ((self._bufs_a, self._bufs_b) if direction == "ab"
                              else (self._bufs_b, self._bufs_a))
        attr = "g" if direction == "ab" else "gy_new"
        pairs = [(getattr(d, attr), getattr(s, attr)) for s, d in zip(src_bufs, dst_bufs)]

        def send(slab: int, start: int, end: int) -> None:
            dst, src = pairs[slab]
            # -1: the copy waits for the current stream of the source device,
            # i.e. the stream the gradient was accumulated on (in a hook) or
            # the caller's stream (after backward).
            link.copy(dst, src, start, end, -1)
        return send

    def sync_replicas(self) -> None:
        """Copy x, gy and the base state of device A to device B (done at
        construction; call it after changing the model's parameters or the
        optimizer state other than through opt.step)."""
        with torch.no_grad():
            for ba, bb in zip(self._bufs_a, self._bufs_b):
                bb.x.copy_(ba.x)
                bb.gy.copy_(ba.gy)
                for n, flat in ba.state.items():
                    bb.state[n].copy_(flat)
            sqs = getattr(self.opt, "_gy_sqs", None)
            if sqs is not None and len(sqs) == 2:
                sqs[1].copy_(sqs[0])

    def close(self) -> None:
        """Remove the gradient hooks from the model's parameters."""
        for ex in self._exchanges:
            ex.close()

    # ------------------------------------------------------------- a step
    def sampa_gradients(self, held, batch):
        opt = self.opt
        if opt._bufs is not self._bufs_a:
            raise RuntimeError("engine='peer': the optimizer's buffers were rebuilt without "
                               "relayout(); use opt.add_param_group to add parameters")
        a, b = self.devices
        ys = self.y_stream
        ca, cb = _cuda.current_stream(a), _cuda.current_stream(b)
        ex_a, ex_b = self._exchanges
        exchange = self.exchange
        # B's pass reads y (written by the pre-gradient update on B's current
        # stream) and, on one device, the batch (A's current stream).
        ys.wait_stream(cb)
        if a == b:
            ys.wait_stream(ca)
        if exchange:
            # The copies overwrite B's g and A's gy_new: after their last readers.
            self.links["ab"].begin(_cuda.handle(cb))
            self.links["ba"].begin(_cuda.handle(ca))
        try:
            with _cuda.device(b), _cuda.stream(ys):
                batch_b = _to_device(batch, a, b, ys)
                for bb in self._bufs_b:
                    bb.gy_new.zero_()
            with _cuda.device(a):
                for ba in self._bufs_a:
                    ba.g.zero_()
            if self.ymodel.training != opt.model.training:
                self.ymodel.train(opt.model.training)
            loss_x, loss_y = self._passes(held, batch_b, ex_a, ex_b, exchange)
        finally:
            ex_a.armed = ex_b.armed = False
            cb.wait_stream(ys)        # B's gy_new, its loss and its activations' memory
            if a == b:
                ca.wait_stream(ys)
        if exchange:
            if self.overlap:
                ex_a.flush()
                ex_b.flush()
            else:
                ex_a.send_all()
                ex_b.send_all()
            # The updates (on each device's current stream) wait for the
            # incoming gradients; the next step's zeroing of the outgoing
            # buffers waits for the copies to have read them.
            self.links["ab"].finish(_cuda.handle(cb), _cuda.handle(ca))
            self.links["ba"].finish(_cuda.handle(ca), _cuda.handle(cb))
        return loss_x, loss_y

    def _passes(self, held, batch_b, ex_a, ex_b, exchange):
        """Forward both passes, then one backward over both losses, micro-batch
        by micro-batch (gradient accumulation); the buckets of a side go out
        during its last backward."""
        opt = self.opt
        a, b = self.devices
        parts_x = micro_batches(held, opt.accumulation_steps)
        parts_y = micro_batches(batch_b, opt.accumulation_steps)
        scaler = opt.grad_scaler
        total_x = total_y = None
        for i in range(max(len(parts_x), len(parts_y))):
            losses = []
            if i < len(parts_x):
                with _cuda.device(a):
                    lx = self._weighted(opt._loss(opt.model, parts_x[i][0], "x̃-pass"), parts_x[i][1])
                losses.append(scaler.scale(lx) if scaler is not None else lx)
                total_x = lx.detach() if total_x is None else total_x + lx.detach()
            if i < len(parts_y):
                with _cuda.device(b), _cuda.stream(self.y_stream):
                    ly = self._weighted(self._y_loss(parts_y[i][0]), parts_y[i][1])
                    losses.append(scaler.scale(ly) if scaler is not None else ly)
                    total_y = ly.detach() if total_y is None else total_y + ly.detach()
            if exchange and self.overlap:
                if i == len(parts_x) - 1:
                    ex_a.start()
                if i == len(parts_y) - 1:
                    ex_b.start()
            torch.autograd.backward(losses)
        return total_x, total_y

    @staticmethod
    def _weighted(loss: torch.Tensor, weight: float) -> torch.Tensor:
        return loss if weight == 1.0 else loss * weight

    def _y_loss(self, batch_b) -> torch.Tensor:
        opt = self.opt
        if opt._t != 0:
            return opt._loss(self.ymodel, batch_b, "y-pass")
        with opt._user_params_frozen():    # first step: loss_fn must use its model argument
            return opt._loss(self.ymodel, batch_b, "y-pass")

    def gradient(self, batch, which: str):
        raise NotImplementedError("engine='peer' computes SAMPa's two independent gradients; "
                                  "SAM's sequential passes are not supported")
