"""Patterns from real training loops that must not silently go wrong:
frozen parameters, fp64, schedulers that switch momentum on, partial eval
mode, resetting state, reused batch buffers, reassigned buffers."""
import copy

import pytest
import torch
import torch.nn as nn
from reference import RefSAM, RefSAMPa, SmallNet, ce_loss, make_batches

from sampa_fused import SAM, SAMPa

TOL = dict(rtol=1e-5, atol=1e-6)


def close(a, b, **tol):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **(tol or TOL))


def test_frozen_parameters_do_not_move():
    model = SmallNet()
    model.fc1.requires_grad_(False)
    w0 = model.fc1.weight.detach().clone()
    ref_model = copy.deepcopy(model)
    # passing every parameter, frozen ones included, as torch users do
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.5, lr=0.1, momentum=0.9,
                weight_decay=5e-4, params=model.parameters(), backend="torch")
    ref = RefSAMPa(ref_model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.5, lr=0.1, momentum=0.9,
                   weight_decay=5e-4)
    for b in make_batches(4):
        opt.step(b)
        ref.step(b)
    assert torch.equal(model.fc1.weight, w0)
    close(model, ref_model)


@pytest.mark.parametrize("cls", [SAMPa, SAM])
def test_freezing_and_unfreezing_between_steps(cls):
    extra = dict(lam=0.5) if cls is SAMPa else {}
    model = SmallNet()
    opt = cls(model, ce_loss, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, backend="torch", **extra)
    batches = make_batches(6)
    for b in batches[:2]:
        opt.step(b)
    model.fc1.requires_grad_(False)
    w = model.fc1.weight.detach().clone()
    for b in batches[2:4]:
        opt.step(b)
    assert torch.equal(model.fc1.weight, w)     # frozen: no momentum, no lam * gy
    model.fc1.requires_grad_(True)
    for b in batches[4:]:
        opt.step(b)
    assert not torch.equal(model.fc1.weight, w)  # trained again


def test_frozen_weights_loaded_after_construction_reach_the_y_pass():
    model = SmallNet()
    model.fc1.requires_grad_(False)
    ref_model = copy.deepcopy(model)
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.5, lr=0.1, backend="torch")
    with torch.no_grad():       # e.g. model.load_state_dict(pretrained) after building the optimizer
        model.fc1.weight.add_(1.0)
        ref_model.fc1.weight.add_(1.0)
    ref = RefSAMPa(ref_model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.5, lr=0.1)
    for b in make_batches(3):
        opt.step(b)
        ref.step(b)
    close(model, ref_model)


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                     (torch.optim.AdamW, dict(lr=1e-2))])
def test_float64_parameters_keep_their_precision(base, kw):
    torch.manual_seed(0)
    model = SmallNet().double()
    ref_model = copy.deepcopy(model)

    def loss64(m, b):
        return ce_loss(m, (b[0].double(), b[1]))
    opt = SAMPa(model, loss64, base, rho=0.1, lam=0.3, backend="torch", **kw)
    ref = RefSAMPa(ref_model, loss64, base, rho=0.1, lam=0.3, **kw)
    for b in make_batches(4):
        opt.step(b)
        ref.step(b)
    close(model, ref_model, rtol=1e-5, atol=1e-8)   # the norm is fp32 (README), summed in another order
    third = SmallNet(bn=False).double()
    with torch.no_grad():
        third.temperature.fill_(1 / 3)
    o3 = SAMPa(third, loss64, torch.optim.SGD, rho=0.1, lam=0.3, lr=0.0, backend="torch")
    o3.step(make_batches(1)[0])
    assert third.temperature.item() == 1 / 3      # lr = 0: x bit-exact, no fp32 round trip


@pytest.mark.parametrize("cls", [SAMPa, SAM])
def test_one_cycle_lr_switching_momentum_on(cls):
    """OneCycleLR cycles momentum: an SGD built with momentum=0 gets momentum 0.95."""
    extra = dict(lam=0.2) if cls is SAMPa else {}
    model = SmallNet()
    ref_model = copy.deepcopy(model)
    opt = cls(model, ce_loss, torch.optim.SGD, rho=0.1, lr=0.1, dampening=0.1, backend="torch", **extra)
    ref = (RefSAMPa if cls is SAMPa else RefSAM)(ref_model, ce_loss, torch.optim.SGD, rho=0.1, lr=0.1,
                                                 dampening=0.1, **extra)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=10)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref.base, max_lr=0.2, total_steps=10)
    for b in make_batches(5):
        opt.step(b)
        ref.step(b)
        sched.step()
        ref_sched.step()
    assert opt.param_groups[0]["momentum"] > 0
    close(model, ref_model)


def test_momentum_switched_on_for_one_group_leaves_nothing_half_done():
    model = SmallNet()
    groups = [{"params": [model.fc1.weight]}, {"params": [model.fc2.weight, model.fc2.bias]}]
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, params=groups, backend="torch")
    ref_model = copy.deepcopy(model)
    ref = RefSAMPa(ref_model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1,
                   params=[{"params": [ref_model.fc1.weight]},
                           {"params": [ref_model.fc2.weight, ref_model.fc2.bias]}])
    for i, b in enumerate(make_batches(5)):
        if i == 2:
            opt.param_groups[1]["momentum"] = 0.9
            ref.base.param_groups[1]["momentum"] = 0.9
        opt.step(b)
        ref.step(b)
    close(model, ref_model)


def test_clearing_optimizer_state_resets_momentum():
    model = SmallNet()
    ref_model = copy.deepcopy(model)
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9, backend="torch")
    ref = RefSAMPa(ref_model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9)
    for i, b in enumerate(make_batches(5)):
        if i == 3:
            opt.state.clear()
            ref.base.state.clear()
        opt.step(b)
        ref.step(b)
    close(model, ref_model)
    assert len(opt.state) == len(list(model.parameters()))   # state shown again


def test_partial_eval_mode_is_mirrored_on_the_y_copy():
    model = SmallNet()
    ref_model = copy.deepcopy(model)
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.5, lr=0.1, backend="torch")
    ref = RefSAMPa(ref_model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.5, lr=0.1)
    batches = make_batches(4)
    opt.step(batches[0])
    ref.step(batches[0])
    model.bn.eval()             # frozen batch norm, as in fine-tuning
    ref_model.bn.eval()
    modes = []                  # the y-pass runs on the model itself: it sees its modes
    model.bn.register_forward_hook(lambda m, i, o: modes.append(m.training))
    for b in batches[1:]:
        opt.step(b)
        ref.step(b)
    assert modes == [False] * 6                  # both passes of 3 steps
    close(model, ref_model)


def test_reused_batch_buffers_do_not_change_the_held_batch():
    model = SmallNet()
    ref_model = copy.deepcopy(model)
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, backend="torch")
    ref = RefSAMPa(ref_model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1)
    batches = make_batches(4)
    sx, sy = batches[0][0].clone(), batches[0][1].clone()     # a loader's static output buffers
    for b in batches:
        sx.copy_(b[0])
        sy.copy_(b[1])
        opt.step((sx, sy))
        ref.step((b[0].clone(), b[1].clone()))
    close(model, ref_model)


class Counter(nn.Module):
    """Counts samples in a buffer it replaces (not in place) in forward."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen = self.seen + x.shape[0]
        return x


def test_rollback_restores_buffers_that_modules_replace():
    model = nn.Sequential(Counter(), SmallNet(bn=False))
    opt = SAMPa(model, lambda m, b: ce_loss(m, b), torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1,
                backend="torch")
    batches = make_batches(3)
    opt.step(batches[0])
    seen = model[0].seen.item()
    bad = (batches[1][0].clone(), batches[1][1])
    bad[0][0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.step(bad)
    assert model[0].seen.item() == seen
    opt.step(batches[1])
    assert model[0].seen.item() == seen + batches[1][0].shape[0]


def test_step_under_no_grad_still_works():
    model = SmallNet()
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, backend="torch")
    with torch.no_grad():
        loss = opt.step(make_batches(1)[0])
    assert torch.isfinite(loss)


def test_plain_checkpoint_then_step():
    model = SmallNet(bn=False)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for b in make_batches(2):
        plain.zero_grad()
        ce_loss(model, b).backward()
        plain.step()
    opt = SAMPa(model, ce_loss, torch.optim.AdamW, rho=0.1, lam=0.2, lr=1e-2, backend="torch")
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["rho"] == 0.1 and opt.param_groups[0]["lam"] == 0.2
    opt.step(make_batches(1, seed=9)[0])
    assert all(float(s["step"]) == 3 for s in opt.state.values())


def test_sampa_lam_none_is_refused():
    with pytest.raises(ValueError, match="lam"):
        SAMPa(SmallNet(), ce_loss, torch.optim.SGD, rho=0.1, lam=None, lr=0.1)


def test_triton_backend_refuses_float64():
    with pytest.raises(ValueError, match="float64"):
        SAMPa(SmallNet().double(), ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, backend="triton")
