"""The peer engine: two CUDA devices in one process (README, 'Engines').

    opt = SAMPa(model, loss_fn, torch.optim.SGD, lr=0.1, momentum=0.9,
                engine="peer", devices=("cuda:0", "cuda:1"))

Device A (devices[0], where the model lives) runs the x̃-pass on the user's
model; device B runs the y-pass on a replica of the model. Both devices keep
x, the base-optimizer state and gy in flat buffers (`replicas`) and run the
same update kernels on them; the only traffic is the two gradient buffers,
which cross once per step (P values each way): A's `g` (gxt) to B and B's
`gy_new` to A. Identical inputs then give bit-identical replicas, with no
parameter traffic. devices=("cuda:0", "cuda:0") also works: the y-pass runs on
a second stream of the same GPU and the copies are device-to-device.

The x̃-pass is queued on A's current stream, then the y-pass on a side stream
of B: the host queues them one after the other while the devices run them at
the same time. Overlap (overlap=True): each gradient buffer is cut into
buckets of about `bucket_bytes`, in backward order; a post-accumulate-grad
hook counts each bucket's parameters, and when the last one has its gradient
the bucket's copy is queued at once on a dedicated copy stream, ordered after
the stream that produced the gradient by a CUDA event. Only the last
bucket's copy is exposed. overlap=False copies whole buffers after backward.
The copies are the extension's (`sampa_fused._C.PeerLink`: cudaMemcpyPeerAsync
after enabling peer access once per device pair; staged through pinned host
memory when peer access is impossible or staged=True).

Batches: tensors of the new batch that are on device A are copied to B for
the y-pass; other leaves are passed as they are, and loss_fn runs under
`torch.cuda.device(B)` for the y-pass, so `.cuda()` inside it lands on B.

Device B's replica follows the user's model at every step (buffers, modes,
parameters this optimizer does not train). If you change the trained
parameters other than through `opt.step` or `opt.load_state_dict`, call
`opt.engine.sync_replicas()`. `opt.engine.close()` removes the gradient hooks.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch

from .. import _cuda, tree
from ..state import BufferPlan
from .base import Context, Engine, Gradients, union
from .buckets import BucketExchange

DEFAULT_BUCKET_BYTES = 1 << 20
STAGING_BYTES = 8 << 20        # pinned host memory per direction for staged copies (2 slots)


def _to_device(batch, src: torch.device, dst: torch.device, stream):
    """The batch for device B: tensors on device A are copied over; on one
    device they are shared and recorded on the y-pass stream."""
    def move(t):
        if _cuda.device_of(t) != src:
            return t
        if src == dst:
            _cuda.record_stream(t, stream)
            return t
        return _cuda.to_device(t, dst)
    return tree.map_tensors(move, batch)


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


class PeerEngine(Engine):
    name = "peer"

    def __init__(self, ctx: Context, devices=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 overlap: bool = True, staged: bool = False):
        super().__init__(ctx)
        if ctx.method != "SAMPa":
            raise NotImplementedError(
                f"engine='peer' runs the two independent gradients of a SAMPa step on two "
                f"devices; {ctx.method}'s two passes are sequential. Use engine='serial' "
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
        if not ctx.fused:
            raise ValueError(f"SAMPa: the peer engine keeps replicas of the optimizer state and "
                             f"needs torch.optim.SGD or torch.optim.AdamW as base optimizer, not "
                             f"{ctx.base_name}")
        where = {_cuda.logical(p.device) for p in ctx.params}
        if pair is None:
            if len(where) != 1 or not _cuda.is_cuda(next(iter(where))):
                raise ValueError("engine='peer': the model's parameters must be on one CUDA device "
                                 f"(devices[0]); they are on {sorted(map(str, where))}")
            a = next(iter(where))
            pair = (a, torch.device("cuda", (a.index + 1) % _cuda.device_count()))
        a, b = _resolve(pair[0]), _resolve(pair[1])
        if where != {a}:
            raise ValueError(f"engine='peer': the model's parameters must all be on devices[0]={a}, "
                             f"they are on {sorted(map(str, where))}; move the model with "
                             f"model.to('{a}') before creating the optimizer")
        self.devices = (a, b)
        self.bucket_bytes, self.overlap, self.staged = bucket_bytes, overlap, staged
        self.exchange = True      # False only to time a step without the exchange (wrong results)
        # B's y-pass stream, and per direction a copy stream on each end (the
        # source end carries peer / device-to-device copies and the
        # device-to-host half of staged copies, the destination end the
        # host-to-device half). High priority: copies are not queued behind compute.
        self.y_stream = _cuda.Stream(b)
        self._copy_streams = {"ab": (_cuda.Stream(a, priority=-1), _cuda.Stream(b, priority=-1)),
                              "ba": (_cuda.Stream(b, priority=-1), _cuda.Stream(a, priority=-1))}
        self.links = {
            "ab": _cuda.peer_link(a.index, b.index, *self._copy_streams["ab"], staged, STAGING_BYTES),
            "ba": _cuda.peer_link(b.index, a.index, *self._copy_streams["ba"], staged, STAGING_BYTES)}
        if a != b and not staged and self.links["ab"].mode == "staged":
            warnings.warn(f"engine='peer': {a} and {b} cannot access each other's memory (no "
                          "peer access); gradients go through pinned host memory, which is slower",
                          RuntimeWarning, stacklevel=3)
        with _cuda.device(b):
            self.ymodel = ctx.replicate_model(b, f"on {b}")
        self._exchanges: list = []
        self.relayout()

    # ------------------------------------------------------------- set-up
    @classmethod
    def buffer_plan(cls, method: str) -> BufferPlan:
        return BufferPlan(points=("xt",))           # device A runs the x̃-pass only

    @property
    def replicas(self) -> list:
        return [self.ctx.primary, self.replica_b]

    def relayout(self) -> None:
        """(Re)build device B's buffers from A's layout and values: at
        construction and whenever the optimizer laid out again."""
        ctx, b_dev = self.ctx, self.devices[1]
        for ex in self._exchanges:
            ex.close()
        with _cuda.device(b_dev):
            self.replica_b = ctx.make_replica(b_dev, plan=BufferPlan(points=("y",)))
            self.ymodel.rebind(ctx.names)
            self.ymodel.bind(self.replica_b.slabs)
        self.sync_replicas()
        slabs = [bf.slab for bf in ctx.primary.slabs]
        self._exchanges = [BucketExchange(ctx.x_leaves(), slabs, self.bucket_bytes, self._sender("ab")),
                           BucketExchange(self.ymodel.params, slabs, self.bucket_bytes, self._sender("ba"))]

    def _sender(self, direction: str):
        link = self.links[direction]
        a_bufs, b_bufs = self.ctx.primary.slabs, self.replica_b.slabs
        src_bufs, dst_bufs = (a_bufs, b_bufs) if direction == "ab" else (b_bufs, a_bufs)
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
        """Copy x, gy, the base state and ||gy||^2 of device A to device B
        (done at construction; call it after changing the model's parameters
        or the optimizer state other than through opt.step)."""
        ra, rb = self.ctx.primary, self.replica_b
        with torch.no_grad(), _cuda.device(self.devices[1]):
            for ba, bb in zip(ra.slabs, rb.slabs):
                bb.ensure_state(list(ba.state))
                bb.x.copy_(ba.x)
                bb.gy.copy_(ba.gy)
                for n, flat in ba.state.items():
                    bb.state[n].copy_(flat)
            rb.gy_sq.copy_(ra.gy_sq)

    def close(self) -> None:
        """Remove the gradient hooks from the model's parameters."""
        for ex in self._exchanges:
            ex.close()

    # ------------------------------------------------------------- a step
    def sampa_gradients(self, held, batch) -> Gradients:
        ctx = self.ctx
        a, b = self.devices
        ys = self.y_stream
        ca, cb = _cuda.current_stream(a), _cuda.current_stream(b)
        ex_a, ex_b = self._exchanges
        exchange, overlap = self.exchange, self.overlap
        ctx.form(("xt", "y"))                     # xt on A, y on B: each on its current stream
        with _cuda.device(b):
            self.ymodel.sync()                    # the user's buffers and other weights, on cb
        # B's pass reads y (written by the pre-gradient update on B's current
        # stream) and, on one device, the batch (A's current stream).
        ys.wait_stream(cb)
        if a == b:
            ys.wait_stream(ca)
        if exchange:
            # The copies overwrite B's g and A's gy_new: after their last readers.
            self.links["ab"].begin(_cuda.handle(cb))
            self.links["ba"].begin(_cuda.handle(ca))
        arm_a = ex_a.start if exchange and overlap else None
        arm_b = ex_b.start if exchange and overlap else None
        try:
            with _cuda.device(a), ctx.x_pass() as model:
                ctx.primary.zero("g")
                x = ctx.run_pass(model, held, "x̃-pass", leaves=ctx.x_leaves(), on_last_backward=arm_a)
            with _cuda.device(b), _cuda.stream(ys):
                batch_b = _to_device(batch, a, b, ys)
                self.replica_b.zero("gy_new")
                # First step: a loss_fn that ignores its model argument would
                # use A's model; with A's parameters frozen it fails clearly.
                y = ctx.run_pass(self.ymodel.module, batch_b, "y-pass", leaves=self.ymodel.params,
                                 freeze=ctx.params if ctx.first_step() else (), on_last_backward=arm_b)
        finally:
            ex_a.armed = ex_b.armed = False
            cb.wait_stream(ys)        # B's gy_new, its loss and its activations' memory
            if a == b:
                ca.wait_stream(ys)
        if exchange:
            for ex in (ex_a, ex_b):
                ex.flush() if overlap else ex.send_all()
            # The updates (on each device's current stream) wait for the
            # incoming gradients; the next step's zeroing of the outgoing
            # buffers waits for the copies to have read them.
            self.links["ab"].finish(_cuda.handle(cb), _cuda.handle(ca))
            self.links["ba"].finish(_cuda.handle(ca), _cuda.handle(cb))
        return Gradients(x.loss, y.loss, x.outputs, union(x.got, y.got))

    def gradient(self, batch, which: str, private_buffers: bool = False):
        raise NotImplementedError("engine='peer' computes SAMPa's two independent gradients; "
                                  "SAM's sequential passes are not supported")
