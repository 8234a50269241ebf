"""Habits torch users bring: what loss_fn may return, the step idioms of
other libraries, params=None with frozen parameters."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import SmallNet, ce_loss, make_batches

from sampa_fused import SAM, MicroBatches, SAMPa

KW = dict(lr=0.1, momentum=0.9, rho=0.1, backend="torch")


class Output:                                      # stands in for a model's output object (.loss)
    def __init__(self, loss, logits):
        self.loss, self.logits = loss, logits


def _forms():
    def logits(model, batch):
        return model(batch[0])

    return {
        "loss": lambda m, b: ce_loss(m, b),
        "tuple": lambda m, b: (lambda z: (F.cross_entropy(z, b[1]), z))(logits(m, b)),
        "mapping": lambda m, b: (lambda z: {"loss": F.cross_entropy(z, b[1]), "logits": z})(logits(m, b)),
        "attribute": lambda m, b: (lambda z: Output(F.cross_entropy(z, b[1]), z))(logits(m, b)),
    }


@pytest.mark.parametrize("cls", [SAMPa, SAM])
@pytest.mark.parametrize("form", ["tuple", "mapping", "attribute"])
def test_loss_fn_may_return_outputs_and_they_reach_the_caller(cls, form):
    torch.manual_seed(0)
    model = SmallNet()
    twin = copy.deepcopy(model)
    kw = dict(KW, lam=0.3) if cls is SAMPa else KW
    opt = cls(model, _forms()[form], torch.optim.SGD, **kw)
    ref = cls(twin, _forms()["loss"], torch.optim.SGD, **kw)
    batches = make_batches(4, batch=12)
    for i, b in enumerate(batches):
        at_x = copy.deepcopy(model)(b[0]).detach()     # SAM's outputs: its pass at x
        assert torch.equal(opt.step(b), ref.step(b))
        out = opt.last_outputs
        logits = out if form == "tuple" else out["logits"] if form == "mapping" else out.logits
        assert logits.shape == (12, 5) and not logits.requires_grad
        if cls is SAMPa:     # the x̃-pass, on the held (previous) batch: the returned loss
            assert torch.equal(F.cross_entropy(logits, batches[max(i - 1, 0)][1]), opt.last_loss)
        else:
            assert torch.equal(logits, at_x)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_step_idioms_of_other_libraries_get_one_message_each():
    model = SmallNet()
    opt = SAMPa(model, ce_loss, torch.optim.SGD, lam=0.2, **KW)
    b = make_batches(1, batch=12)[0]
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        return ce_loss(model, b)
    with pytest.raises(TypeError, match="pass the batch"):
        opt.step(closure)                                   # torch's closure idiom
    with pytest.raises(TypeError, match="pass the batch"):
        opt.step(closure=closure)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(ce_loss(model, b))                         # the recipe's scaler.scale(loss).backward()
    with pytest.raises(RuntimeError, match="grad_scaler=scaler"):
        scaler.step(opt)                                    # the AMP recipe
    with pytest.raises(RuntimeError, match="grad_scaler=scaler"):
        scaler.step(opt, b)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert MicroBatches is not None                         # exported at the top level


def test_params_none_takes_frozen_parameters_and_unfreezing_trains_them_as_torch_sgd():
    torch.manual_seed(0)
    model = SmallNet()
    twin = copy.deepcopy(model)
    for m in (model, twin):
        m.fc1.weight.requires_grad_(False)
    opt = SAM(model, ce_loss, torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.0, backend="torch")
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for i, b in enumerate(make_batches(6, batch=12)):
        if i == 3:                                          # unfreeze mid-run
            model.fc1.weight.requires_grad_(True)
            twin.fc1.weight.requires_grad_(True)
        opt.step(b)
        ref.zero_grad(set_to_none=True)
        ce_loss(twin, b).backward()
        ref.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
