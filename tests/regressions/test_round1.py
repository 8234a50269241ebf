"""Regressions found by the first round of probes: edits made around the
optimizer (storage or .grad replaced, freezing, unused parameters, two
optimizers on one model, structured batches, a disabled GradScaler, failed
loads, invalid hyperparameters, refused base optimizers, dtype / device
moves, deepcopy). Each failed (or errored) at df9f69f. Self-contained (its
own model, loss and batches) so that it runs against older trees too."""
import collections
import copy
import dataclasses
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sampa_fused import SAM, SAMPa


# ---------------------------------------------------------------- fixtures
class Net(nn.Module):
    def __init__(self, d_in=7, d_hidden=13, d_out=5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def batches(n, seed=1, shape=(9, 7)):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=gen), torch.randint(0, 5, (shape[0],), generator=gen))
            for _ in range(n)]


def conv_batches(n, seed=2):
    return batches(n, seed, shape=(6, 3, 6, 6))


def twins(model_cls=Net, seed=0):
    torch.manual_seed(seed)
    a = model_cls()
    return a, copy.deepcopy(a)


def sampa(model, **kw):
    args = dict(rho=0.1, lam=0.3, lr=0.1, momentum=0.9, weight_decay=1e-3, backend="torch")
    args.update(kw)
    args = {k: v for k, v in args.items() if v is not None or k == "lam"}
    base = args.pop("base", torch.optim.SGD)
    loss = args.pop("loss", ce)
    return SAMPa(model, loss, base, **args)


def same_params(a, b):
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(torch.equal(p, q) for p, q in zip(pa, pb))


def assert_same_params(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.dtype == q.dtype and torch.equal(p, q), n


def same_tree(a, b):
    """Bit-for-bit equality of nested checkpoints (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _state_by_position(model, opt):
    """opt.state keyed by parameter position (deep copies of the parameters would be new keys)."""
    return [copy.deepcopy(dict(opt.state[p])) if p in opt.state else None for p in model.parameters()]


def snap(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            _state_by_position(model, opt),
            copy.deepcopy(opt.state_dict()), len(opt.state))


def assert_snap_equal(model, opt, before):
    params, state, sd, _ = before
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params)), "parameters changed"
    assert len(opt.state) == before[3] and same_tree(_state_by_position(model, opt), state), \
        "opt.state changed"
    assert same_tree(opt.state_dict(), sd), "opt.state_dict() changed"


# ------------------------------------------------ 1. storage replaced after construction
def _replace_data(model):
    for p in model.parameters():
        p.data = p.data.clone()


def _vector_to_parameters(model):
    vec = torch.nn.utils.parameters_to_vector(model.parameters()).clone()
    torch.nn.utils.vector_to_parameters(vec, model.parameters())


@pytest.mark.parametrize("how", ["p.data", "vector_to_parameters", "channels_last"])
def test_storage_replaced_after_construction(how):
    conv = how == "channels_last"
    model, twin = twins(ConvNet if conv else Net)
    if conv:   # the twin has the same layout from the start: the forwards compute the same
        twin.to(memory_format=torch.channels_last)
    data = conv_batches(6) if conv else batches(6)
    opt, ref = sampa(model), sampa(twin)
    for b in data[:2]:
        opt.step(b)
        ref.step(b)
    if how == "p.data":
        _replace_data(model)
    elif how == "vector_to_parameters":
        _vector_to_parameters(model)
    else:
        model.to(memory_format=torch.channels_last)
    assert_same_params(model, twin)          # same values, new storage
    replaced = [p.detach().clone() for p in model.parameters()]
    for b in data[2:]:
        opt.step(b)
        ref.step(b)
    assert_same_params(model, twin)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), replaced))   # training continued


# ------------------------------------------------ 2. p.grad replaced between steps
def test_grad_replaced_between_steps():
    model, twin = twins()
    opt, ref = sampa(model), sampa(twin)
    for i, b in enumerate(batches(6)):
        if i in (2, 4):
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        opt.step(b)
        ref.step(b)
    assert_same_params(model, twin)


# ------------------------------------------------ 3. freeze then unfreeze vs torch
@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
                                     (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2))])
def test_freeze_unfreeze_equals_torch(base, kw):
    model, ref_model = twins()
    opt = SAMPa(model, ce, base, rho=0.0, lam=0.0, backend="torch", **kw)
    torch_opt = base(ref_model.parameters(), **kw)
    data = batches(8)
    lagged = [data[0]] + data[:-1]             # SAMPa's step k: the gradient of batch k-1
    frozen = {3, 4, 5}                         # fc1 frozen for these steps
    for k, (b, lb) in enumerate(zip(data, lagged)):
        for m in (model, ref_model):
            m.fc1.requires_grad_(k not in frozen)
        opt.step(b)
        torch_opt.zero_grad(set_to_none=True)
        ce(ref_model, lb).backward()
        torch_opt.step()
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=f"step {k}: {n}")


# ------------------------------------------------ 4. a parameter unused in forward
class WithUnused(Net):
    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.full((3,), 0.5))


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
                                     (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1))])
def test_unused_parameter_untouched(base, kw):
    torch.manual_seed(0)
    model = WithUnused()
    opt = SAMPa(model, ce, base, rho=0.1, lam=0.3, backend="torch", **kw)
    w0 = model.unused.detach().clone()
    st0 = copy.deepcopy(dict(opt.state.get(model.unused, {})))
    fc1 = model.fc1.weight.detach().clone()
    for b in batches(4):
        opt.step(b)
    assert torch.equal(model.unused, w0)
    st = dict(opt.state.get(model.unused, {}))
    assert same_tree(st, st0) or all(                       # no state, or all of it still zero
        not isinstance(v, torch.Tensor) or v.dim() == 0 and float(v) == 0 or not v.any()
        for v in st.values()), st
    idx = [p for g in opt.param_groups for p in g["params"]].index(model.unused)
    ckpt = opt.state_dict()
    for n, v in ckpt["state"].get(idx, {}).items():
        assert float(v.float().abs().sum()) == 0, n
    counts = ckpt.get("sampa_fused", {}).get("counts")
    if counts is not None:
        assert counts[idx] == 0
    assert not torch.equal(model.fc1.weight, fc1)            # the rest trained


# ------------------------------------------------ 5. two optimizers on disjoint parts
def test_two_optimizers_see_each_others_weights():
    lam = 1.0            # opt1's update is its y-pass gradient alone: a stale head shows in it
    torch.manual_seed(0)
    model = Net()
    backbone, head = list(model.fc1.parameters()), list(model.fc2.parameters())
    opt1 = sampa(model, params=backbone, rho=0.0, lam=lam, momentum=0.0, weight_decay=0.0)
    opt2 = sampa(model, params=head, rho=0.0, lam=lam, momentum=0.0, weight_decay=0.0)
    seen = []
    model.fc2.register_forward_pre_hook(lambda m, i: seen.append(m.weight.detach().clone()))
    data = batches(6)
    names = ("fc1.weight", "fc1.bias")
    gy = [torch.zeros_like(p) for p in backbone]   # reference for opt1 (lam = 1): its y-pass gradient
    for k, b in enumerate(data):
        for opt in (opt1, opt2):
            held = data[max(k - 1, 0)]             # the held batch: the previous one (first step: b)
            with torch.no_grad():
                expect = ce(model, held)          # rho = 0: the x̃-pass loss at the current weights
            if opt is opt1:
                # y = x - lr gy (SGD, no momentum), with the head as it is NOW (opt2's)
                y = {n: (p - 0.1 * g).detach().requires_grad_(True) for n, p, g in zip(names, backbone, gy)}
                gy = list(torch.autograd.grad(ce(lambda x: torch.func.functional_call(model, y, (x,)), b),
                                              list(y.values())))
                want = [(p - 0.1 * g).detach() for p, g in zip(backbone, gy)]   # g = gy_{t+1}
            seen.clear()
            loss = opt.step(b)
            if opt is opt1:
                for n, p, w in zip(names, backbone, want):
                    torch.testing.assert_close(p, w, rtol=1e-6, atol=1e-6,
                                               msg=f"step {k}: {n}: opt1's y-pass used a stale head")
            torch.testing.assert_close(loss, expect, rtol=0, atol=1e-7,
                                       msg=f"step {k}: the x̃-pass used stale weights of the other part")
            if opt is opt1:   # the head is opt2's: both passes of opt1 (x̃ and y) see its current value
                assert len(seen) >= 2 and all(torch.equal(w, seen[0]) for w in seen), \
                    f"step {k}: opt1's passes saw different heads"
                assert torch.equal(seen[0], model.fc2.weight)


# ------------------------------------------------ 6. dataclass / UserDict batches
@dataclasses.dataclass
class DCBatch:
    x: torch.Tensor
    y: torch.Tensor


def dc_loss(model, batch):
    return F.cross_entropy(model(batch.x), batch.y)


def ud_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"])


def _make(kind, x, y):
    if kind == "dataclass":
        return DCBatch(x, y)
    return collections.UserDict(x=x, y=y)


@pytest.mark.parametrize("kind", ["dataclass", "UserDict"])
def test_structured_batches_held_as_copies_and_checkpointed(kind):
    loss = dc_loss if kind == "dataclass" else ud_loss
    model, twin = twins()
    opt, ref = sampa(model, loss=loss), sampa(twin, loss=loss)
    data = batches(6)
    sx, sy = data[0][0].clone(), data[0][1].clone()      # the loader's reused buffers
    static = _make(kind, sx, sy)
    for x, y in data[:4]:
        sx.copy_(x)
        sy.copy_(y)
        opt.step(static)
        sx.normal_()                                     # the loader overwrites them after step()
        sy.random_(0, 5)
        ref.step(_make(kind, x.clone(), y.clone()))
    assert_same_params(model, twin)
    # a checkpoint holding such a batch survives torch.save / torch.load (weights_only=True default)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)                                 # torch's default: weights_only=True
    fresh_model = copy.deepcopy(model)
    fresh = sampa(fresh_model, loss=loss)
    fresh.load_state_dict(sd)
    for x, y in data[4:]:
        a = fresh.step(_make(kind, x.clone(), y.clone()))
        b = ref.step(_make(kind, x.clone(), y.clone()))
        assert torch.equal(a, b)
    assert_same_params(fresh_model, twin)


# ------------------------------------------------ 7. a disabled GradScaler
def test_disabled_grad_scaler_equals_none():
    model, twin = twins()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    opt, ref = sampa(model, grad_scaler=scaler), sampa(twin)
    for b in batches(4):
        assert torch.equal(opt.step(b), ref.step(b))
    assert_same_params(model, twin)


# ------------------------------------------------ 8. a failed load_state_dict changes nothing
def _bad_checkpoint(kind, opt):
    if kind == "short_gy":
        sd = copy.deepcopy(opt.state_dict())
        sd["sampa_fused"]["gy"] = sd["sampa_fused"]["gy"][:-1]
        return sd, "gy"
    if kind == "no_held_batch":
        sd = copy.deepcopy(opt.state_dict())
        del sd["sampa_fused"]["held_batch"]
        return sd, r"checkpoint.*held_batch"
    if kind == "held_batch_none_after_steps":
        sd = copy.deepcopy(opt.state_dict())
        sd["sampa_fused"]["held_batch"] = None     # t > 0 but no batch: not a checkpoint save() makes
        return sd, "held"
    if kind == "other_shape":
        other = Net(d_hidden=11)
        o = sampa(other)
        for b in batches(2, seed=5):
            o.step(b)
        return o.state_dict(), "shape"
    # an SGD checkpoint into an AdamW optimizer
    m = copy.deepcopy(opt.model)
    o = sampa(m)
    for b in batches(2, seed=5):
        o.step(b)
    return o.state_dict(), "SGD"


@pytest.mark.parametrize("kind", ["short_gy", "no_held_batch", "other_shape", "sgd_into_adamw",
                                  "held_batch_none_after_steps"])
def test_failed_load_leaves_everything_unchanged(kind):
    kw = dict(base=torch.optim.AdamW, lr=1e-2, momentum=None) if kind == "sgd_into_adamw" else {}
    model, twin = twins()
    opt, ref = sampa(model, **kw), sampa(twin, **kw)
    data = batches(6)
    for b in data[:3]:
        opt.step(b)
        ref.step(b)
    sd, match = _bad_checkpoint(kind, opt)
    before = snap(model, opt)
    with pytest.raises((ValueError, KeyError), match=match):
        opt.load_state_dict(sd)
    assert_snap_equal(model, opt, before)
    for b in data[3:]:
        assert torch.equal(opt.step(b), ref.step(b))
    assert_same_params(model, twin)


# ------------------------------------------------ 12. hyperparameters made invalid between steps
def _edit(group, how):
    key, value = how
    if value is _DEL:
        del group[key]
    else:
        group[key] = value


_DEL = object()
EDITS = [("lam", None), ("lam", _DEL), ("lr", float("nan")), ("weight_decay", float("inf"))]
SAM_EDITS = [("lr", float("nan")), ("weight_decay", float("inf"))]


@pytest.mark.parametrize("cls,how", [(SAMPa, e) for e in EDITS] + [(SAM, e) for e in SAM_EDITS],
                         ids=lambda v: v.__name__ if isinstance(v, type) else
                         f"{v[0]}={'del' if v[1] is _DEL else v[1]}")
def test_invalid_hyperparameter_between_steps(cls, how):
    torch.manual_seed(0)
    model = Net()
    kw = dict(rho=0.1, lr=0.1, momentum=0.9, weight_decay=1e-3, backend="torch")
    if cls is SAMPa:
        kw["lam"] = 0.3
    opt = cls(model, ce, torch.optim.SGD, **kw)
    data = batches(3)
    opt.step(data[0])
    params = [p.detach().clone() for p in model.parameters()]
    _edit(opt.param_groups[0], how)
    # the message names the hyperparameter and where it lives (not a bare KeyError('lam'))
    with pytest.raises((ValueError, TypeError, KeyError), match=rf"param group 0.*{how[0]}"):
        opt.step(data[1])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------ 13. refused at construction
def test_lbfgs_base_refused():
    with pytest.raises((ValueError, TypeError), match="LBFGS"):
        SAMPa(Net(), ce, torch.optim.LBFGS, rho=0.1, lam=0.2, lr=0.1)


def test_differentiable_base_refused():
    with pytest.raises((ValueError, TypeError), match="differentiable"):
        SAMPa(Net(), ce, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, differentiable=True)


def test_sam_with_lam_refused():
    # clear: SAM has no lam, it is SAMPa's (not "got multiple values for keyword argument 'lam'")
    with pytest.raises((ValueError, TypeError), match=r"SAM takes no lam|lam.*SAMPa"):
        SAM(Net(), ce, torch.optim.SGD, rho=0.1, lam=0.1, lr=0.1)


# ------------------------------------------------ 14. model.double(), meta, closures, deepcopy
PARAM_NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def test_double_after_construction_works_or_names_the_parameter():
    model, twin = twins()
    opt = sampa(model)
    data = batches(5)
    opt.step(data[0])
    model.double()
    loss64 = lambda m, b: ce(m, (b[0].double(), b[1]))  # noqa: E731
    opt.loss_fn = loss64
    try:
        for b in data[1:]:
            opt.step(b)
    except Exception as e:     # refused: the message names a parameter
        assert any(n in str(e) for n in PARAM_NAMES), repr(e)
        return
    # it worked: the parameters are float64 and follow a twin made float64 at the same point
    assert all(p.dtype == torch.float64 for p in model.parameters())
    ref = sampa(twin)
    ref.step(data[0])
    twin.double()
    ref.loss_fn = loss64
    ref2_model = copy.deepcopy(twin)
    ref2 = sampa(ref2_model, loss=loss64)
    ref2.load_state_dict(ref.state_dict())
    for b in data[1:]:
        ref2.step(b)
    for p, q in zip(model.parameters(), ref2_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_meta_device_refused_naming_the_parameter():
    model = Net()
    opt = sampa(model)
    opt.step(batches(1)[0])
    model.to("meta")
    with pytest.raises((RuntimeError, ValueError), match=r"fc1\.weight|fc1\.bias|fc2\.weight|fc2\.bias"):
        opt.step(batches(1, seed=3)[0])


def test_closure_instead_of_batch_says_pass_the_batch():
    model = Net()
    opt = sampa(model)
    data = batches(2)
    opt.step(data[0])
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = ce(model, data[1])
        loss.backward()
        return loss
    with pytest.raises(TypeError, match="batch"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_deepcopy_works_or_raises_clearly():
    model = Net()
    opt = sampa(model)
    opt.step(batches(1)[0])
    before = [p.detach().clone() for p in model.parameters()]
    try:
        dup = copy.deepcopy(opt)
    except TypeError as e:
        assert "state_dict" in str(e), repr(e)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        return
    dup.step(batches(1, seed=4)[0])     # a working copy must not move the original
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_meta_then_to_empty_trains_the_model_or_is_refused():
    model = Net()
    opt = sampa(model)
    opt.step(batches(1)[0])
    sd = copy.deepcopy(model.state_dict())
    model.to("meta")
    model.to_empty(device="cpu")
    model.load_state_dict(sd)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        for b in batches(2, seed=3):
            opt.step(b)
    except (RuntimeError, ValueError) as e:     # refused: naming a parameter
        assert any(n in str(e) for n in PARAM_NAMES), repr(e)
        return
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before)), \
        "the optimizer stepped parameters the model no longer holds"
