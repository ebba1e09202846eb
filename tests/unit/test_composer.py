import numpy as np
import pytest

from helip.trainer.pairs.composer import compose_batch
from helip.trainer.pairs.sampler import AnchorSampler, SamplerConfig


def test_alternates_anchor_and_hard_pair_without_duplicates():
    anchors = np.array([10, 20, 30, 40])
    neighbours = np.array([[20, 11, 12], [21, 22, -1], [11, 31, 32], [-1, -1, -1]])
    batch = compose_batch(anchors, neighbours, 8, 1000, np.random.default_rng(0), top=1)
    # anchor 10's first usable neighbour skips 20 (an anchor); anchor 30's 11 is taken by anchor 10.
    assert batch.ids.tolist()[:6] == [10, 11, 20, 21, 30, 31]
    assert batch.ids[6] == 40 and batch.ids[7] not in {10, 11, 20, 21, 30, 31, 40}
    assert len(set(batch.ids.tolist())) == 8
    assert batch.couples.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert (batch.n_hard, batch.n_fallback) == (3, 1)


def test_draws_from_top_and_falls_back_when_mining_gave_nothing():
    anchors = np.arange(4)
    neighbours = np.tile(np.arange(100, 110), (4, 1))
    drawn = set()
    for seed in range(30):
        batch = compose_batch(anchors, neighbours, 8, 1000, np.random.default_rng(seed), top=5)
        drawn.add(int(batch.ids[1]))  # the first anchor's pick: one of its top 5
        assert batch.n_hard == 4 and set(batch.ids[1::2].tolist()) <= set(range(100, 108))
    assert drawn == set(range(100, 105))
    fallback = compose_batch(anchors, None, 8, 1000, np.random.default_rng(0))
    assert (fallback.n_hard, fallback.n_fallback, len(fallback.couples)) == (0, 4, 0)
    assert len(set(fallback.ids.tolist())) == 8


def test_ratio_zero_is_plain_batches():
    sampler = AnchorSampler(SamplerConfig(n_samples=100, batch_size=10, hard_ratio=0.0))
    batch = compose_batch(sampler.anchors(0), None, 10, 100, np.random.default_rng(0))
    assert batch.ids.tolist() == sampler.anchors(0).tolist()
    assert batch.n_fallback == 0


def test_more_hard_slots_than_anchors_cycle():
    batch = compose_batch(np.array([1, 2]), np.array([[5, 6, 7], [8, 9, 10]]), 6, 100, np.random.default_rng(0), top=3)
    assert batch.n_hard == 4 and len(set(batch.ids.tolist())) == 6
    for anchor_pos, _hard_pos in batch.couples:
        assert batch.ids[anchor_pos] in (1, 2)


def test_sampler_partitions_ranks_and_is_deterministic():
    configs = [
        SamplerConfig(n_samples=103, batch_size=8, hard_ratio=0.5, world_size=2, rank=r, seed=3) for r in range(2)
    ]
    samplers = [AnchorSampler(c) for c in configs]
    assert samplers[0].steps_per_epoch == 103 // (2 * 4)
    epoch0 = [np.concatenate([s.anchors(b) for b in range(s.steps_per_epoch)]) for s in samplers]
    assert not set(epoch0[0].tolist()) & set(epoch0[1].tolist())
    assert len(set(epoch0[0].tolist())) == len(epoch0[0])
    again = AnchorSampler(configs[0])
    assert again.anchors(5).tolist() == samplers[0].anchors(5).tolist()
    steps = samplers[0].steps_per_epoch
    assert samplers[0].anchors(steps).tolist() != samplers[0].anchors(0).tolist()  # next epoch reshuffles


def test_bad_sampler_config():
    with pytest.raises(ValueError, match="hard_ratio"):
        SamplerConfig(n_samples=10, batch_size=4, hard_ratio=1.0)
    with pytest.raises(ValueError, match="too few"):
        SamplerConfig(n_samples=3, batch_size=8, hard_ratio=0.5, world_size=2)


def test_ids_the_data_set_does_not_hold_are_dropped_and_counted():
    anchors = np.array([0, 1])
    # A shared miner answered with rows of a bigger data set: ids 50.. do not exist here (n_samples = 10).
    neighbours = np.array([[57, 3, 61], [88, 99, -1]])
    batch = compose_batch(anchors, neighbours, 4, 10, np.random.default_rng(0), top=3)
    assert batch.ids.max() < 10 and batch.ids[1] == 3
    assert (batch.n_hard, batch.n_fallback, batch.n_foreign) == (1, 1, 4)
