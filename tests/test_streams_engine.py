"""engine="streams": two CUDA streams, and the whole step as a CUDA graph.

On CPU, under the stand-in CUDA (tests/fake_cuda.py): the refusals and
options, the device table's values, and graph mode's capture, replays,
static buffers, fallbacks and recaptures against the serial engine (the
capture records the optimizer's own step; a replay re-runs the recording).
The real streams and graphs are checked on a GPU (skipped without CUDA).
"""
import collections
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fake_cuda import fake_cuda
from reference import SmallNet, assert_same, ce_loss, make_batches, snapshot

from sampa_fused import SAM, SAMPa, tree
from sampa_fused.batching import MicroBatches
from sampa_fused.update import adamw, sgd
from sampa_fused.update.table import LAM, OML, RHO, ROW, HyperTable

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


def test_graph_needs_sgd_or_adamw_and_no_grad_scaler():
    with fake_cuda():
        with pytest.raises(ValueError, match="torch.optim.SGD or torch.optim.AdamW"):
            SAMPa(SmallNet(), ce_loss, torch.optim.Adam, lr=1e-3, rho=0.1, lam=0.2, engine="streams",
                  graph=True)
        with pytest.raises(ValueError, match="GradScaler"):
            SAMPa(SmallNet(), ce_loss, torch.optim.SGD, lr=1e-3, rho=0.1, lam=0.2, engine="streams",
                  graph=True, grad_scaler=torch.amp.GradScaler("cpu"))


def test_table_rows_hold_the_host_expressions():
    """Each row holds what torch computes on the host in double (then fp32)."""
    hp = adamw.hyper(dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=False), "g")
    row = adamw.row(hp, 4)                  # 4 steps taken: bias corrections use t=5
    table = HyperTable(torch.device("cpu"), torch.float32, pin=False)
    values = [0.0] * ROW
    values[RHO], values[LAM], values[OML] = 0.05, 0.25, 0.75
    for k, v in row.items():
        values[k] = v
    table.upload([values])
    h = table.row(0)
    assert h[adamw.STEP_SIZE].item() == pytest.approx(-(-0.01 / (1 - 0.9 ** 5)), rel=1e-6)
    assert h[adamw.BC2].item() == pytest.approx((1 - 0.99 ** 5) ** 0.5, rel=1e-6)
    assert h[adamw.DECAY].item() == pytest.approx(1 - 0.01 * 0.1, rel=1e-7)
    assert (h[RHO].item(), h[LAM].item(), h[OML].item()) == pytest.approx((0.05, 0.25, 0.75))
    assert adamw.flags(hp) == (False, False, True, True)
    s = sgd.hyper(dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True, weight_decay=0.0), "g")
    assert sgd.row(s, 0)[sgd.FIRST] == 1.0 and sgd.row(s, 1)[sgd.FIRST] == 0.0
    assert sgd.flags(s) == (True, True, False, False)


def test_device_table_is_refreshed_in_place():
    table = HyperTable(torch.device("cpu"), torch.float32, pin=False)
    rows = [[1.0] * ROW, [2.0] * ROW]
    table.upload(rows)
    t, view, version = table.tensor, table.row(1)[RHO], table.version
    rows[1][0] = 7.5
    table.upload(rows)
    # Same storage (a captured graph reads it by address), new value.
    assert table.tensor is t and table.version == version and view.item() == 7.5
    table.upload(rows[:1])                       # fewer rows: a new table, a new version
    assert table.version == version + 1


def test_batch_structure_roundtrip_and_equality():
    Pair = collections.namedtuple("Pair", "x y")
    batch = {"a": Pair(torch.randn(3, 2), torch.arange(3)), "b": [torch.ones(2), 0.5, "tag"],
             "c": MicroBatches([torch.zeros(1)])}
    leaves = tree.tensors(batch)
    assert len(leaves) == 4
    new = [t.clone() + 1 for t in leaves]
    rebuilt = tree.rebuild(batch, new)
    assert isinstance(rebuilt["a"], Pair) and isinstance(rebuilt["c"], MicroBatches)
    assert rebuilt["b"][1:] == [0.5, "tag"] and rebuilt["a"].x is new[0]
    spec = tree.structure(batch)
    same = tree.structure({"a": Pair(torch.zeros(3, 2), torch.arange(3)), "b": [torch.ones(2), 0.5, "tag"],
                           "c": MicroBatches([torch.ones(1)])})
    assert spec == same
    for other in ({"a": Pair(torch.zeros(4, 2), torch.arange(4)), "b": [torch.ones(2), 0.5, "tag"],
                   "c": MicroBatches([torch.ones(1)])},                                  # shape
                  {"a": Pair(torch.zeros(3, 2), torch.arange(3)), "b": [torch.ones(2), 0.25, "tag"],
                   "c": MicroBatches([torch.ones(1)])},                                  # a value
                  {"a": Pair(torch.zeros(3, 2).double(), torch.arange(3)), "b": [torch.ones(2), 0.5, "tag"],
                   "c": MicroBatches([torch.ones(1)])}):                                 # a dtype
        assert spec != tree.structure(other)
    import numpy as np
    arr = tree.structure((torch.ones(1), np.arange(3)))
    assert arr != tree.structure((torch.ones(1), np.arange(3)))     # no plain ==: never the same


# The graph mode on CPU, under the stand-in CUDA: against the serial engine.
def _pair(cls, base, graph_kw, groups=None, model=None, **kw):
    args = dict(rho=0.1, backend="torch")
    if cls is SAMPa:
        args["lam"] = 0.3
    args.update(kw)
    model = model or SmallNet()
    ref_model = copy.deepcopy(model)
    ref = cls(ref_model, ce_loss, base, engine="serial",
              **(dict(params=groups(ref_model)) if groups else {}), **args)
    opt = cls(model, ce_loss, base, engine="streams", graph=True,
              **(dict(params=groups(model)) if groups else {}), **graph_kw, **args)
    return ref_model, ref, model, opt


def _assert_same_models(a, b):
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


def _assert_models_close(a, b, rtol=1e-5, atol=1e-6):
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if p.is_floating_point():
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=n)
        else:
            assert torch.equal(p, q), n


def _assert_same_state(ref, opt):
    sa, sb = ref.state_dict(), opt.state_dict()
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][name]), (k, name)
    ea, eb = sa["sampa_fused"], sb["sampa_fused"]
    assert (ea["t"], ea["counts"]) == (eb["t"], eb["counts"])
    if "gy" in ea:
        assert all(torch.equal(u, v) for u, v in zip(ea["gy"], eb["gy"]))
        assert torch.equal(ea["gy_sq"], eb["gy_sq"])


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
def test_graph_step_matches_serial(cls, config):
    base, kw, two_groups = CONFIGS[config]
    groups = None
    if two_groups:
        def groups(m):
            return [{"params": [m.fc1.weight, m.bn.weight, m.bn.bias]},
                    {"params": [m.fc2.weight, m.fc2.bias, m.temperature], "lr": kw["lr"] * 2}]
    with fake_cuda():
        ref_model, ref, model, opt = _pair(cls, base, dict(warmup_steps=2), groups, **kw)
        batches = make_batches(14)
        for i, b in enumerate(batches):
            _edit((ref, opt), i)
            assert torch.equal(opt.step(b), ref.step(b)), i
        _assert_same_models(ref_model, model)
        _assert_same_state(ref, opt)
        assert opt.engine.graph.captures == 2      # and again after the structural change at step 10
        assert opt.engine.graph.replays > 6
        if cls is SAMPa:
            assert all(torch.equal(a, b) for a, b in zip(opt.held_batch, batches[-1]))


def test_graph_clip_and_state_dict_resume():
    with fake_cuda():
        ref_model, ref, model, opt = _pair(SAMPa, torch.optim.SGD, dict(warmup_steps=2), lr=0.1,
                                           momentum=0.9, max_grad_norm=0.05)
        batches = make_batches(10)
        for b in batches[:5]:
            assert torch.equal(opt.step(b), ref.step(b))
        _assert_same_models(ref_model, model)
        # A checkpoint of the reference continues identically through the graph.
        opt.load_state_dict(copy.deepcopy(ref.state_dict()))
        model.load_state_dict(ref_model.state_dict())
        for b in batches[5:]:
            assert torch.equal(opt.step(b), ref.step(b))
        _assert_same_models(ref_model, model)
        _assert_same_state(ref, opt)
        assert opt.engine.graph.replays > 0


def _nan(batch):
    x, y = batch
    x = x.clone()
    x[1, 2] = float("nan")
    return x, y


@pytest.mark.parametrize("cls", [SAMPa, SAM])
def test_graph_refuses_nonfinite_inside_the_graph_and_leaves_everything(cls):
    with fake_cuda():
        _, _, model, opt = _pair(cls, torch.optim.AdamW, dict(warmup_steps=1), lr=1e-2)
        batches = make_batches(6)
        for b in batches[:4]:
            opt.step(b)
        replays = opt.engine.graph.replays
        assert replays > 0
        before = snapshot(model, opt)
        with pytest.raises(FloatingPointError, match="non-finite loss .* unchanged"):
            opt.step(_nan(batches[4]))
        assert opt.engine.graph.replays == replays + 1          # refused by the replayed graph
        assert_same(before, snapshot(model, opt))
        opt.step(batches[4])
        assert opt.step_count == 5 and torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()


def test_graph_skip_mode_matches_serial_skip_mode():
    with fake_cuda():
        ref_model, ref, model, opt = _pair(SAMPa, torch.optim.SGD, dict(warmup_steps=1), lr=0.1,
                                           momentum=0.9, nonfinite="skip")
        batches = make_batches(8)
        seq = batches[:4] + [_nan(batches[4])] + batches[5:]
        for b in seq:
            torch.testing.assert_close(opt.step(b), ref.step(b), rtol=0, atol=0, equal_nan=True)
        assert opt.skipped_steps == ref.skipped_steps == 1 and opt.step_count == ref.step_count == 7
        _assert_same_models(ref_model, model)
        _assert_same_state(ref, opt)


def test_graph_rolls_back_when_a_pass_raises():
    with fake_cuda():
        _, _, model, opt = _pair(SAMPa, torch.optim.SGD, dict(warmup_steps=1), lr=0.1, momentum=0.9)
        batches = make_batches(3)
        opt.step(batches[0])
        before = snapshot(model, opt)
        good = opt.loss_fn
        opt.loss_fn = lambda m, b: (_ for _ in ()).throw(KeyError("boom"))
        with pytest.raises(KeyError, match="boom"):
            opt.step(batches[1])
        assert_same(before, snapshot(model, opt))
        opt.loss_fn = good


def test_graph_schedule_warmup_fallbacks_and_recapture():
    """When graph=True captures, replays and falls back to eager steps."""
    with fake_cuda():
        ref_model, ref, model, opt = _pair(SAMPa, torch.optim.SGD, dict(warmup_steps=2), lr=0.1,
                                           momentum=0.9)
        graph = opt.engine.graph
        log = []
        full = make_batches(12, batch=9)
        short = make_batches(1, batch=4, seed=7)[0]
        seq = full[:5] + [short] + full[5:8]
        for i, b in enumerate(seq):
            if i == 7:
                ref.param_groups[0]["nesterov"] = opt.param_groups[0]["nesterov"] = True
            c, r = graph.captures, graph.replays
            assert torch.equal(opt.step(b), ref.step(b))
            log.append("capture" if graph.captures > c else "replay" if graph.replays > r else "eager")
        assert log == ["eager", "eager", "capture", "replay", "replay",   # warm-up 2, the graph
                       "eager",            # a short batch: another structure
                       "eager",            # held short, new full: another structure
                       "eager",            # nesterov switched on: a structural change
                       "eager"]            # the new structure's second warm-up step
        _assert_same_models(ref_model, model)


def test_graph_alternating_shapes_do_not_recapture_and_edits_take_effect():
    with fake_cuda():
        ref_model, ref, model, opt = _pair(SAMPa, torch.optim.SGD, dict(warmup_steps=2), lr=0.05,
                                           momentum=0.9, weight_decay=1e-3)
        full = make_batches(14, batch=9)
        short = make_batches(2, batch=4, seed=7)
        seq = full[:5] + [short[0], full[5], short[1], full[6]] + full[7:12]
        for i, b in enumerate(seq):
            if i == 10:
                for o in (ref, opt):
                    o.param_groups[0]["lr"] = 0.02
                    o.param_groups[0]["rho"] = 0.2
            assert torch.equal(opt.step(b), ref.step(b)), i
        _assert_same_models(ref_model, model)
        _assert_same_state(ref, opt)
        assert opt.engine.graph.captures == 1
        # eager: step 0, the two warm-up steps and the short batches and the
        # full batch after each (whose held batch is short); the rest replays
        assert opt.engine.graph.replays == len(seq) - 6


def test_captured_step_launches_the_eager_steps_kernels():
    """Graph mode captures the optimizer's own fused step: the Triton kernels
    of a replay are those of an eager step, in the same order."""
    pytest.importorskip("triton")
    with fake_cuda() as rt:
        model = SmallNet()
        opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.3, lr=0.05, momentum=0.9,
                    backend="triton", engine="streams", graph=True, warmup_steps=2)
        batches = make_batches(4)
        opt.step(batches[0])
        n = len(rt.launches)
        opt.step(batches[1])                       # an eager warm-up step
        eager = [name for name, _, _ in rt.launches[n:]]
        opt.step(batches[2])                       # captured, then replayed
        assert opt.engine.graph.captures == 1
        captured = rt.graphs[-1].kernels()
        assert captured == eager and {"sgd_pre_kernel", "sgd_post_kernel", "check_partials_kernel",
                                      "check_final_kernel"} <= set(eager)


def test_optimizer_hands_its_step_to_the_engine():
    """SAMPa.step / SAM.step run their device work through engine.run_step:
    graph mode relies on it."""
    for cls in (SAMPa, SAM):
        model = SmallNet()
        opt = cls(model, ce_loss, torch.optim.SGD, lr=0.1)
        seen = []
        real = opt.engine.run_step

        def run_step(step, held, batch, structure):
            seen.append(batch)
            return real(step, held, batch, structure)
        opt.engine.run_step = run_step
        batch = make_batches(1)[0]
        opt.step(batch)
        assert seen == [batch]


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
        assert opt.engine.graph.captures == 1 and opt.engine.graph.replays == 50 - 3


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("cls", [SAMPa, SAM])
def test_graph_reads_hyperparameters_from_device(cls, deterministic):
    _, _, model, opt = _cuda_pair(cls, torch.optim.SGD, dict(graph=True, warmup_steps=2), lr=0.05, momentum=0.9)
    batches = _cuda_batches(8)
    for b in batches[:4]:
        opt.step(b)
    assert opt.engine.graph.replays == 2
    opt.param_groups[0]["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(batches[4])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.param_groups[0]["lr"] = 0.05
    opt.step(batches[5])
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.engine.graph.captures == 1


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
    # the y-pass runs on the same module, y swapped in: one stream per pass, two in all
    streams = seen[id(model)]
    default = torch.cuda.current_stream().cuda_stream
    assert len(streams) == 2 and default not in streams


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
