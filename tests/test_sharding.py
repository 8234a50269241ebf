"""engines/distributed/sharding.rank_parts: each rank's (micro-batch,
weight) pairs; over all ranks they cover the global batch once and the
weights add up so that the summed weighted losses are its mean."""
import pytest
import torch

from sampa_fused.batching import MicroBatches
from sampa_fused.engines.distributed.sharding import rank_parts


def _batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, generator=g), torch.arange(n))


def _all_ranks(batch, world, acc, sharded=False):
    return [rank_parts(batch, sharded, r, world, acc) for r in range(world)]


@pytest.mark.parametrize("n,world,acc", [(11, 2, 1), (11, 3, 2), (8, 4, 2), (5, 1, 3)])
def test_the_ranks_cover_the_batch_once_with_weights_adding_to_one(n, world, acc):
    batch = _batch(n)
    ranks = _all_ranks(batch, world, acc)
    assert all(len(parts) == acc for parts in ranks)
    covered = torch.cat([p[1] for parts in ranks for p, _ in parts])
    assert torch.equal(covered, torch.arange(n))          # in order, each sample once
    weights = [w for parts in ranks for _, w in parts]
    assert sum(weights) == pytest.approx(1.0)
    for parts in ranks:                                   # weight = the part's share of the batch
        for p, w in parts:
            assert w == pytest.approx(len(p[1]) / n)
    mean = sum(w * p[0].mean(0) for parts in ranks for p, w in parts)
    torch.testing.assert_close(mean, batch[0].mean(0))


def test_sharded_batches_count_equally_as_in_ddp():
    shards = [_batch(4, 0), _batch(6, 1)]                 # each rank brought its own
    parts = [rank_parts(shards[r], True, r, 2, 2) for r in range(2)]
    assert [[w for _, w in p] for p in parts] == [[0.25, 0.25], [0.25, 0.25]]
    assert torch.equal(torch.cat([p[1] for p, _ in parts[1]]), shards[1][1])


def test_given_micro_batches_are_each_sharded():
    mbs = MicroBatches([_batch(4, 0), _batch(6, 1)])
    ranks = _all_ranks(mbs, 2, 1)
    assert all(len(parts) == 2 for parts in ranks)
    for k, mb in enumerate(mbs):
        assert torch.equal(torch.cat([ranks[r][k][0][1] for r in range(2)]), mb[1])
    weights = [[w for _, w in parts] for parts in ranks]
    assert weights == [[pytest.approx(2 / 10), pytest.approx(3 / 10)]] * 2
    with pytest.raises(ValueError, match="MicroBatches is empty"):
        rank_parts(MicroBatches([]), False, 0, 2, 1)


def test_one_data_rank_is_the_optimizers_micro_batches():
    batch = _batch(6)
    parts = rank_parts(batch, False, 0, 1, 3)
    assert [w for _, w in parts] == [pytest.approx(1 / 3)] * 3
