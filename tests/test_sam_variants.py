"""SAM's batch-norm bookkeeping and adaptive SAM against davda54/sam's
published algorithm."""
import pytest
import torch
from reference import SmallNet, ce_loss, make_batches

from sampa_fused import SAM

EPS = 1e-12     # the README's algorithm and davda54/sam: rho / (||T g||_2 + 1e-12)


def _copy_of(model):
    """A plain model (no optimizer) with `model`'s parameters and buffers."""
    ref = SmallNet()
    ref.load_state_dict(model.state_dict())
    return ref


def test_sam_batch_norm_counts_one_update_per_step_at_x():
    torch.manual_seed(0)
    model = SmallNet()
    opt = SAM(model, ce_loss, torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, backend="torch")
    bn = model.bn
    for t, (x, y) in enumerate(make_batches(6), start=1):
        ref = _copy_of(model)          # x before the step, and the buffers after step t-1
        ref.train()
        with torch.no_grad():
            ref(x)                     # one forward at x on the batch
        opt.step((x, y))
        assert bn.num_batches_tracked.item() == t
        assert torch.equal(bn.num_batches_tracked, ref.bn.num_batches_tracked)
        assert torch.equal(bn.running_mean, ref.bn.running_mean)
        assert torch.equal(bn.running_var, ref.bn.running_var)


class DavdaSAM:
    """davda54/sam (SAM.first_step / second_step), written out: e_w =
    (p^2 if adaptive else 1) * g * rho / (||(|p| if adaptive else 1) * g||_2 + 1e-12)
    over all parameters; p += e_w; the second gradient; p -= e_w; base step."""

    def __init__(self, model, base_cls, rho, adaptive, **kw):
        self.model, self.rho, self.adaptive = model, rho, adaptive
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.base = base_cls(self.params, **kw)

    def step(self, batch):
        x, y = batch
        for p in self.params:
            p.grad = None
        ce_loss(self.model, batch).backward()
        with torch.no_grad():
            norm = torch.norm(torch.stack([((torch.abs(p) if self.adaptive else 1.0) * p.grad).norm(p=2)
                                           for p in self.params]), p=2)
            scale = self.rho / (norm + EPS)
            e_ws = []
            for p in self.params:
                e_w = (torch.pow(p, 2) if self.adaptive else 1.0) * p.grad * scale
                p.add_(e_w)
                e_ws.append(e_w)
        for p in self.params:
            p.grad = None
        # the perturbed pass's batch-norm updates are discarded, as in the library (README)
        saved = {k: v.clone() for k, v in self.model.named_buffers()}
        ce_loss(self.model, batch).backward()
        with torch.no_grad():
            for k, v in self.model.named_buffers():
                v.copy_(saved[k])
            for p, e_w in zip(self.params, e_ws):
                p.sub_(e_w)
        self.base.step()


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("base, kw", [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
                                      (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.01})])
def test_adaptive_sam_equals_davda54_sam(adaptive, base, kw):
    torch.manual_seed(0)
    model = SmallNet()
    ref_model = _copy_of(model)
    # ASAM takes a larger rho (davda54/sam suggests 2.0; on this small net with a
    # temperature parameter 2.0 drives the temperature through zero and the run
    # turns chaotic, amplifying the reference's rounding of p - e_w: 0.5 stays tame)
    rho = 0.5 if adaptive else 0.05
    opt = SAM(model, ce_loss, base, rho=rho, adaptive=adaptive, backend="torch", **kw)
    ref = DavdaSAM(ref_model, base, rho, adaptive, **kw)
    for b in make_batches(10):
        opt.step(b)
        ref.step(b)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=n)
    for (n, v), w in zip(model.named_buffers(), ref_model.buffers()):
        torch.testing.assert_close(v, w, rtol=0, atol=1e-5, msg=n)
