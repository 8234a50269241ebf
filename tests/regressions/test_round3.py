"""Regressions found by the third round of probes: one test (or a few) per
case, each failing on the tree before the fix. Self-contained: its own
model, loss and batches.

With rho = 0 SAM's step is the base optimizer's step on the same batch
(x + 0 * g / (||g|| + eps) is x), which lets torch's own SGD/AdamW, edited
the same way, be the reference for the edits of opt.state and param groups.
"""
import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sampa_fused import SAM, SAMPa

try:
    import numpy as np
except ImportError:                  # the number-type tests then use tensors only
    np = None


class Net(nn.Module):
    def __init__(self, d_in=7, d_hidden=13, d_out=5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        out = self.fc2(h)
        extra = getattr(self, "extra", None)      # a module added after construction
        return out if extra is None else out + extra(h)


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def batches(n, seed=1, rows=9):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 7, generator=gen), torch.randint(0, 5, (rows,), generator=gen))
            for _ in range(n)]


def twins(seed=0):
    torch.manual_seed(seed)
    a = Net()
    return a, copy.deepcopy(a)


def snapshot(opt):
    """Parameters, the flat state and gy (copies), counts and the held batch:
    what a refusal must leave."""
    params = [p.detach().clone() for p in opt.model.parameters()]
    flats = [t.clone() for b in opt.flat.primary.slabs
             for t in list(b.state.values()) + ([b.gy] if hasattr(b, "gy") else [])]
    return params, flats, list(opt.flat.counts), getattr(opt, "held_batch", None)


def assert_unchanged(opt, snap):
    params, flats, counts, held = snap
    assert all(torch.equal(p, q) for p, q in zip(opt.model.parameters(), params))
    assert list(opt.flat.counts) == counts and getattr(opt, "held_batch", None) is held
    now = [t for b in opt.flat.primary.slabs
           for t in list(b.state.values()) + ([b.gy] if hasattr(b, "gy") else [])]
    assert len(now) == len(flats) and all(torch.equal(a, b) for a, b in zip(now, flats))


def torch_step(opt, model, batch):
    opt.zero_grad()
    ce(model, batch).backward()
    opt.step()


def assert_close(a, b, atol=1e-6):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=atol, rtol=1e-5), (n, (p - q).abs().max().item())


# ------------------------------------------------------------ 1. tensor hooks
def _masked_run(cls, engine="serial", steps=4, late=False, **kw):
    torch.manual_seed(0)
    model = Net()
    mask = (torch.rand_like(model.fc1.weight) > 0.5).float()
    if not late:
        model.fc1.weight.register_hook(lambda g: g * mask)
    extra = dict(lam=0.5) if cls is SAMPa else {}
    opt = cls(model, ce, torch.optim.SGD, rho=0.1, lr=0.1, engine=engine, backend="torch", **extra, **kw)
    if late:      # registered after construction and after a step: the hook dict is new
        opt.step(batches(1, seed=9)[0])
        model.fc1.weight.register_hook(lambda g: g * mask)
    before = model.fc1.weight.detach().clone()
    for b in batches(steps):
        opt.step(b)
    return model, mask, before, opt


@pytest.mark.parametrize("cls", [SAMPa, SAM])
@pytest.mark.parametrize("late", [False, True])
def test_a_tensor_hook_masks_both_gradients(cls, late):
    """SGD without momentum or weight decay moves only where the hooked
    gradient is non-zero: a masked entry must stay exactly where it was."""
    model, mask, before, _ = _masked_run(cls, late=late)
    after = model.fc1.weight.detach()
    assert torch.equal(after[mask == 0], before[mask == 0])
    assert not torch.equal(after[mask == 1], before[mask == 1])


def test_a_removed_tensor_hook_stops_acting_in_the_y_pass():
    torch.manual_seed(0)
    model = Net()
    handle = model.fc1.weight.register_hook(lambda g: g * 0)
    opt = SAMPa(model, ce, torch.optim.SGD, rho=0.1, lam=1.0, lr=0.1, backend="torch")
    bs = batches(3)
    opt.step(bs[0])
    handle.remove()
    before = model.fc1.weight.detach().clone()
    opt.step(bs[1])      # lam = 1: the update is gy alone, which must be unhooked now
    assert not torch.equal(model.fc1.weight.detach(), before)


def test_a_tensor_hook_acts_on_the_streams_engine():
    from fake_cuda import fake_cuda
    with fake_cuda():
        model, mask, before, _ = _masked_run(SAMPa, engine="streams")
        after = model.fc1.weight.detach()
    assert torch.equal(after[mask == 0], before[mask == 0])


def test_a_tensor_hook_added_after_a_cuda_graph_capture_acts():
    from fake_cuda import fake_cuda
    torch.manual_seed(0)
    model = Net()
    mask = (torch.rand_like(model.fc1.weight) > 0.5).float()
    with fake_cuda():
        opt = SAMPa(model, ce, torch.optim.SGD, rho=0.1, lam=0.5, lr=0.1, backend="torch",
                    engine="streams", graph=True, warmup_steps=1)
        bs = batches(8)
        for b in bs[:4]:
            opt.step(b)
        assert opt.engine.graph.captures == 1
        handle = model.fc1.weight.register_hook(lambda g: g * mask)
        before = model.fc1.weight.detach().clone()
        for b in bs[4:7]:
            opt.step(b)
        after = model.fc1.weight.detach().clone()
        assert opt.engine.graph.captures == 2
        handle.remove()
        opt.step(bs[7])
    assert torch.equal(after[mask == 0], before[mask == 0])
    assert not torch.equal(model.fc1.weight.detach()[mask == 0], after[mask == 0])


def _hooked_rank(rank, world, port, out):
    import torch.distributed as dist
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, mask, before, opt = _masked_run(SAMPa, engine="distributed", steps=3)
        if rank == 0:
            torch.save({"mask": mask, "before": before, "after": model.fc1.weight.detach().clone(),
                        "role": opt.engine.role}, out)
        del opt
    finally:
        import gc
        gc.collect()            # the engine closes its group first
        dist.destroy_process_group()


def test_a_tensor_hook_acts_on_the_distributed_engine(tmp_path):
    """Two ranks: one runs the x̃-pass, the other the y-pass (on the y leaves)."""
    import torch.multiprocessing as mp

    from sampa_fused.launch import free_port
    port = free_port()
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_hooked_rank, args=(2, port, out), nprocs=2, join=True)
    r = torch.load(out)
    assert torch.equal(r["after"][r["mask"] == 0], r["before"][r["mask"] == 0])
    assert not torch.equal(r["after"][r["mask"] == 1], r["before"][r["mask"] == 1])


def test_the_peer_engine_refuses_a_tensor_hook_naming_the_parameter():
    from fake_cuda import fake_cuda
    torch.manual_seed(0)
    model = Net()
    with fake_cuda(devices=2) as rt:
        opt = SAMPa(model, ce, torch.optim.SGD, rho=0.1, lam=0.5, lr=0.1, backend="torch",
                    engine="peer", devices=("cuda:0", "cuda:1"))
        bs = [tuple(rt.host(t.clone()) for t in b) for b in batches(2)]
        opt.step(bs[0])
        model.fc2.bias.register_hook(lambda g: g * 2)
        snap = snapshot(opt)
        with pytest.raises(RuntimeError, match=r"fc2\.bias.*hook"):
            opt.step(bs[1])
        assert_unchanged(opt, snap)


# ------------------------------------------------------------ 2. opt.state edits
EDITS = {
    "assign-zeros": lambda opt, p: opt.state[p].__setitem__(
        _first_state_key(opt, p), torch.zeros_like(p)),
    "assign-random": lambda opt, p: opt.state[p].__setitem__(
        _first_state_key(opt, p), torch.randn(p.shape, generator=torch.Generator().manual_seed(5))),
    "del-entry": lambda opt, p: opt.state.__delitem__(p),
    "clear": lambda opt, p: opt.state.clear(),
    "replace-entry": lambda opt, p: opt.state.__setitem__(p, {}),
}


def _first_state_key(opt, p):
    return "momentum_buffer" if "momentum_buffer" in opt.state[p] else "exp_avg"


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
                                      (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2))],
                         ids=["sgd", "adamw"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_edits_of_opt_state_act_as_on_torchs_optimizer(base, kw, edit):
    a, b = twins()
    opt = SAM(a, ce, base, rho=0.0, backend="torch", **kw)
    ref = base(b.parameters(), **kw)
    bs = batches(5)
    for batch in bs[:2]:
        opt.step(batch)
        torch_step(ref, b, batch)
    assert_close(a, b)
    if edit == "replace-entry" and base is torch.optim.AdamW:
        pytest.skip("torch's AdamW fails on an entry without 'step'")
    EDITS[edit](opt, a.fc1.weight)
    EDITS[edit](ref, b.fc1.weight)
    for batch in bs[2:]:
        opt.step(batch)
        torch_step(ref, b, batch)
    assert_close(a, b)


def test_opt_state_edits_reach_the_peer_engines_replica():
    """The peer engine keeps the state on both GPUs: an edit must reach both,
    so the trajectory equals the serial engine's with the same edits."""
    from fake_cuda import fake_cuda
    a, b = twins()
    kw = dict(lr=0.1, momentum=0.9, rho=0.1, lam=0.5, backend="torch")
    bs = batches(5)
    buf = torch.randn(a.fc2.weight.shape, generator=torch.Generator().manual_seed(4))

    def run(opt, model, host=lambda t: t):
        for i, batch in enumerate(bs):
            if i == 2:
                del opt.state[model.fc1.weight]
                opt.state[model.fc2.weight]["momentum_buffer"] = buf.clone()
            opt.step(tuple(host(t.clone()) for t in batch))
    run(SAMPa(b, ce, torch.optim.SGD, **kw), b)
    with fake_cuda(devices=2) as rt:
        run(SAMPa(a, ce, torch.optim.SGD, engine="peer", devices=("cuda:0", "cuda:1"), **kw), a, rt.host)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_adamw_step_count_assignment_and_a_wrong_shape_or_dtype_is_refused():
    a, b = twins()
    kw = dict(lr=1e-2)
    opt = SAM(a, ce, torch.optim.AdamW, rho=0.0, backend="torch", **kw)
    ref = torch.optim.AdamW(b.parameters(), **kw)
    bs = batches(4)
    for batch in bs[:2]:
        opt.step(batch)
        torch_step(ref, b, batch)
    for o, m in ((opt, a), (ref, b)):
        o.state[m.fc2.bias]["step"] = torch.tensor(0.0)
    batch = bs[2]
    snap = snapshot(opt)
    opt.state[a.fc1.weight]["exp_avg"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"fc1\.weight.*exp_avg.*shape"):
        opt.step(batch)
    assert_unchanged(opt, snap)
    opt.state[a.fc1.weight]["exp_avg"] = torch.zeros_like(a.fc1.weight, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"fc1\.weight.*exp_avg.*dtype"):
        opt.step(batch)
    assert_unchanged(opt, snap)
    del opt.state[a.fc1.weight]["exp_avg"]      # back to a valid state: torch's values
    opt.state[a.fc1.weight]["exp_avg"] = ref.state[b.fc1.weight]["exp_avg"].clone()
    for batch in bs[2:]:
        opt.step(batch)
        torch_step(ref, b, batch)
    assert_close(a, b)


def test_sgd_momentum_given_to_a_parameter_without_state_is_used():
    a, b = twins()
    kw = dict(lr=0.1, momentum=0.9)
    opt = SAM(a, ce, torch.optim.SGD, rho=0.0, backend="torch", **kw)
    ref = torch.optim.SGD(b.parameters(), **kw)
    buf = torch.randn(a.fc2.weight.shape, generator=torch.Generator().manual_seed(3))
    opt.state[a.fc2.weight]["momentum_buffer"] = buf.clone()
    ref.state[b.fc2.weight]["momentum_buffer"] = buf.clone()
    for batch in batches(3):
        opt.step(batch)
        torch_step(ref, b, batch)
    assert_close(a, b)


def test_adamw_state_without_step_for_a_parameter_without_state_is_refused():
    model = Net()
    opt = SAM(model, ce, torch.optim.AdamW, lr=1e-2, backend="torch")
    w = model.fc1.weight
    opt.state[w]["exp_avg"] = torch.zeros_like(w)
    opt.state[w]["exp_avg_sq"] = torch.zeros_like(w)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"fc1\.weight.*not \['step'\]"):
        opt.step(batches(1)[0])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.flat.counts == [0] * 4 and opt.step_count == 0
    opt.state[w]["step"] = torch.tensor(3.0)
    opt.step(batches(1)[0])
    assert opt.flat.counts[0] == 4 and opt.flat.counts[1] == 1


def test_opt_state_edits_are_seen_after_load_state_dict():
    a, b = twins()
    kw = dict(lr=0.1, momentum=0.9)
    opt = SAMPa(a, ce, torch.optim.SGD, backend="torch", **kw)
    bs = batches(4)
    for batch in bs[:2]:
        opt.step(batch)
    sd = opt.state_dict()
    b.load_state_dict(a.state_dict())
    opt2 = SAMPa(b, ce, torch.optim.SGD, backend="torch", **kw)
    opt2.load_state_dict(sd)
    for o, m in ((opt, a), (opt2, b)):
        del o.state[m.fc2.weight]
        o.step(bs[2])
    assert torch.equal(a.fc2.weight, b.fc2.weight)
    assert torch.equal(opt.state[a.fc2.weight]["momentum_buffer"], opt2.state[b.fc2.weight]["momentum_buffer"])
    assert opt.flat.counts == opt2.flat.counts and opt.flat.counts[2] == 1


# ------------------------------------------------------------ 3. params lists
def test_edits_of_a_groups_params_list_are_honoured():
    a, b = twins()
    kw = dict(lr=0.1, momentum=0.9)
    opt = SAM(a, ce, torch.optim.SGD, rho=0.0, backend="torch", params=list(a.fc1.parameters()), **kw)
    ref = torch.optim.SGD(list(b.fc1.parameters()), **kw)
    bs = batches(6)
    for batch in bs[:2]:
        opt.step(batch)
        torch_step(ref, b, batch)
    for o, m in ((opt, a), (ref, b)):
        o.param_groups[0]["params"].append(m.fc2.weight)      # trained from now on
        ps = o.param_groups[0]["params"]
        del ps[next(i for i, q in enumerate(ps) if q is m.fc1.bias)]     # frozen from now on
    for batch in bs[2:4]:
        opt.step(batch)
        torch_step(ref, b, batch)
    assert_close(a, b)
    assert torch.equal(a.fc2.bias, b.fc2.bias)
    for o, m in ((opt, a), (ref, b)):
        o.param_groups[0]["params"] = [m.fc1.weight, m.fc2.bias]     # the list replaced
    for batch in bs[4:]:
        opt.step(batch)
        torch_step(ref, b, batch)
    assert_close(a, b)


def test_a_bad_edit_of_a_params_list_is_refused_naming_the_group():
    model = Net()
    opt = SAMPa(model, ce, torch.optim.SGD, lr=0.1, momentum=0.9,
                params=[{"params": [model.fc1.weight]}, {"params": [model.fc2.weight]}])
    bs = batches(2)
    opt.step(bs[0])
    snap = snapshot(opt)
    opt.param_groups[1]["params"].append(nn.Parameter(torch.ones(3)))
    with pytest.raises(ValueError, match="param group 1.*not a parameter of the model"):
        opt.step(bs[1])
    assert_unchanged(opt, snap)
    opt.param_groups[1]["params"][-1] = model.fc1.weight
    with pytest.raises(ValueError, match="param group 1.*fc1.weight.*more than one param group"):
        opt.step(bs[1])
    assert_unchanged(opt, snap)


# ------------------------------------------------------------ 4. growing the model
def test_add_param_group_with_a_module_added_after_construction():
    torch.manual_seed(0)
    a = Net()
    extra = nn.Linear(13, 5)
    b = copy.deepcopy(a)
    b.extra = copy.deepcopy(extra)
    opt = SAMPa(a, ce, torch.optim.SGD, rho=0.1, lam=0.3, lr=0.1, momentum=0.9, backend="torch")
    a.extra = extra
    opt.add_param_group({"params": a.extra.parameters()})
    ref = SAMPa(b, ce, torch.optim.SGD, rho=0.1, lam=0.3, lr=0.1, momentum=0.9, backend="torch",
                params=[{"params": [p for n, p in b.named_parameters() if not n.startswith("extra")]},
                        {"params": b.extra.parameters()}])
    for batch in batches(3):
        assert torch.equal(opt.step(batch), ref.step(batch))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_peer_engine_refusing_a_new_module_leaves_the_optimizer_as_it_was():
    """engine='peer' keeps a copy of the model made at construction: it
    cannot take a module added later. The refusal undoes add_param_group;
    the next steps equal the serial engine's without it."""
    from fake_cuda import fake_cuda
    a, b = twins()
    kw = dict(lr=0.1, momentum=0.9, rho=0.1, lam=0.5, backend="torch")
    bs = batches(4)
    ref = SAMPa(b, ce, torch.optim.SGD, **kw)
    for batch in bs:
        ref.step(batch)
    with fake_cuda(devices=2) as rt:
        opt = SAMPa(a, ce, torch.optim.SGD, engine="peer", devices=("cuda:0", "cuda:1"), **kw)
        host = [tuple(rt.host(t.clone()) for t in batch) for batch in bs]
        opt.step(host[0])
        opt.step(host[1])
        with pytest.raises(RuntimeError, match="extra.weight.*added to the model later"):
            opt.add_param_group({"params": _grown(a).parameters()})
        del a.extra
        assert len(opt.param_groups) == 1 and len(opt.flat.layout.params) == 4
        opt.step(host[2])
        opt.step(host[3])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def _grown(model):
    model.extra = nn.Linear(13, 5)
    return model.extra


@pytest.mark.parametrize("cls", [SAMPa, SAM])
def test_pruning_after_construction_trains_as_pruning_before(cls):
    """torch.nn.utils.prune re-registers the weight as weight_orig (the same
    Parameter object): the optimizer follows it, and training equals an
    optimizer built on the pruned model."""
    prune = pytest.importorskip("torch.nn.utils.prune")
    a, b = twins()
    extra = dict(lam=0.3) if cls is SAMPa else {}
    kw = dict(rho=0.1, lr=0.1, momentum=0.9, backend="torch", **extra)
    opt = cls(a, ce, torch.optim.SGD, **kw)
    prune.l1_unstructured(a.fc1, "weight", amount=0.5)
    prune.l1_unstructured(b.fc1, "weight", amount=0.5)
    ref = cls(b, ce, torch.optim.SGD, **kw)
    for batch in batches(3):
        assert torch.allclose(opt.step(batch), ref.step(batch), atol=1e-6)
    assert_close(a, b)
    assert (a.fc1.weight[a.fc1.weight_mask == 0] == 0).all()


def test_a_replaced_parameter_gets_an_accurate_message_and_the_recipe_works():
    torch.manual_seed(0)
    model = Net()
    opt = SAMPa(model, ce, torch.optim.SGD, lr=0.1, momentum=0.9, backend="torch")
    bs = batches(3)
    opt.step(bs[0])
    model.fc2.weight = nn.Parameter(model.fc2.weight.detach().clone())
    with pytest.raises(RuntimeError, match=r"fc2\.weight.*new Parameter object.*load_state_dict"):
        opt.step(bs[1])
    sd = opt.state_dict()                               # the recipe of the message
    opt2 = SAMPa(model, ce, torch.optim.SGD, lr=0.1, momentum=0.9, backend="torch")
    opt2.load_state_dict(sd)
    opt2.step(bs[1])
    # a parameter removed from the model: say so, and how to go on
    model2 = Net()
    opt3 = SAMPa(model2, ce, torch.optim.SGD, lr=0.1, backend="torch")
    del model2.fc2._parameters["bias"]
    model2.fc2.bias = None
    with pytest.raises(RuntimeError, match=r"fc2\.bias is no longer a parameter of the model.*params"):
        opt3.step(bs[0])
    gone = opt3.flat.layout.params[3]
    ps = opt3.param_groups[0]["params"]
    opt3.param_groups[0]["params"] = [q for q in ps if q is not gone]     # the message's recipe
    opt3.step(bs[0])
    assert len(opt3.flat.layout.params) == 3


# ------------------------------------------------------------ 5. number types
NUMBERS = {
    "numpy-lr": lambda: dict(lr=np.float32(0.1)),
    "numpy-rho": lambda: dict(rho=np.float32(0.05)),
    "tensor-rho": lambda: dict(rho=torch.tensor(0.05)),
    "numpy-lam": lambda: dict(lam=np.float32(0.25)),
    "numpy-momentum-wd": lambda: dict(momentum=np.float32(0.9), weight_decay=np.float64(1e-3)),
    "tensor-lr": lambda: dict(lr=torch.tensor(0.1)),
    "numpy-int-rho": lambda: dict(rho=np.int64(0)),
    "numpy-max-grad-norm": lambda: dict(max_grad_norm=np.float32(0.5)),
}
needs_numpy = pytest.mark.skipif(np is None, reason="needs numpy")


def _as_float(v):
    return float(v.item()) if torch.is_tensor(v) else float(v)


@needs_numpy
@pytest.mark.parametrize("case", list(NUMBERS))
def test_numpy_scalars_and_0dim_tensors_are_hyperparameters(case):
    a, b = twins()
    given = NUMBERS[case]()
    kw = dict(lr=0.1, rho=0.05, lam=0.2)
    opt = SAMPa(a, ce, torch.optim.SGD, backend="torch", **{**kw, **given})
    ref = SAMPa(b, ce, torch.optim.SGD, backend="torch", **{**kw, **{k: _as_float(v) for k, v in given.items()}})
    for batch in batches(3):
        assert torch.equal(opt.step(batch), ref.step(batch))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    opt.param_groups[0]["lr"] = np.float32(0.05)        # as a scheduler or a user might
    opt.param_groups[0]["rho"] = np.float64(0.1)
    opt.step(batches(1, seed=4)[0])


@needs_numpy
def test_adamw_betas_as_tensors_and_numpy_scalars_in_a_group():
    a, b = twins()
    opt = SAMPa(a, ce, torch.optim.AdamW, backend="torch", lr=1e-2, betas=(torch.tensor(0.9), torch.tensor(0.99)))
    # the same numbers: a float32 tensor's 0.9 is not the float 0.9
    ref = SAMPa(b, ce, torch.optim.AdamW, backend="torch", lr=1e-2,
                betas=(_as_float(torch.tensor(0.9)), _as_float(torch.tensor(0.99))))
    for batch in batches(3):
        assert torch.equal(opt.step(batch), ref.step(batch))
    opt.param_groups[0]["betas"] = (np.float32(0.5), np.float32(0.9))     # edited between steps
    ref.param_groups[0]["betas"] = (float(np.float32(0.5)), float(np.float32(0.9)))
    for batch in batches(2, seed=3):
        assert torch.equal(opt.step(batch), ref.step(batch))


@pytest.mark.parametrize("bad", [dict(lr=float("nan")), dict(rho="0.1"), dict(lam=torch.tensor([0.2, 0.3])),
                                 dict(params_lr="0.1"), dict(momentum=float("inf")), dict(rho=torch.tensor(True)),
                                 dict(max_grad_norm="1.0"), dict(max_grad_norm=float("nan"))])
def test_a_bad_hyperparameter_is_refused_at_construction(bad):
    model = Net()
    bad = dict(bad)
    kw = dict(lr=0.1, rho=0.05, lam=0.2)
    if "params_lr" in bad:
        kw["params"] = [{"params": model.parameters(), "lr": bad.pop("params_lr")}]
    with pytest.raises((ValueError, TypeError)):
        SAMPa(model, ce, torch.optim.SGD, **{**kw, **bad})


# ------------------------------------------------------------ 7. empty batch
@pytest.mark.parametrize("cls", [SAMPa, SAM])
def test_an_empty_batch_is_refused_by_name(cls):
    model = Net()
    opt = cls(model, ce, torch.optim.SGD, lr=0.1, momentum=0.9)
    bs = batches(2)
    opt.step(bs[0])
    snap = snapshot(opt)
    x, y = bs[1]
    with pytest.raises(ValueError, match="batch is empty"):
        opt.step((x[:0], y[:0]))
    assert_unchanged(opt, snap)
    opt.step(bs[1])
