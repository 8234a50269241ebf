"""pytest-benchmark timings of the fused Triton kernels and of the elementwise
part of one SAMPa step (fused vs foreach vs the per-parameter loop).

    python -m pytest bench/test_bench_kernels.py --benchmark-only
    python -m pytest bench/test_bench_kernels.py --benchmark-json bench/results/kernels-bench.json

On CUDA: P = 2^24 fp32 elements per kernel and the ResNet-56 parameter list.
Without CUDA the kernels run in Triton's interpreter at small sizes, so the
numbers only show that the benchmarks run. Each benchmark checks its result
against the torch reference once; there are no timed assertions.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")    # before triton is imported
    torch.set_num_threads(1)
sys.path.insert(0, str(HERE))
pytest.importorskip("triton")
pytest.importorskip("pytest_benchmark")

import bench_kernels as bk  # noqa: E402

bk._setup_env("cuda" if CUDA else "cpu")


DEV = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
P = (1 << 24) if CUDA else 20_011
LIST = "resnet56" if CUDA else "tiny"


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _timed(benchmark, fn, rounds):
    def call():
        fn()
        _sync()
    fn()
    _sync()
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1 if not CUDA else 3)


@pytest.fixture(scope="module")
def backend():
    return bk.Backend("triton")


@pytest.mark.parametrize("kernel", list(bk.KERNEL_PASSES))
def test_kernel(benchmark, backend, kernel):
    calls, bufs = bk.kernel_calls(P, DEV, backend)
    # Correct before timed: one call against the torch backend on a copy.
    ref_calls, ref_bufs = bk.kernel_calls(P, DEV, bk.Backend("torch"))
    out, ref = calls[kernel](), ref_calls[kernel]()
    if kernel == "check":
        assert bool(out[0]) and bool(ref[0])
        assert abs(out[1].item() - ref[1].item()) <= 1e-5 * ref[1].item()
    else:
        for b, r in zip(bufs, ref_bufs):
            torch.testing.assert_close(b.x, r.x, rtol=1e-5, atol=1e-6)
    benchmark.extra_info.update(P=P, bytes=bk.KERNEL_PASSES[kernel] * P * 4, device=str(DEV))
    _timed(benchmark, calls[kernel], rounds=50 if CUDA else 3)


def test_copy_same_bytes(benchmark):
    """The yardstick: a device-to-device copy of P elements (2P passes' worth of bytes)."""
    src = torch.randn(P, device=DEV)
    dst = torch.empty_like(src)
    benchmark.extra_info.update(P=P, bytes=2 * P * 4, device=str(DEV))
    _timed(benchmark, lambda: dst.copy_(src), rounds=50 if CUDA else 5)
    assert torch.equal(dst, src)


@pytest.mark.parametrize("method", bk.STEP_METHODS)
def test_sampa_step_elementwise(benchmark, backend, method):
    shapes = bk.param_shapes(LIST)
    n = sum(bk.numel(s) for s in shapes)
    gen = torch.Generator(device=DEV).manual_seed(3)
    init = [torch.randn(n, device=DEV, generator=gen) * s for s in (1.0, 1e-2, 1e-3, 1e-3, 1e-3)]
    make = {"fused": lambda: bk.FlatStep(shapes, DEV, backend),
            "flat": lambda: bk.FlatStep(shapes, DEV, bk.Backend("torch")),
            "foreach": lambda: bk.ForeachStep(shapes, DEV),
            "loop": lambda: bk.LoopStep(shapes, DEV)}
    st, ref = make[method](), bk.FlatStep(shapes, DEV, bk.Backend("torch"))
    for s in (st, ref):
        s.load(*init)
        s.step()
    torch.testing.assert_close(st.flat_x(), ref.flat_x(), rtol=1e-5, atol=1e-6)
    benchmark.extra_info.update(list=LIST, params=n, tensors=len(shapes), device=str(DEV))
    _timed(benchmark, st.step, rounds=50 if CUDA else 3)
