"""backend="triton" against backend="torch" (the reference): end to end through
SAMPa / SAM, and kernel by kernel on flat buffers with random contents.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1);
sizes stay small. GPU-only checks (no host sync, > 2^31 elements) skip here.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("triton")

from sampa_fused import SAM, SAMPa  # noqa: E402
from sampa_fused.backends import make_backend  # noqa: E402
from sampa_fused.backends.torch_backend import TorchBackend  # noqa: E402
from sampa_fused.flat import Segment, build_slabs  # noqa: E402
from sampa_fused.kernels import KernelConfig  # noqa: E402
from sampa_fused.optim import SlabBuffers  # noqa: E402
from sampa_fused.rules import AdamWRule, SGDRule  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small launch shapes: many programs, ragged tails and a multi-iteration second
# stage even on the few thousand elements an interpreter test can afford.
SMALL = KernelConfig(block=128, num_warps=4, reduce_block=64, reduce_iters=3, reduce_warps=4,
                     final_block=16, final_warps=4)


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in fp32 (the trajectories' error measure)."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------ models
class Net(nn.Module):
    """Odd sizes (none a multiple of a block) and a 1-element parameter."""

    def __init__(self, d_in=23, hidden=61, d_out=7):
        super().__init__()
        self.l1 = nn.Linear(d_in, hidden)
        self.l2 = nn.Linear(hidden, d_out)
        self.gain = nn.Parameter(torch.tensor([0.9]))

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))) * self.gain


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y)


def batches(n=5, bs=16, d_in=23, classes=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, d_in, generator=g).to(DEV), torch.randint(0, classes, (bs,), generator=g).to(DEV))
            for _ in range(n)]


def fresh(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return Net().to(DEV, dtype)


def groups_of(model, per_group):
    """Three param groups (l1, l2, gain) with their own hyperparameters."""
    parts = [list(model.l1.parameters()), list(model.l2.parameters()), [model.gain]]
    return [dict(params=p, **kw) for p, kw in zip(parts, per_group)]


def run(method, backend, base, steps=4, dtype=torch.float32, groups=None, **kw):
    model = fresh(dtype)
    if groups is not None:
        kw["params"] = groups_of(model, groups)
    opt = method(model, loss_fn, base, backend=backend, **kw)
    traj = []
    for b in batches(steps):
        opt.step(b)
        traj.append(torch.cat([p.detach().float().flatten() for p in model.parameters()]))
    return opt, traj


def assert_same_run(method, base, tol=1e-5, dtype=torch.float32, **kw):
    ref_opt, ref = run(method, "torch", base, dtype=dtype, **kw)
    tri_opt, tri = run(method, "triton", base, dtype=dtype, **kw)
    assert tri_opt.backend.name == "triton" and ref_opt.backend.name == "torch"
    for t, (a, b) in enumerate(zip(tri, ref)):
        assert relerr(a, b) <= tol, f"step {t}: relative error {relerr(a, b):.3g} > {tol}"
        assert not torch.equal(b, ref[0]) or t == 0      # the run does move
    # Optimizer state and the committed gy follow the same trajectory.
    for bt, br in zip(tri_opt._bufs, ref_opt._bufs):
        for name in br.state:
            assert relerr(bt.state[name], br.state[name]) <= tol, name
        if hasattr(br, "gy"):
            assert relerr(bt.gy, br.gy) <= tol
    return tri_opt


SGD_VARIANTS = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "dampening": dict(lr=0.1, momentum=0.9, dampening=0.3),
    "weight_decay": dict(lr=0.1, momentum=0.9, weight_decay=5e-3),
    "maximize_wd": dict(lr=0.05, weight_decay=1e-2, maximize=True),
}
ADAMW_VARIANTS = {
    "default": dict(lr=1e-2),
    "amsgrad": dict(lr=1e-2, amsgrad=True, weight_decay=0.05),
    "no_wd_low_beta1": dict(lr=1e-2, weight_decay=0.0, betas=(0.3, 0.99)),   # lerp's other branch
    "maximize": dict(lr=1e-2, maximize=True),
}


# ------------------------------------------------------------ end to end
@pytest.mark.parametrize("variant", list(SGD_VARIANTS))
def test_sampa_sgd_matches_torch_backend(variant):
    assert_same_run(SAMPa, torch.optim.SGD, rho=0.1, lam=0.2, **SGD_VARIANTS[variant])


@pytest.mark.parametrize("variant", list(ADAMW_VARIANTS))
def test_sampa_adamw_matches_torch_backend(variant):
    assert_same_run(SAMPa, torch.optim.AdamW, rho=0.05, lam=0.2, **ADAMW_VARIANTS[variant])


@pytest.mark.parametrize("lam", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
                                     (torch.optim.AdamW, dict(lr=1e-2))], ids=["sgd", "adamw"])
def test_sampa_lam_matches_torch_backend(lam, base, kw):
    assert_same_run(SAMPa, base, rho=0.1, lam=lam, **kw)


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
                                     (torch.optim.SGD, dict(lr=0.1)),
                                     (torch.optim.AdamW, dict(lr=1e-2, amsgrad=True))],
                         ids=["sgd-nesterov", "sgd-plain", "adamw-amsgrad"])
def test_sam_matches_torch_backend(base, kw):
    assert_same_run(SAM, base, rho=0.05, **kw)


def test_param_groups_with_different_hyperparameters():
    groups = [dict(lr=0.1, momentum=0.9, weight_decay=1e-3, rho=0.2, lam=0.5),
              dict(lr=0.03, momentum=0.5, dampening=0.2, rho=0.05, lam=0.0),
              dict(lr=0.02, momentum=0.0, nesterov=False, lam=1.0)]
    opt = assert_same_run(SAMPa, torch.optim.SGD, rho=0.1, lam=0.2, groups=groups)
    assert len(opt._bufs[0].slab.segments) == 3
    groups = [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, betas=(0.8, 0.9)),
              dict(lr=1e-3, amsgrad=True, rho=0.0)]
    assert_same_run(SAMPa, torch.optim.AdamW, rho=0.1, lam=0.3, groups=groups)
    assert_same_run(SAM, torch.optim.AdamW, rho=0.1, groups=groups)


def test_lr_change_between_steps_is_followed():
    """Hyperparameters are host scalars read at every step (schedulers)."""
    res = {}
    for backend in ("torch", "triton"):
        model = fresh()
        opt = SAMPa(model, loss_fn, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9,
                    backend=backend)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for b in batches(4):
            opt.step(b)
            sched.step()
        res[backend] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert relerr(res["triton"], res["torch"]) <= 1e-5
    model = fresh()                      # and the schedule mattered: without it, elsewhere
    opt = SAMPa(model, loss_fn, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9, backend="triton")
    for b in batches(4):
        opt.step(b)
    assert relerr(torch.cat([p.detach().flatten() for p in model.parameters()]), res["triton"]) > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_match_torch_backend(dtype):
    """Same dtype, same fp32 math: the two backends agree to about one rounding."""
    for base, kw in [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
                     (torch.optim.AdamW, dict(lr=1e-2))]:
        ref_opt, ref = run(SAMPa, "torch", base, steps=3, dtype=dtype, rho=0.1, lam=0.2, **kw)
        tri_opt, tri = run(SAMPa, "triton", base, steps=3, dtype=dtype, rho=0.1, lam=0.2, **kw)
        assert tri_opt._bufs[0].x.dtype == dtype
        for a, b in zip(tri, ref):
            assert relerr(a, b) <= 2e-2


def test_bf16_params_against_fp32_reference():
    """bf16 parameters (fp32 math, fp32 norms) follow the fp32 trajectory to bf16 accuracy."""
    for base, kw in [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
                     (torch.optim.AdamW, dict(lr=1e-2))]:
        _, ref = run(SAMPa, "torch", base, steps=3, dtype=torch.float32, rho=0.1, lam=0.2, **kw)
        _, tri = run(SAMPa, "triton", base, steps=3, dtype=torch.bfloat16, rho=0.1, lam=0.2, **kw)
        for a, b in zip(tri, ref):
            assert relerr(a, b) <= 3e-2
        _, ref = run(SAM, "torch", base, steps=3, dtype=torch.float32, rho=0.1, **kw)
        _, tri = run(SAM, "triton", base, steps=3, dtype=torch.bfloat16, rho=0.1, **kw)
        for a, b in zip(tri, ref):
            assert relerr(a, b) <= 3e-2


def test_rho0_lam0_is_the_base_optimizer():
    """SPEC 1: rho = lam = 0 gives the base optimizer on b0, b0, b1, ..."""
    data = batches(4)
    model = fresh()
    opt = SAMPa(model, loss_fn, torch.optim.SGD, rho=0.0, lam=0.0, lr=0.1, momentum=0.9,
                nesterov=True, backend="triton")
    ref_model = fresh()
    base = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for b in [data[0]] + data[:-1]:
        base.zero_grad()
        loss_fn(ref_model, b).backward()
        base.step()
    for b in data:
        opt.step(b)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert relerr(p, q) <= 1e-5


def test_nonfinite_gradient_is_refused():
    model = fresh()
    opt = SAMPa(model, loss_fn, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9,
                backend="triton", nonfinite="skip")
    data = batches(3)
    opt.step(data[0])
    before = [p.detach().clone() for p in model.parameters()]

    def finite_loss_nan_grad(m, b):
        # adds 0 to the loss, but d/dw sqrt(|w - w|) is not finite: only the
        # kernels' finite check over the gradient buffers can refuse this step
        w = m.l1.weight
        return loss_fn(m, b) + (w - w.detach()).abs().sqrt().sum()
    opt.loss_fn = finite_loss_nan_grad
    assert torch.isfinite(finite_loss_nan_grad(model, data[1]))
    opt.step(data[1])
    assert opt.skipped_steps == 1
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_auto_backend_on_cpu_is_torch():
    model = fresh()
    opt = SAMPa(model, loss_fn, torch.optim.SGD, lr=0.1, backend="auto")
    assert opt.backend.name == ("triton" if CUDA else "torch")


# ------------------------------------------------------------ kernel level
def make_bufs(sizes, dtype=torch.float32, groups=None, state_names=(), sampa=True, seed=0):
    """One slab of random contents (never zeros), the torch and the triton copy."""
    groups = groups or [0] * len(sizes)
    tensors = [torch.empty(s, dtype=dtype, device=DEV) for s in sizes]
    slab, = build_slabs(tensors, groups)
    b = SlabBuffers(slab, sampa, list(state_names))
    g = torch.Generator().manual_seed(seed)
    for name in ("x", "x_save", "g", "y", "gy_new", "gy"):
        if hasattr(b, name):
            getattr(b, name).copy_(torch.randn(slab.numel, generator=g))
    for name, t in b.state.items():
        r = torch.randn(slab.numel, generator=g)
        t.copy_(r.abs() if "sq" in name else r)     # second moments are >= 0
    return b, copy.deepcopy(b)


def all_buffers(b):
    names = ["x", "x_save", "g", "y", "gy_new", "gy"]
    out = {n: getattr(b, n) for n in names if hasattr(b, n)}
    out.update({f"state.{k}": v for k, v in b.state.items()})
    return out


def assert_bufs_close(bt, br, rtol=1e-5, atol=1e-6):
    for (name, t), r in zip(all_buffers(bt).items(), all_buffers(br).values()):
        torch.testing.assert_close(t.float(), r.float(), rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{name}: {m}")


SIZES = [1, 1000, 37, 129, 3]          # ragged around the SMALL block of 128


def sgd_hp(**kw):
    d = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-2, maximize=False)
    d.update(kw)
    return SGDRule.hyper(d)


def adamw_hp(**kw):
    d = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False)
    d.update(kw)
    return AdamWRule.hyper(d)


KERNEL_CASES = [
    ("sgd", sgd_hp(momentum=0.0, weight_decay=0.0), 3),
    ("sgd", sgd_hp(), 0),                           # first step: the buffer is not read
    ("sgd", sgd_hp(), 5),
    ("sgd", sgd_hp(nesterov=True, dampening=0.0), 2),
    ("sgd", sgd_hp(dampening=0.4, maximize=True), 7),
    ("adamw", adamw_hp(), 0),
    ("adamw", adamw_hp(amsgrad=True, maximize=True), 9),
    ("adamw", adamw_hp(betas=(0.2, 0.5), weight_decay=0.0), 3),
]


@pytest.mark.parametrize("config", [SMALL, None], ids=["small-blocks", "default-blocks"])
@pytest.mark.parametrize("rule_name,hp,step", KERNEL_CASES)
def test_kernels_match_torch_backend(rule_name, hp, step, config):
    rule = SGDRule if rule_name == "sgd" else AdamWRule
    bt, br = make_bufs(SIZES, groups=[0, 0, 1, 1, 1], state_names=rule.state_names(hp))
    if rule_name == "sgd" and step == 0 and "momentum_buffer" in bt.state:
        bt.state["momentum_buffer"].fill_(float("nan"))      # must not be read at step 0
        br.state["momentum_buffer"].fill_(float("nan"))
    tri, ref = make_backend("triton", DEV), TorchBackend()
    if config is not None:
        tri = type(tri)(DEV, config)
    norm = torch.tensor(2.5, device=DEV)
    for seg_t, seg_r in zip(bt.slab.segments, br.slab.segments):
        tri.sampa_pre(bt, seg_t, rule, hp, step, 0.3, norm)
        ref.sampa_pre(br, seg_r, rule, hp, step, 0.3, norm)
    assert_bufs_close(bt, br)
    for seg_t, seg_r in zip(bt.slab.segments, br.slab.segments):
        tri.sampa_post(bt, seg_t, rule, hp, step, 0.25)
        ref.sampa_post(br, seg_r, rule, hp, step, 0.25)
    assert_bufs_close(bt, br)
    assert torch.equal(bt.gy, bt.gy_new)                    # the commit is a bit-exact copy
    for seg_t, seg_r in zip(bt.slab.segments, br.slab.segments):
        tri.sam_perturb(bt, seg_t, 0.07, norm)
        ref.sam_perturb(br, seg_r, 0.07, norm)
    assert_bufs_close(bt, br)
    for seg_t, seg_r in zip(bt.slab.segments, br.slab.segments):
        tri.sam_post(bt, seg_t, rule, hp, step + 1)
        ref.sam_post(br, seg_r, rule, hp, step + 1)
    assert_bufs_close(bt, br)


@pytest.mark.parametrize("rule,hp", [(SGDRule, sgd_hp(nesterov=True)), (AdamWRule, adamw_hp(amsgrad=True))],
                         ids=["sgd", "adamw"])
def test_one_element_slab(rule, hp):
    """A slab holding a single element (n == 1, which Triton specialises)."""
    tri, ref = make_backend("triton", DEV), TorchBackend()
    bt, br = make_bufs([()], state_names=rule.state_names(hp), seed=11)
    # the layout pads segments to the alignment: launch on the one real element
    seg_t = seg_r = Segment(0, 0, 1)
    norm = torch.tensor(0.3, device=DEV)
    for step in (0, 1):
        tri.sampa_pre(bt, seg_t, rule, hp, step, 0.2, norm)
        ref.sampa_pre(br, seg_r, rule, hp, step, 0.2, norm)
        tri.sampa_post(bt, seg_t, rule, hp, step, 0.4)
        ref.sampa_post(br, seg_r, rule, hp, step, 0.4)
        tri.sam_perturb(bt, seg_t, 0.2, norm)
        ref.sam_perturb(br, seg_r, 0.2, norm)
        assert_bufs_close(bt, br)
    ok, sq = tri.check([bt], (), ("g", "gy_new"), "gy_new")
    assert bool(ok) and sq.item() == pytest.approx(bt.gy_new.double().square().sum().item(), rel=1e-6)


def test_kernels_multi_program_default_blocks():
    """More than one program of the default launch shape, with a ragged tail."""
    tri, ref = make_backend("triton", DEV), TorchBackend()
    n = 2 * tri.config.block + 1234
    hp = adamw_hp(amsgrad=True)
    bt, br = make_bufs([n, 5], state_names=AdamWRule.state_names(hp))
    norm = torch.tensor(0.8, device=DEV)
    seg_t, seg_r = bt.slab.segments[0], br.slab.segments[0]
    tri.sampa_pre(bt, seg_t, AdamWRule, hp, 4, 0.1, norm)
    ref.sampa_pre(br, seg_r, AdamWRule, hp, 4, 0.1, norm)
    tri.sampa_post(bt, seg_t, AdamWRule, hp, 4, 0.6)
    ref.sampa_post(br, seg_r, AdamWRule, hp, 4, 0.6)
    assert_bufs_close(bt, br)
    ok, sq = tri.check([bt], (), ("g", "gy_new"), "gy_new")
    ok_r, sq_r = ref.check([br], (), ("g", "gy_new"), "gy_new")
    assert bool(ok) and bool(ok_r)
    assert relerr(sq, sq_r) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_low_precision(dtype):
    """fp32 math on 16-bit buffers: results within one rounding of the torch backend."""
    tri, ref = TritonBackendSmall(), TorchBackend()
    for rule, hp in [(SGDRule, sgd_hp(nesterov=True)), (AdamWRule, adamw_hp(amsgrad=True))]:
        bt, br = make_bufs(SIZES, dtype=dtype, state_names=rule.state_names(hp), seed=3)
        norm = torch.tensor(1.7, device=DEV)
        seg_t, seg_r = bt.slab.segments[0], br.slab.segments[0]
        tri.sampa_pre(bt, seg_t, rule, hp, 2, 0.2, norm)
        ref.sampa_pre(br, seg_r, rule, hp, 2, 0.2, norm)
        tri.sampa_post(bt, seg_t, rule, hp, 2, 0.2)
        ref.sampa_post(br, seg_r, rule, hp, 2, 0.2)
        eps = torch.finfo(dtype).eps
        assert_bufs_close(bt, br, rtol=2 * eps, atol=2 * eps)
        assert bt.x.dtype == dtype and all(v.dtype == dtype for v in bt.state.values())
        ok, sq = tri.check([bt], (), ("g", "gy_new"), "gy_new")
        _, sq_r = ref.check([br], (), ("g", "gy_new"), "gy_new")
        assert sq.dtype == torch.float32 and relerr(sq, sq_r) <= 1e-6


def TritonBackendSmall():
    from sampa_fused.backends.triton_backend import TritonBackend
    return TritonBackend(DEV, SMALL)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")     # the interpreter's numpy sees the injected inf
@pytest.mark.parametrize("config", [SMALL, None], ids=["small-blocks", "default-blocks"])
def test_check_matches_torch_and_flags_nonfinite(config):
    from sampa_fused.backends.triton_backend import TritonBackend
    tri, ref = TritonBackend(DEV, config), TorchBackend()
    slabs = [make_bufs([1000, 7, 1], seed=s)[0] for s in range(2)]
    slabs.append(make_bufs([333], dtype=torch.bfloat16, seed=9)[0])
    loss = torch.tensor(1.5, device=DEV)
    for grads, sq_attr, losses in [(("g", "gy_new"), "gy_new", (loss, loss * 2)), (("g",), "g", ()),
                                   (("g",), None, (loss,)), ((), "gy_new", ()),
                                   (("g", "gy", "y"), "x", (loss, loss, loss))]:
        ok, sq = tri.check(slabs, losses, grads, sq_attr)
        ok_r, sq_r = ref.check(slabs, losses, grads, sq_attr)
        assert ok.dtype == torch.bool and ok.shape == () and sq.dtype == torch.float32 and sq.shape == ()
        assert bool(ok) and bool(ok_r)
        if sq_attr is None:
            assert sq.item() == 0.0
        else:
            assert relerr(sq, sq_r) <= 1e-6
    # Any NaN / inf in a checked or squared buffer, in a loss, or an overflowing
    # sum of squares refuses the step, as in the torch backend.
    cases = [("g", 1010, float("nan")), ("g", 0, float("inf")), ("gy_new", 500, float("-inf")),
             ("gy_new", 7, 1e30)]
    for name, i, value in cases:
        b = slabs[1]
        old = getattr(b, name)[i].item()
        getattr(b, name)[i] = value
        ok, _ = tri.check(slabs, (loss,), ("g", "gy_new"), "gy_new")
        ok_r, _ = ref.check(slabs, (loss,), ("g", "gy_new"), "gy_new")
        assert not bool(ok) and not bool(ok_r), (name, value)
        getattr(b, name)[i] = old
    # The second and third checked buffers of a launch (two per launch, then a new chunk).
    for name, attrs in [("gy", ("g", "gy")), ("gy", ("g", "y", "gy")), ("y", ("g", "gy", "y"))]:
        b = slabs[0]
        getattr(b, name)[999] = float("nan")
        assert not bool(tri.check(slabs, (), attrs, None)[0]), (name, attrs)
        assert not bool(tri.check(slabs, (), attrs, "x")[0]), (name, attrs)
        getattr(b, name)[999] = 0.5
        assert bool(tri.check(slabs, (), attrs, "x")[0])
    slabs[2].g[332] = float("nan")                                   # the bf16 slab, last element
    assert not bool(tri.check(slabs, (), ("g",), None)[0])
    slabs[2].g[332] = 1.0
    for bad_loss in (torch.tensor(float("nan")), torch.tensor(float("inf"), dtype=torch.bfloat16),
                     torch.tensor([float("-inf")], dtype=torch.float64)):
        assert not bool(tri.check(slabs, (loss, bad_loss.to(DEV)), ("g",), "gy_new")[0])
    assert bool(tri.check(slabs, (torch.tensor(1e300, dtype=torch.float64, device=DEV),), ("g",), "gy_new")[0])


def test_check_is_deterministic_and_independent_of_memory():
    """Two-stage reduction without atomics: the same data on two 'devices'
    (here two copies in different memory) gives bit-identical norms."""
    from sampa_fused.backends.triton_backend import TritonBackend
    tri = TritonBackend(DEV, SMALL)
    a, b = make_bufs([4097, 3, 1], seed=4)
    runs = [tri.check([a], (), ("g", "gy_new"), "gy_new")[1] for _ in range(2)]
    runs.append(tri.check([b], (), ("g", "gy_new"), "gy_new")[1])
    assert runs[0].item() == runs[1].item() == runs[2].item()
    assert runs[0].item() > 0
    # fp32 accumulation: close to an fp64 reference.
    exact = a.gy_new.double().square().sum().item()
    assert abs(runs[0].item() - exact) / exact <= 1e-6


def test_check_returns_fresh_outputs():
    """The optimizer keeps last step's ||gy||^2 while the next check runs."""
    from sampa_fused.backends.triton_backend import TritonBackend
    tri = TritonBackend(DEV, SMALL)
    a, _ = make_bufs([100], seed=5)
    ok1, sq1 = tri.check([a], (), ("g",), "gy_new")
    v1 = sq1.item()
    a.gy_new.mul_(2)
    ok2, sq2 = tri.check([a], (), ("g",), "gy_new")
    assert sq1.item() == v1 and sq2.item() != v1
    assert ok1.data_ptr() != ok2.data_ptr()


def test_empty_check_and_zero_norm():
    """No buffers at all: sq = 0 and ok from the losses; a zero norm gives xt = x."""
    from sampa_fused.backends.triton_backend import TritonBackend
    tri = TritonBackend(DEV, SMALL)
    ok, sq = tri.check([], (torch.tensor(2.0, device=DEV),), (), None)
    assert bool(ok) and sq.item() == 0.0
    bt, _ = make_bufs([300], state_names=["momentum_buffer"])
    bt.gy.zero_()
    x0 = bt.x.clone()
    tri.sampa_pre(bt, bt.slab.segments[0], SGDRule, sgd_hp(), 0, 0.5, torch.zeros((), device=DEV))
    assert torch.equal(bt.x, x0) and torch.equal(bt.x_save, x0)


# ------------------------------------------------------------ GradScaler unscaling
# The gradient buffers hold values scaled by the loss scale; the kernels unscale
# them as they load them (inv_scale read from device memory). 1536 is not a
# power of two, so the unscaling rounds and both backends must round alike.
LOSS_SCALE = 1536.0

UNSCALE_CASES = [
    ("sgd", sgd_hp(momentum=0.0, weight_decay=0.0), 3),
    ("sgd", sgd_hp(), 0),                           # first step: the buffer is not read
    ("sgd", sgd_hp(nesterov=True), 4),
    ("sgd", sgd_hp(dampening=0.4, maximize=True), 7),
    ("adamw", adamw_hp(), 0),
    ("adamw", adamw_hp(amsgrad=True, maximize=True), 9),
    ("adamw", adamw_hp(betas=(0.2, 0.5), weight_decay=0.0), 3),
]


def scaled_bufs(rule, hp, dtype, seed):
    """make_bufs with g and gy_new scaled by LOSS_SCALE (unscaled values O(1))."""
    bt, br = make_bufs(SIZES, dtype=dtype, groups=[0, 0, 1, 1, 1], state_names=rule.state_names(hp),
                       seed=seed)
    for b in (bt, br):
        b.g.mul_(LOSS_SCALE)
        b.gy_new.mul_(LOSS_SCALE)
    return bt, br


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rule_name,hp,step", UNSCALE_CASES)
def test_unscaled_kernels_match_torch_backend(rule_name, hp, step, dtype):
    rule = SGDRule if rule_name == "sgd" else AdamWRule
    tri, ref = TritonBackendSmall(), TorchBackend()
    inv = torch.tensor(1.0 / LOSS_SCALE, device=DEV)
    norm = torch.tensor(1.3, device=DEV)
    eps = torch.finfo(dtype).eps
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 * eps, atol=2 * eps)
    for k, lam in enumerate((0.0, 0.2, 1.0)):
        bt, br = scaled_bufs(rule, hp, dtype, seed=20 + k)
        g0, gy_new0 = bt.g.clone(), bt.gy_new.clone()
        for seg_t, seg_r in zip(bt.slab.segments, br.slab.segments):
            tri.sampa_post(bt, seg_t, rule, hp, step, lam, inv_scale=inv)
            ref.sampa_post(br, seg_r, rule, hp, step, lam, inv_scale=inv)
        assert_bufs_close(bt, br, **tol)
        # The scaled buffers are left as they are; the commit is gy_new / scale
        # rounded once to the buffer dtype, as in the torch backend (bit-exact
        # but for the interpreter's fp32 -> bf16 cast, which truncates).
        assert torch.equal(bt.g, g0) and torch.equal(bt.gy_new, gy_new0)
        if dtype == torch.float32 or CUDA:
            assert torch.equal(bt.gy, br.gy)
            assert torch.equal(bt.gy, (gy_new0.float() * inv).to(dtype))
    # SAM on the last buffers: perturb with the unscaled g, then the step.
    for seg_t, seg_r in zip(bt.slab.segments, br.slab.segments):
        tri.sam_perturb(bt, seg_t, 0.07, norm, inv_scale=inv)
        ref.sam_perturb(br, seg_r, 0.07, norm, inv_scale=inv)
    assert_bufs_close(bt, br, **tol)
    for seg_t, seg_r in zip(bt.slab.segments, br.slab.segments):
        tri.sam_post(bt, seg_t, rule, hp, step + 1, inv_scale=inv)
        ref.sam_post(br, seg_r, rule, hp, step + 1, inv_scale=inv)
    assert_bufs_close(bt, br, **tol)


def test_unit_inv_scale_is_the_unscaled_path():
    """inv_scale = 1 (the UNSCALE kernels) is bit-identical to inv_scale=None."""
    tri = TritonBackendSmall()
    one = torch.ones((), device=DEV)
    norm = torch.tensor(0.9, device=DEV)
    for rule, hp in [(SGDRule, sgd_hp(nesterov=True)), (AdamWRule, adamw_hp(amsgrad=True))]:
        a, b = make_bufs(SIZES, groups=[0, 0, 1, 1, 1], state_names=rule.state_names(hp), seed=31)
        for seg_a, seg_b in zip(a.slab.segments, b.slab.segments):
            tri.sampa_post(a, seg_a, rule, hp, 2, 0.3)
            tri.sampa_post(b, seg_b, rule, hp, 2, 0.3, inv_scale=one)
            tri.sam_perturb(a, seg_a, 0.1, norm)
            tri.sam_perturb(b, seg_b, 0.1, norm, inv_scale=one)
            tri.sam_post(a, seg_a, rule, hp, 3)
            tri.sam_post(b, seg_b, rule, hp, 3, inv_scale=one)
        for (name, t), u in zip(all_buffers(a).items(), all_buffers(b).values()):
            assert torch.equal(t, u), name
        assert torch.equal(tri.check([a], (), ("g", "gy_new"), "gy_new")[1],
                           tri.check([b], (), ("g", "gy_new"), "gy_new", inv_scale=one)[1])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")     # the interpreter's numpy sees the injected inf
@pytest.mark.parametrize("config", [SMALL, None], ids=["small-blocks", "default-blocks"])
def test_unscaled_check_matches_torch_and_flags_nonfinite(config):
    from sampa_fused.backends.triton_backend import TritonBackend
    tri, ref = TritonBackend(DEV, config), TorchBackend()
    inv = torch.tensor(1.0 / LOSS_SCALE, device=DEV)
    slabs = [make_bufs([1000, 7, 1], seed=40 + s)[0] for s in range(2)]
    slabs.append(make_bufs([333], dtype=torch.bfloat16, seed=49)[0])
    for b in slabs:
        b.g.mul_(LOSS_SCALE)
        b.gy_new.mul_(LOSS_SCALE)
    loss = torch.tensor(1.5, device=DEV)
    for grads, sq_attr, losses in [(("g", "gy_new"), "gy_new", (loss,)), (("g",), "g", ()),
                                   (("g",), None, (loss,))]:
        ok, sq = tri.check(slabs, losses, grads, sq_attr, inv_scale=inv)
        ok_r, sq_r = ref.check(slabs, losses, grads, sq_attr, inv_scale=inv)
        assert ok.dtype == torch.bool and ok.shape == () and sq.dtype == torch.float32 and sq.shape == ()
        assert bool(ok) and bool(ok_r)
        if sq_attr is None:
            assert sq.item() == 0.0
        else:
            assert relerr(sq, sq_r) <= 1e-6
            # the norm is of the unscaled values: not the scaled sum / scale^2 by luck
            exact = sum((getattr(b, sq_attr).double() * inv.double()).square().sum() for b in slabs)
            assert abs(sq.item() - exact.item()) / exact.item() <= 1e-5
    # Non-finite values still refuse the step; an unscaled value whose square
    # overflows fp32 does too, and a scaled one whose unscaled square fits does not.
    b = slabs[1]
    for name, i, value, expect in [("g", 1005, float("nan"), False), ("gy_new", 3, float("inf"), False),
                                   ("gy_new", 500, float("-inf"), False), ("gy_new", 7, 1e30, False),
                                   ("gy_new", 7, 1e20, True)]:
        old = getattr(b, name)[i].item()
        getattr(b, name)[i] = value
        ok, _ = tri.check(slabs, (loss,), ("g", "gy_new"), "gy_new", inv_scale=inv)
        ok_r, _ = ref.check(slabs, (loss,), ("g", "gy_new"), "gy_new", inv_scale=inv)
        assert bool(ok) == bool(ok_r) == expect, (name, value)
        getattr(b, name)[i] = old
    b.gy_new[7] = 1e20                   # (1e20)^2 overflows fp32; (1e20 / 1536)^2 does not
    assert not bool(tri.check(slabs, (), ("g",), "gy_new")[0])
    assert bool(tri.check(slabs, (), ("g",), "gy_new", inv_scale=inv)[0])
    bad_loss = torch.tensor(float("nan"), device=DEV)
    assert not bool(tri.check(slabs, (loss, bad_loss), ("g",), "gy_new", inv_scale=inv)[0])


def test_bad_inv_scale_is_refused():
    tri = TritonBackendSmall()
    hp = sgd_hp()
    bt, _ = make_bufs([10], state_names=SGDRule.state_names(hp))
    seg, norm = bt.slab.segments[0], torch.ones((), device=DEV)
    for bad in (1 / 1024, torch.tensor(1 / 1024, dtype=torch.float64, device=DEV),
                torch.full((2,), 1 / 1024, device=DEV)):
        with pytest.raises(TypeError, match="inv_scale must be a 1-element fp32 tensor"):
            tri.sampa_post(bt, seg, SGDRule, hp, 1, 0.2, inv_scale=bad)
        with pytest.raises(TypeError, match="inv_scale"):
            tri.sam_perturb(bt, seg, 0.1, norm, inv_scale=bad)
        with pytest.raises(TypeError, match="inv_scale"):
            tri.sam_post(bt, seg, SGDRule, hp, 1, inv_scale=bad)
        with pytest.raises(TypeError, match="inv_scale"):
            tri.check([bt], (), ("g",), "g", inv_scale=bad)


# ------------------------------------------------------------ bad input
def test_bad_norm_argument_is_refused():
    from sampa_fused.backends.triton_backend import TritonBackend
    tri = TritonBackend(DEV, SMALL)
    bt, _ = make_bufs([10])
    seg = bt.slab.segments[0]
    with pytest.raises(TypeError, match="fp32 tensor"):
        tri.sam_perturb(bt, seg, 0.1, 2.0)
    with pytest.raises(TypeError, match="fp32 tensor"):
        tri.sam_perturb(bt, seg, 0.1, torch.tensor(2.0, dtype=torch.float64, device=DEV))


def test_unsupported_rule_is_refused():
    from sampa_fused.backends.triton_backend import TritonBackend
    from sampa_fused.rules import GenericRule
    tri = TritonBackend(DEV, SMALL)
    bt, _ = make_bufs([10])
    with pytest.raises(NotImplementedError, match="SGD and torch.optim.AdamW"):
        tri.sampa_pre(bt, bt.slab.segments[0], GenericRule, {}, 0, 0.1, torch.ones((), device=DEV))


def test_bad_kernel_config_is_refused():
    for kw, what in [(dict(block=1000), "block"), (dict(num_warps=6), "num_warps"),
                     (dict(reduce_iters=0), "reduce_iters"), (dict(final_block=8), "final_block")]:
        with pytest.raises(ValueError, match=what):
            KernelConfig(**kw)


def test_unsupported_device_is_refused():
    with pytest.raises(RuntimeError, match="backend='torch'"):
        make_backend("triton", torch.device("meta"))


@pytest.mark.skipif(CUDA, reason="CPU-only refusal")
def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        make_backend("triton", torch.device("cpu"))
    model = fresh()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        SAMPa(model, loss_fn, torch.optim.SGD, lr=0.1, backend="triton")


@pytest.mark.skipif(CUDA, reason="CPU-only refusal")
def test_missing_triton_and_late_interpreter_are_refused():
    """Run in a fresh interpreter: one with triton hidden, one that imported
    the kernels (built for the GPU) before setting TRITON_INTERPRET."""
    script = textwrap.dedent("""
        import os, sys
        os.environ.pop("TRITON_INTERPRET", None)
        import torch
        from sampa_fused.backends import make_backend
        if sys.argv[1] == "missing":
            sys.modules["triton"] = None
        else:
            import sampa_fused.kernels.sgd  # built as GPU kernels
            os.environ["TRITON_INTERPRET"] = "1"
        try:
            make_backend("triton", torch.device("cpu"))
        except RuntimeError as e:
            print("REFUSED:", e)
    """)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    for mode, expect in [("missing", "needs the triton package"), ("late", "imported before TRITON_INTERPRET")]:
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                             env=env, timeout=120)
        assert "REFUSED:" in out.stdout and expect in out.stdout, out.stdout + out.stderr


# ------------------------------------------------------------ compile only
COMPILE_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)          # real GPU kernels, compiled, not run
    import triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from sampa_fused.kernels import CUDA_CONFIG as C, adamw, perturb, reduce, sgd

    SCALARS = ("rho", "lr", "momentum", "damp1", "weight_decay", "lam", "one_minus_lam", "decay",
               "w", "beta2", "one_minus_beta2", "step_size", "bc2_sqrt", "eps")
    def build(fn, consts, nw, dt="*fp32", **types):
        sig = {}
        for a in fn.arg_names:
            sig[a] = ("constexpr" if a in consts else types.get(a) or
                      ("fp32" if a in SCALARS else "i32" if a in ("n", "slot", "n_slots") else dt))
        for a in ("norm_ptr", "inv_ptr"):      # 0-dim fp32 device scalars
            if a in sig:
                sig[a] = "*fp32"
        # 16-byte aligned pointers and sizes, as the launcher specialises them
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if sig[a].startswith("*") or a == "n"}
        k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw))
        return k.asm["ptx"]

    sg = dict(MOMENTUM=True, FIRST=False, NESTEROV=True, WEIGHT_DECAY=True, MAXIMIZE=False, BLOCK=C.block)
    ad = dict(WEIGHT_DECAY=True, AMSGRAD=True, MAXIMIZE=True, LERP_SMALL=True, BLOCK=C.block)
    out = {}
    out["sgd_pre"] = build(sgd.sgd_pre_kernel, sg, C.num_warps)
    out["sgd_post_bf16"] = build(sgd.sgd_post_kernel, dict(sg, MIX=True, UNSCALE=False, FIRST=True),
                                 C.num_warps, "*bf16")
    out["sgd_post_unscale_bf16"] = build(sgd.sgd_post_kernel, dict(sg, MIX=True, UNSCALE=True),
                                         C.num_warps, "*bf16")
    out["adamw_pre_fp16"] = build(adamw.adamw_pre_kernel, ad, C.num_warps, "*fp16")
    out["adamw_post"] = build(adamw.adamw_post_kernel, dict(ad, MIX=True, UNSCALE=False), C.num_warps)
    out["adamw_post_unscale"] = build(adamw.adamw_post_kernel, dict(ad, MIX=True, UNSCALE=True), C.num_warps)
    out["perturb"] = build(perturb.perturb_kernel, dict(UNSCALE=False, BLOCK=C.block), C.num_warps, n="i64")
    out["perturb_unscale"] = build(perturb.perturb_kernel, dict(UNSCALE=True, BLOCK=C.block), C.num_warps)
    out["check"] = build(reduce.check_partials_kernel, dict(SQ=True, UNSCALE=False, N_CHECK=2,
                         BLOCK=C.reduce_block, ITERS=C.reduce_iters), C.reduce_warps, "*bf16",
                         parts_ptr="*fp32")
    out["check_unscale"] = build(reduce.check_partials_kernel, dict(SQ=True, UNSCALE=True, N_CHECK=2,
                                 BLOCK=C.reduce_block, ITERS=C.reduce_iters), C.reduce_warps, "*bf16",
                                 parts_ptr="*fp32")
    out["final"] = build(reduce.check_final_kernel, dict(N_LOSS=2, BLOCK=C.final_block), C.final_warps,
                         loss0_ptr="*fp64", loss1_ptr="*bf16", ok_out_ptr="*i1")
    for name, ptx in out.items():
        print(name, ptx.count("ld.global.v4"), ptx.count("div.rn.f32"), ptx.count("div.full"),
              ptx.count("sqrt.approx"), ptx.count("ld.global"))
""")


def test_kernels_compile_for_sm90_without_a_gpu():
    """The GPU path (not the interpreter) of every kernel family compiles to
    sm_90 cubin here; the fp32 loads are vectorised and divisions are IEEE."""
    pytest.importorskip("triton.compiler")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget compile API")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in out.stdout.splitlines()}
    assert set(rows) == {"sgd_pre", "sgd_post_bf16", "sgd_post_unscale_bf16", "adamw_pre_fp16", "adamw_post",
                         "adamw_post_unscale", "perturb", "perturb_unscale", "check", "check_unscale", "final"}
    for name in ("sgd_pre", "adamw_post", "adamw_post_unscale", "perturb", "perturb_unscale"):
        assert rows[name][0] > 0, f"{name}: no 16-byte vector loads in the PTX"
    for name, (_, div_rn, div_full, sqrt_approx, _) in rows.items():
        assert div_full == 0 and sqrt_approx == 0, f"{name}: approximate division or sqrt"
    # GradScaler unscaling costs one scalar load per program, nothing more.
    for name in ("adamw_post", "perturb", "check"):
        assert rows[name + "_unscale"][4] == rows[name][4] + 1, (name, rows[name], rows[name + "_unscale"])
    assert rows["sgd_pre"][1] >= 1 and rows["adamw_post"][1] >= 1


# ------------------------------------------------------------ GPU only
@needs_cuda
def test_cuda_auto_backend_is_triton():
    model = fresh()
    opt = SAMPa(model, loss_fn, torch.optim.SGD, lr=0.1, backend="auto")
    assert opt.backend.name == "triton"


@needs_cuda
def test_cuda_no_host_sync_in_backend_calls():
    """Every backend call of a step, under CUDA's sync debug mode set to error."""
    from sampa_fused.backends.triton_backend import TritonBackend
    tri = TritonBackend(DEV)
    for rule, hp in [(SGDRule, sgd_hp(nesterov=True)), (AdamWRule, adamw_hp(amsgrad=True))]:
        bt, _ = make_bufs([100003, 17, 1], groups=[0, 1, 1], state_names=rule.state_names(hp))
        loss = torch.tensor(1.0, device=DEV)
        norm = torch.tensor(3.0, device=DEV)
        inv = torch.tensor(1 / 1024, device=DEV)                   # a GradScaler's 1 / scale
        for unscale in (None, inv):                                  # compile outside the check
            tri.check([bt], (loss,), ("g", "gy_new"), "gy_new", inv_scale=unscale)
            for seg in bt.slab.segments:
                tri.sampa_pre(bt, seg, rule, hp, 1, 0.1, norm)
                tri.sampa_post(bt, seg, rule, hp, 1, 0.2, inv_scale=unscale)
                tri.sam_perturb(bt, seg, 0.1, norm, inv_scale=unscale)
                tri.sam_post(bt, seg, rule, hp, 1, inv_scale=unscale)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for unscale in (None, inv):
                ok, sq = tri.check([bt], (loss, loss), ("g", "gy_new"), "gy_new", inv_scale=unscale)
                for seg in bt.slab.segments:
                    tri.sampa_pre(bt, seg, rule, hp, 1, 0.1, sq.sqrt())
                    tri.sampa_post(bt, seg, rule, hp, 1, 0.2, inv_scale=unscale)
                    tri.sam_perturb(bt, seg, 0.1, sq.sqrt(), inv_scale=unscale)
                    tri.sam_post(bt, seg, rule, hp, 1, inv_scale=unscale)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert bool(ok)


@needs_cuda
@pytest.mark.slow
def test_cuda_buffer_past_int32_elements():
    """Offsets are int64: the elements past 2^31 are updated too."""
    from sampa_fused.kernels import default_config
    from sampa_fused.kernels.perturb import perturb
    from sampa_fused.kernels.reduce import check
    n = 2 ** 31 + 1000
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * 2 + (1 << 30):
        pytest.skip("not enough GPU memory for 2^31 bf16 elements")
    x = torch.zeros(n, dtype=torch.bfloat16, device=DEV)
    g = torch.ones(n, dtype=torch.bfloat16, device=DEV)
    g[-7:] = 2.0
    norm = torch.tensor(1.0, device=DEV)
    perturb(x, g, norm, 0.5, default_config(DEV))
    assert x[-7:].float().tolist() == [1.0] * 7 and x[-8].item() == 0.5 and x[0].item() == 0.5
    ok, sq = check([(g, [x])], (), DEV, default_config(DEV))
    assert bool(ok) and sq.item() == pytest.approx(n - 7 + 4 * 7, rel=1e-6)
