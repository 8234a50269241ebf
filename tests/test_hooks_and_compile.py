"""The y-pass runs on the user's own module (ymodel.py), so what a user adds to
the model after building the optimizer runs in every pass: forward hooks,
a replaced `model.forward` (accelerate's autocast wrapper is one), and a
torch.compile'd module."""
from __future__ import annotations

import copy

import pytest
import torch
from fake_cuda import fake_cuda
from reference import SmallNet, ce_loss, make_batches
from torch._dynamo.utils import counters

from sampa_fused import SAM, SAMPa

STEPS = 4


def _opt(cls, model, engine="serial"):
    kw = dict(lr=0.1, momentum=0.9, rho=0.1, backend="torch", engine=engine)
    if cls is SAMPa:
        kw["lam"] = 0.3
    return cls(model, ce_loss, torch.optim.SGD, **kw)


def _passes_per_step(cls, engine, install):
    """Steps an optimizer built before `install(model, record)` adds something;
    returns, per step, the first-layer weights each call of it saw."""
    torch.manual_seed(0)
    model = SmallNet()
    batches = make_batches(STEPS + 1, batch=12)
    opt = _opt(cls, model, engine)
    opt.step(batches[0])               # SAMPa's first step computes its first y gradient
    seen = []
    install(model, lambda: seen.append(next(model.parameters()).detach().clone()))
    per_step = []
    for b in batches[1:]:
        seen.clear()
        opt.step(b)
        per_step.append(list(seen))
    return per_step


def _hook(model, record):
    model.register_forward_hook(lambda m, i, o: record())


def _wrapper(model, record):
    inner = model.forward

    def forward(*args, **kwargs):      # as accelerate.prepare replaces forward
        record()
        return inner(*args, **kwargs)
    model.forward = forward


@pytest.mark.parametrize("install", [_hook, _wrapper], ids=["forward-hook", "forward-wrapper"])
@pytest.mark.parametrize("cls", [SAMPa, SAM])
@pytest.mark.parametrize("engine", ["serial", "streams"])
def test_added_after_construction_runs_in_both_passes(engine, cls, install):
    if engine == "streams":
        with fake_cuda():
            per_step = _passes_per_step(cls, engine, install)
    else:
        per_step = _passes_per_step(cls, engine, install)
    for i, seen in enumerate(per_step):
        # Two passes a step, at two different points (SAMPa: x̃ and y; SAM: x and x̃).
        assert len(seen) == 2, f"step {i}: called {len(seen)} times"
        assert not torch.equal(seen[0], seen[1]), f"step {i}: both calls saw the same weights"


@pytest.mark.parametrize("cls", [SAMPa, SAM])
def test_torch_compile_model_compiles_once_and_equals_eager(cls):
    """The y-pass swaps the y parameters into the compiled module: dynamo
    treats module parameters as graph inputs, so nothing recompiles (one
    frame, one graph for the whole run) and aot_eager runs the same ops in
    the same order as eager."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = SmallNet()
    twin = copy.deepcopy(model)
    batches = make_batches(STEPS, batch=12)
    opt = _opt(cls, torch.compile(model, backend="aot_eager"))
    ref = _opt(cls, twin)
    for b in batches:
        assert torch.equal(opt.step(b), ref.step(b))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert dict(counters["frames"]) == {"total": 1, "ok": 1}
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]
