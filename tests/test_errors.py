"""Bad input gets a clear exception; a refused step leaves everything as it was."""

import copy

import pytest
import torch
import torch.nn as nn
from reference import SmallNet, assert_same, ce_loss, make_batches, snapshot

from sampa_fused import SAM, SAMPa


def make(cls=SAMPa, **kw):
    model = SmallNet()
    args = dict(rho=0.1, lr=0.1, momentum=0.9, backend="torch")
    if cls is SAMPa:
        args["lam"] = 0.2
    args.update(kw)
    return model, cls(model, ce_loss, torch.optim.SGD, **args)


@pytest.mark.parametrize("kw,match", [
    (dict(rho=-0.1), "rho"),
    (dict(rho=float("nan")), "rho"),
    (dict(lam=1.5), "lam"),
    (dict(lam=-0.01), "lam"),
    (dict(engine="warp"), "unknown engine"),
    (dict(backend="cuda-magic"), "unknown backend"),
    (dict(nonfinite="ignore"), "nonfinite"),
])
def test_bad_construction_arguments(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make(**kw)


def test_engine_this_machine_cannot_run():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for engine in ("streams", "peer"):
        with pytest.raises((RuntimeError, NotImplementedError), match=engine):
            make(engine=engine)


def test_model_without_trainable_parameters():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1)


def test_base_optimizer_instance_or_non_optimizer():
    model = SmallNet()
    with pytest.raises(TypeError, match="class"):
        SAMPa(model, ce_loss, torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1, lam=0.2)
    with pytest.raises(TypeError, match="Optimizer subclass"):
        SAMPa(model, ce_loss, dict, rho=0.1, lam=0.2)
    with pytest.raises(TypeError, match="nn.Module"):
        SAMPa([torch.zeros(2, requires_grad=True)], ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=1)


def test_parameter_not_in_model():
    model = SmallNet()
    stranger = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, params=[stranger])


def test_parameters_on_two_devices():
    model = SmallNet()
    model.fc2.to("meta")
    with pytest.raises(ValueError, match="one device"):
        SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, backend="torch")


def test_unknown_engine_option():
    with pytest.raises(TypeError, match="does not take the option 'devices'"):
        make(devices=("cuda:0", "cuda:1"))


@pytest.mark.parametrize("bad_loss,exc,match", [
    (lambda m, b: 3.0, TypeError, "must return a tensor"),
    (lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"), ValueError, "scalar"),
    (lambda m, b: ce_loss(m, b).detach(), ValueError, "does not depend"),
    (lambda m, b: (m(b[0]).argmax(1) == b[1]).sum(), TypeError, "floating point"),
])
@pytest.mark.parametrize("cls", [SAMPa, SAM])
def test_bad_loss_is_refused_and_nothing_changes(cls, bad_loss, exc, match):
    model, opt = make(cls)
    batches = make_batches(3)
    opt.step(batches[0])
    before = snapshot(model, opt)
    good = opt.loss_fn
    opt.loss_fn = bad_loss
    with pytest.raises(exc, match=match):
        opt.step(batches[1])
    assert_same(before, snapshot(model, opt))
    opt.loss_fn = good
    opt.step(batches[1])      # the next good step works
    assert opt.step_count == 2


def test_loss_fn_ignoring_its_model_argument_is_the_same_on_one_device():
    # The y-pass runs on the user's own module (y swapped in), so a loss_fn
    # that uses the global model computes what one using its argument does.
    # (Engines that run the y-pass on a replica catch it on the first step:
    # tests/test_peer_engine.py.)
    model = SmallNet()
    twin = copy.deepcopy(model)

    def global_loss(m, b):       # uses the global model, not the one it is given
        return ce_loss(model, b)
    opt = SAMPa(model, global_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, backend="torch")
    ref = SAMPa(twin, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, backend="torch")
    for b in make_batches(3):
        assert torch.equal(opt.step(b), ref.step(b))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def _nan_batch(batch):
    x, y = batch
    x = x.clone()
    x[0, 0] = float("nan")
    return x, y


def _inf_grad_loss(m, b):
    # finite loss (0 at the kink) whose gradient is infinite: d/dw sqrt(|w - w|)
    w = m.fc2.weight
    return ce_loss(m, b) + (w - w.detach()).abs().sqrt().sum()


@pytest.mark.parametrize("cls", [SAMPa, SAM])
@pytest.mark.parametrize("kind", ["nan_loss_new_batch", "nan_loss_held_batch", "inf_grad"])
def test_nonfinite_step_raises_and_leaves_everything(cls, kind):
    model, opt = make(cls)
    batches = make_batches(4)
    opt.step(batches[0])
    opt.step(batches[1])
    before = snapshot(model, opt)
    if kind == "inf_grad":
        opt.loss_fn = _inf_grad_loss
        bad = batches[2]
    elif kind == "nan_loss_new_batch":
        bad = _nan_batch(batches[2])
    else:
        if cls is SAM:
            pytest.skip("SAM holds no batch")
        opt.progress.held = _nan_batch(opt.held_batch)   # as if the held batch had been poisoned
        before = snapshot(model, opt)
        bad = batches[2]
    with pytest.raises(FloatingPointError, match="unchanged"):
        opt.step(bad)
    assert_same(before, snapshot(model, opt))
    opt.loss_fn = ce_loss
    if kind == "nan_loss_held_batch":
        return   # the poisoned held batch stays held: exactly as before
    opt.step(batches[2])
    assert torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()


def test_nonfinite_skip_mode_counts():
    model, opt = make(nonfinite="skip")
    batches = make_batches(4)
    opt.step(batches[0])
    before = snapshot(model, opt)
    opt.step(_nan_batch(batches[1]))
    assert opt.skipped_steps == 1
    assert_same(before, snapshot(model, opt), skipped=1)
    opt.step(batches[1])
    assert opt.skipped_steps == 1 and opt.step_count == 2


def test_bad_hyperparameter_edit_is_refused_at_step():
    model, opt = make()
    opt.step(make_batches(1)[0])
    before = snapshot(model, opt)
    opt.param_groups[0]["lam"] = 2.0
    with pytest.raises(ValueError, match="lam"):
        opt.step(make_batches(1, seed=4)[0])
    opt.param_groups[0]["lam"] = 0.2
    assert_same(before, snapshot(model, opt))


def test_step_needs_a_batch():
    model, opt = make()
    with pytest.raises(TypeError, match="batch"):
        opt.step()
