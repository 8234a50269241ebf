"""One rank of the sharded scenarios (tests/test_sharded.py launches 2k of
these as processes on gloo): runs the scenarios named on the command line
and saves what it saw to OUT/rank<r>.pt. Not a test module itself."""
from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import sampa_fused
from sampa_fused import SAM, SAMPa
from sampa_fused.sharded import ShardedSAM, ShardedSAMPa


class MLP(nn.Module):
    # odd sizes: shards of unequal length (7 rows over 2 or 4 ranks) and a
    # bias shard that is empty on some ranks
    def __init__(self, d_in=6, hidden=7, d_out=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def batches(n, size, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def full_params(model):
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def serial_run(cls, kw, bs, steps):
    torch.manual_seed(0)
    m = MLP()
    opt = cls(m, loss_fn, torch.optim.SGD, engine="serial", **kw)
    out = []
    for b in bs[:steps]:
        opt.step(b)
        out.append([p.detach().clone() for p in m.parameters()])
    return out


def sharded_run(cls, kw, bs, steps):
    torch.manual_seed(0)
    m = sampa_fused.shard(MLP())
    opt = cls(m, loss_fn, torch.optim.SGD, **kw)
    out = []
    for b in bs[:steps]:
        opt.step(b)
        out.append(full_params(m))
    return out, opt


def scenario_trajectory(res, steps=20):
    kw = dict(rho=0.1, lam=0.3, lr=0.1, momentum=0.9, weight_decay=1e-3)
    bs = batches(steps, 8)
    got, opt = sharded_run(ShardedSAMPa, kw, bs, steps)
    res["sampa"] = (serial_run(SAMPa, kw, bs, steps), got)
    res["sampa_local"] = [opt.x.clone(), opt.gy.clone(), opt.state_bufs["momentum_buffer"].clone()]
    kw.pop("lam")
    got, opt = sharded_run(ShardedSAM, kw, bs, steps)
    res["sam"] = (serial_run(SAM, kw, bs, steps), got)
    res["sam_local"] = [opt.x.clone(), opt.state_bufs["momentum_buffer"].clone()]


def scenario_layout8(res):
    scenario_trajectory(res, steps=5)


def scenario_adamw(res, steps=8):
    kw = dict(rho=0.05, lam=0.2, lr=1e-2, weight_decay=1e-2)
    bs = batches(steps, 8, seed=5)
    torch.manual_seed(0)
    m = MLP()
    ser = SAMPa(m, loss_fn, torch.optim.AdamW, engine="serial", **kw)
    ref = []
    for b in bs:
        ser.step(b)
        ref.append([p.detach().clone() for p in m.parameters()])
    torch.manual_seed(0)
    ms = sampa_fused.shard(MLP())
    opt = ShardedSAMPa(ms, loss_fn, torch.optim.AdamW, **kw)
    got = []
    for b in bs:
        opt.step(b)
        got.append(full_params(ms))
    res["adamw"] = (ref, got)


def scenario_errors(res):
    torch.manual_seed(0)
    m = sampa_fused.shard(MLP())
    opt = ShardedSAMPa(m, loss_fn, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9)
    bs = batches(3, 8)
    opt.step(bs[0])
    before = full_params(m)
    kept = [opt.x.clone(), opt.gy.clone(), opt.gy_sq.clone(), opt.state_bufs["momentum_buffer"].clone()]
    errs = {}
    # a batch that does not split over the ranks: the same error on every rank
    try:
        opt.step((bs[1][0][:5], bs[1][1][:5]))
    except Exception as e:  # noqa: BLE001
        errs["odd_batch"] = f"{type(e).__name__}: {e}"
    # a loss that is not finite on the y-pass half only (its new batch): every rank refuses
    nan_batch = (bs[1][0].clone(), bs[1][1])
    nan_batch[0][0, 0] = float("nan")
    try:
        opt.step(nan_batch)
    except Exception as e:  # noqa: BLE001
        errs["nan"] = f"{type(e).__name__}: {e}"
    # loss_fn raising on every rank of the y-pass half (an exception on only
    # some ranks of a half would leave the others in FSDP2's collectives
    # until the process group's timeout)
    half = dist.get_rank() // (dist.get_world_size() // 2)

    def bad_loss(model, batch):
        if half == 1:
            raise KeyError("boom in the y-pass")
        return loss_fn(model, batch)
    opt.loss_fn = bad_loss
    try:
        opt.step(bs[2])
    except Exception as e:  # noqa: BLE001
        errs["raise"] = f"{type(e).__name__}: {e}"
    opt.loss_fn = loss_fn
    res["errors"] = errs
    now = [opt.x, opt.gy, opt.gy_sq, opt.state_bufs["momentum_buffer"]]
    res["unchanged"] = (all(torch.equal(a, b) for a, b in zip(before, full_params(m)))
                        and all(torch.equal(a, b) for a, b in zip(kept, now))
                        and opt.held is not None and torch.equal(opt.held[0], bs[0][0]))
    # and the optimizer still works afterwards
    opt.step(bs[2])
    res["after_ok"] = True
    # a model sharded over the whole world (not per half) is refused
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    # SAM: bad input raises the same error on every rank; a non-finite loss is refused everywhere
    sam = ShardedSAM(sampa_fused.shard(MLP()), loss_fn, torch.optim.SGD, rho=0.1, lr=0.1, timeout=60)
    for key, b in (("sam_odd", (bs[1][0][:6], bs[1][1][:6])), ("sam_nan", nan_batch)):
        try:
            sam.step(b)
        except Exception as e:  # noqa: BLE001
            errs[key] = f"{type(e).__name__}: {e}"
    res["sam_steps"] = (sam.steps_taken, float(sam.step(bs[2])) > 0, sam.steps_taken)
    # a model the user sharded on a compatible mesh (the root only) is accepted
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("pass", "shard"))
    torch.manual_seed(0)
    own = fully_shard(MLP(), mesh=mesh["shard"])
    kw = dict(rho=0.1, lam=0.3, lr=0.1, momentum=0.9, weight_decay=1e-3)
    mine = ShardedSAMPa(own, loss_fn, torch.optim.SGD, **kw)
    for b in bs:
        mine.step(b)
    res["user_sharded"] = (serial_run(SAMPa, kw, bs, len(bs))[-1], full_params(own))
    flat_mesh = init_device_mesh("cpu", (world,))
    m2 = fully_shard(MLP(), mesh=flat_mesh)
    try:
        ShardedSAMPa(m2, loss_fn, torch.optim.SGD, lr=0.1)
    except Exception as e:  # noqa: BLE001
        errs["layout"] = f"{type(e).__name__}: {e}"


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc1(x))))


def scenario_buffers(res, steps=3):
    bs = batches(steps, 8, seed=9)
    out = {}
    for cls, kw in ((ShardedSAMPa, dict(lam=0.2)), (ShardedSAM, {})):
        torch.manual_seed(0)
        m = sampa_fused.shard(BNNet())
        opt = cls(m, loss_fn, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, **kw)
        for b in bs:
            opt.step(b)
        out[cls.__name__] = [b.detach().clone() for b in m.buffers()]
    res["buffers"] = out


OUT = {}


def scenario_checkpoint(res, steps=6, cut=3):
    """Save after `cut` steps, load into a fresh model and optimizer (other
    initial weights), go on: bit-identical to the uninterrupted run."""
    import torch.distributed.checkpoint as dcp
    kw = dict(rho=0.1, lam=0.3, lr=0.1, momentum=0.9, weight_decay=1e-3)
    bs = batches(steps, 8, seed=11)

    def build(seed):
        torch.manual_seed(seed)
        m = sampa_fused.shard(MLP())
        return m, ShardedSAMPa(m, loss_fn, torch.optim.SGD, **kw)
    m, opt = build(0)
    whole = []
    for b in bs:
        opt.step(b)
        whole.append(full_params(m) + [opt.gy.clone(), opt.state_bufs["momentum_buffer"].clone()])
    m, opt = build(0)
    for b in bs[:cut]:
        opt.step(b)
    path = os.path.join(OUT["dir"], "ckpt")
    dcp.save(opt.state_dict(), checkpoint_id=path)
    m, opt = build(1)
    sd = opt.state_dict()
    dcp.load(sd, checkpoint_id=path)
    opt.load_state_dict(sd)
    resumed = []
    for b in bs[cut:]:
        opt.step(b)
        resumed.append(full_params(m) + [opt.gy.clone(), opt.state_bufs["momentum_buffer"].clone()])
    res["checkpoint"] = (whole[cut:], resumed)
    full = opt.full_state_dict()
    res["full_x"] = (full["x"], full_params(m))


SCENARIOS = {"trajectory": scenario_trajectory, "layout8": scenario_layout8, "adamw": scenario_adamw,
             "errors": scenario_errors, "buffers": scenario_buffers, "checkpoint": scenario_checkpoint}


def main():
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    names = sys.argv[5].split(",")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res = {}
    OUT["dir"] = out
    try:
        for n in names:
            SCENARIOS[n](res)
    except Exception:  # noqa: BLE001
        res["crash"] = traceback.format_exc()
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
