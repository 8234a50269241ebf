"""pytest-benchmark entry points for the peer engine's communication, and
smoke runs of bench_comm.py. Timings are reported, never asserted; GPU parts
skip without CUDA.

    python -m pytest bench/test_bench_comm.py --benchmark-only
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from sampa_fused._ext import load_extension  # noqa: E402
from sampa_fused.engines.buckets import BucketExchange  # noqa: E402
from sampa_fused.flat import build_slabs, plan_layout  # noqa: E402

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
def test_bench_plan_layout(benchmark):
    """Laying out 20k tensors over 4 slabs (once per optimizer construction)."""
    rng = random.Random(0)
    n = 20_000
    args = ([rng.randrange(1, 10_000) for _ in range(n)], [rng.randrange(4) for _ in range(n)],
            [rng.choice([8, 16, 32]) for _ in range(n)])
    out = benchmark(plan_layout, *args)
    assert out == plan_layout(*args)


@pytest.mark.parametrize("hooks", ["armed", "none"])
def test_bench_backward_with_bucket_hooks(benchmark, hooks):
    """The Python cost of the overlap: one backward of a 64-layer MLP (130
    parameters) with the bucket hooks armed (sends are no-ops) or without."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(64)])
    params = list(model.parameters())
    slabs = build_slabs(params, [0] * len(params))
    flat = slabs[0].zeros()
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


def test_bench_comm_gloo_smoke(tmp_path):
    """bench_comm.py end to end: 2 gloo ranks, all_reduce and sendrecv at 3
    sizes, checked data, JSON and plot (tests/test_comm_bench.py covers more)."""
    out = tmp_path / "cpu-comm.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, str(HERE / "bench_comm.py"), "--device", "cpu",
                        "--backend", "gloo", "--nproc", "2", "--ops",
                        "all_reduce,sendrecv", "-b", "1K", "-e", "64K", "-f", "8", "-n", "5",
                        "--json", str(out), "--plot", str(tmp_path / "cpu-comm.png")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    saved = json.loads(out.read_text())
    assert (tmp_path / "cpu-comm.png").stat().st_size > 0
    for t in saved["tables"].values():
        assert [r["size"] for r in t["rows"]] == [1024, 8192, 65536]
        for r in t["rows"]:
            assert r["out_of_place"]["wrong"] == r["in_place"]["wrong"] == 0
            assert r["out_of_place"]["busbw"] == pytest.approx(r["out_of_place"]["algbw"]
                                                               * t["bus_factor"])


# ---------------------------------------------------------------- GPU
def _pair():
    return ("cuda:0", "cuda:1") if torch.cuda.device_count() > 1 else ("cuda:0", "cuda:0")


@cuda
@pytest.mark.parametrize("method", ["link", "memcpy", "copy_"])
def test_bench_copy_64mb(benchmark, method):
    """64 MB per call. The link runs as bench_comm.py's peer_copy does: the
    producer/owner and consumer are non-default streams (the link's waits on
    the null stream were skipped before the .cu fix), and each call ends with
    the owner waiting for the consumer, so the synchronize covers the copy."""
    ext = _ext_or_skip(need_cuda=True)
    a, b = (torch.device(d) for d in _pair())
    n = (64 << 20) // 4
    src, dst = torch.randn(n, device=a), torch.empty(n, device=b)
    s0, s1 = torch.cuda.Stream(a, priority=-1), torch.cuda.Stream(b, priority=-1)
    link = ext.PeerLink(a.index, b.index, s0.cuda_stream, s1.cuda_stream, False, 8 << 20)
    owner, consumer = torch.cuda.Stream(a), torch.cuda.Stream(b)

    def one():
        if method == "link":
            link.begin(consumer.cuda_stream)
            link.copy(dst, src, 0, n, owner.cuda_stream)
            link.finish(consumer.cuda_stream, owner.cuda_stream)
            owner.wait_stream(consumer)
        elif method == "memcpy":
            ext.memcpy_async(dst, src, owner.cuda_stream)
        else:
            with torch.cuda.stream(owner):
                dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
    benchmark(one)
    assert torch.equal(dst.cpu(), src.cpu())


@cuda
def test_bench_comm_quick_gpu(tmp_path):
    """The GPU check's command: one process, peer_copy and copy on cuda:0, a
    peer-engine step, the targets in the JSON (reported, not asserted)."""
    _ext_or_skip(need_cuda=True)
    out = tmp_path / "quick.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, str(HERE / "bench_comm.py"), "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    js = json.loads(out.read_text())
    for key in ("device_name", "torch", "triton", "cuda", "targets"):
        assert key in js
    assert set(js["targets"]) == {"peer_copy_vs_memcpy", "peer_step_exposed_fraction"}
    for t in js["targets"].values():
        assert set(t) >= {"value", "goal", "met"}
    assert all(h["wrong"] == 0 for t in js["tables"].values() for r in t["rows"]
               for h in (r["out_of_place"],))


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
