"""The GPU engines' own code, run on CPU under the stand-in CUDA
(tests/fake_cuda.py), against the serial engine with torch.equal: the same
ops in the same order give the same bits. The stand-in also checks that every
buffer one stream writes and another reads is ordered by an event or
wait_stream, so a missing wait fails here, not on a user's GPU.

    engine="streams"                 SAMPa and SAM, eager
    engine="streams", graph=True     capture, replays under a scheduler and
                                     edits, fallbacks, recapture
    engine="peer"                    one and two devices, direct and staged,
                                     buckets that split the parameters
"""
import copy

import pytest
import torch
from fake_cuda import fake_cuda
from reference import SmallNet, ce_loss, make_batches

from sampa_fused import SAM, SAMPa

STEPS = 10
BASES = {
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "sgd-nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, dampening=0.0)),
    "adamw": (torch.optim.AdamW, dict(lr=3e-3, weight_decay=0.01)),
}
EXTRAS = {
    "plain": {},
    "accumulation": dict(accumulation_steps=3),
    "grad-scaler": dict(grad_scaler=lambda: torch.amp.GradScaler("cpu", init_scale=2.0 ** 10,
                                                                growth_interval=3)),
}


def _kwargs(cls, base_kw, extra):
    kw = dict(rho=0.1, backend="torch", **base_kw)
    if cls is SAMPa:
        kw["lam"] = 0.3
    for k, v in extra.items():
        kw[k] = v() if callable(v) else v
    return kw


def _run_pair(cls, base, base_kw, extra, engine_kw, devices=1, steps=STEPS, schedule=False):
    """The same model and batches on the serial engine (outside the stand-in)
    and on `engine_kw` (inside it); returns both models, optimizers and losses."""
    torch.manual_seed(0)
    model = SmallNet()
    twin = copy.deepcopy(model)
    batches = make_batches(steps, batch=12)
    ref = cls(twin, ce_loss, base, engine="serial", **_kwargs(cls, base_kw, extra))
    ref_losses = _train(ref, batches, schedule)
    with fake_cuda(devices=devices) as rt:
        opt = cls(model, ce_loss, base, **engine_kw, **_kwargs(cls, base_kw, extra))
        losses = _train(opt, batches, schedule)
    return model, twin, opt, ref, losses, ref_losses, rt


def _train(opt, batches, schedule):
    """The losses of one step per batch, under a StepLR when `schedule`."""
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5) if schedule else None
    losses = []
    for b in batches:
        losses.append(opt.step(b))
        if sched:
            sched.step()
    return losses


def _assert_same(model, twin, opt, ref, losses, ref_losses):
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        assert torch.equal(a, b), f"step {i}: loss {a.item()} != {b.item()}"
    for (n, p), q in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(p, q), n
    sa, sb = opt.state_dict(), ref.state_dict()
    for k in sb["state"]:
        for name, v in sb["state"][k].items():
            assert torch.equal(sa["state"][k][name], v), (k, name)
    ea, eb = sa["sampa_fused"], sb["sampa_fused"]
    assert (ea["t"], ea["counts"], ea["skipped_steps"]) == (eb["t"], eb["counts"], eb["skipped_steps"])
    if "gy" in eb:
        assert all(torch.equal(u, v) for u, v in zip(ea["gy"], eb["gy"]))
        assert torch.equal(ea["gy_sq"], eb["gy_sq"])


# ------------------------------------------------------------------ streams
@pytest.mark.parametrize("cls", [SAMPa, SAM])
@pytest.mark.parametrize("base", list(BASES))
def test_streams_eager_equals_serial(cls, base):
    _assert_same(*_run_pair(cls, *BASES[base], {}, dict(engine="streams"))[:6])


@pytest.mark.parametrize("cls", [SAMPa, SAM])
@pytest.mark.parametrize("extra", ["accumulation", "grad-scaler"])
def test_streams_eager_training_loop_features_equal_serial(cls, extra):
    _assert_same(*_run_pair(cls, *BASES["sgd-momentum"], EXTRAS[extra], dict(engine="streams"))[:6])


@pytest.mark.parametrize("cls", [SAMPa, SAM])
@pytest.mark.parametrize("base", list(BASES))
def test_streams_graph_equals_serial_under_a_scheduler(cls, base):
    res = _run_pair(cls, *BASES[base], {}, dict(engine="streams", graph=True, warmup_steps=2),
                    schedule=True)
    _assert_same(*res[:6])
    opt = res[2]
    assert opt.engine.graph.captures == 1 and opt.engine.graph.replays == STEPS - 2


def test_streams_graph_accumulation_equals_serial():
    res = _run_pair(SAMPa, *BASES["adamw"], EXTRAS["accumulation"],
                    dict(engine="streams", graph=True, warmup_steps=2))
    _assert_same(*res[:6])
    assert res[2].engine.graph.replays == STEPS - 2


# ------------------------------------------------------------------ peer
PEER = [
    # devices, engine options
    (1, dict(devices=("cuda:0", "cuda:0"))),
    (1, dict(devices=("cuda:0", "cuda:0"), staged=True, bucket_bytes=64)),
    (2, dict(devices=("cuda:0", "cuda:1"), bucket_bytes=200)),           # buckets split parameters
    (2, dict(devices=("cuda:0", "cuda:1"), staged=True, bucket_bytes=100)),
    (2, dict(devices=("cuda:0", "cuda:1"), overlap=False)),
]


@pytest.mark.parametrize("devices,engine_kw", PEER,
                         ids=["1dev", "1dev-staged-64B", "2dev-200B", "2dev-staged-100B", "2dev-no-overlap"])
@pytest.mark.parametrize("base", list(BASES))
def test_peer_equals_serial(devices, engine_kw, base):
    res = _run_pair(SAMPa, *BASES[base], {}, dict(engine="peer", **engine_kw), devices=devices)
    _assert_same(*res[:6])
    opt, rt = res[2], res[6]
    ra, rb = opt.engine.replicas
    for ba, bb in zip(ra.slabs, rb.slabs):          # the replicas stayed bit-identical
        assert torch.equal(ba.x, bb.x) and torch.equal(ba.gy, bb.gy)
        for n in ba.state:
            assert torch.equal(ba.state[n], bb.state[n]), n
    ab, ba_ = rt.links
    assert ab.steps == ba_.steps == STEPS
    if engine_kw.get("overlap", True) and engine_kw.get("bucket_bytes", 1 << 20) < 1000:
        assert len(ab.copies) > 2 * STEPS          # bucket by bucket, not whole buffers


@pytest.mark.parametrize("extra", ["accumulation", "grad-scaler"])
@pytest.mark.parametrize("devices", [1, 2])
def test_peer_training_loop_features_equal_serial(extra, devices):
    pair = ("cuda:0", f"cuda:{devices - 1}")
    _assert_same(*_run_pair(SAMPa, *BASES["sgd-momentum"], EXTRAS[extra],
                            dict(engine="peer", devices=pair, bucket_bytes=128), devices=devices)[:6])


def test_peer_host_batches():
    """Batches in host memory (a CPU data loader) with a model without buffers:
    nothing but the engine's own wait orders B's y-pass (on its side stream)
    after B's pre-gradient update (on B's current stream)."""
    torch.manual_seed(0)
    model = SmallNet(bn=False)
    twin = copy.deepcopy(model)
    batches = make_batches(STEPS, batch=12)
    kw = _kwargs(SAMPa, BASES["sgd-momentum"][1], {})
    ref = SAMPa(twin, ce_loss, torch.optim.SGD, engine="serial", **kw)
    ref_losses = [ref.step(b) for b in batches]
    with fake_cuda(devices=2) as rt:
        opt = SAMPa(model, ce_loss, torch.optim.SGD, engine="peer", devices=("cuda:0", "cuda:1"), **kw)
        losses = [opt.step(tuple(rt.host(t.clone()) for t in b)) for b in batches]
    _assert_same(model, twin, opt, ref, losses, ref_losses)
