"""The distributed engine on gloo over loopback, 2 and 4 processes, 1 thread each.

Each multi-process scenario is launched once (module fixtures) and its ranks
save what they saw; the tests below check it. Ranks fork from a server that
has imported torch once, so a launch costs about a second; the serial engine
run inside each rank is the reference.
"""
from __future__ import annotations

import collections
import gc
import os
import sys
import time
from pathlib import Path

import pytest
import ranks
import torch
import torch.nn.functional as F
from torch import nn

import sampa_fused
from sampa_fused import SAM, SAMPa
from sampa_fused.batching import MicroBatches
from sampa_fused.engines.distributed import DEFAULT_TIMEOUT_S, plan_buckets, shard_batch
from sampa_fused.flat import build_slabs

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")

REPO = str(Path(sampa_fused.__file__).resolve().parents[1])


# ---------------------------------------------------------------- the models
class Net(nn.Module):
    """Conv + (optional) batch norm + linear, with a layer that the forward
    never uses (zero gradient; its bucket must not hold back the others) and a
    forward counter."""

    def __init__(self, bn: bool, hidden: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, hidden, 3, padding=1)
        self.bn = nn.BatchNorm2d(hidden) if bn else nn.Identity()
        self.fc = nn.Linear(hidden * 25, 7)
        self.unused = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls = self.calls + 1      # a buffer replaced (not updated in place) by forward
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def make_net(bn: bool, hidden: int = 5) -> Net:
    torch.manual_seed(1234)
    return Net(bn, hidden)


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def branchy_loss(model, batch):
    # Uses `unused` on some batches only: the set of parameters with a
    # gradient changes from pass to pass (and between the two halves). The
    # flag is not a tensor, so every shard of a batch sees the same one.
    x, y, use = batch
    loss = F.cross_entropy(model(x), y)
    if use:
        loss = loss + 0.1 * model.unused(x[:, 0, 0, :3]).square().mean()
    return loss


def batches(n: int, size: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 5, 5, generator=g), torch.randint(0, 7, (size,), generator=g))
            for _ in range(n)]


def groups(model, lr2=0.1):
    return [{"params": list(model.conv.parameters()) + list(model.bn.parameters()), "lr": 0.05},
            {"params": list(model.fc.parameters()) + list(model.unused.parameters()), "lr": lr2,
             "weight_decay": 1e-3}]


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def replica(opt):
    """Everything that must be identical on every rank: parameters, base
    state, gy, model buffers."""
    parts = [opt.model.parameters()]
    for b in opt.flat.primary.slabs:
        parts.append(b.state.values())
        if hasattr(b, "gy"):
            parts.append([b.gy])
    parts.append(opt.model.buffers())
    return flat([t for p in parts for t in p])


# ---------------------------------------------------------------- the ranks
def _run(method, opt_kwargs, data, model, engine, lossf=loss_fn, **engine_kwargs):
    cls = SAMPa if method == "sampa" else SAM
    if opt_kwargs.pop("scaler", False):
        opt_kwargs["grad_scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    opt = cls(model, lossf, opt_kwargs.pop("base"), params=groups(model), engine=engine,
              **opt_kwargs, **engine_kwargs)
    losses, xs = [], []
    for b in data:
        losses.append(opt.step(b).item())
        xs.append(flat(model.parameters()))
    return opt, losses, xs


def _trajectory(method, base_kwargs, data, bn, lossf=loss_fn, **engine_kwargs):
    out = {}
    for engine in ("serial", "distributed"):
        kw = dict(base_kwargs)
        ekw = engine_kwargs if engine == "distributed" else {}
        opt, losses, xs = _run(method, kw, data, make_net(bn), engine, lossf, **ekw)
        out[engine] = {"losses": losses, "x": xs, "replica": replica(opt),
                       "stats": dict(getattr(opt.engine, "stats", {}))}
    return out


SGD = dict(base=torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, rho=0.05)
ADAMW = dict(base=torch.optim.AdamW, lr=0.01, weight_decay=0.01, amsgrad=True, rho=0.05)


def _scenario_main(rank, world):
    import torch.distributed as dist
    res = {}
    k = world // 2
    # SAMPa, SGD: with 2 ranks (k = 1) each half sees the whole batch, so the
    # model may have batch norm and the trajectory must be bit-identical.
    res["sgd"] = _trajectory("sampa", dict(SGD, lam=0.3), batches(20, 13), bn=(k == 1),
                             bucket_bytes=512, timeout=60)
    res["adamw"] = _trajectory("sampa", dict(ADAMW, lam=0.5), batches(6, 10, seed=3), bn=False,
                               bucket_bytes=256, timeout=60)
    # Gradient accumulation (micro-batches of each rank's shard), a GradScaler
    # and clipping; then micro-batches given by the caller (sizes 7 and 6).
    res["training"] = _trajectory("sampa", dict(SGD, lam=0.3, accumulation_steps=2, scaler=True,
                                                max_grad_norm=0.5),
                                  batches(5, 13, seed=8), bn=False, bucket_bytes=512)
    data = [MicroBatches([(x[:7], y[:7]), (x[7:], y[7:])]) for x, y in batches(4, 13, seed=12)]
    res["micro"] = _trajectory("sampa", dict(SGD, lam=0.3), data, bn=False, bucket_bytes=512)
    res["sam_micro"] = _trajectory("sam", dict(SGD, accumulation_steps=3), batches(4, 13, seed=13),
                                   bn=False, bucket_bytes=512)
    # Any other base optimizer takes the generic path (its own step()).
    res["generic"] = _trajectory("sampa", dict(base=torch.optim.Adam, lr=0.01, rho=0.05, lam=0.2),
                                 batches(4, 10, seed=6), bn=False, bucket_bytes=512)
    res["sam"] = _trajectory("sam", SGD, batches(6, 13, seed=5), bn=False, bucket_bytes=512, timeout=60)
    data = [(x, y, i % 3 != 1) for i, (x, y) in enumerate(batches(8, 13, seed=2))]
    res["branchy"] = _trajectory("sampa", dict(SGD, lam=0.3), data, bn=False,
                                 lossf=branchy_loss, bucket_bytes=512)
    res["no_overlap"] = _trajectory("sampa", dict(SGD, lam=0.3), batches(5, 13), bn=(k == 1),
                                    bucket_bytes=512, overlap=False)

    # A param group added after 3 steps (on every rank): new buckets and hooks,
    # fingerprint checked again, same trajectory as serial.
    data = [(x, y, True) for x, y in batches(6, 13, seed=4)]
    res["grown"] = {}
    for engine in ("serial", "distributed"):
        model = make_net(False)
        opt = SAMPa(model, branchy_loss, torch.optim.SGD, params=groups(model)[:1], lr=0.1,
                    momentum=0.9, rho=0.05, lam=0.3, engine=engine)
        xs = []
        for i, b in enumerate(data):
            if i == 3:
                opt.add_param_group({"params": list(model.fc.parameters()) + list(model.unused.parameters()),
                                     "lr": 0.2})
            opt.step(b)
            xs.append(flat(model.parameters()))
        res["grown"][engine] = {"x": xs, "replica": replica(opt), "losses": [],
                                "stats": dict(getattr(opt.engine, "stats", {}))}

    # Batches already sharded per rank: ranks r and r + k get shard r % k.
    data = batches(5, 12, seed=11)
    kw = dict(SGD, lam=0.3)
    base = kw.pop("base")
    opt = SAMPa(make_net(False), loss_fn, base, engine="distributed", sharded_batches=True, **kw)
    assert (opt.engine.data_rank, opt.engine.data_world_size) == (rank % k, k)
    xs = []
    for b in data:
        opt.step(shard_batch(b, opt.engine.data_rank, opt.engine.data_world_size)[0])
        xs.append(flat(opt.model.parameters()))
    res["sharded"] = {"x": xs, "replica": replica(opt)}
    ref = SAMPa(make_net(False), loss_fn, base, engine="distributed", **kw)
    res["sharded"]["global_x"] = []
    for b in data:
        ref.step(b)
        res["sharded"]["global_x"].append(flat(ref.model.parameters()))

    # Fingerprint: the last rank differs in a hyperparameter, then in the model.
    for name, (lr2, hidden) in {"lr": (0.2, 5), "shape": (0.1, 6)}.items():
        last = rank == world - 1
        model = make_net(False, hidden if last else 5)
        try:
            SAMPa(model, loss_fn, torch.optim.SGD, params=groups(model, lr2 if last else 0.1),
                  lr=0.1, momentum=0.9, engine="distributed")
            res[f"fingerprint_{name}"] = None
        except Exception as e:  # noqa: BLE001 - the test inspects it
            res[f"fingerprint_{name}"] = (type(e).__name__, str(e))

    if world == 4:
        # A 3-rank group: SAMPa refuses it, SAM runs data-parallel over it.
        sub = dist.new_group([0, 1, 2])
        if rank < 3:
            try:
                SAMPa(make_net(False), loss_fn, torch.optim.SGD, lr=0.1, engine="distributed",
                      process_group=sub)
                res["odd"] = None
            except Exception as e:  # noqa: BLE001
                res["odd"] = (type(e).__name__, str(e))
            res["sam3"] = _trajectory("sam", SGD, batches(4, 13, seed=9), bn=False, process_group=sub)
        # Fewer samples than data-parallel ranks: the same clear error on every rank.
        opt = SAMPa(make_net(False), loss_fn, torch.optim.SGD, lr=0.1, engine="distributed")
        try:
            opt.step(batches(1, 1)[0])
            res["tiny"] = None
        except Exception as e:  # noqa: BLE001
            res["tiny"] = (type(e).__name__, str(e))
    return res


def _scenario_failure(rank, world, victim, how, timeout):
    """The victim rank dies (os._exit) or stalls inside loss_fn at step 3; the
    others record what they raised and how long it took."""
    stop = {"armed": False}

    def deadly_loss(model, batch):
        if stop["armed"] and rank == victim:
            if how == "die":
                os._exit(17)
            time.sleep(120)
        return loss_fn(model, batch)

    opt = SAMPa(make_net(False), deadly_loss, torch.optim.SGD, lr=0.1, momentum=0.9,
                engine="distributed", timeout=timeout, bucket_bytes=512)
    for i, b in enumerate(batches(6, 8)):
        stop["armed"] = i == 3
        t0 = time.monotonic()
        try:
            opt.step(b)
        except Exception as e:  # noqa: BLE001
            kind = "RuntimeError" if isinstance(e, RuntimeError) else type(e).__name__
            return {"step": i, "error": (kind, str(e)), "seconds": time.monotonic() - t0}
    return {"step": None, "error": None}


def _scenario_bad_loss(rank, world, marker, timeout):
    """loss_fn ignores its model argument: the y-ranks run the y-pass on the
    user's own module (y swapped in), so the global model is the one they are
    given and the steps are those of a loss_fn that uses its argument."""
    res = {}
    for name in ("global", "argument"):
        model = make_net(False)
        lossf = (lambda m, b, model=model: loss_fn(model, b)) if name == "global" else loss_fn
        opt = SAMPa(model, lossf, torch.optim.SGD, lr=0.1, engine="distributed", timeout=timeout)
        res[name] = [opt.step(b).item() for b in batches(3, 8)] + [replica(opt)]
    return res


def _err(e):
    return (type(e).__name__, isinstance(e, RuntimeError), str(e))


class Picky(Exception):
    """A user error raised inside loss_fn on one rank only."""


def _steps(opt, data):
    """Step through `data`; record, per step, 'ok' or the error."""
    log = []
    for b in data:
        try:
            opt.step(b)
            log.append("ok")
        except Exception as e:  # noqa: BLE001 - the test inspects it
            log.append(_err(e))
    return log


def _scenario_errors(rank, world):
    """Errors that hit some ranks only; each must raise on every rank at once
    (short timeout: a rank left waiting would show as a timeout error) and
    leave the replicas identical, so training can go on."""
    res = {}
    data = batches(6, 13, seed=21)
    timeout = 15

    # A new batch too small to shard: only the y-ranks shard it.
    tiny = batches(1, 1, seed=22)[0]
    run = data[:2] + [tiny] + data[2:4]
    opt = SAMPa(make_net(False), loss_fn, torch.optim.SGD, lr=0.1, momentum=0.9, engine="distributed",
                timeout=timeout)
    res["tiny_new"] = {"log": _steps(opt, run), "replica": replica(opt), "t": opt.step_count}
    ser = SAMPa(make_net(False), loss_fn, torch.optim.SGD, lr=0.1, momentum=0.9)
    _steps(ser, data[:4])
    res["tiny_new"]["serial"] = replica(ser)

    # SAM, accumulation_steps=3, batch of 9 over 4 ranks: shares 3, 2, 2, 2.
    opt = SAM(make_net(False), loss_fn, torch.optim.SGD, lr=0.1, accumulation_steps=3,
              engine="distributed", timeout=timeout)
    res["sam_acc"] = _steps(opt, batches(1, 9, seed=23)) + _steps(opt, batches(1, 13, seed=24))

    # loss_fn raises on the last rank only, in step 1 (SAMPa: its only pass;
    # SAM: the first pass): that rank re-raises its own error, the others a
    # RuntimeError naming it; nobody waits.
    for method, fail_at in (("sampa", 2), ("sam", 3)):
        calls = {"n": 0}

        def picky(model, batch):
            calls["n"] += 1
            if rank == world - 1 and calls["n"] == fail_at:
                raise Picky("bad sample")
            return loss_fn(model, batch)

        cls, kw = (SAMPa, dict(lam=0.3)) if method == "sampa" else (SAM, {})
        opt = cls(make_net(False), picky, torch.optim.SGD, lr=0.1, momentum=0.9, engine="distributed",
                  timeout=timeout, **kw)
        t0 = time.monotonic()
        log = _steps(opt, data[:3])
        res[f"local_{method}"] = {"log": log, "seconds": time.monotonic() - t0,
                                  "log2": _steps(opt, data[3:5]), "replica": replica(opt), "t": opt.step_count}

    # sharded_batches: each rank's own shard; one rank's shard is smaller
    # than accumulation_steps.
    opt = SAMPa(make_net(False), loss_fn, torch.optim.SGD, lr=0.1, engine="distributed",
                sharded_batches=True, accumulation_steps=2, timeout=timeout)
    x, y = data[0]
    n = 1 if rank == 1 else 4
    res["sharded_small"] = _steps(opt, [(x[:n], y[:n])]) + _steps(opt, [(x[:4], y[:4])])
    res["sharded_small_replica"] = replica(opt)
    return res


def _scenario_drift(rank, world):
    """Replicas drifting apart the ways a user makes them: each must raise
    on every rank at the step it happens (or, for parameters changed in
    place, at the next checksum), refuse that step, and train on once fixed."""
    res = {}
    data = batches(6, 12, seed=41)
    other = batches(6, 12, seed=42)

    def fresh(method="sampa", **kw):
        cls, extra = (SAMPa, {"lam": 0.3}) if method == "sampa" else (SAM, {})
        return cls(make_net(True), loss_fn, torch.optim.SGD, lr=0.1, momentum=0.9, engine="distributed",
                   timeout=15, **extra, **kw)

    def case(name, opt, break_it, fix_it, k=2):
        log = _steps(opt, data[:k])
        break_it(opt)
        before = replica(opt)
        log += _steps(opt, data[k:k + 1])
        res[name] = {"log": log, "unchanged": torch.equal(before, replica(opt))}
        fix_it(opt)
        res[name]["after"] = _steps(opt, data[k + 1:k + 3])
        res[name]["replica"] = replica(opt)

    def nothing(opt):
        pass

    # a scheduler stepped on rank 0 only; then on rank 1 too
    for method in ("sampa", "sam"):
        opt = fresh(method)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        case(f"scheduler_{method}", opt, lambda o: rank == 0 and sched.step(),
             lambda o: rank == 1 and sched.step())

    def edit(key, who, value):
        def f(o):
            if rank == who:
                o.param_groups[-1][key] = value
        return f

    opt = fresh()
    case("lam", opt, edit("lam", 1, 0.5), edit("lam", 1, 0.3))
    opt = fresh()
    case("rho", opt, edit("rho", 0, 0.2), edit("rho", 0, 0.05))

    # model.load_state_dict on rank 0 only; then on rank 1 too
    opt = fresh()
    _steps(opt, data[:1])
    sd = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in opt.model.state_dict().items()}
    case("model_load", opt, lambda o: rank == 0 and o.model.load_state_dict(sd),
         lambda o: rank == 1 and o.model.load_state_dict(sd), k=1)

    # a parameter changed in place on rank 0 (no hook sees it): the checksum
    # every verify_every steps does
    opt = fresh(verify_every=3)
    log = _steps(opt, data[:1])
    if rank == 0:
        with torch.no_grad():
            opt.model.fc.weight[0, 0] += 1e-3
    res["in_place"] = log + _steps(opt, data[1:4])

    # Each rank forms only its own pass's input; the y-rank holds the
    # caller's batch object (it never runs the held batch), the x̃-rank a copy.
    opt = fresh()
    rep = opt.flat.primary
    _steps(opt, data[:3])
    res["roles"] = {"points": opt.engine.points, "role": opt.engine.role,
                    "buffers": sorted(n for n in ("x", "x_save", "xt", "y")
                                      if getattr(rep.slabs[0], n, None) is not None),
                    "held_is_batch": opt.held_batch is data[2],
                    "held_equal": all(torch.equal(a, b) for a, b in zip(opt.held_batch, data[2]))}

    # two ranks given different batches of the same size
    for method in ("sampa", "sam"):
        opt = fresh(method)
        log = _steps(opt, data[:2])
        before = replica(opt)
        log += _steps(opt, [data[2] if rank == 0 else other[2]])
        res[f"batch_{method}"] = {"log": log, "unchanged": torch.equal(before, replica(opt)),
                                  "after": _steps(opt, data[3:5]), "replica": replica(opt)}
    return res


class Cache(nn.Module):
    """A buffer that grows with the input in forward (a positional-cache
    pattern): only the ranks running the user's model grow it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(75, 7)
        self.register_buffer("cache", torch.zeros(4), persistent=False)

    def forward(self, x):
        if self.cache.numel() < x.shape[0]:
            self.cache = torch.arange(x.shape[0], dtype=torch.float32)
        return self.lin(x.flatten(1)) + 0 * self.cache[: x.shape[0], None]


def _scenario_replicas(rank, world):
    """Initial values, checkpoints, GradScaler, loss dtype, process groups."""
    import torch.distributed.distributed_c10d as c10d
    res = {}
    data = batches(4, 12, seed=31)

    # Different seeds on every rank (and a buffer and a frozen parameter that
    # differ): construction makes every rank hold rank 0's values.
    def seeded(seed):
        torch.manual_seed(seed)
        m = Net(True)
        m.unused.weight.requires_grad_(False)     # outside the optimizer
        m.bn.running_mean.uniform_()
        return m

    out = {}
    for engine in ("serial", "distributed"):
        model = seeded(100 + (rank if engine == "distributed" else 0))
        opt = SAMPa(model, loss_fn, torch.optim.SGD, lr=0.1, momentum=0.9, lam=0.3, engine=engine,
                    params=[p for p in model.parameters() if p.requires_grad])
        start = flat(list(model.parameters()) + list(model.buffers()))
        _steps(opt, data)
        out[engine] = {"start": start, "replica": replica(opt), "x": flat(model.parameters())}
    res["seeds"] = out

    # A checkpoint whose values differ per rank: every rank ends with rank 0's.
    model = make_net(False)
    opt = SAMPa(model, loss_fn, torch.optim.AdamW, lr=0.01, engine="distributed")
    _steps(opt, data[:2])
    sd = opt.state_dict()
    for st in sd["state"].values():
        st["exp_avg"] = st["exp_avg"] + rank
    sd["sampa_fused"]["gy"] = [g + rank for g in sd["sampa_fused"]["gy"]]
    sd["sampa_fused"]["t"] += rank
    with torch.no_grad():
        for p in model.parameters():
            p.add_(rank)
    opt.load_state_dict(sd)
    res["loaded"] = {"replica": replica(opt), "t": opt.step_count}
    _steps(opt, data[2:])
    res["loaded"]["after"] = replica(opt)

    # GradScaler: a different initial scale per rank is made rank 0's; a
    # different growth interval is refused.
    sc = torch.amp.GradScaler("cpu", init_scale=2.0 ** (10 + 3 * rank))
    opt = SAMPa(make_net(False), loss_fn, torch.optim.SGD, lr=0.1, momentum=0.9, engine="distributed",
                grad_scaler=sc)
    res["scaler"] = {"scale0": sc.get_scale()}
    _steps(opt, data)
    res["scaler"]["replica"] = replica(opt)
    sc = torch.amp.GradScaler("cpu", growth_interval=100 + rank)
    try:
        SAMPa(make_net(False), loss_fn, torch.optim.SGD, lr=0.1, engine="distributed", grad_scaler=sc)
        res["scaler_settings"] = None
    except Exception as e:  # noqa: BLE001
        res["scaler_settings"] = _err(e)

    # A float64 loss is reduced in float64.
    def loss64(model, batch):
        return F.cross_entropy(model(batch[0].double()), batch[1])

    res["fp64"] = {}
    for engine in ("serial", "distributed"):
        model = make_net(False).double()
        opt = SAMPa(model, loss64, torch.optim.SGD, lr=0.1, engine=engine)
        res["fp64"][engine] = [opt.step(b) for b in data[:2]]

    # Buffers resized in forward on the ranks running the user's model.
    opt = SAMPa(Cache(), loss_fn, torch.optim.SGD, lr=0.1, engine="distributed", timeout=15)
    res["cache"] = _steps(opt, data[:2])

    # close() destroys the engine's group; the optimizer refuses to step.
    del opt                  # the previous optimizer's engine closes its group now, not during the count
    gc.collect()
    before = len(c10d._world.pg_map)
    opt = SAMPa(make_net(False), loss_fn, torch.optim.SGD, lr=0.1, engine="distributed")
    during = len(c10d._world.pg_map)
    opt.engine.close()
    res["close"] = {"counts": (before, during, len(c10d._world.pg_map)), "after": _steps(opt, data[:1])}
    return res


def launch(world, scenario, *args, deadline=150.0, expect_dead=()):
    """Run `_scenario_<scenario>` on `world` processes; return each rank's
    result (None for ranks in `expect_dead`). Never hangs: stragglers are killed."""
    return ranks.launch(__name__, f"_scenario_{scenario}", world, args, deadline=deadline,
                        expect_dead=expect_dead, what=f" of the {scenario} scenario")


@pytest.fixture(scope="module")
def two():
    return launch(2, "main")


@pytest.fixture(scope="module")
def four():
    return launch(4, "main")


# ---------------------------------------------------------------- trajectories
def _close(a, b, exact):
    if exact:
        assert torch.equal(a, b), f"max difference {(a - b).abs().max().item():.3g}"
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("case", ["sgd", "adamw", "generic", "training", "micro", "branchy", "grown",
                                  "no_overlap"])
def test_sampa_two_ranks_equals_serial_exactly(two, case):
    # k = 1: each half runs the whole batch, in the same order, on 1 thread.
    for res in two:
        r = res[case]
        assert r["distributed"]["losses"] == r["serial"]["losses"]
        for xd, xs in zip(r["distributed"]["x"], r["serial"]["x"]):
            _close(xd, xs, exact=True)


@pytest.mark.parametrize("case", ["sgd", "adamw", "generic", "training", "micro", "branchy", "grown",
                                  "no_overlap"])
def test_sampa_four_ranks_matches_serial(four, case):
    # k = 2: shards of 7 and 6 samples (odd batch 13) or 5 and 5; sharded means
    # differ from the full-batch mean only by rounding.
    for res in four:
        r = res[case]
        torch.testing.assert_close(torch.tensor(r["distributed"]["losses"]),
                                   torch.tensor(r["serial"]["losses"]), rtol=1e-5, atol=1e-6)
        for xd, xs in zip(r["distributed"]["x"], r["serial"]["x"]):
            _close(xd, xs, exact=False)


@pytest.mark.parametrize("fixture", ["two", "four"])
def test_sam_data_parallel_matches_serial(fixture, request):
    for res in request.getfixturevalue(fixture):
        for case in ("sam", "sam_micro"):
            r = res[case]
            for xd, xs in zip(r["distributed"]["x"], r["serial"]["x"]):
                _close(xd, xs, exact=False)


def test_sam_on_three_ranks(four):
    for res in four[:3]:
        for xd, xs in zip(res["sam3"]["distributed"]["x"], res["sam3"]["serial"]["x"]):
            _close(xd, xs, exact=False)
    assert torch.equal(four[0]["sam3"]["distributed"]["replica"], four[2]["sam3"]["distributed"]["replica"])


@pytest.mark.parametrize("fixture", ["two", "four"])
def test_replicas_identical_on_every_rank(fixture, request):
    results = request.getfixturevalue(fixture)
    for case in ("sgd", "adamw", "generic", "training", "micro", "sam", "sam_micro", "branchy",
                 "grown", "no_overlap"):
        ref = results[0][case]["distributed"]["replica"]
        for r, res in enumerate(results[1:], 1):
            assert torch.equal(res[case]["distributed"]["replica"], ref), f"{case}: rank {r} differs"
        for r, res in enumerate(results):  # and every step's parameters, not only the last
            for xd, x0 in zip(res[case]["distributed"]["x"], results[0][case]["distributed"]["x"]):
                assert torch.equal(xd, x0)
    # 20 steps, and the parameters moved (a frozen model would pass trivially)
    sgd = results[0]["sgd"]["distributed"]["x"]
    assert len(sgd) == 20 and (sgd[-1] - sgd[0]).abs().max() > 1e-3


def test_batch_norm_statistics_follow_rank_zero(two):
    # The y-rank never runs the user's model: its running statistics come from
    # rank 0 and equal the serial run's.
    for res in two:
        assert torch.equal(res["sgd"]["distributed"]["replica"], res["sgd"]["serial"]["replica"])


@pytest.mark.parametrize("fixture", ["two", "four"])
def test_buckets_start_during_backward(fixture, request):
    for res in request.getfixturevalue(fixture):
        # every bucket, that of the never-used parameter included, starts
        # before backward returns
        st = res["sgd"]["distributed"]["stats"]
        assert st["buckets_during_backward"] > 20 and st["buckets_after_backward"] == 0
        # parameters used on some passes only: still correct (see the
        # trajectory tests); what could not start early starts right after
        st = res["branchy"]["distributed"]["stats"]
        assert st["buckets_during_backward"] > 0
        st = res["no_overlap"]["distributed"]["stats"]
        assert st["buckets_during_backward"] == 0 and st["buckets_after_backward"] > 0


@pytest.mark.parametrize("fixture", ["two", "four"])
def test_sharded_batches(fixture, request):
    results = request.getfixturevalue(fixture)
    for res in results:
        # equal shards: the same weights as the engine's own sharding
        for a, b in zip(res["sharded"]["x"], res["sharded"]["global_x"]):
            assert torch.equal(a, b)
        assert torch.equal(res["sharded"]["replica"], results[0]["sharded"]["replica"])


@pytest.mark.parametrize("fixture", ["two", "four"])
def test_fingerprint_mismatch_raises_on_every_rank(fixture, request):
    results = request.getfixturevalue(fixture)
    world = len(results)
    for res in results:
        kind, msg = res["fingerprint_lr"]
        assert kind == "RuntimeError"
        assert "hyperparameters of param group 1" in msg and f"rank {world - 1}" in msg
        assert "lr=0.2" in msg
        kind, msg = res["fingerprint_shape"]
        assert kind == "RuntimeError" and "parameters of param group 0" in msg
        assert "(6, 3, 3, 3)" in msg


def test_odd_world_size_refused(four):
    for res in four[:3]:
        kind, msg = res["odd"]
        assert kind == "ValueError" and "even world size" in msg and "got 3" in msg


def test_batch_smaller_than_half_refused(four):
    for res in four:
        kind, msg = res["tiny"]
        assert kind == "ValueError" and "1 samples cannot be split over 2" in msg


# ---------------------------------------------------------------- failures
def test_killed_rank_gives_errors_not_a_hang():
    timeout = 20.0
    t0 = time.monotonic()
    results = launch(4, "failure", 3, "die", timeout, deadline=90.0, expect_dead=(3,))
    for r, res in enumerate(results[:3]):
        assert res["step"] == 3, f"rank {r}: {res}"
        kind, msg = res["error"]
        assert kind == "RuntimeError" and f"rank {r} of 4" in msg and "restart all ranks" in msg, msg
        assert res["seconds"] < timeout + 10
    assert time.monotonic() - t0 < 90


def test_stalled_rank_times_out():
    # A rank that is alive but never arrives: the others fail after `timeout`.
    timeout = 3.0
    results = launch(2, "failure", 1, "stall", timeout, deadline=60.0, expect_dead=(1,))
    res = results[0]
    assert res["step"] == 3
    kind, msg = res["error"]
    assert kind == "RuntimeError" and "timeout (3 s" in msg, msg
    assert timeout - 0.5 < res["seconds"] < timeout + 20


def test_loss_ignoring_its_model_is_the_same_on_the_y_rank(tmp_path):
    timeout = 30.0
    for res in launch(2, "bad_loss", str(tmp_path / "x_done"), timeout, deadline=90.0):
        assert res["global"][:-1] == res["argument"][:-1]
        assert torch.equal(res["global"][-1], res["argument"][-1])


# ------------------------------------------------ errors on some ranks only
@pytest.fixture(scope="module")
def errors():
    return launch(4, "errors", deadline=120.0)


def test_too_small_new_batch_refused_on_every_rank(errors):
    for res in errors:
        r = res["tiny_new"]
        assert r["log"][:2] == ["ok", "ok"] and r["log"][3:] == ["ok", "ok"], r["log"]
        kind, _, msg = r["log"][2]
        assert kind == "ValueError" and "new batch" in msg and "1 samples cannot be split over 2" in msg
        assert r["t"] == 4
        # the refused step changed nothing: as a serial run without it
        torch.testing.assert_close(r["replica"], r["serial"], rtol=1e-5, atol=2e-6)
        assert torch.equal(r["replica"], errors[0]["tiny_new"]["replica"])


def test_share_smaller_than_accumulation_steps_refused_on_every_rank(errors):
    # serial accepts a batch of 9 with accumulation_steps=3; 4 ranks get 3, 2, 2, 2
    for res in errors:
        (kind, _, msg), after = res["sam_acc"]
        assert kind == "ValueError" and "accumulation_steps=3" in msg and "12 samples" in msg, msg
        assert after == "ok"


@pytest.mark.parametrize("method", ["sampa", "sam"])
def test_error_in_loss_fn_on_one_rank_raises_on_every_rank(errors, method):
    world = len(errors)
    for r, res in enumerate(errors):
        out = res[f"local_{method}"]
        log = out["log"]
        assert log[0] == "ok" and log[2] == "ok", log
        kind, is_runtime, msg = log[1]
        if r == world - 1:
            assert kind == "Picky" and msg == "bad sample"
        else:
            assert kind == "RuntimeError" and f"rank {world - 1} raised an error" in msg, msg
            assert "refused on every rank" in msg
        assert out["seconds"] < 10          # no rank waited for the 15 s timeout
        # the group still works, and the step was refused everywhere alike
        assert out["log2"] == ["ok", "ok"] and out["t"] == 4
        assert torch.equal(out["replica"], errors[0][f"local_{method}"]["replica"])


def test_sharded_batch_error_on_one_rank_raises_on_every_rank(errors):
    for r, res in enumerate(errors):
        (kind, _, msg), after = res["sharded_small"]
        if r == 1:
            assert kind == "ValueError" and "accumulation_steps=2" in msg
        else:
            assert kind == "RuntimeError" and "rank 1 raised an error" in msg, msg
        assert after == "ok"
        assert torch.equal(res["sharded_small_replica"], errors[0]["sharded_small_replica"])


# ------------------------------------------------ drift between replicas
@pytest.fixture(scope="module")
def drift():
    return launch(2, "drift", deadline=120.0)


def _refused_everywhere(drift, name, *needles):
    for res in drift:
        r = res[name]
        assert r["log"][:-1] == ["ok"] * (len(r["log"]) - 1), r["log"]
        assert r["log"][-1] != "ok", f"{name}: the replicas drifted apart unseen"
        kind, _, msg = r["log"][-1]
        assert kind == "RuntimeError" and "drifted apart" in msg, msg
        for n in needles:
            assert n in msg, msg
        assert r["unchanged"]                        # the step was refused
        assert r["after"] == ["ok", "ok"], r["after"]
        assert torch.equal(r["replica"], drift[0][name]["replica"])


@pytest.mark.parametrize("method", ["sampa", "sam"])
def test_scheduler_stepped_on_one_rank_raises_on_every_rank(drift, method):
    _refused_everywhere(drift, f"scheduler_{method}", "param group 0", "lr=0.05", "rank 1 has lr=0.1")


def test_lam_edited_on_one_rank_raises_on_every_rank(drift):
    _refused_everywhere(drift, "lam", "lam=0.3", "rank 1 has lam=0.5")


def test_rho_edited_on_one_rank_raises_on_every_rank(drift):
    _refused_everywhere(drift, "rho", "rho=0.2", "rank 1 has rho=0.05")


def test_model_loaded_on_one_rank_raises_on_every_rank(drift):
    _refused_everywhere(drift, "model_load", "parameters of rank 1 differ", "conv.weight",
                        "model.load_state_dict ran on rank 0")


def test_parameter_changed_in_place_on_one_rank_caught_by_the_checksum(drift):
    for res in drift:
        log = res["in_place"]
        assert log[:2] == ["ok", "ok"], log           # steps 1 and 2: no checksum due
        assert "ok" not in log[2:], "the changed parameter went unseen"
        for kind, _, msg in log[2:]:                   # step 3, and every step after, until fixed
            assert kind == "RuntimeError" and "fc.weight" in msg and "conv.weight" not in msg, msg


def test_each_rank_forms_only_its_own_input_and_the_y_rank_keeps_no_copy(drift):
    x, y = drift[0]["roles"], drift[1]["roles"]
    assert (x["role"], x["points"], y["role"], y["points"]) == ("x", ("xt",), "y", ("y",))
    assert "y" not in x["buffers"] and "x_save" in x["buffers"]      # xt is formed in x
    assert "y" in y["buffers"] and "x_save" not in y["buffers"]      # x is never perturbed there
    assert not x["held_is_batch"] and x["held_equal"]
    assert y["held_is_batch"]


@pytest.mark.parametrize("method", ["sampa", "sam"])
def test_different_batches_of_one_size_raise_on_every_rank(drift, method):
    _refused_everywhere(drift, f"batch_{method}", "rank 0 and rank 1 were given different batches")


# ------------------------------------------------ replicas and resources
@pytest.fixture(scope="module")
def replicas():
    return launch(2, "replicas", deadline=90.0)


def test_different_seeds_end_identical_and_equal_serial_from_rank_zero(replicas):
    for res in replicas:
        s = res["seeds"]
        # rank 0's initial values everywhere (frozen parameter and buffers too)
        assert torch.equal(s["distributed"]["start"], replicas[0]["seeds"]["distributed"]["start"])
        assert torch.equal(s["distributed"]["start"], s["serial"]["start"])
        assert torch.equal(s["distributed"]["replica"], replicas[0]["seeds"]["distributed"]["replica"])
        assert torch.equal(s["distributed"]["x"], s["serial"]["x"])
        assert not torch.equal(s["serial"]["start"], s["serial"]["x"])   # it trained


def test_load_state_dict_makes_rank_zero_values_everyone_s(replicas):
    for res in replicas:
        assert res["loaded"]["t"] == 2
        assert torch.equal(res["loaded"]["replica"], replicas[0]["loaded"]["replica"])
        assert torch.equal(res["loaded"]["after"], replicas[0]["loaded"]["after"])


def test_grad_scaler_scale_follows_rank_zero_and_settings_are_checked(replicas):
    for res in replicas:
        assert res["scaler"]["scale0"] == 2.0 ** 10
        assert torch.equal(res["scaler"]["replica"], replicas[0]["scaler"]["replica"])
        kind, _, msg = res["scaler_settings"]
        assert kind == "RuntimeError" and "GradScaler settings" in msg and "growth_interval=101" in msg


def test_float64_loss_reduced_in_float64(replicas):
    for res in replicas:
        for a, b in zip(res["fp64"]["serial"], res["fp64"]["distributed"]):
            assert b.dtype == torch.float64 and a.item() == b.item()


def test_buffer_resized_in_forward_raises_on_every_rank(replicas):
    for res in replicas:
        for entry in res["cache"]:
            kind, _, msg = entry
            assert kind == "RuntimeError" and "buffers differ between ranks" in msg, msg


def test_close_destroys_the_engine_group(replicas):
    for res in replicas:
        before, during, after = res["close"]["counts"]
        assert during == before + 1 and after == before
        kind, _, msg = res["close"]["after"][0]
        assert kind == "RuntimeError" and "closed" in msg


TORCHRUN_SCRIPT = """
import torch, torch.nn.functional as F
from torch import nn
from sampa_fused import SAMPa
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3))
opt = SAMPa(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), torch.optim.SGD,
            lr=0.1, momentum=0.9, engine="distributed", timeout=60)
g = torch.Generator().manual_seed(1)
for _ in range(4):
    opt.step((torch.randn(11, 6, generator=g), torch.randint(0, 3, (11,), generator=g)))
x = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
# one file per rank: the ranks' stdout lines may interleave
import os, sys
with open(os.path.join(sys.argv[1], f"rank{torch.distributed.get_rank()}.txt"), "w") as f:
    f.write(f"RESULT {torch.distributed.get_rank()} {opt.engine.role} {x.double().sum().item()!r}")
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_launch_initializes_the_group(tmp_path):
    # As the README says: no init_process_group call in the script; the
    # engine initializes the default group from torchrun's environment.
    import subprocess
    script = tmp_path / "train.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = sorted((tmp_path / f"rank{r}.txt").read_text().split() for r in range(2))
    assert [(ln[1], ln[2]) for ln in lines] == [("0", "x"), ("1", "y")]
    assert lines[0][3] == lines[1][3]


# ---------------------------------------------------------------- in-process
Pair = collections.namedtuple("Pair", "x y")


@pytest.mark.parametrize("n,parts", [(13, 2), (13, 4), (7, 7), (10, 3), (5, 1)])
def test_shard_batch_covers_batch(n, parts):
    x, y = torch.randn(n, 3), torch.randn(n)
    batch = {"pair": Pair(x, y), "scale": torch.tensor(2.0), "name": "b", "list": [x]}
    pieces, weights = [], []
    for i in range(parts):
        s, w = shard_batch(batch, i, parts)
        assert isinstance(s["pair"], Pair) and s["name"] == "b" and torch.equal(s["scale"], batch["scale"])
        assert s["pair"].x.shape[0] == s["pair"].y.shape[0] == s["list"][0].shape[0]
        assert s["pair"].x.shape[0] in (n // parts, -(-n // parts))
        pieces.append(s["pair"].x)
        weights.append(w)
    assert torch.equal(torch.cat(pieces), x)
    assert sum(weights) == pytest.approx(1.0)
    assert weights == [p.shape[0] / n for p in pieces]


def test_shard_batch_refuses_what_it_cannot_shard():
    with pytest.raises(ValueError, match="different sizes"):
        shard_batch((torch.randn(4, 2), torch.randn(5)), 0, 2)
    with pytest.raises(ValueError, match="3 samples cannot be split over 4"):
        shard_batch(torch.randn(3, 2), 0, 4)
    with pytest.raises(TypeError, match="sharded_batches=True"):
        shard_batch({"x": torch.randn(4), "obj": object()}, 0, 2)
    with pytest.raises(TypeError, match="no tensor"):
        shard_batch((1, "a"), 0, 2)


@pytest.mark.parametrize("cap", [4, 200, 1 << 20])
def test_buckets_tile_every_slab(cap):
    params = [torch.randn(s) for s in (7, 33, 1, 129, 5)] + [torch.randn(9, dtype=torch.float64)]
    slabs = build_slabs(params, [0, 0, 1, 1, 1, 0])
    buckets = plan_buckets(slabs, cap)
    for si, slab in enumerate(slabs):
        mine = sorted((b.start, b.end) for b in buckets if b.slab == si)
        assert mine[0][0] == 0 and mine[-1][1] == slab.numel
        assert all(a[1] == b[0] for a, b in zip(mine, mine[1:]))
    assert sorted(i for b in buckets for i in b.params) == list(range(len(params)))
    # last parameters first, as backward produces them
    order = [max(b.params) for b in buckets]
    assert order == sorted(order, reverse=True)


def test_needs_an_initialized_group(monkeypatch):
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        SAMPa(make_net(False), loss_fn, torch.optim.SGD, lr=0.1, engine="distributed")


def test_option_validation():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    model = make_net(False)
    with pytest.raises(TypeError, match="timeout"):
        SAMPa(model, loss_fn, torch.optim.SGD, lr=0.1, engine="distributed", timeout="soon")
    with pytest.raises(ValueError, match="positive"):
        SAMPa(model, loss_fn, torch.optim.SGD, lr=0.1, engine="distributed", timeout=0)
    with pytest.raises(ValueError, match="bucket_bytes"):
        SAMPa(model, loss_fn, torch.optim.SGD, lr=0.1, engine="distributed", bucket_bytes=0)
    assert DEFAULT_TIMEOUT_S > 0


def test_batch_fingerprint_tells_one_changed_sample_apart():
    # The per-step fingerprint samples large tensors; every sample of the
    # batch must still count, and the label tensor (small) is taken whole.
    from types import SimpleNamespace

    from sampa_fused.engines.distributed.engine import DistributedEngine, _same_fingerprint
    me = SimpleNamespace(device=torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)

    def fp(batch, full=False):
        return DistributedEngine._batch_fingerprint(me, batch, full).tolist()
    base = fp((x, y))
    assert _same_fingerprint(base, fp((x.clone(), y.clone())))
    for i in (0, 57, 127):
        x2 = x.clone()
        x2[i] = torch.randn(3, 32, 32, generator=g)
        assert not _same_fingerprint(base, fp((x2, y))), i
    y2 = y.clone()
    y2[3] = (y2[3] + 1) % 10
    assert not _same_fingerprint(base, fp((x, y2)))
    assert not _same_fingerprint(base, fp((y, x)))                     # order counts
    assert not _same_fingerprint(base, fp((x[torch.randperm(128, generator=g)], y)))
    # every element on checksum steps: one changed pixel shows
    x3 = x.clone()
    x3[9, 1, 2, 3] += 0.5
    assert not _same_fingerprint(fp((x, y), full=True), fp((x3, y), full=True))
