"""batching: a batch as micro-batches, weighted so that the weighted mean
losses add up to the whole batch's mean loss."""
import pytest
import torch

from sampa_fused.batching import MicroBatches, micro_batches


def _batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 3, generator=g), "y": torch.randint(0, 5, (n,), generator=g),
            "scale": torch.tensor(0.5)}


def test_one_step_is_the_batch_itself():
    b = _batch(5)
    assert micro_batches(b, 1) == [(b, 1.0)]


@pytest.mark.parametrize("n,acc", [(7, 3), (9, 9), (12, 4)])
def test_accumulation_cuts_dim0_and_weights_by_share(n, acc):
    b = _batch(n)
    parts = micro_batches(b, acc)
    assert len(parts) == acc
    assert torch.equal(torch.cat([p["x"] for p, _ in parts]), b["x"])
    assert torch.equal(torch.cat([p["y"] for p, _ in parts]), b["y"])
    assert all(p["scale"] is b["scale"] for p, _ in parts)        # no batch dimension: repeated
    assert [w for _, w in parts] == [len(p["y"]) / n for p, _ in parts]
    assert sum(w for _, w in parts) == pytest.approx(1.0)
    # the weighted means are the whole batch's mean
    total = sum(w * p["x"].mean(0) for p, w in parts)
    torch.testing.assert_close(total, b["x"].mean(0))


def test_too_few_samples_for_the_accumulation_steps_is_refused():
    with pytest.raises(ValueError, match="3 samples cannot be cut into accumulation_steps=4"):
        micro_batches(_batch(3), 4)


def test_given_micro_batches_are_weighted_by_their_sizes_whatever_accumulation_steps():
    mbs = MicroBatches([_batch(2, 1), _batch(5, 2), _batch(1, 3)])
    parts = micro_batches(mbs, 4)
    assert [p for p, _ in parts] == list(mbs)
    assert [w for _, w in parts] == [2 / 8, 5 / 8, 1 / 8]
    with pytest.raises(ValueError, match="MicroBatches is empty"):
        micro_batches(MicroBatches([]), 1)
