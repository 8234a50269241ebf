"""The update stages as registered ops: torch.library.opcheck for every op of
every family that runs here (schema, mutations as declared, FakeTensor,
AOT dispatch), on ragged sizes and random non-zero buffers; the two
families agree on the same inputs."""
import pytest
import torch

from sampa_fused.update import adamw, ops, sgd
from sampa_fused.update.common import INTERPRETER_CONFIG, KernelConfig
from sampa_fused.update.table import ROW

N = 1000 + 37
SMALL = KernelConfig(block=128, num_warps=1, reduce_block=128, reduce_iters=2, reduce_warps=1,
                     final_block=128, final_warps=1)
CFG = ops.config_list(SMALL)
FAMILIES = sorted(ops.FAMILIES)

SGD_HP = sgd.hyper(dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True, weight_decay=1e-2,
                        maximize=False), "test")
ADAMW_HP = adamw.hyper(dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-2, amsgrad=True,
                            maximize=True), "test")
CASES = [("sgd", sgd, SGD_HP), ("adamw", adamw, ADAMW_HP)]


def rnd(seed, n=N, positive=False):
    t = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return t.abs() + 0.1 if positive else t


def row(rule, hp, count=3, rho=0.2, lam=0.3):
    r = {0: rho, 1: lam, 2: 1 - lam}
    r.update(rule.row(hp, count))
    out = torch.zeros(ROW)
    for k, v in r.items():
        out[k] = v
    return out


def state_of(rule, hp, seed):
    fl = rule.flags(hp)
    return [rnd(seed + i, positive="sq" in n) for i, n in enumerate(rule.state_order(fl))], list(fl)


def pre_args(rule, hp, seed=0):
    state, fl = state_of(rule, hp, seed + 10)
    return (rnd(seed), torch.zeros(N), torch.zeros(N), rnd(seed + 1), state, torch.tensor(2.5),
            row(rule, hp), fl, 0, False, CFG)


def post_args(rule, hp, seed=0, host_ok=-1, inv=None, coef=None, ok=True, active=True):
    state, fl = state_of(rule, hp, seed + 10)
    return (rnd(seed), rnd(seed + 1), rnd(seed + 2), rnd(seed + 3), state, torch.zeros(N), inv,
            torch.tensor(ok), coef, row(rule, hp), fl, 0, host_ok, active, CFG)


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("name,rule,hp", CASES, ids=[c[0] for c in CASES])
def test_opcheck_pre(fam, name, rule, hp):
    op = ops.family(fam).pre[name]
    torch.library.opcheck(op, pre_args(rule, hp))
    a = pre_args(rule, hp)
    torch.library.opcheck(op, (a[0], None, a[2]) + a[3:])       # y only (the serial engine's second form)


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("name,rule,hp", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("kw", [dict(), dict(inv=torch.tensor(1 / 1536.0), coef=torch.tensor(0.5)),
                                dict(ok=False), dict(active=False)], ids=["plain", "unscale-clip", "refused",
                                                                         "inactive"])
def test_opcheck_post(fam, name, rule, hp, kw):
    op = ops.family(fam).post[name]
    torch.library.opcheck(op, post_args(rule, hp, **kw))
    a = post_args(rule, hp, **kw)
    torch.library.opcheck(op, a[:2] + (None, None) + a[4:])     # SAM: no mix, no gy


def test_opcheck_post_host_decided():
    """host_ok=1 (a CPU replica that read its flag): in place, no copies."""
    for name, rule, hp in CASES:
        torch.library.opcheck(ops.family("torch").post[name], post_args(rule, hp, host_ok=1))


@pytest.mark.parametrize("fam", FAMILIES)
def test_opcheck_perturb_and_check(fam):
    f = ops.family(fam)
    for inv, adaptive in [(None, False), (torch.tensor(0.25), True)]:
        torch.library.opcheck(f.perturb, (rnd(0), torch.zeros(N), rnd(1), torch.tensor(1.7), inv,
                                          row(sgd, SGD_HP), adaptive, CFG))
    for inv in (None, torch.tensor(0.5)):
        torch.library.opcheck(f.check, ([rnd(2), rnd(3, 77)], [rnd(4), rnd(5, 77)],
                                        [torch.tensor(1.0), torch.tensor(2.0)], inv, 2, CFG))
        torch.library.opcheck(f.check, ([], [rnd(4), rnd(5, 77)], [], inv, 2, CFG))


@pytest.mark.skipif(len(FAMILIES) < 2, reason="needs triton")
def test_families_agree():
    """The torch ops and the Triton ops on the same inputs: within rounding."""
    tol = dict(rtol=1e-5, atol=1e-6)
    for name, rule, hp in CASES:
        a, b = pre_args(rule, hp), pre_args(rule, hp)
        ops.family("torch").pre[name](*a)
        ops.family("triton").pre[name](*b)
        torch.testing.assert_close(a[1], b[1], **tol)
        torch.testing.assert_close(a[2], b[2], **tol)
        for kw in (dict(), dict(ok=False), dict(inv=torch.tensor(0.5), coef=torch.tensor(0.7))):
            a, b = post_args(rule, hp, **kw), post_args(rule, hp, **kw)
            ops.family("torch").post[name](*a)
            ops.family("triton").post[name](*b)
            for i in (0, 3):
                torch.testing.assert_close(a[i], b[i], **tol)
            for u, v in zip(a[4], b[4]):
                torch.testing.assert_close(u, v, **tol)
    c = ([rnd(2)], [rnd(4)], [torch.tensor(1.0)], None, 1, ops.config_list(INTERPRETER_CONFIG))
    (ok_t, sq_t), (ok_r, sq_r) = ops.family("torch").check(*c), ops.family("triton").check(*c)
    assert bool(ok_t) and bool(ok_r)
    torch.testing.assert_close(sq_t, sq_r, rtol=1e-5, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fam", FAMILIES)
def test_opcheck_on_cuda(fam):
    """The same ops on CUDA tensors (the Triton family's real kernels)."""
    def cuda(args):
        return tuple([t.cuda() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
                     else (a.cuda() if isinstance(a, torch.Tensor) else a) for a in args)
    f = ops.family(fam)
    cfg = ops.config_list(KernelConfig())
    for name, rule, hp in CASES:
        torch.library.opcheck(f.pre[name], cuda(pre_args(rule, hp))[:-1] + (cfg,))
        for kw in (dict(), dict(ok=False), dict(inv=torch.tensor(0.5), coef=torch.tensor(0.7))):
            torch.library.opcheck(f.post[name], cuda(post_args(rule, hp, **kw))[:-1] + (cfg,))
    torch.library.opcheck(f.perturb, cuda((rnd(0), torch.zeros(N), rnd(1), torch.tensor(1.7), None,
                                           row(sgd, SGD_HP), True)) + (cfg,))
    torch.library.opcheck(f.check, cuda(([rnd(2)], [rnd(4)], [torch.tensor(1.0)], None)) + (1, cfg))
