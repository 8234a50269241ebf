"""The training loop's features: mixed precision, GradScaler, clipping, accumulation, torch.compile,
non-finite handling -- on the torch backend (CPU) and the Triton backend: on
CUDA tensors where there is a GPU, else on CPU tensors through Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 only without CUDA, so
Triton on CPU tensors would be refused on a GPU machine)."""
import copy
import importlib.util

import pytest
import torch
from reference import RefSAM, RefSAMPa, SmallNet, _same_tree, ce_loss, make_batches

from sampa_fused import SAM, SAMPa
from sampa_fused.batching import MicroBatches

TOL = dict(rtol=1e-5, atol=1e-6)


def _triton_ready():
    return importlib.util.find_spec("triton") is not None


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not _triton_ready(), reason="Triton backend not available"))]
CUDA = torch.cuda.is_available()


def device_for(backend: str) -> torch.device:
    """Where a backend's test runs: Triton kernels on the GPU when there is one."""
    return torch.device("cuda") if backend == "triton" and CUDA else torch.device("cpu")


def on(device, batches):
    return [tuple(t.to(device) for t in b) for b in batches]


def close_models(a, b, **tol):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **(tol or TOL))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_in_loss_fn_learns(backend):
    dev = device_for(backend)
    torch.manual_seed(0)
    model = SmallNet().to(dev)

    def loss_fn(m, b):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            return ce_loss(m, b)
    opt = SAMPa(model, loss_fn, torch.optim.SGD, rho=0.05, lam=0.2, lr=0.2, momentum=0.9, backend=backend)
    batches = on(dev, make_batches(4, batch=32))
    first = [ce_loss(model, b).item() for b in batches]
    for _ in range(10):
        for b in batches:
            opt.step(b)
    last = [ce_loss(model, b).item() for b in batches]
    assert sum(last) < 0.8 * sum(first)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [SAMPa, SAM])
def test_grad_scaler_matches_unscaled_and_skips_overflow(cls, backend):
    extra = dict(lam=0.3) if cls is SAMPa else {}
    dev = device_for(backend)
    torch.manual_seed(0)
    model = SmallNet().to(dev)
    plain_model = copy.deepcopy(model)
    scaler = torch.amp.GradScaler(dev.type, init_scale=2.0 ** 12, growth_interval=2)
    opt = cls(model, ce_loss, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, grad_scaler=scaler,
              backend=backend, **extra)
    plain = cls(plain_model, ce_loss, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9,
                backend=backend, **extra)
    batches = on(dev, make_batches(6))
    for b in batches[:3]:
        opt.step(b)
        plain.step(b)
    close_models(model, plain_model)           # power-of-two scales unscale exactly
    assert scaler.get_scale() == 2.0 ** 13      # grew once after 2 clean steps

    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    # finite gradients (~1e35) that overflow fp32 only once scaled by 2^13
    opt.loss_fn = lambda m, b: ce_loss(m, b) * 1e36
    opt.step(batches[3])
    opt.loss_fn = ce_loss
    assert opt.skipped_steps == 1
    assert scaler.get_scale() == 2.0 ** 12      # backed off as usual
    m_after, o_after = model.state_dict(), opt.state_dict()
    for k, v in before[0].items():
        assert torch.equal(v, m_after[k]), k
    for p, st in before[1]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, o_after["state"][p][k])
    if cls is SAMPa:
        assert all(torch.equal(a, b) for a, b in zip(before[1]["sampa_fused"]["gy"], o_after["sampa_fused"]["gy"]))
        assert _same_tree(before[1]["sampa_fused"]["held_batch"], o_after["sampa_fused"]["held_batch"])
    for b in batches[3:]:                      # continues like the unscaled run
        opt.step(b)
        plain.step(b)
    close_models(model, plain_model)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [SAMPa, SAM])
def test_clipping_equals_clip_grad_norm(cls, backend):
    dev = device_for(backend)
    torch.manual_seed(0)
    model = SmallNet().to(dev)
    ref_model = copy.deepcopy(model)
    kw = dict(rho=0.1, lr=0.1, momentum=0.9, max_grad_norm=0.05)
    if cls is SAMPa:
        opt = SAMPa(model, ce_loss, torch.optim.SGD, lam=0.3, backend=backend, **kw)
        ref = RefSAMPa(ref_model, ce_loss, torch.optim.SGD, lam=0.3, **kw)
    else:
        opt = SAM(model, ce_loss, torch.optim.SGD, backend=backend, **kw)
        ref = RefSAM(ref_model, ce_loss, torch.optim.SGD, **kw)
    for b in on(dev, make_batches(5)):
        opt.step(b)
        ref.step(b)
    close_models(model, ref_model)
    # and clipping was active: the unclipped run ends elsewhere
    torch.manual_seed(0)
    free = SmallNet().to(dev)
    kw.pop("max_grad_norm")
    o_free = (SAMPa(free, ce_loss, torch.optim.SGD, lam=0.3, backend=backend, **kw) if cls is SAMPa
              else SAM(free, ce_loss, torch.optim.SGD, backend=backend, **kw))
    for b in on(dev, make_batches(5)):
        o_free.step(b)
    assert any((p - q).abs().max() > 1e-3 for p, q in zip(free.parameters(), model.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [SAMPa, SAM])
def test_accumulation_equals_big_batch(cls, backend):
    extra = dict(lam=0.2) if cls is SAMPa else {}
    dev = device_for(backend)
    torch.manual_seed(0)
    big = SmallNet(bn=False).to(dev)  # batch norm would see per-micro-batch statistics
    acc = copy.deepcopy(big)
    lst = copy.deepcopy(big)
    o_big = cls(big, ce_loss, torch.optim.AdamW, rho=0.1, lr=1e-2, backend=backend, **extra)
    o_acc = cls(acc, ce_loss, torch.optim.AdamW, rho=0.1, lr=1e-2, accumulation_steps=3,
                backend=backend, **extra)
    o_lst = cls(lst, ce_loss, torch.optim.AdamW, rho=0.1, lr=1e-2, backend=backend, **extra)
    for b in on(dev, make_batches(4, batch=10)):    # 10 = 4 + 3 + 3: unequal micro-batches
        l_big = o_big.step(b)
        l_acc = o_acc.step(b)
        l_lst = o_lst.step(MicroBatches([(b[0][:6], b[1][:6]), (b[0][6:], b[1][6:])]))
        torch.testing.assert_close(l_acc, l_big, **TOL)
        torch.testing.assert_close(l_lst, l_big, **TOL)
    close_models(acc, big, rtol=1e-4, atol=1e-5)
    close_models(lst, big, rtol=1e-4, atol=1e-5)


def test_accumulation_refuses_too_small_batch():
    model = SmallNet(bn=False)
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, accumulation_steps=4, backend="torch")
    with pytest.raises(ValueError, match="accumulation_steps=4"):
        opt.step(make_batches(1, batch=3)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_model(backend):
    dev = device_for(backend)
    torch.manual_seed(0)
    eager = SmallNet().to(dev)
    compiled_src = copy.deepcopy(eager)
    compiled = torch.compile(compiled_src, backend="aot_eager")
    o_e = SAMPa(eager, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9, backend=backend)
    o_c = SAMPa(compiled, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9, backend=backend)
    for b in on(dev, make_batches(4)):
        torch.testing.assert_close(o_c.step(b), o_e.step(b), **TOL)
    close_models(compiled_src, eager)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_skip_counts(backend):
    dev = device_for(backend)
    torch.manual_seed(0)
    model = SmallNet().to(dev)
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, nonfinite="skip", backend=backend)
    batches = on(dev, make_batches(3))
    opt.step(batches[0])
    x = [p.detach().clone() for p in model.parameters()]
    bad = (batches[1][0].clone(), batches[1][1])
    bad[0][2, 3] = float("inf")
    opt.step(bad)
    opt.step(bad)
    assert opt.skipped_steps == 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), x))
    opt.step(batches[1])
    assert opt.skipped_steps == 2 and opt.step_count == 2


def test_bad_training_loop_options():
    model = SmallNet()
    for kw, match in [(dict(max_grad_norm=0), "max_grad_norm"), (dict(accumulation_steps=0), "accumulation"),
                      (dict(grad_scaler=object()), "GradScaler")]:
        with pytest.raises((ValueError, TypeError), match=match):
            SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, **kw)
