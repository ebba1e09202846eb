"""Read replicas and degraded shards, the pure parts: replica order, the degraded merge, lag, mining settings."""

from __future__ import annotations

import numpy as np
import pytest

from helip.miner_service.client.replicas import ReplicaRotation
from helip.miner_service.client.sharded import _merge, _scatter_rows
from helip.miner_service.client.single import Neighbours
from helip.miner_service.service.lag import lag_of
from helip.miner_service.service.log import Offset
from helip.trainer.pairs.mining import MiningConfig, MiningCounters


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rotation_spreads_reads_over_followers_and_keeps_the_leader_behind_them():
    rotation = ReplicaRotation(3, retry_after_s=5.0, clock=Clock())
    firsts = [rotation.order() for _ in range(6)]
    assert [o[0] for o in firsts] == [0, 1, 2, 0, 1, 2]
    assert all(o[3] == rotation.leader == 3 and sorted(o[:3]) == [0, 1, 2] for o in firsts)


def test_a_failed_follower_rests_then_is_asked_again():
    clock = Clock()
    rotation = ReplicaRotation(2, retry_after_s=5.0, clock=clock)
    rotation.failed(1)
    assert rotation.resting() == [1]
    # While it rests it comes after the leader, as the last resort, whatever the turn.
    assert rotation.order() == [0, 2, 1] and rotation.order() == [0, 2, 1]
    clock.now += 5.1
    assert rotation.resting() == [] and sorted(rotation.order()[:2]) == [0, 1]
    rotation.failed(0)
    rotation.succeeded(0)  # it answered as a last resort: back in turn at once
    assert rotation.resting() == []
    rotation.failed(rotation.leader)  # the leader never rests: it stays right behind the ready followers
    assert rotation.order()[2] == rotation.leader and rotation.resting() == []


def test_rotation_without_followers_is_the_leader_alone():
    assert ReplicaRotation(0).order() == [0]
    with pytest.raises(ValueError, match="retry_after_s"):
        ReplicaRotation(1, retry_after_s=-1)


def answer(ids, scores, lag=0.0, follower=False) -> Neighbours:
    ids = np.asarray(ids, np.int64)
    return Neighbours(
        ids,
        np.asarray(scores, np.float32),
        np.ones(ids.shape, np.uint64),
        10,
        np.zeros(0, np.uint64),
        served_by_follower=follower,
        replica_lag_seconds=lag,
    )


def test_degraded_merge_is_the_top_k_of_the_shards_that_answered_and_names_the_others():
    parts = {0: answer([[1, 4, -1]], [[0.9, 0.3, -np.inf]]), 2: answer([[7, 8, 9]], [[0.8, 0.5, 0.1]], 0.25, True)}
    merged = _merge(parts, 3, errors={1: "down"})
    assert merged.ids.tolist() == [[1, 7, 8]]
    assert merged.missing_shards == (1,) and merged.served_by_follower and merged.replica_lag_seconds == 0.25
    assert merged.size == 20
    assert _merge(parts, 3).missing_shards == ()


def test_anchors_nobody_could_answer_get_padding_rows():
    merged = _merge({}, 2, errors={0: "down"})
    found = np.array([False, False])
    rows = _scatter_rows(merged, found, 2, np.array([5], np.uint64))
    assert rows.ids.tolist() == [[-1, -1], [-1, -1]] and rows.missing_shards == (0,)
    assert rows.unknown_anchor_ids.tolist() == [5]


def test_lag_is_the_age_of_the_oldest_unapplied_entry():
    assert lag_of(None, 5_000.0).seconds == 0.0 and not lag_of(None, 1.0).behind
    assert lag_of(Offset(4_000, 3), 5_500.0).seconds == pytest.approx(1.5)
    # Written this very millisecond: behind all the same, never 0.
    assert lag_of(Offset(5_000, 0), 5_000.0).seconds > 0


def test_followers_compose_with_shards():
    config = MiningConfig(address="a:1,b:1", followers="a:2|a:3,")
    assert config.shard_addresses == ["a:1", "b:1"]
    assert config.shard_followers == [["a:2", "a:3"], []]
    assert MiningConfig(address="a:1").shard_followers == [[]]
    with pytest.raises(ValueError, match=r"mining\.followers.*2 shard\(s\).*has 1"):
        MiningConfig(address="a:1", followers="a:2,a:3")
    with pytest.raises(ValueError, match=r"mining\.followers needs mining\.address"):
        MiningConfig(followers="a:2")
    with pytest.raises(ValueError, match=r"mining\.follower_retry_s"):
        MiningConfig(address="a:1", follower_retry_s=-1)


def test_counters_keep_running_maxima():
    counters = MiningCounters()
    counters.raise_to(max_replica_lag_ms=30)
    counters.raise_to(max_replica_lag_ms=10)
    assert counters.snapshot()["max_replica_lag_ms"] == 30


def test_lag_sampler_keeps_its_last_sample_when_one_fails():
    from helip.miner_service.service.lag import LagSampler, ReplicaLag

    samples = iter([ReplicaLag(0.5), RuntimeError("redis away"), ReplicaLag(0.0)])
    exported = []

    def measure():
        value = next(samples)
        if isinstance(value, Exception):
            raise value
        return value

    sampler = LagSampler(measure, on_sample=lambda lag: exported.append(lag.seconds))
    assert [sampler.sample().seconds for _ in range(3)] == [0.5, 0.5, 0.0] == exported
    with pytest.raises(ValueError, match="interval_s"):
        LagSampler(measure, interval_s=0)
