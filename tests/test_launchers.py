"""Models and optimizers as launchers hand them over: DistributedDataParallel,
FSDP (1 and 2) and Lightning Fabric's wrappers. On 2 gloo ranks with a short
deadline: a combination that cannot work must be refused at construction on
every rank (it used to deadlock in the first step's exchange, or let the
ranks drift apart unseen), and data-parallel SAM through DDP must equal the
distributed engine's SAM on the same global batches."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ranks as rank_runner
import torch
import torch.nn.functional as F
from reference import SmallNet, ce_loss, make_batches

import sampa_fused
from sampa_fused import SAM, SAMPa
from sampa_fused.launch import free_port

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")

REPO = str(Path(sampa_fused.__file__).resolve().parents[1])
STEPS = 4


def _kw(method):
    kw = dict(lr=0.1, momentum=0.9, rho=0.1, backend="torch")
    return dict(kw, lam=0.3) if method is SAMPa else kw


def _net():
    torch.manual_seed(0)
    return SmallNet(bn=False)


def _construct(make):
    """What construction said: 'ok' or the exception's type and message."""
    try:
        opt = make()
    except Exception as e:  # noqa: BLE001 - recorded for the test
        return f"{type(e).__name__}: {e}"
    return "ok" if opt is not None else "none"


def _wrappers(rank):
    """(name, factory of a wrapped SmallNet, method, engine) to try on every rank."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    cases = []
    for method in (SAMPa, SAM):
        for engine in ("distributed", "auto"):
            cases.append((f"ddp-{method.__name__}-{engine}", lambda: DDP(_net()), method, engine))
    cases.append(("ddp-SAMPa-serial", lambda: DDP(_net()), SAMPa, "serial"))

    def fsdp1():
        from torch.distributed.fsdp import FullyShardedDataParallel
        return FullyShardedDataParallel(_net(), device_id=torch.device("cpu"))

    def fsdp2():
        from torch.distributed.fsdp import fully_shard
        return fully_shard(_net())

    for name, make in (("fsdp1", fsdp1), ("fsdp2", fsdp2)):
        for method, engine in ((SAMPa, "distributed"), (SAM, "serial")):
            cases.append((f"{name}-{method.__name__}-{engine}", make, method, engine))
    try:
        from lightning.fabric.wrappers import _FabricModule
    except ImportError:
        return cases
    cases.append(("fabric-ddp-SAMPa-distributed", lambda: _FabricModule(DDP(_net()), None), SAMPa,
                  "distributed"))
    cases.append(("fabric-bare-SAMPa-distributed", lambda: _FabricModule(_net(), None), SAMPa,
                  "distributed"))
    return cases


def _scenario(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP
    res = {}
    for name, make, method, engine in _wrappers(rank):
        try:
            model = make()
        except Exception as e:  # noqa: BLE001 - the wrapper itself cannot run here
            res[name] = f"unavailable: {type(e).__name__}: {e}"
            continue
        extra = dict(timeout=15) if engine in ("distributed", "auto") else {}
        res[name] = _construct(lambda: method(model, ce_loss, torch.optim.SGD, engine=engine,
                                              **_kw(method), **extra))
    # data-parallel SAM: DDP averages both passes of each rank's half batch
    batches = make_batches(STEPS, batch=12, seed=3)
    net = _net()
    twin = copy.deepcopy(net)
    ddp = DDP(net)
    opt = SAM(ddp, ce_loss, torch.optim.SGD, engine="serial", **_kw(SAM))
    half = [(x[6 * rank:6 * rank + 6], y[6 * rank:6 * rank + 6]) for x, y in batches]
    res["ddp_sam_losses"] = [opt.step(b).detach() for b in half]
    res["ddp_sam_params"] = [p.detach().clone() for p in net.parameters()]
    ref = SAM(twin, ce_loss, torch.optim.SGD, engine="distributed", timeout=15, **_kw(SAM))
    res["dist_sam_losses"] = [ref.step(b).detach() for b in batches]
    res["dist_sam_params"] = [p.detach().clone() for p in twin.parameters()]
    return res


def _launch(world=2, deadline=120.0):
    """Each rank's result; a rank still running after `deadline` fails the test (a hang)."""
    return rank_runner.launch(__name__, "_scenario", world, deadline=deadline, init_timeout_s=30.0)


@pytest.fixture(scope="module")
def ranks():
    return _launch()


REFUSED = ["ddp-SAMPa-distributed", "ddp-SAMPa-auto", "ddp-SAM-distributed", "ddp-SAM-auto",
           "ddp-SAMPa-serial", "fsdp1-SAMPa-distributed", "fsdp1-SAM-serial",
           "fsdp2-SAMPa-distributed", "fsdp2-SAM-serial", "fabric-ddp-SAMPa-distributed",
           "fabric-bare-SAMPa-distributed"]


@pytest.mark.parametrize("case", REFUSED)
def test_wrapped_model_refused_at_construction_on_every_rank(ranks, case):
    if case not in ranks[0]:
        pytest.skip("lightning is not installed")
    for res in ranks:
        said = res[case]
        if said.startswith("unavailable"):
            pytest.skip(f"{case}: {said}")
        assert said.startswith("ValueError"), said
        assert "\n" not in said
        assert "bare module" in said, said
        wrapper = "FSDP" if case.startswith("fsdp") else "DistributedDataParallel" if case.startswith(
            "ddp") else "_FabricModule"
        assert wrapper in said, said


def test_ddp_wrapped_sam_equals_the_distributed_engine(ranks):
    # Same math on the same global batch (mean of two equal halves). DDP
    # averages as (g0 + g1) / 2 in its own buckets, the engine with its own
    # weights: the sums may round differently, hence a tolerance.
    for res in ranks:
        for a, b in zip(res["ddp_sam_params"], res["dist_sam_params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ranks[0]["ddp_sam_params"], ranks[1]["ddp_sam_params"]):
        assert torch.equal(a, b)      # DDP keeps the replicas identical
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["ddp_sam_losses"], ranks[1]["ddp_sam_losses"])]
    for a, b in zip(mean, ranks[0]["dist_sam_losses"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- Fabric, one process
def test_fabric_setup_then_step_with_the_batch_equals_a_plain_loop():
    fabric_mod = pytest.importorskip("lightning.fabric")
    net = _net()
    twin = copy.deepcopy(net)
    batches = make_batches(STEPS, batch=12, seed=4)
    fabric = fabric_mod.Fabric(accelerator="cpu", devices=1)
    opt = SAMPa(net, ce_loss, torch.optim.SGD, **_kw(SAMPa))
    model, fopt = fabric.setup(net, opt)
    losses = [fopt.step(b) for b in batches]   # Fabric passes the batch on as closure=
    ref_opt = SAMPa(twin, ce_loss, torch.optim.SGD, **_kw(SAMPa))
    for a, b in zip(losses, [ref_opt.step(b) for b in batches]):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_fabric_module_around_a_bare_model_trains_as_the_bare_model():
    fabric_mod = pytest.importorskip("lightning.fabric")
    net = _net()
    twin = copy.deepcopy(net)
    batches = make_batches(STEPS, batch=12, seed=6)
    wrapped = fabric_mod.Fabric(accelerator="cpu", devices=1).setup_module(net)
    opt = SAMPa(wrapped, ce_loss, torch.optim.SGD, **_kw(SAMPa))
    ref = SAMPa(twin, ce_loss, torch.optim.SGD, **_kw(SAMPa))
    for b in batches:
        assert torch.equal(opt.step(b), ref.step(b))
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)


FABRIC_SCRIPT = '''
import sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric, seed_everything
from reference import SmallNet, make_batches
from sampa_fused import SAMPa

# the README's port of the official script's set-up, on CPU (gloo)
fabric = Fabric(devices=2, strategy="ddp", accelerator="cpu")
fabric.launch()
seed_everything(0)
data = make_batches(3, batch=12, seed=8)
dataset = torch.utils.data.TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))
train_loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(dataset, batch_size=12),
                                        use_distributed_sampler=False)
torch.manual_seed(0)
model = SmallNet(bn=False).to(fabric.device)
loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1], label_smoothing=0.1)
opt = SAMPa(model, loss_fn, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9, weight_decay=5e-4,
            engine="distributed", timeout=30)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 2)
for epoch in range(2):
    for batch in train_loader:
        opt.step(batch)
    scheduler.step()
if fabric.global_rank == 0:
    torch.save([p.detach().clone() for p in model.parameters()], {out!r})
'''


def test_readme_fabric_port_on_two_processes_equals_the_serial_engine(tmp_path):
    pytest.importorskip("lightning.fabric")
    out = tmp_path / "params.pt"
    script = tmp_path / "fabric_port.py"
    script.write_text(FABRIC_SCRIPT.format(repo=REPO, tests=str(Path(__file__).parent), out=str(out)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(out)
    torch.manual_seed(0)
    model = SmallNet(bn=False)
    opt = SAMPa(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], label_smoothing=0.1), torch.optim.SGD,
                rho=0.1, lam=0.2, lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 2)
    for _ in range(2):
        for b in make_batches(3, batch=12, seed=8):
            opt.step(b)
        sched.step()
    for a, b in zip(got, model.parameters()):
        assert torch.equal(a, b)     # two ranks, one pass each: the serial engine's step exactly
