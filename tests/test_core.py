"""SAMPa and SAM on the torch backend and serial engine against hand-computed
values and the per-parameter reference of the algorithm (README, 'Exactly what it computes')."""
import copy
import io
import math

import pytest
import torch
import torch.nn as nn
from reference import RefSAM, RefSAMPa, SmallNet, ce_loss, make_batches, params_of

from sampa_fused import SAM, SAMPa

TOL = dict(rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ hand-computed
class Quad(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0]))


def quad_loss(model, batch):
    a, c = batch
    return 0.5 * (a * (model.w - c) ** 2).sum()


def qgrad(w, batch):
    a, c = batch
    return [ai * (wi - ci) for wi, ai, ci in zip(w, a.tolist(), c.tolist())]


QB = [(torch.tensor([0.5, 2.0]), torch.tensor([0.3, -1.0])),
      (torch.tensor([1.5, 0.7]), torch.tensor([-0.4, 0.9]))]


def _norm(v):
    return math.sqrt(sum(t * t for t in v))


def test_hand_computed_sgd_momentum():
    lr, mu, wd, rho, lam = 0.1, 0.9, 0.01, 0.5, 0.3
    model = Quad()
    opt = SAMPa(model, quad_loss, torch.optim.SGD, rho=rho, lam=lam, lr=lr, momentum=mu,
                weight_decay=wd, backend="torch")
    x0 = [1.0, -2.0]
    # step 1: gy_0 = 0 so xt = x0; both passes on b0
    y1 = [x - lr * (wd * x) for x in x0]
    gxt = qgrad(x0, QB[0])
    gy1 = qgrad(y1, QB[0])
    g = [(1 - lam) * a + lam * b for a, b in zip(gxt, gy1)]
    buf1 = [gi + wd * x for gi, x in zip(g, x0)]
    x1 = [x - lr * b for x, b in zip(x0, buf1)]
    loss1 = opt.step(QB[0])
    assert loss1.item() == pytest.approx(0.5 * sum(a * (x - c) ** 2 for x, a, c in
                                                   zip(x0, QB[0][0].tolist(), QB[0][1].tolist())), rel=1e-6)
    assert model.w.tolist() == pytest.approx(x1, rel=1e-6)
    # step 2: x̃-pass on the held b0, y-pass on b1
    n = _norm(gy1)
    xt = [x + rho * gi / (n + 1e-12) for x, gi in zip(x1, gy1)]
    y2 = [x - lr * (mu * b + gi + wd * x) for x, b, gi in zip(x1, buf1, gy1)]
    gxt = qgrad(xt, QB[0])
    gy2 = qgrad(y2, QB[1])
    g = [(1 - lam) * a + lam * b for a, b in zip(gxt, gy2)]
    buf2 = [mu * b + gi + wd * x for b, gi, x in zip(buf1, g, x1)]
    x2 = [x - lr * b for x, b in zip(x1, buf2)]
    opt.step(QB[1])
    assert model.w.tolist() == pytest.approx(x2, rel=1e-6)
    assert opt.state[model.w]["momentum_buffer"].tolist() == pytest.approx(buf2, rel=1e-6)


def _adamw(x, m, v, g, t, lr, b1, b2, eps, wd):
    x = [xi * (1 - lr * wd) for xi in x]
    m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
    v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    x = [xi - lr / bc1 * mi / (math.sqrt(vi) / math.sqrt(bc2) + eps) for xi, mi, vi in zip(x, m, v)]
    return x, m, v


def test_hand_computed_adamw():
    lr, b1, b2, eps, wd, rho, lam = 0.01, 0.9, 0.99, 1e-8, 0.1, 0.2, 0.5
    model = Quad()
    opt = SAMPa(model, quad_loss, torch.optim.AdamW, rho=rho, lam=lam, lr=lr, betas=(b1, b2),
                eps=eps, weight_decay=wd, backend="torch")
    x0, z = [1.0, -2.0], [0.0, 0.0]
    y1, _, _ = _adamw(x0, z, z, z, 1, lr, b1, b2, eps, wd)
    g = [(1 - lam) * a + lam * b for a, b in zip(qgrad(x0, QB[0]), qgrad(y1, QB[0]))]
    x1, m1, v1 = _adamw(x0, z, z, g, 1, lr, b1, b2, eps, wd)
    opt.step(QB[0])
    assert model.w.tolist() == pytest.approx(x1, rel=1e-6)
    gy1 = qgrad(y1, QB[0])
    n = _norm(gy1)
    xt = [x + rho * gi / (n + 1e-12) for x, gi in zip(x1, gy1)]
    y2, _, _ = _adamw(x1, m1, v1, gy1, 2, lr, b1, b2, eps, wd)
    g = [(1 - lam) * a + lam * b for a, b in zip(qgrad(xt, QB[0]), qgrad(y2, QB[1]))]
    x2, m2, v2 = _adamw(x1, m1, v1, g, 2, lr, b1, b2, eps, wd)
    opt.step(QB[1])
    assert model.w.tolist() == pytest.approx(x2, rel=1e-6)
    st = opt.state[model.w]
    assert st["exp_avg"].tolist() == pytest.approx(m2, rel=1e-6)
    assert st["exp_avg_sq"].tolist() == pytest.approx(v2, rel=1e-5)
    assert float(st["step"]) == 2


# ------------------------------------------------------------ reference runs
BASES = [
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-3)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, maximize=True)),
    (torch.optim.AdamW, dict(lr=3e-3, weight_decay=0.05)),
    (torch.optim.AdamW, dict(lr=3e-3, betas=(0.8, 0.95), amsgrad=True)),
    (torch.optim.Adam, dict(lr=3e-3, weight_decay=1e-2)),          # generic path
    (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5)),            # generic path
]


def _ids(bases):
    return [f"{b.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for b, kw in bases]


@pytest.mark.parametrize("lam", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("base,kw", BASES, ids=_ids(BASES))
def test_sampa_matches_reference(base, kw, lam):
    torch.manual_seed(0)
    model = SmallNet()
    ref_model = copy.deepcopy(model)
    opt = SAMPa(model, ce_loss, base, rho=0.1, lam=lam, backend="torch", **kw)
    ref = RefSAMPa(ref_model, ce_loss, base, rho=0.1, lam=lam, **kw)
    for b in make_batches(6):
        torch.testing.assert_close(opt.step(b), ref.step(b), **TOL)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL)
    for p, q in zip(model.buffers(), ref_model.buffers()):
        torch.testing.assert_close(p, q, **TOL)   # batch-norm stats follow the x̃-pass


SOME_BASES = BASES[1:2] + BASES[5:6] + BASES[7:8]


@pytest.mark.parametrize("base,kw", SOME_BASES, ids=_ids(SOME_BASES))
def test_sam_matches_reference(base, kw):
    model = SmallNet()
    ref_model = copy.deepcopy(model)
    opt = SAM(model, ce_loss, base, rho=0.05, backend="torch", **kw)
    ref = RefSAM(ref_model, ce_loss, base, rho=0.05, **kw)
    for b in make_batches(5):
        torch.testing.assert_close(opt.step(b), ref.step(b), **TOL)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL)


def test_param_groups_with_different_hyperparameters():
    model = SmallNet()
    ref_model = copy.deepcopy(model)

    def groups(m):
        return [{"params": [m.fc1.weight, m.fc2.weight], "weight_decay": 1e-2, "rho": 0.2, "lam": 0.5},
                {"params": [m.fc2.bias, m.temperature] + list(m.bn.parameters()),
                 "lr": 0.02, "rho": 0.05}]
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9,
                params=groups(model), backend="torch")
    assert [g["rho"] for g in opt.param_groups] == [0.2, 0.05]
    assert [g["lam"] for g in opt.param_groups] == [0.5, 0.2]
    ref_groups = groups(ref_model)
    ref_groups[1]["lam"] = 0.2
    ref = RefSAMPa(ref_model, ce_loss, torch.optim.SGD, rho=None, lam=None, params=ref_groups,
                   lr=0.1, momentum=0.9)
    for b in make_batches(4):
        torch.testing.assert_close(opt.step(b), ref.step(b), **TOL)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL)


# ---------------------------------------------------------- consequences
def test_rho0_lam0_is_base_optimizer_on_lagged_batches():
    batches = make_batches(7)
    model = SmallNet(bn=False)
    ref_model = copy.deepcopy(model)
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.0, lam=0.0, lr=0.1, momentum=0.9,
                weight_decay=1e-3, backend="torch")
    base = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for b in batches:
        opt.step(b)
    for b in [batches[0]] + batches[:-1]:      # b0, b0, b1, ..., b_{n-2}
        base.zero_grad()
        ce_loss(ref_model, b).backward()
        base.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_sam_rho0_is_base_optimizer():
    batches = make_batches(5)
    model = SmallNet(bn=False)
    ref_model = copy.deepcopy(model)
    opt = SAM(model, ce_loss, torch.optim.AdamW, rho=0.0, lr=1e-2, backend="torch")
    base = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    for b in batches:
        opt.step(b)
        base.zero_grad()
        ce_loss(ref_model, b).backward()
        base.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_lam0_still_perturbs():
    batches = make_batches(4)
    runs = {}
    for rho in (0.0, 0.3):
        torch.manual_seed(0)
        model = SmallNet(bn=False)
        opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=rho, lam=0.0, lr=0.1, backend="torch")
        runs[rho] = [opt.step(b) for b in batches]
    assert torch.equal(runs[0.0][0], runs[0.3][0])      # xt_0 = x_0 exactly
    assert not torch.equal(runs[0.0][1], runs[0.3][1])  # afterwards the perturbation acts


def test_scheduler_drives_peek_and_step():
    model = SmallNet()
    ref_model = copy.deepcopy(model)
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.4, lr=0.2, momentum=0.9, backend="torch")
    ref = RefSAMPa(ref_model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.4, lr=0.2, momentum=0.9)
    assert opt.param_groups is opt.base.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref.base, step_size=1, gamma=0.5)
    lrs = []
    for b in make_batches(5):
        opt.step(b)
        ref.step(b)
        sched.step()
        ref_sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.05, 0.025, 0.0125, 0.00625])
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL)
    # a scheduler that changes lr changes the trajectory: the peek uses it too
    model2 = copy.deepcopy(ref_model)
    opt2 = SAMPa(model2, ce_loss, torch.optim.SGD, rho=0.1, lam=1.0, lr=0.2, backend="torch")
    opt2.step(make_batches(1)[0])
    before = params_of(model2)
    opt2.param_groups[0]["lr"] = 0.0
    opt2.step(make_batches(1, seed=5)[0])   # lr = 0: neither peek nor step may move x
    for p, q in zip(model2.parameters(), before):
        assert torch.equal(p, q)


def test_hyperparameter_edits_take_effect():
    model = SmallNet()
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, backend="torch")
    ref_model = copy.deepcopy(model)
    ref = RefSAMPa(ref_model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1)
    for i, b in enumerate(make_batches(4)):
        if i == 2:
            opt.param_groups[0].update(rho=0.4, lam=0.7)
            ref.rho, ref.lam = 0.4, 0.7
        opt.step(b)
        ref.step(b)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL)


# ------------------------------------------------------------- resume
@pytest.mark.parametrize("cls,base,kw", [
    (SAMPa, torch.optim.SGD, dict(lr=0.1, momentum=0.9, lam=0.3)),
    (SAMPa, torch.optim.AdamW, dict(lr=1e-2, lam=0.3)),
    (SAMPa, torch.optim.Adam, dict(lr=1e-2, lam=0.3)),
    (SAM, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
])
def test_resume_is_bit_identical(cls, base, kw):
    batches = make_batches(8)

    def make():
        torch.manual_seed(0)
        model = SmallNet()
        return model, cls(model, ce_loss, base, rho=0.1, backend="torch", **kw)

    model_a, opt_a = make()
    for b in batches:
        opt_a.step(b)

    model_b, opt_b = make()
    for b in batches[:3]:
        opt_b.step(b)
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    del model_b, opt_b
    model_c, opt_c = make()
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    for b in batches[3:]:
        opt_c.step(b)
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model_a.buffers(), model_c.buffers()):
        assert torch.equal(p, q)


def test_state_dict_loads_into_plain_torch_optimizer():
    model = SmallNet()
    opt = SAMPa(model, ce_loss, torch.optim.AdamW, rho=0.1, lam=0.2, lr=1e-2, backend="torch")
    for b in make_batches(3):
        opt.step(b)
    sd = opt.state_dict()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sd = {k: v for k, v in sd.items() if k != "sampa_fused"}
    plain.load_state_dict(sd)
    steps = [s["step"] for s in plain.state.values()]
    assert len({id(s) for s in steps}) == len(steps)  # not shared
    assert all(float(s) == 3 for s in steps)


def test_warm_start_from_plain_checkpoint():
    model = SmallNet(bn=False)
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for b in make_batches(2):
        plain.zero_grad()
        ce_loss(model, b).backward()
        plain.step()
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9, backend="torch")
    opt.load_state_dict(plain.state_dict())
    for p in model.parameters():
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], plain.state[p]["momentum_buffer"])


# ------------------------------------------------------------ flat buffers
def test_parameters_and_grads_are_views_into_one_buffer():
    model = SmallNet()
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, backend="torch")
    flat = opt.flat.primary.slabs[0]
    assert len(opt.flat.primary.slabs) == 1
    for p in model.parameters():
        assert p.untyped_storage().data_ptr() == flat.x.untyped_storage().data_ptr()
        assert p.grad.untyped_storage().data_ptr() == flat.g.untyped_storage().data_ptr()
        assert p.data_ptr() % 64 == 0       # aligned views
    opt.step(make_batches(1)[0])
    for p in model.parameters():  # still views after a step
        assert p.untyped_storage().data_ptr() == flat.x.untyped_storage().data_ptr()


def test_one_buffer_per_dtype():
    model = SmallNet()
    model.fc2.to(torch.float64)

    def loss(m, b):
        h = torch.relu(m.bn(m.fc1(b[0])))
        return nn.functional.cross_entropy(m.fc2(h.double()) / m.temperature, b[1])
    opt = SAMPa(model, loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9, backend="torch")
    assert sorted(str(b.slab.dtype) for b in opt.flat.primary.slabs) == ["torch.float32", "torch.float64"]
    ref_model = copy.deepcopy(model)
    for b in make_batches(3):
        opt.step(b)
    ref = RefSAMPa(ref_model, loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9)
    for b in make_batches(3):
        ref.step(b)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL)


def test_model_works_between_steps_and_zero_grad_is_safe():
    model = SmallNet()
    keys = list(model.state_dict())
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, backend="torch")
    ref_model = copy.deepcopy(model)
    ref = RefSAMPa(ref_model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1)
    for i, b in enumerate(make_batches(4)):
        opt.step(b)
        ref.step(b)
        model.zero_grad()           # sets .grad to None: the optimizer rebinds its views
        model.eval()
        with torch.no_grad():
            model(b[0])
        model.train()
    assert list(model.state_dict()) == keys
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL)


def test_user_edits_between_steps_are_kept():
    model = SmallNet(bn=False)
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.0, backend="torch")
    opt.step(make_batches(1)[0])
    with torch.no_grad():
        model.fc1.weight.fill_(0.25)
    opt.step(make_batches(1, seed=3)[0])
    assert torch.all(model.fc1.weight == 0.25)  # lr = 0: x is exactly what the user set


def test_add_param_group():
    torch.manual_seed(0)
    model = SmallNet()
    model.fc2.weight.requires_grad_(False)
    ref_model = copy.deepcopy(model)
    # the trainable ones only: params=None would take the frozen one too (as
    # torch.optim.SGD(model.parameters()) does), and a parameter is in one group
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = SAMPa(model, ce_loss, torch.optim.SGD, params=trainable, rho=0.1, lam=0.2, lr=0.1,
                momentum=0.9, backend="torch")
    ref = RefSAMPa(ref_model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9)
    batches = make_batches(6)
    for b in batches[:3]:
        opt.step(b)
        ref.step(b)
    for m in (model, ref_model, ref.ymodel):
        m.fc2.weight.requires_grad_(True)
    opt.add_param_group({"params": [model.fc2.weight], "lr": 0.05})
    ref.add_param_group({"params": [ref_model.fc2.weight], "lr": 0.05})
    assert opt.param_groups[1]["rho"] == 0.1 and opt.param_groups[1]["lam"] == 0.2
    assert len(opt.base.param_groups) == 2
    for b in batches[3:]:
        opt.step(b)
        ref.step(b)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL)
    steps = dict(zip(opt.flat.layout.names, opt.flat.counts))     # steps each state has taken
    assert steps.pop("fc2.weight") == 3 and set(steps.values()) == {6}


def test_auto_engine_and_backend_on_cpu():
    model = SmallNet()
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, engine="auto", backend="auto")
    assert (opt.engine.name, opt.backend) == ("serial", "torch")
    opt = SAM(model, ce_loss, torch.optim.SGD, rho=0.1, lr=0.1, engine="auto")
    assert opt.engine.name == "serial"


@pytest.mark.parametrize("cls,ref_cls", [(SAMPa, RefSAMPa), (SAM, RefSAM)], ids=["SAMPa", "SAM"])
def test_adaptive_matches_reference(cls, ref_cls):
    torch.manual_seed(0)
    model = SmallNet()
    ref_model = copy.deepcopy(model)
    kw = dict(rho=0.5, lr=0.1, momentum=0.9, adaptive=True) | (dict(lam=0.3) if cls is SAMPa else {})
    opt = cls(model, ce_loss, torch.optim.SGD, backend="torch", **kw)
    ref = ref_cls(ref_model, ce_loss, torch.optim.SGD, **kw)
    for b in make_batches(5):
        torch.testing.assert_close(opt.step(b), ref.step(b), **TOL)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL)
