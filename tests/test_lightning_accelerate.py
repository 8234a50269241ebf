"""The loops people train with: Lightning (manual optimization) and
accelerate. Skipped where the packages are missing (the GPU machine)."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from reference import SmallNet, ce_loss, make_batches

from sampa_fused import SAMPa

STEPS = 5


def _kw():
    return dict(lr=0.1, momentum=0.9, rho=0.1, lam=0.3, backend="torch")


def _assert_equals_a_plain_loop(losses, net, twin, batches):
    """`losses` and `net` equal a plain loop of SAMPa steps on `twin`."""
    opt = SAMPa(twin, ce_loss, torch.optim.SGD, **_kw())
    ref = [opt.step(b) for b in batches]
    assert len(losses) == len(ref)
    for a, b in zip(losses, ref):
        assert torch.equal(a, b)
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)


class _Batches:
    """An iterable of ready batches (Lightning reads a list as several loaders)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _trainer(L):
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    return L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def test_lightning_manual_optimization_equals_a_plain_loop():
    L = pytest.importorskip("lightning")
    torch.manual_seed(0)
    net = SmallNet()
    twin = copy.deepcopy(net)
    batches = make_batches(STEPS, batch=12)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = net
            self.losses = []

        def training_step(self, batch, idx):
            # Lightning calls opt.step(closure=..., batch=batch) through its precision plugin
            self.losses.append(self.optimizers().step(batch=batch).detach())

        def configure_optimizers(self):
            return SAMPa(self.net, ce_loss, torch.optim.SGD, **_kw())

    m = Module()
    _trainer(L).fit(m, train_dataloaders=_Batches(batches))
    assert len(m.losses) == STEPS
    _assert_equals_a_plain_loop(m.losses, net, twin, batches)


def test_lightning_automatic_optimization_is_refused_pointing_to_manual():
    L = pytest.importorskip("lightning")
    net = SmallNet()

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def training_step(self, batch, idx):
            return ce_loss(self.net, batch)

        def configure_optimizers(self):
            return SAMPa(self.net, ce_loss, torch.optim.SGD, **_kw())

    with pytest.raises(TypeError, match="manual optimization"):
        _trainer(L).fit(Module(), train_dataloaders=_Batches(make_batches(2, batch=12)))


@pytest.mark.parametrize("order", ["optimizer-first", "prepare-first"])
def test_accelerate_prepare_either_order_equals_a_plain_loop(order):
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    net = SmallNet()
    twin = copy.deepcopy(net)
    batches = make_batches(STEPS, batch=12)
    acc = accelerate.Accelerator(cpu=True)
    if order == "optimizer-first":
        opt = SAMPa(net, ce_loss, torch.optim.SGD, **_kw())
        model, opt = acc.prepare(net, opt)
    else:
        model = acc.prepare(net)
        opt = acc.prepare(SAMPa(model, ce_loss, torch.optim.SGD, **_kw()))
    losses = []
    for b in batches:
        assert opt.step(b) is None                # accelerate's wrapper returns nothing:
        losses.append(opt.optimizer.last_loss)    # the loss is kept on the optimizer
    _assert_equals_a_plain_loop(losses, net, twin, batches)


def test_accelerate_accumulate_is_refused_pointing_to_accumulation_steps():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState
    net = SmallNet()
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=4)
    try:
        model, opt = acc.prepare(net, SAMPa(net, ce_loss, torch.optim.SGD, **_kw()))
        before = [p.detach().clone() for p in net.parameters()]
        with pytest.raises(RuntimeError, match="accumulation_steps=4"):
            for b in make_batches(4, batch=12):     # steps skipped on 3 of 4, refused on the 4th
                with acc.accumulate(model):
                    opt.step(b)
        assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
