"""Every CUDA runtime call of the engines and the Triton launches, in one place.

The engines and backends never call `torch.cuda` directly: they call these
functions, which forward to `torch.cuda` (and to the extension's PeerLink).
Tests swap the runtime for the stand-in of `tests/fake_cuda.py`, which runs
the same engine code on CPU tensors and checks the stream ordering, so the
GPU paths' own code runs in CI.

Logical and physical devices: engines think in CUDA devices ("cuda:0",
"cuda:1"); `physical(d)` is where tensors for `d` are allocated (the same
device on a real GPU, the CPU under the stand-in) and `logical(d)` maps a
tensor's device back.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import torch


class TorchCuda:
    """The real runtime: torch.cuda and the compiled extension."""

    fake = False

    def available(self) -> bool:
        return torch.cuda.is_available()

    def device_count(self) -> int:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def is_cuda(self, device: torch.device) -> bool:
        return torch.device(device).type == "cuda"

    def logical(self, device: torch.device) -> torch.device:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def physical(self, device: torch.device) -> torch.device:
        return torch.device(device)

    def current_device(self) -> int:
        return torch.cuda.current_device()

    def device_of(self, t: torch.Tensor) -> torch.device:
        """The (logical) device a tensor lives on."""
        return t.device

    def to_device(self, t: torch.Tensor, device) -> torch.Tensor:
        """A copy of `t` on `device` (a logical device)."""
        return t.to(device, non_blocking=True)

    def move_module(self, module, device):
        return module.to(device)

    def Stream(self, device, priority: int = 0):
        return torch.cuda.Stream(device=device, priority=priority)

    def current_stream(self, device):
        return torch.cuda.current_stream(device)

    def stream(self, s):
        return torch.cuda.stream(s)

    def set_stream(self, s) -> None:
        torch.cuda.set_stream(s)

    def device(self, d):
        return torch.cuda.device(d)

    def record_stream(self, t: torch.Tensor, s) -> None:
        if t.is_cuda:
            t.record_stream(s)

    def is_capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def CUDAGraph(self):
        return torch.cuda.CUDAGraph()

    def graph(self, g, stream, capture_error_mode: str = "thread_local"):
        return torch.cuda.graph(g, stream=stream, capture_error_mode=capture_error_mode)

    def handle(self, s) -> int:
        return s.cuda_stream

    def has_peer_ops(self) -> bool:
        from ._ext import has_cuda_ops
        return has_cuda_ops()

    def require_peer_ops(self) -> None:
        """Raise, saying how to build it, unless the extension's CUDA part is here."""
        from . import _ext
        ext = _ext.load_extension(required=True, feature="engine='peer'")
        if not ext.has_cuda():
            raise RuntimeError("engine='peer' needs the CUDA part of the extension sampa_fused._C, "
                               "which was built without it (CPU-only torch or no nvcc at build "
                               "time). Rebuild with CUDA_HOME set: `pip install "
                               "--no-build-isolation -e .` (SAMPA_FUSED_BUILD=cuda)")

    def peer_link(self, src: int, dst: int, src_stream, dst_stream, staged: bool, staging_bytes: int):
        from ._ext import load_extension
        ext = load_extension(required=True, feature="engine='peer'")
        return ext.PeerLink(src, dst, self.handle(src_stream), self.handle(dst_stream), staged,
                            staging_bytes)

    def launch(self, kernel, grid, args: Sequence[Any], meta: dict) -> None:
        kernel[grid](*args, **meta)

    def synchronize(self, device=None) -> None:
        torch.cuda.synchronize(device)


_rt: Any = TorchCuda()


def runtime():
    """The runtime in use (the stand-in swaps it)."""
    return _rt


def _forward(name: str) -> Callable:
    def call(*args, **kwargs):
        return getattr(_rt, name)(*args, **kwargs)
    call.__name__ = name
    call.__doc__ = getattr(TorchCuda, name).__doc__
    return call


available = _forward("available")
device_count = _forward("device_count")
is_cuda = _forward("is_cuda")
logical = _forward("logical")
physical = _forward("physical")
current_device = _forward("current_device")
to_device = _forward("to_device")
device_of = _forward("device_of")
move_module = _forward("move_module")
Stream = _forward("Stream")
current_stream = _forward("current_stream")
stream = _forward("stream")
set_stream = _forward("set_stream")
device = _forward("device")
record_stream = _forward("record_stream")
is_capturing = _forward("is_capturing")
CUDAGraph = _forward("CUDAGraph")
graph = _forward("graph")
handle = _forward("handle")
has_peer_ops = _forward("has_peer_ops")
require_peer_ops = _forward("require_peer_ops")
peer_link = _forward("peer_link")
launch = _forward("launch")
synchronize = _forward("synchronize")


def on_device(d: Optional[torch.device]):
    """`device(d)` for a CUDA device, a no-op context otherwise."""
    if d is not None and is_cuda(d):
        return device(d)
    return contextlib.nullcontext()
