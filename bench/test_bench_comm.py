"""pytest-benchmark entry points for the peer engine's communication, and a
smoke run of bench_comm.py. Timings are reported, never asserted; GPU parts
skip without CUDA.

    python -m pytest bench/test_bench_comm.py --benchmark-only
"""
import json
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_comm  # noqa: E402
from sampa_fused._ext import load_extension  # noqa: E402
from sampa_fused.engines.peer import BucketExchange  # noqa: E402
from sampa_fused.flat import build_slabs, plan_layout_py  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
torch.set_num_threads(1)  # steadier CPU timings on a shared machine


def _ext_or_skip(need_cuda=False):
    ext = load_extension(required=False)
    if ext is None:
        pytest.skip("sampa_fused._C is not built")
    if need_cuda and not ext.has_cuda():
        pytest.skip("sampa_fused._C is built without CUDA")
    return ext


# ---------------------------------------------------------------- CPU
@pytest.mark.parametrize("impl", ["extension", "python"])
def test_bench_plan_layout(benchmark, impl):
    """Laying out 20k tensors over 4 slabs (once per optimizer construction)."""
    rng = random.Random(0)
    n = 20_000
    args = ([rng.randrange(1, 10_000) for _ in range(n)], [rng.randrange(4) for _ in range(n)],
            [rng.choice([8, 16, 32]) for _ in range(n)])
    fn = _ext_or_skip().plan_layout if impl == "extension" else plan_layout_py
    out = benchmark(fn, *args)
    assert tuple(out) == plan_layout_py(*args)


@pytest.mark.parametrize("hooks", ["armed", "none"])
def test_bench_backward_with_bucket_hooks(benchmark, hooks):
    """The Python cost of the overlap: one backward of a 64-layer MLP (130
    parameters) with the bucket hooks armed (sends are no-ops) or without."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(64)])
    params = list(model.parameters())
    slabs = build_slabs(params, [0] * len(params))
    flat = slabs[0].empty()
    slabs[0].bind_grad(params, flat)
    sent = []
    ex = BucketExchange(params, slabs, 4096, lambda s, a, b: sent.append(b - a)) \
        if hooks == "armed" else None
    x = torch.randn(8, 32)

    def one():
        if ex is not None:
            ex.start()
        model(x).sum().backward()
        if ex is not None:
            ex.flush()
    benchmark(one)
    if ex is not None:
        assert sum(sent) % flat.numel() == 0 and sent
        ex.close()


def test_bench_comm_cpu_smoke(tmp_path):
    """bench_comm.py --cpu end to end at one size: JSON and plot written."""
    out = tmp_path / "cpu-comm.json"
    res = bench_comm.main(["--cpu", "--min-size", "64K", "--max-size", "64K", "--out", str(out),
                           "--quiet"])
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert {(r["method"], r["direction"]) for r in saved["copies"] + saved["sendrecv"]} == \
        {("copy_", "uni"), ("sendrecv", "uni"), ("sendrecv", "bi")}
    for r in saved["copies"] + saved["sendrecv"]:
        assert r["bytes"] == 65536 and r["time_us"] > 0
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * (2 if r["direction"] == "bi" else 1))
    assert res["skipped"]["peer_step"]


def test_bench_comm_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="--cpu"):
        bench_comm.main(["--quiet"])


# ---------------------------------------------------------------- GPU
def _pair():
    return ("cuda:0", "cuda:1") if torch.cuda.device_count() > 1 else ("cuda:0", "cuda:0")


@cuda
@pytest.mark.parametrize("method", ["link", "memcpy", "copy_"])
def test_bench_copy_64mb(benchmark, method):
    ext = _ext_or_skip(need_cuda=True)
    a, b = (torch.device(d) for d in _pair())
    n = (64 << 20) // 4
    src, dst = torch.randn(n, device=a), torch.empty(n, device=b)
    s0, s1 = torch.cuda.Stream(a), torch.cuda.Stream(b)
    link = ext.PeerLink(a.index, b.index, s0.cuda_stream, s1.cuda_stream, False, 8 << 20)

    def one():
        if method == "link":
            link.copy(dst, src, 0, n, -1)
            link.finish(-1, -1)
        elif method == "memcpy":
            ext.memcpy_async(dst, src, -1)
        else:
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
    benchmark(one)
    assert torch.equal(dst.cpu(), src.cpu())


@cuda
@pytest.mark.parametrize("variant", ["overlap", "no_overlap", "no_exchange"])
def test_bench_peer_step_resnet56(benchmark, variant):
    _ext_or_skip(need_cuda=True)
    from models_bench import MODELS, cross_entropy
    from sampa_fused import SAMPa
    spec = MODELS["resnet56"]
    a = torch.device(_pair()[0])
    torch.manual_seed(0)
    model = spec.make().to(a)
    opt = SAMPa(model, cross_entropy, torch.optim.SGD, rho=0.05, lam=0.5, lr=0.05, momentum=0.9,
                engine="peer", devices=_pair(), overlap=variant != "no_overlap")
    opt.engine.exchange = variant != "no_exchange"
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(spec.batch, *spec.input_shape, generator=gen).to(a),
             torch.randint(0, spec.classes, (spec.batch,), generator=gen).to(a)) for _ in range(4)]
    for i in range(5):
        opt.step(data[i % 4])
    it = iter(range(10 ** 9))

    def one():
        opt.step(data[next(it) % 4])
        torch.cuda.synchronize()
    benchmark.pedantic(one, rounds=30, iterations=1)
    opt.engine.close()
