"""A stand-in CUDA for CI: the GPU paths' own code on CPU tensors, with the
stream ordering checked.

    from fake_cuda import fake_cuda
    with fake_cuda():
        opt = SAMPa(model_on_cpu, loss_fn, torch.optim.SGD, engine="streams", ...)
        opt.step(batch)

Under `fake_cuda(devices=2)` the runtime seam `sampa_fused._cuda` answers as a
machine with `devices` GPUs whose memory is the CPU: engines see "cuda:k"
devices, streams, events, graphs and the extension's PeerLink, and all the
math runs for real on CPU tensors. Only these are stood in for:

- streams and events: vector clocks; `wait_stream`, `wait_event` and event
  records order them; a host read (`.item()`, `.tolist()`, ...) or
  `synchronize()` orders the host, and so every later operation;
- stream ordering: every aten op and every Triton launch is attributed to the
  stream it would run on (the current stream; in backward, the stream of the
  forward op that made the autograd node, as CUDA autograd does; the
  caller's current stream waits for them when backward returns). A buffer
  written on one stream and then read or written on another, or read on one
  and written on another, with no ordering in between, raises
  `StreamOrderError` naming both streams and both ops (the idea of
  `torch.cuda._sanitizer`, on CPU tensors, with byte ranges so that
  different slices of one flat buffer are told apart);
- CUDA graphs: a capture runs the body once to record its ops and kernel
  launches on the capturing streams (their tensors stay the graph's static
  memory), then restores every pre-existing buffer that the body wrote, so a
  capture changes nothing, as on a GPU; `replay()` re-runs the recording
  with the same tensors. Host reads while capturing raise, streams that
  joined a capture must be joined back;
- the extension's PeerLink: the same begin/copy/finish protocol as
  csrc/sampa_fused_cuda.cu, the copies done as ops on its copy streams.

Other torch functions are untouched (`torch.cuda` itself is not patched).
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sampa_fused import _cuda

_TAG = "fake_cuda_stream"      # autograd Node metadata: the stream of its forward
HOST = -1                      # the "device" of host memory


class StreamOrderError(RuntimeError):
    """Two streams touched the same memory with no ordering between them."""


class CaptureError(RuntimeError):
    """What a real CUDA graph capture would refuse."""


# ---------------------------------------------------------------- streams
class FakeStream:
    _ids = itertools.count(1)

    def __init__(self, rt: "FakeCuda", device: int, priority: int = 0, name: Optional[str] = None,
                 sid: Optional[int] = None):
        self.rt, self.index = rt, device
        self.device = torch.device("cuda", device)
        self.priority = priority
        self.id = next(FakeStream._ids) if sid is None else sid
        self.name = name or f"stream {self.id} (cuda:{device})"
        self.vc: Dict[int, int] = {self.id: 0}     # vector clock: what this stream has seen

    @property
    def cuda_stream(self) -> int:
        return self.id

    def tick(self) -> int:
        _merge(self.vc, self.rt.host_vc)           # work queued after a host sync follows it
        self.vc[self.id] += 1
        return self.vc[self.id]

    def wait_stream(self, other: "FakeStream") -> None:
        _merge(self.vc, other.vc)
        self.rt._joined(self, other)

    def wait_event(self, event: "FakeEvent") -> None:
        event.wait(self)

    def record_event(self, event: Optional["FakeEvent"] = None) -> "FakeEvent":
        event = event or FakeEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        self.rt.host_sync(self)

    def query(self) -> bool:
        return True

    def __eq__(self, other):
        return isinstance(other, FakeStream) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<FakeStream {self.name}>"


class FakeEvent:
    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.vc: Dict[int, int] = {}
        self.stream: Optional[FakeStream] = None

    def record(self, stream: Optional[FakeStream] = None) -> None:
        stream = stream or _active().current_stream()
        self.vc = dict(stream.vc)
        self.stream = stream
        cap = stream.rt._capture
        self.captured = cap if cap is not None and stream.id in cap.members else None

    def wait(self, stream: Optional[FakeStream] = None) -> None:
        stream = stream or _active().current_stream()
        _merge(stream.vc, self.vc)
        if getattr(self, "captured", None) is not None and self.captured is stream.rt._capture:
            stream.rt._joined(stream, self.stream)

    def synchronize(self) -> None:
        _merge(_active().host_vc, self.vc)

    def query(self) -> bool:
        return True


def _merge(into: Dict[int, int], other: Dict[int, int]) -> None:
    for k, v in other.items():
        if into.get(k, 0) < v:
            into[k] = v


# ---------------------------------------------------------------- graphs
@dataclass
class _Op:
    kind: str            # "op" (aten, or a registered sampa_fused op) or "kernel" (a Triton launch
                         # inside an op: listed, replayed by its op)
    fn: Any
    args: Any
    kwargs: Any
    outs: Any            # recorded outputs (op)
    mode: str            # "view", "inplace", "functional", "empty"
    name: str


class FakeGraph:
    """A recorded step: the ops and launches of the capture, replayed in order."""

    def __init__(self):
        self.tape: List[_Op] = []
        self.captured = False

    def replay(self) -> None:
        if not self.captured:
            raise RuntimeError("FakeGraph.replay: nothing was captured")
        _active()._replay(self)

    def kernels(self) -> List[str]:
        """The Triton kernels the graph launches, in order."""
        return [op.name for op in self.tape if op.kind == "kernel"]

    def reset(self) -> None:
        self.tape, self.captured = [], False


class _Capture:
    def __init__(self, graph: FakeGraph, origin: FakeStream):
        self.graph, self.origin = graph, origin
        self.members: Dict[int, FakeStream] = {origin.id: origin}
        self.start = {origin.id: origin.vc[origin.id]}
        self.backups: Dict[int, tuple] = {}      # storage key -> (storage, saved bytes)
        self.fresh: set = set()                  # storages allocated during the capture


# ---------------------------------------------------------------- the link
class FakePeerLink:
    """The extension's PeerLink (csrc/sampa_fused_cuda.cu): same modes, same
    ordering protocol, copies done as ops on its copy streams."""

    def __init__(self, rt: "FakeCuda", src: int, dst: int, src_stream: FakeStream,
                 dst_stream: FakeStream, staged: bool, staging_bytes: int):
        for d, role in ((src, "source"), (dst, "destination")):
            if not 0 <= d < rt.n:
                raise RuntimeError(f"sampa_fused: {role} device cuda:{d} does not exist (this "
                                   f"process sees {rt.n} CUDA device(s))")
        self.rt, self._src, self._dst = rt, src, dst
        self.src_stream, self.dst_stream = src_stream, dst_stream
        self.mode = "staged" if staged else ("device" if src == dst else "peer")
        self.slot_bytes = staging_bytes // 2 if self.mode == "staged" else 0
        self._slots: List[Optional[torch.Tensor]] = [None, None]
        self._filled = [FakeEvent(), FakeEvent()]
        self._freed = [FakeEvent(), FakeEvent()]
        self._next = 0
        self.copies: List[tuple] = []            # (start, end) of every copy, for tests
        self.steps = 0                           # finish() calls
        rt.links.append(self)

    @property
    def src(self) -> int:
        return self._src

    @property
    def dst(self) -> int:
        return self._dst

    def begin(self, reader_stream: int = -1) -> None:
        reader = self.rt.stream_of(reader_stream, self._dst)
        writer = self.dst_stream if self.mode == "staged" else self.src_stream
        FakeEvent().record(reader)
        writer.wait_stream(reader)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, start: int, end: int,
             producer_stream: int = -1) -> None:
        if dst.dtype != src.dtype:
            raise ValueError(f"PeerLink.copy: dtypes differ (src {src.dtype}, dst {dst.dtype})")
        if not (0 <= start <= end <= src.numel() and end <= dst.numel()):
            raise ValueError(f"PeerLink.copy: range [{start}, {end}) is outside src "
                             f"({src.numel()} elements) or dst ({dst.numel()} elements)")
        if end == start:
            return
        self.copies.append((start, end))
        producer = self.rt.stream_of(producer_stream, self._src)
        self.src_stream.wait_stream(producer)
        rt = self.rt
        if self.mode != "staged":
            with rt.on_stream(self.src_stream):
                dst[start:end].copy_(src[start:end])
            return
        per = max(1, self.slot_bytes // src.element_size())
        for off in range(start, end, per):
            n = min(per, end - off)
            slot = self._next
            self._next ^= 1
            self._freed[slot].wait(self.src_stream)
            with rt.on_stream(self.src_stream):
                if self._slots[slot] is None or self._slots[slot].numel() < per \
                        or self._slots[slot].dtype != src.dtype:
                    self._slots[slot] = torch.empty(per, dtype=src.dtype)   # "pinned host memory"
                self._slots[slot][:n].copy_(src[off:off + n])
            self._filled[slot].record(self.src_stream)
            self._filled[slot].wait(self.dst_stream)
            with rt.on_stream(self.dst_stream):
                dst[off:off + n].copy_(self._slots[slot][:n])
            self._freed[slot].record(self.dst_stream)

    def finish(self, consumer_stream: int = -1, owner_stream: int = -1) -> None:
        consumer = self.rt.stream_of(consumer_stream, self._dst)
        owner = self.rt.stream_of(owner_stream, self._src)
        self.steps += 1
        owner.wait_stream(self.src_stream)
        consumer.wait_stream(self.dst_stream if self.mode == "staged" else self.src_stream)


# ---------------------------------------------------------------- the runtime
_local = threading.local()


def _active() -> "FakeCuda":
    rt = getattr(_local, "rt", None)
    if rt is None:
        raise RuntimeError("no fake_cuda() context is active")
    return rt


class FakeCuda:
    """The `sampa_fused._cuda` runtime interface, on CPU tensors."""

    fake = True

    def __init__(self, devices: int = 1, check: bool = True):
        if devices < 1:
            raise ValueError("fake_cuda: devices must be >= 1")
        self.n, self.check = devices, check
        self.host_vc: Dict[int, int] = {}
        # The default (legacy) stream has handle 0, as torch's does.
        self.default = [FakeStream(self, d, name=f"default stream (cuda:{d})", sid=0 if d == 0 else None)
                        for d in range(devices)]
        self.current = list(self.default)
        self.cur_dev = 0
        self._streams: Dict[int, FakeStream] = {s.id: s for s in self.default}
        self._override: List[FakeStream] = []      # copy streams of the link, graph replays
        self._capture: Optional[_Capture] = None
        self._bw: List[dict] = []                  # open backward calls
        self._records: Dict[int, list] = {}
        self._keep: Dict[int, Any] = {}            # storages touched: alive, so no address reuse
        self._dev_of: Dict[int, int] = {}          # storage -> the device it was allocated on
        self.launches: List[tuple] = []            # (kernel, stream name, captured) of every launch
        self.graphs: List[FakeGraph] = []
        self.links: List[FakePeerLink] = []

    # --- the _cuda interface
    def available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.n

    def is_cuda(self, device) -> bool:
        return torch.device(device).type == "cuda"

    def logical(self, device) -> torch.device:
        device = torch.device(device)
        if device.type == "cpu":
            return torch.device("cuda", 0)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.cur_dev)
        return device

    def physical(self, device) -> torch.device:
        device = torch.device(device)
        return torch.device("cpu") if device.type == "cuda" else device

    def current_device(self) -> int:
        return self.cur_dev

    def to_device(self, t: torch.Tensor, device) -> torch.Tensor:
        """A copy on another (logical) device: as torch copies between devices,
        on the source's current stream, synchronised with the destination's."""
        d = self._index(device)
        src_dev = self.device_index(t)
        src_dev = self.cur_dev if src_dev is None else src_dev
        if src_dev == d:
            return t
        src, dst = self.current[src_dev], self.current[d]
        src.wait_stream(dst)
        seq = src.tick()
        self._touch(t, False, src, seq, "copy to another device")
        with self._untracked():
            out = t.detach().clone()
        if t.requires_grad:
            out.requires_grad_(True)
        self._fresh(out, d)
        self._touch(out, True, src, seq, "copy to another device")
        dst.wait_stream(src)
        return out

    def move_module(self, module, device):
        with torch.no_grad():
            return module._apply(lambda t: self.to_device(t, device))

    def _index(self, device) -> int:
        if device is None:
            return self.cur_dev
        if isinstance(device, int):
            return device
        d = torch.device(device)
        if d.type == "cpu":
            return 0
        return self.cur_dev if d.index is None else d.index

    def Stream(self, device=None, priority: int = 0) -> FakeStream:
        d = self._index(device)
        if not 0 <= d < self.n:
            raise RuntimeError(f"fake_cuda: no device cuda:{d} (devices={self.n})")
        s = FakeStream(self, d, priority)
        self._streams[s.id] = s
        return s

    def current_stream(self, device=None) -> FakeStream:
        d = self._index(device)
        for s in reversed(self._override):
            if s.index == d:
                return s
        if self._bw:
            tag = self._bw[-1]["now"]
            if tag is not None and tag.index == d:
                return tag
        return self.current[d]

    @contextlib.contextmanager
    def stream(self, s: FakeStream):
        prev_dev, prev = self.cur_dev, self.current[s.index]
        self.current[s.index], self.cur_dev = s, s.index
        try:
            yield s
        finally:
            self.current[s.index], self.cur_dev = prev, prev_dev

    def set_stream(self, s: FakeStream) -> None:
        self.current[s.index], self.cur_dev = s, s.index

    @contextlib.contextmanager
    def device(self, d):
        prev = self.cur_dev
        self.cur_dev = self._index(d)
        try:
            yield
        finally:
            self.cur_dev = prev

    def record_stream(self, t: torch.Tensor, s) -> None:
        pass                      # the caching allocator's bookkeeping: nothing to stand in for

    def is_capturing(self) -> bool:
        return self._capture is not None and self.current_stream().id in self._capture.members

    def CUDAGraph(self) -> FakeGraph:
        g = FakeGraph()
        self.graphs.append(g)
        return g

    @contextlib.contextmanager
    def graph(self, g: FakeGraph, stream: FakeStream, capture_error_mode: str = "thread_local"):
        if self._capture is not None:
            raise CaptureError("fake_cuda: nested graph captures")
        self.synchronize()                        # torch.cuda.graph synchronizes before capturing
        g.reset()
        cap = _Capture(g, stream)
        # Captured work runs at replay, ordered after the replay stream: check
        # the capture's ops among themselves only, and keep no record of them.
        outside, self._records = self._records, {}
        with self.stream(stream):
            self._capture = cap
            ok = False
            try:
                yield g
                ok = True
            finally:
                self._capture = None
                self._records = outside
                self._restore(cap)
            if ok:
                self._check_joined(cap)
                g.captured = True

    def handle(self, s: FakeStream) -> int:
        return s.cuda_stream

    def has_peer_ops(self) -> bool:
        return True

    def require_peer_ops(self) -> None:
        pass

    def peer_link(self, src: int, dst: int, src_stream, dst_stream, staged: bool, staging_bytes: int):
        return FakePeerLink(self, src, dst, src_stream, dst_stream, staged, staging_bytes)

    def launch(self, kernel, grid, args, meta) -> None:
        """A Triton launch runs inside one of the library's registered ops,
        whose schema already told the tracker what it reads and writes (and
        whose replay relaunches it): here it is only listed and run."""
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", repr(kernel))
        if getattr(_local, "in_op", None) is None:
            raise RuntimeError(f"fake_cuda: kernel {name} launched outside a registered op: the "
                               "stand-in reads what a launch writes from its op's schema")
        stream = self.current_stream()
        cap = self._capture if (self._capture and stream.id in self._capture.members) else None
        self.launches.append((name, stream.name, cap is not None))
        if cap is not None:
            cap.graph.tape.append(_Op("kernel", kernel, (grid, tuple(args)), dict(meta), None, "note", name))
        with self._untracked():
            kernel[grid](*args, **meta)

    def synchronize(self, device=None) -> None:
        if self._capture is not None:
            raise CaptureError("fake_cuda: synchronize() while a graph is being captured")
        for s in self._streams.values():
            _merge(self.host_vc, s.vc)

    # --- helpers for the link and tests
    def stream_of(self, handle: int, device: int) -> FakeStream:
        """The stream a raw handle names (-1: the current stream of `device`)."""
        if handle == -1:
            return self.current_stream(device)
        s = self._streams.get(handle)
        if s is None:
            raise RuntimeError(f"fake_cuda: no stream with handle {handle}")
        if s.index != device:
            raise RuntimeError(f"fake_cuda: stream {s.name} does not belong to cuda:{device}")
        return s

    @contextlib.contextmanager
    def on_stream(self, s: FakeStream):
        """Run the ops of the block on `s` (the link's copy engine)."""
        self._override.append(s)
        try:
            yield
        finally:
            self._override.pop()

    def host_sync(self, s: FakeStream) -> None:
        if self._capture is not None and s.id in self._capture.members:
            raise CaptureError("fake_cuda: a host synchronisation (.item(), .tolist(), .cpu(), "
                               "printing a tensor...) on a stream that is being captured: "
                               "operation not permitted when stream is capturing")
        _merge(self.host_vc, s.vc)

    # --- the checker
    @contextlib.contextmanager
    def _untracked(self):
        prev = getattr(_local, "untracked", False)
        _local.untracked = True
        try:
            yield
        finally:
            _local.untracked = prev

    def _touch(self, t: torch.Tensor, write: bool, stream: FakeStream, seq: int, op: str) -> None:
        if not self.check or t.numel() == 0 or t.device.type != "cpu":
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key == 0 or self._dev_of.get(key) == HOST:
            return
        self._keep.setdefault(key, st)
        es = t.element_size()
        lo = t.storage_offset() * es
        span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
        hi = lo + span * es
        recs = self._records.setdefault(key, [])
        for r in recs:
            if r[1] <= lo or r[0] >= hi or r[3] is stream or not (write or r[2]):
                continue
            if stream.vc.get(r[3].id, 0) >= r[4]:
                continue
            raise StreamOrderError(
                f"fake_cuda: {op} on {stream.name} {'writes' if write else 'reads'} bytes "
                f"[{lo}, {hi}) of a {tuple(t.shape)} {t.dtype} buffer that {r[5]} on {r[3].name} "
                f"{'wrote' if r[2] else 'read'} (bytes [{r[0]}, {r[1]})), with no event wait or "
                f"wait_stream ordering the two")
        if write:
            recs[:] = [r for r in recs if not (lo <= r[0] and r[1] <= hi)]
        else:
            recs[:] = [r for r in recs if not (r[3] is stream and not r[2] and r[0] == lo and r[1] == hi)]
        recs.append((lo, hi, write, stream, seq, op))

    def op_stream(self, tensors) -> FakeStream:
        """The stream an op runs on: the link's copy stream inside a copy; in
        backward, the autograd node's; else the current stream of the device
        of its first written (else read) tensor, or of the current device."""
        if self._override:
            return self._override[-1]
        if self._bw and self._bw[-1]["now"] is not None:
            return self._bw[-1]["now"]
        for t in tensors:
            d = self.device_index(t)
            if d is not None:
                return self.current[d]
        return self.current[self.cur_dev]

    def device_index(self, t: torch.Tensor) -> Optional[int]:
        """The device a tensor's memory belongs to: where it was allocated,
        or cuda:0 for memory allocated before the block (the CPU is cuda:0);
        None for host memory (see `host`)."""
        if t.device.type != "cpu" or t.numel() == 0:
            return None
        d = self._dev_of.get(t.untyped_storage().data_ptr(), 0)
        return None if d == HOST else d

    def device_of(self, t: torch.Tensor) -> torch.device:
        if t.numel() and self._dev_of.get(t.untyped_storage().data_ptr()) == HOST:
            return torch.device("cpu")
        d = self.device_index(t)
        return torch.device("cuda", 0 if d is None else d)

    def host(self, t: torch.Tensor) -> torch.Tensor:
        """Mark `t`'s memory as host memory (a CPU batch): no stream owns it."""
        if t.numel():
            self._dev_of[t.untyped_storage().data_ptr()] = HOST
        return t

    def cross_device(self, name: str, reads, writes):
        """(source stream, destination stream) for a copy between two devices."""
        if self._override or self._bw or name not in ("copy_", "_foreach_copy_") or not writes:
            return None
        src = self.device_index(reads[0]) if reads else None
        dst = self.device_index(writes[0])
        if src is None or dst is None or src == dst:
            return None
        return self.current[src], self.current[dst]

    def _fresh(self, t: torch.Tensor, device: int) -> None:
        """A new allocation on `device`: forget what was recorded for its memory."""
        if t.numel() == 0 or t.device.type != "cpu":
            return
        key = t.untyped_storage().data_ptr()
        self._records.pop(key, None)
        self._dev_of[key] = device
        if self._capture is not None:
            self._capture.fresh.add(key)

    def _backup(self, cap: _Capture, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key == 0 or key in cap.fresh or key in cap.backups:
            return
        with self._untracked():
            whole = torch.empty(0, dtype=torch.uint8).set_(st)
            cap.backups[key] = (whole, whole.clone())

    def _restore(self, cap: _Capture) -> None:
        with self._untracked():
            for whole, saved in cap.backups.values():
                whole.copy_(saved)

    def _joined(self, stream: FakeStream, other: FakeStream) -> None:
        """A stream that waits on a capturing stream joins the capture (as in CUDA)."""
        cap = self._capture
        if cap is None or stream.id in cap.members or other.id not in cap.members:
            return
        cap.members[stream.id] = stream
        cap.start[stream.id] = stream.vc.get(stream.id, 0)

    def _check_joined(self, cap: _Capture) -> None:
        for sid, s in cap.members.items():
            if sid != cap.origin.id and s.vc[sid] > cap.start[sid] and \
                    cap.origin.vc.get(sid, 0) < s.vc[sid]:
                raise CaptureError(f"fake_cuda: the capture on {cap.origin.name} ended while "
                                   f"{s.name} had captured work that was not joined back "
                                   "(cudaErrorStreamCaptureUnjoined)")

    def _replay(self, g: FakeGraph) -> None:
        replay_stream = self.current_stream()
        if self._capture is not None:
            raise CaptureError("fake_cuda: replaying a graph inside a capture")
        # A replay runs kernels, below autograd: no graph is recorded, and no
        # view/in-place checks apply.
        with self.on_stream(replay_stream), torch.no_grad(), torch._C._AutoDispatchBelowAutograd():
            for op in g.tape:
                if op.kind == "kernel" or op.mode in ("view", "empty"):
                    continue
                else:
                    # Writes to inputs happen in place; new outputs are copied
                    # into the recorded ones (the graph's static memory).
                    res = op.fn(*op.args, **op.kwargs)
                    for rec, new in zip(op.outs, _returns(res)):
                        if isinstance(rec, list):
                            for r, n in zip(rec, new):
                                r.copy_(n)
                        elif rec is not None:
                            rec.copy_(new)


# ---------------------------------------------------------------- the modes
_HOST_READS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "unique",
               "_unique2", "unique_consecutive", "unique_dim", "allclose"}
_EMPTY = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
# Ops that write arguments their schema does not mark as written: batch norm's
# running statistics (argument positions).
_UNANNOTATED_WRITES = {"native_batch_norm": (3, 4), "_batch_norm_with_update": (3, 4),
                       "cudnn_batch_norm": (3, 4), "miopen_batch_norm": (3, 4)}
# Factories that read only the shape, dtype and device of their tensor arguments.
_META_ONLY = {"empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
              "randint_like", "new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full"}
_HOST_METHODS = {"tolist", "item", "numpy", "__bool__", "__float__", "__int__", "__index__",
                 "__complex__", "__array__", "__format__", "__repr__", "__str__"}


def _returns(out) -> list:
    """An op's results as a list, one entry per schema return."""
    return list(out) if isinstance(out, tuple) else [out]


def fresh_outputs(rets, out, fresh) -> list:
    """Per schema return: the recorded tensor to refresh at replay, or None."""
    ids = {id(t) for t in fresh}
    res = _returns(out)
    if len(rets) == 1 and isinstance(out, list):             # foreach ops: one list return
        return [out] if out and all(id(t) in ids for t in out) else [None]
    return [t if isinstance(t, torch.Tensor) and id(t) in ids else None for t in res]


def _tensors(obj):
    return [t for t in _pytree.tree_leaves(obj) if isinstance(t, torch.Tensor)]


class _Tracker(TorchDispatchMode):
    """Attributes every aten op to its stream and checks the ordering; records
    ops of a capture."""

    def __init__(self, rt: FakeCuda):
        super().__init__()
        self.rt = rt

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rt = self.rt
        if getattr(_local, "untracked", False):
            return func(*args, **kwargs)
        if rt._bw:                        # in backward: the stream of the node being run
            node = torch._C._current_autograd_node()
            frame = rt._bw[-1]
            tag = node.metadata.get(_TAG) if node is not None else None
            if tag is not None and tag is not frame["now"]:
                # Autograd orders a node after the producers of its input
                # gradients, on whatever streams they ran (the caller's
                # streams for the seeds): model backward as internally ordered.
                for prev in frame["used"] or frame["callers"]:
                    tag.wait_stream(prev)
                frame["now"] = tag
            if frame["now"] is not None:
                frame["used"].add(frame["now"])
        schema = func._schema
        name = schema.name.split("::")[-1]
        reads, writes = [], []
        rets = schema.returns
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in rets)
        hidden = _UNANNOTATED_WRITES.get(name, ())
        values = list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]
        for k, (arg, val) in enumerate(zip(schema.arguments, values)):
            written = (arg.alias_info is not None and arg.alias_info.is_write) or k in hidden
            if view and not written:
                continue                  # a view reads no data
            for t in _tensors(val):
                if written:
                    writes.append(t)
                elif name not in _META_ONLY:
                    reads.append(t)
        op = f"aten.{name}"
        cross = rt.cross_device(name, reads, writes)
        stream = cross[0] if cross else rt.op_stream(writes or reads)
        if cross:
            # torch copies between devices on the source device's current
            # stream, synchronised with the destination's current stream.
            stream.wait_stream(cross[1])
        cap = rt._capture if (rt._capture and stream.id in rt._capture.members) else None
        if name in _HOST_READS:
            rt.host_sync(stream)          # raises while capturing, as CUDA does
        seq = stream.tick()
        for t in reads:
            rt._touch(t, False, stream, seq, op)
        for t in writes:
            rt._touch(t, True, stream, seq, op)
            if cap is not None:
                rt._backup(cap, t)
        # A registered op of the library: its Triton launches run inside it
        # (what they write is what the schema says the op writes).
        prev = getattr(_local, "in_op", None)
        _local.in_op = op if schema.name.startswith("sampa_fused::") else prev
        try:
            out = func(*args, **kwargs)
        finally:
            _local.in_op = prev
        mode = "view" if view else ("inplace" if writes else ("empty" if name in _EMPTY else "functional"))
        # Outputs that alias no input are new allocations (also of ops that
        # write an input, as batch norm writes its running statistics).
        fresh = [] if view else [t for r, t in zip(rets, _returns(out))
                                 if r.alias_info is None and isinstance(t, torch.Tensor)]
        if not view and len(rets) == 1 and isinstance(out, (list, tuple)) and rets[0].alias_info is None:
            fresh = _tensors(out)                 # a list of tensors (foreach ops)
        for t in fresh:
            rt._fresh(t, stream.index)
            rt._touch(t, True, stream, seq, op)
        if cap is not None:
            cap.graph.tape.append(_Op("op", func, args, kwargs, fresh_outputs(rets, out, fresh), mode, op))
        if name in _HOST_READS:
            rt.host_sync(stream)
        if cross:
            cross[1].wait_stream(stream)
        return out


class _Tagger(TorchFunctionMode):
    """Tags each autograd node with the stream of its forward op (CUDA runs a
    node's backward there), and syncs backward with its caller's streams."""

    def __init__(self, rt: FakeCuda):
        super().__init__()
        self.rt = rt

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rt = self.rt
        name = getattr(func, "__name__", "")
        if func in (torch.Tensor.backward, torch.autograd.backward):
            return self._backward(func, args, kwargs)
        if name in _HOST_METHODS and args and isinstance(args[0], torch.Tensor) \
                and not getattr(_local, "untracked", False):
            t = args[0]
            s = rt.op_stream([t])
            seq = s.tick()
            rt._touch(t, False, s, seq, f"host read ({name})")
            rt.host_sync(s)
        out = func(*args, **kwargs)
        if not rt._bw and not getattr(_local, "untracked", False):
            for t in _tensors(out):
                fn = t.grad_fn
                if fn is not None and _TAG not in fn.metadata:
                    fn.metadata[_TAG] = rt.current_stream()
        return out

    def _backward(self, func, args, kwargs):
        rt = self.rt
        callers = [rt.current_stream(d) for d in range(rt.n)]
        frame = {"now": None, "used": set(), "callers": callers}
        rt._bw.append(frame)
        try:
            return func(*args, **kwargs)
        finally:
            rt._bw.pop()
            # CUDA autograd: the caller's current stream waits for the streams backward ran on.
            for s in frame["used"]:
                callers[s.index].wait_stream(s)


@contextlib.contextmanager
def fake_cuda(devices: int = 1, check: bool = True):
    """Run the block as on a machine with `devices` GPUs (see the module doc).
    Yields the runtime: `.launches`, `.graphs`, `.default`, `.Stream()`."""
    if getattr(_local, "rt", None) is not None:
        raise RuntimeError("fake_cuda() contexts do not nest")
    rt = FakeCuda(devices, check)
    prev = _cuda._rt
    _cuda._rt = rt
    _local.rt = rt
    try:
        with _Tagger(rt), _Tracker(rt):
            yield rt
    finally:
        _cuda._rt = prev
        _local.rt = None
