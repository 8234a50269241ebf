"""Which flat buffers each engine and method holds (the engine's BufferPlan),
and what that layout promises: x is never overwritten by a pass, so a
refused step writes nothing and needs no copy of x."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fake_cuda import fake_cuda

from sampa_fused import SAM, SAMPa
from sampa_fused.state import BufferPlan


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(11, 23)
        self.bn = nn.BatchNorm1d(23)
        self.fc2 = nn.Linear(23, 5)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def batches(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(17, 11, generator=g), torch.randint(0, 5, (17,), generator=g)) for _ in range(n)]


def storages(b):
    """The distinct flat buffers of one slab (aliases counted once), state included."""
    named = {n: getattr(b, n) for n in b.names}
    named.update({f"state.{k}": v for k, v in b.state.items()})
    out = {}
    for n, t in named.items():
        out.setdefault(t.untyped_storage().data_ptr(), []).append(n)
    return sorted(sorted(v) for v in out.values())


SGD = dict(lr=0.05, momentum=0.9)


def test_serial_sampa_holds_one_pass_buffer_and_no_copy_of_x():
    torch.manual_seed(0)
    opt = SAMPa(Net(), ce, torch.optim.SGD, rho=0.1, lam=0.3, engine="serial", **SGD)
    opt.step(batches(1)[0])
    (b,) = opt.flat.primary.slabs
    assert b.y is b.xt
    assert storages(b) == [["g"], ["gy"], ["gy_new"], ["state.momentum_buffer"], ["x"], ["xt", "y"]]
    assert not hasattr(b, "x_save")


def test_serial_sam_holds_x_g_and_one_pass_buffer():
    torch.manual_seed(0)
    opt = SAM(Net(), ce, torch.optim.SGD, rho=0.1, engine="serial", **SGD)
    opt.step(batches(1)[0])
    (b,) = opt.flat.primary.slabs
    assert storages(b) == [["g"], ["state.momentum_buffer"], ["x"], ["xt"]]


@pytest.mark.parametrize("method", [SAMPa, SAM])
def test_model_parameters_hold_x_during_every_pass(method):
    """The passes run on swapped-in leaves: the user's parameter objects keep
    x all through a step, and the perturbed pass sees xt, not x."""
    torch.manual_seed(0)
    model = Net()
    own = list(model.parameters())
    seen = []

    def loss_fn(m, batch):
        seen.append(([p.detach().clone() for p in own], [p.detach().clone() for p in m.parameters()]))
        return ce(m, batch)

    kw = dict(lam=0.3) if method is SAMPa else {}
    opt = method(model, loss_fn, torch.optim.SGD, rho=0.2, engine="serial", **kw, **SGD)
    for b in batches(3):
        start = [p.detach().clone() for p in own]
        seen.clear()
        opt.step(b)
        assert len(seen) == 2
        for user, _ in seen:
            assert all(torch.equal(u, s) for u, s in zip(user, start))
    # the last step's x̃-pass (SAMPa: gy != 0) / perturbed pass (SAM) ran at xt != x
    perturbed = seen[0][1] if method is SAMPa else seen[1][1]
    assert not all(torch.equal(u, s) for u, s in zip(perturbed, start))


@pytest.mark.parametrize("method", [SAMPa, SAM])
def test_refused_step_keeps_x_state_and_gy(method):
    """A refused step: parameters, state and gy keep their bits (nothing to
    restore: x was never overwritten)."""
    torch.manual_seed(0)
    model = Net()
    kw = dict(lam=0.3) if method is SAMPa else {}
    opt = method(model, ce, torch.optim.SGD, rho=0.1, engine="serial", nonfinite="skip", **kw, **SGD)
    data = batches(3)
    opt.step(data[0])
    opt.step(data[1])
    (b,) = opt.flat.primary.slabs
    before = {n: getattr(b, n).clone() for n in ("x", "gy") if hasattr(b, n)}
    state = {k: v.clone() for k, v in b.state.items()}
    opt.loss_fn = lambda m, batch: ce(m, batch) * float("nan")
    opt.step(data[2])
    assert opt.skipped_steps == 1
    for n, t in before.items():
        assert torch.equal(getattr(b, n), t), n
    for k, v in state.items():
        assert torch.equal(b.state[k], v), k


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_separate_pass_buffers_give_the_serial_trajectory(backend):
    """An engine's replica narrowed or widened to another plan (here one
    buffer per pass instead of the shared one) computes the same bits."""
    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    model = Net()
    model2 = copy.deepcopy(model)
    kw = dict(rho=0.1, lam=0.3, engine="serial", backend=backend, weight_decay=1e-3, **SGD)
    a = SAMPa(model, ce, torch.optim.SGD, **kw)
    b = SAMPa(model2, ce, torch.optim.SGD, **kw)
    b._ctx.set_buffer_plan(BufferPlan(points=("xt", "y")))
    (sb,) = b.flat.primary.slabs
    assert sb.y is not sb.xt and sb.y.untyped_storage().data_ptr() != sb.xt.untyped_storage().data_ptr()
    for batch in batches(5):
        assert torch.equal(a.step(batch), b.step(batch))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_shared_buffer_refuses_forming_both_points_at_once():
    torch.manual_seed(0)
    opt = SAMPa(Net(), ce, torch.optim.SGD, rho=0.1, engine="serial", **SGD)
    with pytest.raises(RuntimeError, match="one at a time"):
        opt.update.sampa_pre(opt.engine.replicas, ("xt", "y"))


def test_bad_plan_is_refused():
    with pytest.raises(ValueError, match="points"):
        BufferPlan(points=("x",))


def test_streams_and_peer_hold_what_each_replica_needs():
    """streams: one buffer per pass (both run at once); peer: device A holds
    xt and no y, device B y and no xt."""
    torch.manual_seed(0)
    with fake_cuda(devices=1):
        o_s = SAMPa(Net(), ce, torch.optim.SGD, rho=0.1, engine="streams", backend="torch", **SGD)
        o_p = SAMPa(Net(), ce, torch.optim.SGD, rho=0.1, engine="peer", backend="torch", **SGD)
        for o in (o_s, o_p):
            o.step(batches(1)[0])
    (b,) = o_s.flat.primary.slabs
    assert storages(b) == [["g"], ["gy"], ["gy_new"], ["state.momentum_buffer"], ["x"], ["xt"], ["y"]]
    ra, rb = o_p.engine.replicas
    assert storages(ra.slabs[0]) == [["g"], ["gy"], ["gy_new"], ["state.momentum_buffer"], ["x"], ["xt"]]
    assert storages(rb.slabs[0]) == [["g"], ["gy"], ["gy_new"], ["state.momentum_buffer"], ["x"], ["y"]]


@pytest.mark.parametrize("method", [SAMPa, SAM])
def test_refused_step_on_cpu_writes_nothing(method):
    """On a CPU replica the accept-or-refuse decision is a host branch: a
    refused step does not write x, the state or gy at all."""
    torch.manual_seed(0)
    kw = dict(lam=0.3) if method is SAMPa else {}
    opt = method(Net(), ce, torch.optim.SGD, rho=0.1, engine="serial", nonfinite="skip", **kw, **SGD)
    data = batches(3)
    opt.step(data[0])
    opt.step(data[1])
    (b,) = opt.flat.primary.slabs
    kept = [b.x] + list(b.state.values()) + ([b.gy] if method is SAMPa else [])
    versions = [t._version for t in kept]
    opt.loss_fn = lambda m, batch: ce(m, batch) * float("nan")
    opt.step(data[2])
    assert opt.skipped_steps == 1
    assert [t._version for t in kept] == versions


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
def test_lean_check_matches_torch_check(dtype, scaled):
    """One reduction per buffer (min/max, a dot product) decides as the
    elementwise check does, and sums the same squares."""
    import types

    from sampa_fused.update.common import lean_check, torch_check
    g = torch.Generator().manual_seed(5)
    slabs = [types.SimpleNamespace(g=torch.randn(n, generator=g).to(dtype),
                                   gy_new=torch.randn(n, generator=g).to(dtype)) for n in (1031, 7, 1)]
    inv = torch.tensor(1 / 1536.0) if scaled else None
    loss = torch.tensor(0.7)
    for grads, sq in [(("g", "gy_new"), "gy_new"), (("g",), "g"), (("g",), None)]:
        ok, total = lean_check(slabs, (loss,), grads, sq, inv, "cpu")
        ok_r, total_r = torch_check(slabs, (loss,), grads, sq, inv, "cpu")
        assert bool(ok) and bool(ok_r)
        torch.testing.assert_close(total, total_r, rtol=1e-5, atol=0)
    for name, i, value in [("g", 1030, float("nan")), ("g", 0, float("-inf")), ("gy_new", 3, float("inf")),
                           ("gy_new", 0, float("nan"))]:
        t = getattr(slabs[0 if i else 2], name)
        old = t[i].item()
        t[i] = value
        for grads, sq in [(("g", "gy_new"), "gy_new"), (("g",), "gy_new"), (("g",), None)]:
            checked = name in grads or name == sq
            assert bool(torch_check(slabs, (), grads, sq, inv, "cpu")[0]) is not checked
            assert bool(lean_check(slabs, (), grads, sq, inv, "cpu")[0]) is not checked, (name, value, grads)
        t[i] = old
    assert not bool(lean_check(slabs, (torch.tensor(float("nan")),), ("g",), "gy_new", inv, "cpu")[0])


@pytest.mark.parametrize("method", [SAMPa, SAM])
def test_tensor_hooks_apply_to_the_passes_on_the_pass_buffer(method):
    """A gradient hook on a parameter masks its gradient in the x̃-pass (and
    SAM's perturbed pass) as it did when those passes ran on the parameters:
    with plain SGD and lam = 0 the masked entries never move."""
    torch.manual_seed(0)
    model = Net()
    mask = torch.ones_like(model.fc1.weight)
    mask[:5] = 0
    model.fc1.weight.register_hook(lambda g: g * mask)
    kw = dict(lam=0.0) if method is SAMPa else {}
    opt = method(model, ce, torch.optim.SGD, rho=0.1, lr=0.1, engine="serial", **kw)
    before = model.fc1.weight.detach().clone()
    for b in batches(4):
        opt.step(b)
    after = model.fc1.weight.detach()
    assert torch.equal(after[:5], before[:5])
    assert not torch.equal(after[5:], before[5:])
