"""The peer engine (engine="peer"): bucketing and hook logic and the refusals
on CPU; on CUDA, the extension's copies and whole trajectories against the
serial engine (devices ("cuda:0", "cuda:1") where there are two GPUs,
("cuda:0", "cuda:0") where there is one)."""
import collections
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fake_cuda import fake_cuda

from sampa_fused import SAM, SAMPa, _ext
from sampa_fused.batching import MicroBatches
from sampa_fused.engines.buckets import BucketExchange, plan_buckets
from sampa_fused.engines.peer import _to_device
from sampa_fused.flat import build_slabs

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


class OddNet(nn.Module):
    """Parameter sizes that are no multiple of anything; an optional unused branch."""

    def __init__(self, d_in=13, hidden=37, classes=7, unused=False, bn=False):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.bn = nn.BatchNorm1d(hidden) if bn else nn.Identity()
        self.fc2 = nn.Linear(hidden, 29)
        self.fc3 = nn.Linear(29, classes)
        self.spare = nn.Linear(5, 3) if unused else None

    def forward(self, x, extra=False):
        out = self.fc3(F.relu(self.fc2(F.relu(self.bn(self.fc1(x))))))
        if extra:              # the spare branch: used by some batches only
            out = out + F.pad(self.spare(x[:, :5]), (0, out.shape[1] - 3))
        return out


def ce(model, batch):
    x, y, *extra = batch
    return F.cross_entropy(model(x, *extra), y)


def batches(n, device, size=24, d_in=13, classes=7, seed=1, alternate=False):
    """Random batches; alternate=True adds a flag that switches the spare
    branch on every other batch (a gradient that is there, then not)."""
    g = torch.Generator().manual_seed(seed)
    out = [(torch.randn(size, d_in, generator=g).to(device),
            torch.randint(0, classes, (size,), generator=g).to(device)) for _ in range(n)]
    return [b + (i % 3 == 0,) for i, b in enumerate(out)] if alternate else out


# ------------------------------------------------------------------ buckets (CPU)
def _layout(shapes, dtype=torch.float32):
    ts = [torch.empty(s, dtype=dtype) for s in shapes]
    (slab,) = build_slabs(ts, [0] * len(ts))
    return slab


@pytest.mark.parametrize("bucket_elems", [1, 7, 100, 333, 10 ** 6])
def test_plan_buckets_cover_buffer_in_backward_order(bucket_elems):
    gen = torch.Generator().manual_seed(bucket_elems)
    shapes = [tuple(int(v) for v in torch.randint(1, 40, (int(torch.randint(1, 3, (1,), generator=gen)),),
                                                  generator=gen)) for _ in range(23)]
    slab = _layout(shapes)
    buckets = plan_buckets([slab], 4 * bucket_elems)            # fp32: 4 bytes an element
    bounds = [(b.start, b.end) for b in buckets]
    bucket_of = [next(j for j, b in enumerate(buckets) if i in b.params) for i in slab.index]
    # contiguous, no gaps, first bucket = end of the buffer
    assert bounds[0][1] == slab.numel and bounds[-1][0] == 0
    for (s0, e0), (s1, e1) in zip(bounds, bounds[1:]):
        assert e1 == s0 and s1 < e1 or (s1 == e1 == s0)
    for k, (off, shape) in enumerate(zip(slab.offsets, slab.shapes)):
        s, e = bounds[bucket_of[k]]
        assert s <= off and off + shape.numel() <= e
    assert bucket_of == sorted(bucket_of, reverse=True)
    # every bucket but the lowest holds at least bucket_elems, and no more
    # than needed: without its lowest tensor it would be too small
    for b, (s, e) in enumerate(bounds[:-1]):
        assert e - s >= bucket_elems
        members = [k for k in range(len(shapes)) if bucket_of[k] == b]
        if len(members) > 1:
            assert e - slab.offsets[min(members) + 1] < bucket_elems
    if bucket_elems >= slab.numel:
        assert bounds == [(0, slab.numel)]


def test_plan_buckets_rejects_zero():
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([_layout([(4,)])], 0)


class Side:
    """One side of an exchange on CPU: a model whose gradients are views into
    flat buffers, and a destination buffer that `send` copies ranges into at
    once (so a range sent before its gradients were final shows up)."""

    def __init__(self, model, bucket_bytes):
        self.model = model
        self.params = [p for p in model.parameters()]
        self.slabs = build_slabs(self.params, [0] * len(self.params))
        self.g = [s.zeros() for s in self.slabs]
        self.dst = [torch.full((s.numel,), float("nan")) for s in self.slabs]
        for s, g in zip(self.slabs, self.g):
            s.bind_grad(self.params, g)
        self.log = []
        self.in_backward = False
        self.ex = BucketExchange(self.params, self.slabs, bucket_bytes, self.send)

    def send(self, s, start, end):
        self.log.append((s, start, end, self.in_backward))
        self.dst[s][start:end].copy_(self.g[s][start:end])

    def backward(self, loss):
        self.in_backward = True
        try:
            loss.backward()
        finally:
            self.in_backward = False


@pytest.mark.parametrize("bucket_bytes", [4, 256, 1000, 1 << 20])
def test_exchange_sends_each_bucket_once_as_backward_produces_it(bucket_bytes):
    torch.manual_seed(3)
    side = Side(nn.Sequential(nn.Linear(13, 37), nn.ReLU(), nn.Linear(37, 29), nn.ReLU(),
                              nn.Linear(29, 7)), bucket_bytes)
    x = torch.randn(9, 13)
    for _ in range(2):                       # twice: the exchange re-arms
        side.log.clear()
        for g in side.g:
            g.zero_()
        side.ex.start()
        side.backward(side.model(x).square().mean())
        side.ex.flush()
        n_buckets = len(side.ex.bounds[0])
        assert len(side.log) == n_buckets
        assert all(during for *_, during in side.log)        # nothing left for the flush
        assert sorted(r[1:3] for r in side.log) == sorted(side.ex.bounds[0])
        # sent when complete: the copy taken at send time equals the final gradient
        assert torch.equal(side.dst[0], side.g[0])
        assert side.g[0].abs().sum() > 0
    if n_buckets > 1:                        # the first layer comes last in backward
        assert side.log[-1][1] == 0


def test_exchange_flushes_unused_and_frozen_and_resends_reaccumulated():
    torch.manual_seed(4)
    model = OddNet(unused=True)
    model.fc2.bias.requires_grad_(False)     # frozen at construction: sent at flush
    side = Side(model, 64)
    x = torch.randn(6, 13)
    side.ex.start()
    side.backward(ce(model, (x, torch.randint(0, 7, (6,)))))
    late_before = len(side.log)
    side.ex.flush()
    late = side.log[late_before:]
    assert late and not any(during for *_, during in late)
    spare = [k for k, i in enumerate(side.slabs[0].index) if side.params[i] is model.spare.weight]
    assert spare
    assert torch.equal(side.dst[0], side.g[0])
    # a parameter that accumulates again after its bucket went out (two
    # backward passes while armed, as reentrant checkpointing does) is resent
    side.log.clear()
    for g in side.g:
        g.zero_()
    side.ex.start()
    side.backward(model(x).sum())
    side.backward(model(x).pow(2).mean())
    side.ex.flush()
    assert torch.equal(side.dst[0], side.g[0])
    assert any(not during for *_, during in side.log)


def test_exchange_unarmed_sends_nothing_and_close_removes_hooks():
    torch.manual_seed(5)
    side = Side(OddNet(), 128)
    x = torch.randn(4, 13)
    side.backward(side.model(x).sum())       # never armed
    assert side.log == []
    side.ex.start()
    side.ex.close()
    side.backward(side.model(x).sum())
    assert side.log == [] and not side.ex.armed
    side.ex.send_all()
    assert side.log == [(0, 0, side.slabs[0].numel, False)]


def test_to_device_keeps_structure():
    Pair = collections.namedtuple("Pair", "x y")
    t = torch.randn(3, 2)
    batch = {"a": Pair(t, 7), "b": [t, "tag"], "c": MicroBatches([(t, t)])}
    out = _to_device(batch, torch.device("cpu"), torch.device("meta"), None)
    assert isinstance(out["a"], Pair) and out["a"].y == 7 and out["a"].x.device.type == "meta"
    assert out["b"][1] == "tag" and out["b"][0].shape == (3, 2)
    assert isinstance(out["c"], MicroBatches) and out["c"][0][0].device.type == "meta"
    # tensors elsewhere than the source device are left alone
    assert _to_device(t, torch.device("meta"), torch.device("meta"), None) is t


# ------------------------------------------------------------------ refusals (CPU)
def _make(cls=SAMPa, **kw):
    model = OddNet()
    args = dict(rho=0.05, lr=0.1, momentum=0.9, backend="torch")
    if cls is SAMPa:
        args["lam"] = 0.3
    args.update(kw)
    return cls(model, ce, torch.optim.SGD, **args)


def test_refuses_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="engine='peer' needs CUDA devices"):
        _make(engine="peer", devices=("cuda:0", "cuda:1"))
    with pytest.raises(RuntimeError, match="needs CUDA"):
        _make(engine="peer")


def test_refuses_sam():
    with pytest.raises(NotImplementedError, match="SAM"):
        _make(SAM, engine="peer")


@pytest.mark.parametrize("kw,err,match", [
    (dict(bucket_bytes=0), ValueError, "bucket_bytes"),
    (dict(bucket_bytes=2.5), ValueError, "bucket_bytes"),
    (dict(overlap="yes"), TypeError, "overlap"),
    (dict(staged=1), TypeError, "staged"),
    (dict(devices="cuda:0"), ValueError, "pair"),
    (dict(devices=("cuda:0",)), ValueError, "pair"),
    (dict(devices=("cpu", "cpu")), ValueError, "two CUDA devices"),
    (dict(devices=("cuda:0", "nonsense")), ValueError, "not a device"),
])
def test_bad_options(kw, err, match):
    with pytest.raises(err, match=match):
        _make(engine="peer", **kw)


def test_refuses_extension_without_cuda_part(monkeypatch):
    class CpuOnly:
        @staticmethod
        def has_cuda():
            return False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "load_extension", lambda **kw: CpuOnly)
    with pytest.raises(RuntimeError, match="without"):
        _make(engine="peer", devices=("cuda:0", "cuda:0"))


def test_refuses_missing_extension(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "_ext", None)
    monkeypatch.setattr(_ext, "_error", ImportError("no module named sampa_fused._C"))
    with pytest.raises(RuntimeError, match="no-build-isolation"):
        _make(engine="peer", devices=("cuda:0", "cuda:0"))


# ------------------------------------------------- the engine on CPU, under the stand-in CUDA
@pytest.fixture
def simulated_cuda():
    """PeerEngine on CPU under tests/fake_cuda.py (one device: both engine
    devices are cuda:0): the engine's own code, with stream ordering checked."""
    with fake_cuda(devices=1) as rt:
        yield rt


def _replicas_equal(opt):
    (ra, rb) = opt.engine.replicas
    for ba, bb in zip(ra.slabs, rb.slabs):
        assert torch.equal(ba.x, bb.x) and torch.equal(ba.gy, bb.gy)
        assert ba.state.keys() == bb.state.keys()
        for n in ba.state:
            assert torch.equal(ba.state[n], bb.state[n]), n
        assert ba.x.data_ptr() != bb.x.data_ptr()


@pytest.mark.parametrize("base,kw,engine_kw,model_kw", [
    (torch.optim.SGD, dict(rho=0.05, lam=0.3, lr=0.05, momentum=0.9, nesterov=True,
                           weight_decay=1e-3), dict(bucket_bytes=200), dict(bn=True, unused=True)),
    (torch.optim.AdamW, dict(rho=0.02, lam=0.5, lr=1e-3, weight_decay=1e-2),
     dict(overlap=False), dict(unused=True)),
    (torch.optim.SGD, dict(rho=0.1, lam=0.0, lr=0.1, momentum=0.5, accumulation_steps=3),
     dict(bucket_bytes=64, staged=True), dict(unused=True)),
])
def test_engine_follows_serial_with_simulated_cuda(simulated_cuda, base, kw, engine_kw, model_kw):
    torch.manual_seed(0)
    model = OddNet(**model_kw)
    model_s = copy.deepcopy(model)
    o_p = SAMPa(model, ce, base, engine="peer", backend="torch", **engine_kw, **kw)
    o_s = SAMPa(model_s, ce, base, engine="serial", backend="torch", **kw)
    assert o_p.engine.ymodel.module is not o_p.model and len(o_p.engine.replicas) == 2
    for batch in batches(6, "cpu", alternate=model_kw.get("unused", False)):
        torch.testing.assert_close(o_p.step(batch), o_s.step(batch), rtol=1e-6, atol=1e-7)
        _replicas_equal(o_p)
    for p, q in zip(model.parameters(), model_s.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for a, b in zip(model.buffers(), model_s.buffers()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-6, atol=1e-7)
    ab, ba = simulated_cuda.links
    assert ab.steps == ba.steps == 6
    if engine_kw.get("overlap", True):          # bucket by bucket, not whole buffers
        assert len(ab.copies) > 6 and len(ba.copies) > 6
    else:
        assert len(ab.copies) == len(ba.copies) == 6
    # the y-model on B computes with B's y buffer; A's private y-model is not used
    (ra, rb) = o_p.engine.replicas
    yp = next(o_p.engine.ymodel.module.parameters())
    assert any(yp.data_ptr() == b.y.data_ptr() for b in rb.slabs)


def test_engine_add_param_group_and_sync_with_simulated_cuda(simulated_cuda):
    torch.manual_seed(1)
    model = OddNet()
    model.fc3.requires_grad_(False)
    model_s = copy.deepcopy(model)
    kw = dict(rho=0.05, lam=0.3, lr=0.05, momentum=0.9, backend="torch")
    o_p = SAMPa(model, ce, torch.optim.SGD, engine="peer", bucket_bytes=100, **kw,
                params=[p for p in model.parameters() if p.requires_grad])
    o_s = SAMPa(model_s, ce, torch.optim.SGD, engine="serial", **kw,
                params=[p for p in model_s.parameters() if p.requires_grad])
    for i, batch in enumerate(batches(6, "cpu")):
        if i == 2:
            for m, o in ((model, o_p), (model_s, o_s)):
                m.fc3.requires_grad_(True)
                o.add_param_group({"params": list(m.fc3.parameters()), "lr": 0.02})
            assert o_p.engine.replicas[0] is o_p.flat.primary
        torch.testing.assert_close(o_p.step(batch), o_s.step(batch), rtol=1e-6, atol=1e-7)
        _replicas_equal(o_p)
    for p, q in zip(model.parameters(), model_s.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # editing the model directly desynchronises B until sync_replicas()
    with torch.no_grad():
        model.fc1.weight.mul_(0.5)
    with pytest.raises(AssertionError):
        _replicas_equal(o_p)
    o_p.engine.sync_replicas()
    _replicas_equal(o_p)


def test_engine_checks_devices_and_first_y_pass(simulated_cuda, monkeypatch):
    torch.manual_seed(2)
    model = OddNet()
    # a loss_fn that ignores its model argument is caught on the first step
    bad = SAMPa(model, lambda m, b: ce(model, b), torch.optim.SGD, rho=0.05, lam=0.3, lr=0.1,
                engine="peer", backend="torch")
    with pytest.raises(ValueError, match="y-pass"):
        bad.step(batches(1, "cpu")[0])
    assert all(p.requires_grad for p in model.parameters())
    bad.engine.close()
    # a base optimizer without fused rules cannot keep replicas
    with pytest.raises(ValueError, match="SGD or torch.optim.AdamW"):
        SAMPa(OddNet(), ce, torch.optim.Adagrad, rho=0.05, lam=0.3, lr=0.1, engine="peer")


def test_engine_refuses_parameters_elsewhere_than_devices0():
    with fake_cuda(devices=2):
        with pytest.raises(ValueError, match="devices\\[0\\]=cuda:1"):
            SAMPa(OddNet(), ce, torch.optim.SGD, rho=0.05, lam=0.3, lr=0.1, engine="peer",
                  devices=("cuda:1", "cuda:0"))


# ------------------------------------------------------------------ CUDA
def _pairs():
    if not CUDA:
        return [("cuda:0", "cuda:0")]
    n = torch.cuda.device_count()
    return [("cuda:0", "cuda:0")] + ([("cuda:0", "cuda:1")] if n > 1 else [])


def _ext_cuda():
    ext = _ext.load_extension(required=False)
    if ext is None or not ext.has_cuda():
        pytest.skip("sampa_fused._C is not built with its CUDA part")
    return ext


@gpu
@pytest.mark.parametrize("pair", _pairs())
@pytest.mark.parametrize("staged", [False, True])
def test_link_copies_ranges_exactly(pair, staged):
    ext = _ext_cuda()
    a, b = (torch.device(d) for d in pair)
    src_stream, dst_stream = torch.cuda.Stream(a), torch.cuda.Stream(b)
    link = ext.PeerLink(a.index, b.index, src_stream.cuda_stream, dst_stream.cuda_stream,
                        staged, 4096 + 12)        # tiny slots: many chunks per copy
    want_mode = ("staged" if staged or not ext.can_access_peer(a.index, b.index)
                 else "device" if a == b else "peer")
    assert link.mode == want_mode
    n = 100_003
    producer = torch.cuda.Stream(a)
    for start, end in [(0, n), (17, 5_011), (n - 3, n), (40_000, 40_000), (1, n - 1)]:
        with torch.cuda.stream(producer):
            src = torch.randn(n, device=a)          # written on the producer stream
        dst = torch.full((n,), -1.0, device=b)      # written on b's current stream
        link.begin(-1)                              # the copy lands after that fill
        link.copy(dst, src, start, end, producer.cuda_stream)
        link.finish(-1, -1)                         # b's current stream waits for it
        got = dst.cpu()
        torch.cuda.current_stream(a).wait_stream(producer)
        want = torch.full((n,), -1.0)
        want[start:end] = src.cpu()[start:end]
        assert torch.equal(got, want), (start, end)
    torch.cuda.synchronize()


@gpu
def test_link_refuses_wrong_tensors():
    ext = _ext_cuda()
    s = torch.cuda.Stream()
    link = ext.PeerLink(0, 0, s.cuda_stream, s.cuda_stream, False, 1 << 20)
    x = torch.zeros(10, device="cuda:0")
    with pytest.raises(ValueError, match="CUDA tensor"):
        link.copy(x, torch.zeros(10), 0, 10, -1)
    with pytest.raises(ValueError, match="dtypes differ"):
        link.copy(x, torch.zeros(10, device="cuda:0", dtype=torch.float16), 0, 10, -1)
    with pytest.raises(ValueError, match="outside"):
        link.copy(x, torch.zeros(5, device="cuda:0"), 0, 10, -1)
    with pytest.raises(RuntimeError, match="does not exist"):
        ext.PeerLink(0, 64, s.cuda_stream, s.cuda_stream, False, 1 << 20)


def _pair_of(opt_kwargs, pair, steps, base=torch.optim.SGD, model_kw=None, **engine_kw):
    torch.manual_seed(0)
    model = OddNet(**(model_kw or {})).to(pair[0])
    model_s = copy.deepcopy(model)
    data = batches(steps, pair[0], alternate=bool((model_kw or {}).get("unused")))
    o_p = SAMPa(model, ce, base, engine="peer", devices=pair, **engine_kw, **opt_kwargs)
    o_s = SAMPa(model_s, ce, base, engine="serial", **opt_kwargs)
    return model, model_s, o_p, o_s, data


SGD_KW = dict(rho=0.05, lam=0.3, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
ADAMW_KW = dict(rho=0.02, lam=0.5, lr=1e-3, weight_decay=1e-2)


@gpu
@pytest.mark.parametrize("pair", _pairs())
@pytest.mark.parametrize("engine_kw", [dict(), dict(overlap=False), dict(staged=True),
                                       dict(bucket_bytes=300)])
@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, SGD_KW), (torch.optim.AdamW, ADAMW_KW)])
def test_trajectory_equals_serial(pair, engine_kw, base, kw):
    _ext_cuda()
    model, model_s, o_p, o_s, data = _pair_of(kw, pair, 25, base, dict(bn=True, unused=True),
                                              **engine_kw)
    for batch in data:
        lp, ls = o_p.step(batch), o_s.step(batch)
        torch.testing.assert_close(lp, ls, rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(model.named_parameters(), model_s.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    for a, b in zip(model.buffers(), model_s.buffers()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)


@gpu
@pytest.mark.parametrize("pair", _pairs())
def test_replicas_bit_identical_after_200_steps(pair):
    _ext_cuda()
    _, _, o_p, _, data = _pair_of(SGD_KW, pair, 20, bucket_bytes=256)
    for i in range(200):
        o_p.step(data[i % len(data)])
    torch.cuda.synchronize()
    (ra, rb) = o_p.engine.replicas
    for ba, bb in zip(ra.slabs, rb.slabs):
        assert torch.equal(ba.x.cpu(), bb.x.cpu())
        assert torch.equal(ba.gy.cpu(), bb.gy.cpu())
        for n in ba.state:
            assert torch.equal(ba.state[n].cpu(), bb.state[n].cpu()), n
    assert torch.equal(ra.gy_sq.cpu(), rb.gy_sq.cpu())


def _capture_first_post(opt):
    """g and gy_new of every replica as the first post-gradient update sees them."""
    seen = []
    real_post = opt.update.sampa_post

    def spy(replicas, *args):
        if not seen:
            torch.cuda.synchronize()
            seen.extend([[(b.g.cpu(), b.gy_new.cpu()) for b in rep.slabs] for rep in replicas])
        return real_post(replicas, *args)
    opt.update.sampa_post = spy
    return seen


@gpu
@pytest.mark.parametrize("pair", _pairs())
@pytest.mark.parametrize("bucket_bytes", [4, 100, 1000, 4096 + 4])
@pytest.mark.parametrize("overlap", [True, False])
def test_exchange_bitwise_for_odd_bucket_sizes(pair, bucket_bytes, overlap):
    _ext_cuda()
    _, _, o_p, o_s, data = _pair_of(SGD_KW, pair, 3, bucket_bytes=bucket_bytes, overlap=overlap,
                                    model_kw=dict(unused=True))
    seen_p, seen_s = _capture_first_post(o_p), _capture_first_post(o_s)
    o_p.step(data[0])
    o_s.step(data[0])
    (ra, rb), (rs,) = seen_p, seen_s
    for (ga, gya), (gb, gyb), (gs, gys) in zip(ra, rb, rs):
        assert torch.equal(ga, gb) and torch.equal(gya, gyb)      # the exchange is exact
        torch.testing.assert_close(ga, gs, rtol=1e-5, atol=1e-6)  # and the gradients right
        torch.testing.assert_close(gya, gys, rtol=1e-5, atol=1e-6)
        assert ga.abs().sum() > 0 and gya.abs().sum() > 0


@gpu
@pytest.mark.parametrize("pair", _pairs())
def test_accumulation_and_add_param_group_follow_serial(pair):
    _ext_cuda()
    torch.manual_seed(0)
    model = OddNet().to(pair[0])
    model.fc3.requires_grad_(False)
    model_s = copy.deepcopy(model)
    kw = dict(SGD_KW, accumulation_steps=2)
    o_p = SAMPa(model, ce, torch.optim.SGD, engine="peer", devices=pair, bucket_bytes=512, **kw,
                params=[p for p in model.parameters() if p.requires_grad])
    o_s = SAMPa(model_s, ce, torch.optim.SGD, engine="serial", **kw,
                params=[p for p in model_s.parameters() if p.requires_grad])
    data = batches(8, pair[0])
    for i, batch in enumerate(data):
        if i == 3:
            for m, o in ((model, o_p), (model_s, o_s)):
                m.fc3.requires_grad_(True)
                o.add_param_group({"params": list(m.fc3.parameters()), "lr": 0.02})
        torch.testing.assert_close(o_p.step(batch), o_s.step(batch), rtol=1e-4, atol=1e-5)
    for p, q in zip(model.parameters(), model_s.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@gpu
def test_parameters_must_be_on_first_device():
    _ext_cuda()
    model = OddNet()                           # on the CPU
    with pytest.raises(ValueError, match="devices\\[0\\]"):
        SAMPa(model, ce, torch.optim.SGD, rho=0.05, lam=0.3, lr=0.1, engine="peer",
              devices=("cuda:0", "cuda:0"))


@gpu
def test_sync_replicas_after_loading_parameters():
    _ext_cuda()
    pair = _pairs()[-1]
    _, _, o_p, _, data = _pair_of(SGD_KW, pair, 3)
    for batch in data:
        o_p.step(batch)
    with torch.no_grad():
        for p in o_p.model.parameters():
            p.mul_(0.5)
    o_p.engine.sync_replicas()
    (ra, rb) = o_p.engine.replicas
    assert all(torch.equal(x.x.cpu(), y.x.cpu()) for x, y in zip(ra.slabs, rb.slabs))
