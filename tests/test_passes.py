"""passes.split_loss: every shape of what loss_fn may return, and the clear
errors for what it may not."""
import collections
import types

import pytest
import torch

from sampa_fused.passes import split_loss


def _loss():
    w = torch.randn(3, requires_grad=True)
    return (w * torch.arange(1.0, 4.0)).sum()


def test_a_tensor_is_the_loss_with_no_outputs():
    loss = _loss()
    got, outputs = split_loss(loss, "SAMPa", "x̃-pass")
    assert got.shape == () and torch.equal(got, loss) and outputs is None


def test_loss_outputs_pairs_mappings_and_objects():
    loss, logits = _loss(), torch.randn(2, 5)
    assert split_loss((loss, logits), "SAMPa", "x̃-pass")[1] is logits
    got, outputs = split_loss([loss, logits, 7], "SAMPa", "x̃-pass")
    assert got is not None and outputs[0] is logits and outputs[1] == 7
    mapping = collections.OrderedDict(loss=loss, logits=logits)
    got, outputs = split_loss(mapping, "SAMPa", "x̃-pass")
    assert torch.equal(got, loss) and outputs is mapping
    obj = types.SimpleNamespace(loss=loss, logits=logits)
    got, outputs = split_loss(obj, "SAM", "pass at x")
    assert torch.equal(got, loss) and outputs is obj


def test_a_one_element_loss_is_reshaped_to_a_scalar():
    loss = _loss().reshape(1, 1)
    assert split_loss(loss, "SAMPa", "y-pass")[0].shape == ()


@pytest.mark.parametrize("out,error,match", [
    (1.5, TypeError, "must return a tensor.*got float"),
    ({"logits": torch.ones(2)}, TypeError, "must return a tensor"),
    (torch.ones(3, requires_grad=True), ValueError, "scalar loss.*shape \\(3,\\)"),
    (torch.tensor(1), TypeError, "int64 loss"),
    (torch.tensor(2.0), ValueError, "does not depend on the parameters"),
])
def test_what_is_not_a_loss_is_refused_saying_which_pass(out, error, match):
    with pytest.raises(error, match=match) as info:
        split_loss(out, "SAMPa", "y-pass")
    assert str(info.value).startswith("SAMPa")
