"""engine="streams": two CUDA streams, and the whole step as a CUDA graph.

On CPU: the refusal, the option checks, the device-hyperparameter math against
the host rules, and the whole step with device-resident hyperparameters run
eagerly (the code a graph captures) against the serial engine. The streams
themselves and the capture are checked on a GPU (skipped without CUDA).
"""
import collections
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reference import assert_same, snapshot
from sampa_fused import SAM, SAMPa
from sampa_fused.batching import MicroBatches
from sampa_fused.engines.serial import SerialEngine
from sampa_fused.engines.streams import (ROW, SLOTS, DeviceHyper, WholeStep, _Captured, adamw_update,
                                         flatten_batch, host_row, rebuild_batch, same_structure,
                                         sgd_update)
from sampa_fused.rules import AdamWRule, SGDRule
from reference import SmallNet, ce_loss, make_batches

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --------------------------------------------------------------------- CPU
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("cls", [SAMPa, SAM])
@pytest.mark.parametrize("graph", [False, True])
def test_refused_without_cuda(cls, graph):
    with pytest.raises(RuntimeError, match="engine='streams' needs a CUDA device"):
        cls(SmallNet(), ce_loss, torch.optim.SGD, lr=0.1, engine="streams", graph=graph)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(graph="yes"), TypeError, "graph must be True or False"),
    (dict(warmup_steps=0), ValueError, "warmup_steps must be an int >= 1"),
    (dict(warmup_steps=2.0), ValueError, "warmup_steps"),
])
def test_bad_engine_options(kw, exc, match):
    with pytest.raises(exc, match=match):
        SAMPa(SmallNet(), ce_loss, torch.optim.SGD, lr=0.1, engine="streams", **kw)


def _rand_state(names, n, gen):
    st = {k: torch.randn(n, generator=gen) for k in names}
    for k in ("exp_avg_sq", "max_exp_avg_sq"):
        if k in st:
            st[k] = st[k].abs()
    return st


def _device_scalars(rule, hp, step, lam=0.3):
    row, flags = host_row(rule.name, hp, 0.07, lam, step)
    table = DeviceHyper(torch.device("cpu"))
    table.upload([row])
    return table.group(0), flags


SGD_CASES = [dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=5e-4),
             dict(lr=0.03, momentum=0.8, dampening=0.0, nesterov=True, weight_decay=0.0),
             dict(lr=0.2, momentum=0.5, dampening=0.25, nesterov=False, weight_decay=1e-3, maximize=True),
             dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=1e-2)]
ADAMW_CASES = [dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False),
               dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0, amsgrad=True),
               dict(lr=1e-2, betas=(0.5, 0.9), eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=True)]


@pytest.mark.parametrize("step", [0, 5])
@pytest.mark.parametrize("rule,group", [(SGDRule, g) for g in SGD_CASES] + [(AdamWRule, g) for g in ADAMW_CASES])
def test_device_scalar_update_matches_host_rule(rule, group, step):
    gen = torch.Generator().manual_seed(3 + step)
    n = 4099                                     # not a multiple of any block size
    hp = rule.hyper(dict(group, maximize=group.get("maximize", False)))
    x, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    st = _rand_state(rule.state_names(hp), n, gen)
    st_copy = {k: v.clone() for k, v in st.items()}
    want_x, want_st = rule.update(x, g, st, hp, step)
    h, flags = _device_scalars(rule, hp, step)
    update = sgd_update if rule is SGDRule else adamw_update
    got_x, got_st = update(x, g, st, h, flags)
    torch.testing.assert_close(got_x, want_x, rtol=1e-6, atol=1e-7)
    assert got_st.keys() == want_st.keys()
    for k in want_st:
        torch.testing.assert_close(got_st[k], want_st[k], rtol=1e-6, atol=1e-7)
    for k in st:                                 # out of place: the peek must not write the state
        assert torch.equal(st[k], st_copy[k])


def test_host_row_values():
    hp = AdamWRule.hyper(dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=False))
    row, flags = host_row("adamw", hp, 0.05, 0.25, 4)       # 4 steps taken: bias corrections use t=5
    table = DeviceHyper(torch.device("cpu"))
    table.upload([row])
    h = table.group(0)
    assert h["neg_step_size"].item() == pytest.approx(-0.01 / (1 - 0.9 ** 5), rel=1e-6)
    assert h["bc2"].item() == pytest.approx((1 - 0.99 ** 5) ** 0.5, rel=1e-6)
    assert h["omlw"].item() == pytest.approx(1 - 0.01 * 0.1, rel=1e-7)
    assert (h["rho"].item(), h["lam"].item(), h["oml"].item()) == pytest.approx((0.05, 0.25, 0.75))
    assert flags == ("adamw", False, False, True)
    sgd = SGDRule.hyper(dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True, weight_decay=0.0))
    assert host_row("sgd", sgd, 0.1, None, 0)[0][SLOTS["first"]] == 1.0
    assert host_row("sgd", sgd, 0.1, None, 1)[0][SLOTS["first"]] == 0.0
    assert host_row("sgd", sgd, 0.1, None, 3)[1] == ("sgd", True, True, False, False)


def test_device_table_is_refreshed_in_place():
    table = DeviceHyper(torch.device("cpu"))
    rows = [[1.0] * ROW, [2.0] * ROW]
    table.upload(rows)
    t, view, version = table.table, table.group(1)["rho"], table.version
    rows[1][0] = 7.5
    table.upload(rows)
    # Same storage (a captured graph reads it by address), new value.
    assert table.table is t and table.version == version and view.item() == 7.5
    table.upload(rows[:1])                       # fewer groups: a new table, a new version
    assert table.version == version + 1


def test_batch_structure_roundtrip_and_equality():
    Pair = collections.namedtuple("Pair", "x y")
    batch = {"a": Pair(torch.randn(3, 2), torch.arange(3)), "b": [torch.ones(2), 0.5, "tag"],
             "c": MicroBatches([torch.zeros(1)])}
    leaves = []
    spec = flatten_batch(batch, leaves)
    assert len(leaves) == 4
    new = [t.clone() + 1 for t in leaves]
    rebuilt = rebuild_batch(spec, new)
    assert isinstance(rebuilt["a"], Pair) and isinstance(rebuilt["c"], MicroBatches)
    assert rebuilt["b"][1:] == [0.5, "tag"] and rebuilt["a"].x is new[0]
    same = flatten_batch({"a": Pair(torch.zeros(3, 2), torch.arange(3)), "b": [torch.ones(2), 0.5, "tag"],
                          "c": MicroBatches([torch.ones(1)])}, [])
    assert same_structure(spec, same)
    for other in ({"a": Pair(torch.zeros(4, 2), torch.arange(4)), "b": [torch.ones(2), 0.5, "tag"],
                   "c": MicroBatches([torch.ones(1)])},                                  # shape
                  {"a": Pair(torch.zeros(3, 2), torch.arange(3)), "b": [torch.ones(2), 0.25, "tag"],
                   "c": MicroBatches([torch.ones(1)])},                                  # a value
                  {"a": Pair(torch.zeros(3, 2).double(), torch.arange(3)), "b": [torch.ones(2), 0.5, "tag"],
                   "c": MicroBatches([torch.ones(1)])}):                                 # a dtype
        assert not same_structure(spec, flatten_batch(other, []))
    import numpy as np
    arr = flatten_batch((torch.ones(1), np.arange(3)), [])
    assert not same_structure(arr, flatten_batch((torch.ones(1), np.arange(3)), []))


# The whole step with device hyperparameters, run eagerly on CPU, against the
# serial engine: the same code that graph=True captures.
def _pair(cls, model, base, groups=None, **kw):
    args = dict(rho=0.1, backend="torch", engine="serial")
    if cls is SAMPa:
        args["lam"] = 0.3
    args.update(kw)
    ref_model = copy.deepcopy(model)
    if groups is not None:
        ref = cls(ref_model, ce_loss, base, params=groups(ref_model), **args)
        opt = cls(model, ce_loss, base, params=groups(model), **args)
    else:
        ref = cls(ref_model, ce_loss, base, **args)
        opt = cls(model, ce_loss, base, **args)
    eng = SerialEngine(opt)
    whole = WholeStep(opt, torch.device("cpu"), eng.sampa_gradients if cls is SAMPa else None,
                      eng.gradient)
    return ref_model, ref, opt, whole


def _assert_models_close(a, b, rtol=1e-5, atol=1e-6):
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if p.is_floating_point():
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=n)
        else:
            assert torch.equal(p, q), n


def _assert_state_close(ref, opt):
    sa, sb = ref.state_dict(), opt.state_dict()
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            torch.testing.assert_close(v, sb["state"][k][name], rtol=1e-5, atol=1e-6)
    ea, eb = sa["sampa_fused"], sb["sampa_fused"]
    assert (ea["t"], ea["steps"]) == (eb["t"], eb["steps"])
    if "gy" in ea:
        for u, v in zip(ea["gy"], eb["gy"]):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ea["gy_sq"], eb["gy_sq"], rtol=1e-5, atol=1e-6)


def _edit(opts, i):
    """Hyperparameter edits between steps, applied alike to both optimizers."""
    for o in opts:
        if i == 4:
            o.param_groups[0]["lr"] *= 0.5
        if i == 6:
            for g in o.param_groups:
                g["rho"] = 0.25
        if i == 8 and "lam" in o.param_groups[0]:
            o.param_groups[-1]["lam"] = 0.7
        if i == 10:
            o.param_groups[-1]["weight_decay"] = 0.0       # a structural change too


CONFIGS = {
    "sgd-nesterov-2groups": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4), True),
    "sgd-plain": (torch.optim.SGD, dict(lr=0.1, weight_decay=1e-3), False),
    "adamw-amsgrad": (torch.optim.AdamW, dict(lr=3e-3, weight_decay=0.05, amsgrad=True), True),
}


@pytest.mark.parametrize("cls", [SAMPa, SAM])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_whole_step_matches_serial(cls, config):
    base, kw, two_groups = CONFIGS[config]
    model = SmallNet()
    groups = None
    if two_groups:
        def groups(m):
            return [{"params": [m.fc1.weight, m.bn.weight, m.bn.bias]},
                    {"params": [m.fc2.weight, m.fc2.bias, m.temperature], "lr": kw["lr"] * 2}]
    ref_model, ref, opt, whole = _pair(cls, model, base, groups, **kw)
    batches = make_batches(14)
    for i, b in enumerate(batches):
        _edit((ref, opt), i)
        want = ref.step(b)
        got = whole.step(b)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    _assert_models_close(ref_model, model)
    _assert_state_close(ref, opt)
    if cls is SAMPa:
        assert opt._held is batches[-1]


def test_whole_step_clip_and_state_dict_resume():
    model = SmallNet()
    ref_model, ref, opt, whole = _pair(SAMPa, model, torch.optim.SGD, lr=0.1, momentum=0.9,
                                       max_grad_norm=0.05)
    batches = make_batches(8)
    for b in batches[:4]:
        ref.step(b)
        whole.step(b)
    _assert_models_close(ref_model, model)
    # A checkpoint of the reference continues identically through the whole step.
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    model.load_state_dict(ref_model.state_dict())
    for b in batches[4:]:
        torch.testing.assert_close(whole.step(b), ref.step(b), rtol=1e-5, atol=1e-6)
    _assert_models_close(ref_model, model)
    _assert_state_close(ref, opt)


def _nan(batch):
    x, y = batch
    x = x.clone()
    x[1, 2] = float("nan")
    return x, y


@pytest.mark.parametrize("cls", [SAMPa, SAM])
def test_whole_step_refuses_nonfinite_and_leaves_everything(cls):
    model = SmallNet()
    _, _, opt, whole = _pair(cls, model, torch.optim.AdamW, lr=1e-2)
    batches = make_batches(5)
    whole.step(batches[0])
    whole.step(batches[1])
    before = snapshot(model, opt)
    with pytest.raises(FloatingPointError, match="non-finite loss .* unchanged"):
        whole.step(_nan(batches[2]))
    assert_same(before, snapshot(model, opt))
    whole.step(batches[2])
    assert opt._t == 3 and torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()


def test_whole_step_skip_mode_matches_serial_skip_mode():
    model = SmallNet()
    ref_model, ref, opt, whole = _pair(SAMPa, model, torch.optim.SGD, lr=0.1, momentum=0.9,
                                       nonfinite="skip")
    batches = make_batches(6)
    seq = [batches[0], batches[1], _nan(batches[2]), batches[3], batches[4]]
    for b in seq:
        torch.testing.assert_close(whole.step(b), ref.step(b), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert opt.skipped_steps == ref.skipped_steps == 1 and opt._t == ref._t == 4
    _assert_models_close(ref_model, model)
    _assert_state_close(ref, opt)


def test_whole_step_rolls_back_when_a_pass_raises():
    model = SmallNet()
    _, _, opt, whole = _pair(SAMPa, model, torch.optim.SGD, lr=0.1, momentum=0.9)
    batches = make_batches(3)
    whole.step(batches[0])
    before = snapshot(model, opt)
    opt.loss_fn = lambda m, b: (_ for _ in ()).throw(KeyError("boom"))
    with pytest.raises(KeyError, match="boom"):
        whole.step(batches[1])
    assert_same(before, snapshot(model, opt))


def test_graph_needs_sgd_or_adamw_and_no_grad_scaler():
    model = SmallNet()
    opt = SAMPa(model, ce_loss, torch.optim.Adam, lr=1e-3, rho=0.1, lam=0.2)
    with pytest.raises(ValueError, match="torch.optim.SGD or torch.optim.AdamW"):
        WholeStep(opt, torch.device("cpu"), None, None, graph=True)
    opt = SAMPa(model, ce_loss, torch.optim.SGD, lr=1e-3, rho=0.1, lam=0.2)
    opt.grad_scaler = object()                   # as an enabled GradScaler would be kept
    with pytest.raises(ValueError, match="GradScaler"):
        WholeStep(opt, torch.device("cpu"), None, None, graph=True)


def test_capture_schedule():
    """When graph=True captures, replays and falls back to eager steps (the
    capture itself is faked: CPU here; the real one is tested on a GPU)."""
    model = SmallNet()
    ref_model, ref, opt, whole = _pair(SAMPa, model, torch.optim.SGD, lr=0.1, momentum=0.9)
    whole.graph, whole.warmup_steps = True, 2
    log = []

    def fake_capture(key, held, batch):
        log.append("capture")
        return _Captured(key, opt._bufs, None, [], [], None, None, True)

    def fake_replay(cap, held, batch):
        log.append("replay")
        return eager(held, batch)

    eager = whole._eager
    whole._capture, whole._replay = fake_capture, fake_replay

    def logged_eager(held, batch):
        log.append("eager")
        return eager(held, batch)

    whole._eager = logged_eager
    full = make_batches(12, batch=9)
    short = make_batches(1, batch=4, seed=7)[0]
    seq = full[:5] + [short] + full[5:8]
    for i, b in enumerate(seq):
        if i == 7:
            ref.param_groups[0]["nesterov"] = opt.param_groups[0]["nesterov"] = True
        ref.step(b)
        whole.step(b)
    assert log == ["eager", "eager", "capture", "replay", "replay", "replay",  # warm-up 2, the graph
                   "eager",            # a short batch: another structure
                   "eager",            # held short, new full: another structure
                   "eager",            # nesterov switched on: a structural change
                   "eager"]            # the new structure's second warm-up step
    _assert_models_close(ref_model, model)


class _RerunGraph:
    """Stands in for a CUDA graph on CPU: capturing records the step's body
    without running it; a replay runs it on the static buffers and writes the
    static outputs, as a replayed graph does."""

    def __init__(self, body):
        self.body = body
        self.loss, self.flags = torch.full((), float("nan")), torch.zeros(2, dtype=torch.bool)

    def replay(self):
        loss, flags = self.body()
        self.loss.copy_(loss)
        self.flags.copy_(flags)


def _record(body):
    g = _RerunGraph(body)
    return g, (g.loss, g.flags)


@pytest.mark.parametrize("cls", [SAMPa, SAM])
def test_graph_mode_static_buffers_match_serial(cls):
    """graph=True's host logic end to end on CPU (static batch buffers, the held
    batch carried by the graph, warm-up, fallbacks, refusals, edits), with the
    capture replaced by a recorder that re-runs the captured body."""
    model = SmallNet()
    ref_model, ref, opt, whole = _pair(cls, model, torch.optim.SGD, lr=0.05, momentum=0.9,
                                       weight_decay=1e-3)
    whole.graph, whole.warmup_steps, whole._record = True, 2, _record
    full = make_batches(14, batch=9)
    short = make_batches(2, batch=4, seed=7)
    seq = (full[:5] + [short[0], full[5], short[1], full[6]]      # alternating shapes: no recapture
           + [full[7], full[8], "nan", full[9], full[10], full[11]])
    replays_before = None
    for i, b in enumerate(seq):
        if b == "nan":
            replays_before = whole.replays
            snap = snapshot(model, opt)
            with pytest.raises(FloatingPointError, match="unchanged"):
                whole.step(_nan(full[9]))
            assert_same(snap, snapshot(model, opt))
            assert whole.replays == replays_before + 1             # refused inside the graph
            continue
        if i == 10:
            for o in (ref, opt):
                o.param_groups[0]["lr"] = 0.02
                o.param_groups[0]["rho"] = 0.2
        torch.testing.assert_close(whole.step(b), ref.step(b), rtol=1e-5, atol=1e-6)
    _assert_models_close(ref_model, model)
    _assert_state_close(ref, opt)
    assert whole.captures == 1
    # eager: the two warm-up steps and the short batches (SAMPa: also the full
    # batch after each, whose held batch is short); the rest replays
    assert whole.replays == len(seq) - (6 if cls is SAMPa else 4)


def test_graph_mode_recaptures_for_a_lasting_change_only():
    model = SmallNet()
    ref_model, ref, opt, whole = _pair(SAMPa, model, torch.optim.SGD, lr=0.05, momentum=0.9)
    whole.graph, whole.warmup_steps, whole._record = True, 1, _record
    batches = make_batches(9)
    for i, b in enumerate(batches):
        if i == 4:
            for o in (ref, opt):
                o.param_groups[0]["nesterov"] = True            # structural: the graph changes
        torch.testing.assert_close(whole.step(b), ref.step(b), rtol=1e-5, atol=1e-6)
    assert whole.captures == 2
    _assert_models_close(ref_model, model)


def test_optimizer_hands_whole_step_to_engine():
    """SAMPa.step / SAM.step must give the whole step to an engine that takes
    it (engine.whole_step is not None): graph=True relies on it."""
    for cls in (SAMPa, SAM):
        model = SmallNet()
        opt = cls(model, ce_loss, torch.optim.SGD, lr=0.1)
        marker = torch.tensor(42.0)
        seen = []
        opt.engine.whole_step = lambda batch: seen.append(batch) or marker
        batch = make_batches(1)[0]
        assert opt.step(batch) is marker and seen == [batch], (
            f"{cls.__name__}.step must start with `if getattr(self.engine, 'whole_step', None) is not "
            "None: return self.engine.whole_step(batch)`")


# --------------------------------------------------------------------- GPU
class ConvBN(nn.Module):
    def __init__(self, c=12, classes=7):
        super().__init__()
        self.c1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, 2 * c + 1, 3, stride=2, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(2 * c + 1)
        self.fc = nn.Linear(2 * c + 1, classes)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def _cuda_batches(n, batch=24, size=11, classes=7, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=gen).cuda(),
             torch.randint(0, classes, (batch,), generator=gen).cuda()) for _ in range(n)]


@pytest.fixture
def deterministic():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _cuda_pair(cls, base, engine_kw, **kw):
    torch.manual_seed(0)
    model = ConvBN().cuda()
    ref_model = copy.deepcopy(model)
    args = dict(rho=0.1, **kw)
    if cls is SAMPa:
        args["lam"] = 0.3
    ref = cls(ref_model, ce_loss, base, engine="serial", **args)
    opt = cls(model, ce_loss, base, engine="streams", **engine_kw, **args)
    return ref_model, ref, model, opt


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("cls,base,kw", [
    (SAMPa, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    (SAM, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    (SAMPa, torch.optim.AdamW, dict(lr=2e-3, weight_decay=0.05)),
])
@pytest.mark.parametrize("graph", [False, True])
def test_streams_trajectory_matches_serial(cls, base, kw, graph, deterministic):
    if cls is SAM and not graph:
        pytest.skip("SAM has one pass at a time: without a graph the engine is the serial one")
    ref_model, ref, model, opt = _cuda_pair(cls, base, dict(graph=graph), **kw)
    batches = _cuda_batches(50)
    for i, b in enumerate(batches):
        for o in (ref, opt):      # edits between replays must take effect
            if i == 20:
                o.param_groups[0]["lr"] *= 0.3
            if i == 30:
                o.param_groups[0]["rho"] = 0.3
            if i == 40 and cls is SAMPa:
                o.param_groups[0]["lam"] = 0.6
        torch.testing.assert_close(opt.step(b), ref.step(b), rtol=1e-4, atol=1e-5)
    _assert_models_close(ref_model, model, rtol=1e-4, atol=1e-5)
    if graph:
        assert opt.engine._whole.captures == 1 and opt.engine._whole.replays == 50 - 3


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("cls", [SAMPa, SAM])
def test_graph_reads_hyperparameters_from_device(cls, deterministic):
    _, _, model, opt = _cuda_pair(cls, torch.optim.SGD, dict(graph=True, warmup_steps=2), lr=0.05, momentum=0.9)
    batches = _cuda_batches(8)
    for b in batches[:4]:
        opt.step(b)
    assert opt.engine._whole.replays == 2
    opt.param_groups[0]["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(batches[4])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.param_groups[0]["lr"] = 0.05
    opt.step(batches[5])
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.engine._whole.captures == 1


@cuda
@pytest.mark.gpu
def test_passes_run_on_two_streams():
    seen = {}

    def loss_fn(m, b):
        seen.setdefault(id(m), set()).add(torch.cuda.current_stream().cuda_stream)
        return ce_loss(m, b)

    model = ConvBN().cuda()
    opt = SAMPa(model, loss_fn, torch.optim.SGD, lr=0.05, rho=0.1, lam=0.2, engine="streams")
    for b in _cuda_batches(3):
        opt.step(b)
    x_streams, y_streams = seen[id(model)], seen[id(opt._ymodel)]
    default = torch.cuda.current_stream().cuda_stream
    assert len(x_streams) == len(y_streams) == 1
    assert x_streams != y_streams and default not in x_streams | y_streams


@cuda
@pytest.mark.gpu
def test_passes_do_not_synchronise():
    model = ConvBN().cuda()
    opt = SAMPa(model, ce_loss, torch.optim.SGD, lr=0.05, rho=0.1, lam=0.2, engine="streams")
    b0, b1, b2 = _cuda_batches(3)
    opt.step(b0)
    opt.step(b1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.engine.sampa_gradients(b1, b2)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
@pytest.mark.gpu
def test_uncapturable_loss_is_refused_clearly():
    def host_sync_loss(m, b):
        loss = ce_loss(m, b)
        if loss.item() > 1e9:            # a host read: cannot be captured
            raise AssertionError
        return loss

    model = ConvBN().cuda()
    opt = SAMPa(model, host_sync_loss, torch.optim.SGD, lr=0.05, rho=0.1, lam=0.2, engine="streams",
                graph=True, warmup_steps=2)
    batches = _cuda_batches(4)
    opt.step(batches[0])
    opt.step(batches[1])
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="could not be captured"):
        opt.step(batches[2])
    assert_same(before, snapshot(model, opt))


@cuda
@pytest.mark.gpu
def test_graph_needs_the_batch_on_the_device():
    model = ConvBN().cuda()
    opt = SAMPa(model, ce_loss, torch.optim.SGD, lr=0.05, rho=0.1, lam=0.2, engine="streams", graph=True)
    x, y = _cuda_batches(1)[0]
    with pytest.raises(ValueError, match="must already be on"):
        opt.step((x.cpu(), y))


@cuda
@pytest.mark.gpu
def test_graph_short_batch_and_nonfinite(deterministic):
    ref_model, ref, model, opt = _cuda_pair(SAMPa, torch.optim.SGD, dict(graph=True, warmup_steps=2),
                                            lr=0.05, momentum=0.9)
    batches = _cuda_batches(10)
    short = _cuda_batches(1, batch=5, seed=9)[0]
    for b in batches[:5] + [short] + batches[5:8]:
        torch.testing.assert_close(opt.step(b), ref.step(b), rtol=1e-4, atol=1e-5)
    _assert_models_close(ref_model, model, rtol=1e-4, atol=1e-5)
    before = snapshot(model, opt)
    x, y = batches[8]
    bad = (x.clone().index_fill_(0, torch.tensor([0], device=x.device), float("nan")), y)
    with pytest.raises(FloatingPointError, match="unchanged"):
        opt.step(bad)
    assert_same(before, snapshot(model, opt))
    for b in batches[8:]:
        torch.testing.assert_close(opt.step(b), ref.step(b), rtol=1e-4, atol=1e-5)
    _assert_models_close(ref_model, model, rtol=1e-4, atol=1e-5)
