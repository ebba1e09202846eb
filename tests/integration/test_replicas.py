"""Read replicas and degraded shards against real miner processes and the real Redis: Mines spread over followers
and failing over, a sharded Mine with a shard killed, and a follower's lag while it catches up."""

from __future__ import annotations

import signal
import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helip import MinePrefetcher, MiningConfig, MiningSession
from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.client.replicas import ReplicatedMinerClient
from helip.miner_service.client.sharded import ShardedMinerClient
from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.miner_service.wire.shards import shard_of
from tests.conftest import free_port
from tests.reference import random_pairs, reference_mine

DIM = 16
CONFIG = ClientConfig(wire_dtype=pb.FLOAT32, timeout_s=20)


def durable(redis_url, key_prefix, *extra):
    return ("--dim", str(DIM), "--redis-url", redis_url, "--key-prefix", key_prefix, *extra)


def sample_value(miner, name: str, **labels) -> float:
    """One sample of a miner's /metrics (0 when it is not exported yet)."""
    text = urllib.request.urlopen(miner.metrics_url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def mines_answered(miner) -> int:
    return int(sample_value(miner, "helip_miner_requests_total", method="Mine", code="OK"))


def wait_caught_up(leader: MinerClient, followers: list[MinerClient], timeout_s: float = 20) -> None:
    head = leader.stats().log_offset
    deadline = time.monotonic() + timeout_s
    while any(f.stats().log_offset != head for f in followers):
        assert time.monotonic() < deadline, "followers did not catch up"
        time.sleep(0.01)


def connected(address: str) -> MinerClient:
    client = MinerClient(ClientConfig(address=address, wire_dtype=pb.FLOAT32, timeout_s=20))
    client.wait_ready(30)
    return client


@pytest.mark.slow
def test_followers_answer_mines_fail_over_when_killed_and_spare_the_leader(
    miner_factory, redis_url, key_prefix, tmp_path
):
    leader = miner_factory(*durable(redis_url, key_prefix, "--snapshot-dir", str(tmp_path / "snapshots")))
    ports = [free_port(), free_port()]
    followers = [miner_factory(*durable(redis_url, key_prefix, "--follow", "--port", str(p))) for p in ports]
    writer = connected(leader.address)
    image, text = random_pairs(np.random.default_rng(0), 300, DIM)
    writer.upsert(np.arange(300), image, text, step=1)
    wait_caught_up(writer, [connected(f.address) for f in followers])
    client = ReplicatedMinerClient(leader.address, [f.address for f in followers], CONFIG, retry_after_s=1.0)
    client.wait_ready(30)
    anchors = np.arange(0, 300, 37)
    expected = writer.mine(8, anchor_ids=anchors).ids

    for _ in range(10):
        answer = client.mine(8, anchor_ids=anchors)
        np.testing.assert_array_equal(answer.ids, expected)
        assert answer.served_by_follower
    assert [mines_answered(f) for f in followers] == [5, 5]  # round-robin
    assert mines_answered(leader) == 1  # only the test's own reference Mine above

    # A hung follower: its attempt gets half the deadline, and the other follower answers in the other half.
    followers[0].process.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    answer = client.mine(8, anchor_ids=anchors, timeout_s=4.0)
    assert answer.served_by_follower and time.monotonic() - started < 4.0
    np.testing.assert_array_equal(answer.ids, expected)
    assert client.rotation.resting() == [0] and mines_answered(followers[1]) == 6
    followers[0].process.send_signal(signal.SIGCONT)
    time.sleep(1.1)  # its rest is over
    assert client.rotation.resting() == []
    before = mines_answered(followers[0])  # (it may have finished the abandoned call after all)

    followers[1].stop(signal.SIGKILL)
    for _ in range(10):  # every Mine is still answered: the killed one's share fails over to the other
        answer = client.mine(8, anchor_ids=anchors)
        np.testing.assert_array_equal(answer.ids, expected)
        assert answer.served_by_follower
    assert mines_answered(followers[0]) == before + 10
    assert mines_answered(leader) == 1
    assert client.rotation.resting() == [1]
    # Writes still go to the leader, even while reads go elsewhere.
    more_image, more_text = random_pairs(np.random.default_rng(1), 5, DIM)
    assert client.upsert(np.arange(300, 305), more_image, more_text, step=2).size == 305

    # The killed follower comes back on its address: once its rest is over it takes its share again.
    followers[1] = miner_factory(*durable(redis_url, key_prefix, "--follow", "--port", str(ports[1])))
    time.sleep(1.1)
    for _ in range(4):
        assert client.mine(8, anchor_ids=anchors).served_by_follower
    assert mines_answered(followers[1]) >= 1 and client.rotation.resting() == []

    for follower in followers:  # no follower left: the leader answers
        follower.stop(signal.SIGKILL)
    answer = client.mine(8, anchor_ids=anchors)
    assert not answer.served_by_follower and mines_answered(leader) == 2
    client.close()


def test_a_follower_that_reports_not_serving_is_skipped_by_its_channel():
    """Client-side health checking (the follower channels' service config): a follower that says NOT_SERVING, as a
    miner does from the start of its graceful shutdown, is failed over at once and rests; SERVING again, it is
    asked again once its rest is over."""
    from grpc_health.v1 import health_pb2

    from helip.miner_service.service.config import MinerConfig
    from helip.miner_service.service.server import MinerServer
    from helip.miner_service.wire.names import SERVICE_NAME

    leader, follower = (MinerServer(MinerConfig(dim=DIM, port=0, metrics_port=-1)).start() for _ in range(2))
    try:
        image, text = random_pairs(np.random.default_rng(6), 50, DIM)
        for server in (leader, follower):
            connected(f"127.0.0.1:{server.port}").upsert(np.arange(50), image, text, step=1)
        client = ReplicatedMinerClient(
            f"127.0.0.1:{leader.port}", [f"127.0.0.1:{follower.port}"], CONFIG, retry_after_s=0.5
        )
        answered = lambda server: server.metrics.requests.labels("Mine", "OK")._value.get()  # noqa: E731
        client.mine(5, anchor_ids=[1, 2])
        assert (answered(follower), answered(leader)) == (1, 0)
        follower.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        time.sleep(0.3)  # the health watch reports the change
        client.mine(5, anchor_ids=[1, 2])
        assert (answered(follower), answered(leader)) == (1, 1) and client.rotation.resting() == [0]
        follower.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        time.sleep(0.6)
        client.mine(5, anchor_ids=[1, 2])
        assert (answered(follower), answered(leader)) == (2, 1)
        client.close()
    finally:
        for server in (leader, follower):
            server.stop(0)


def rows_of(ids, image, text, keep) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    return {int(i): (image[j], text[j]) for j, i in enumerate(ids) if keep[j]}


@pytest.mark.slow
def test_a_killed_shard_leaves_exact_answers_from_the_others_flagged_and_strict_mode_raises(miner_factory):
    shards = [miner_factory("--dim", str(DIM), "--shard", f"{i}/3") for i in range(3)]
    addresses = [s.address for s in shards]
    degraded = ShardedMinerClient(addresses, CONFIG)
    degraded.wait_ready(30)
    ids = np.arange(450, dtype=np.uint64) * 5 + 1
    image, text = random_pairs(np.random.default_rng(3), len(ids), DIM)
    degraded.upsert(ids, image, text, step=1)
    owner = shard_of(ids, 3)
    shards[1].stop(signal.SIGKILL)
    remaining = rows_of(ids, image, text, owner != 1)

    q_image, q_text = random_pairs(np.random.default_rng(4), 6, DIM)
    answer = degraded.mine(10, image=q_image, text=q_text)
    want_ids, want_scores = reference_mine(remaining, q_image, q_text, 10)
    assert answer.missing_shards == (1,)
    np.testing.assert_array_equal(answer.ids, want_ids)
    np.testing.assert_allclose(answer.scores, want_scores, rtol=1e-5)

    # Anchors by id: those of the answering shards are mined exactly; those of the killed one get padding rows.
    anchors = ids[::29]
    answer = degraded.mine(10, anchor_ids=anchors, exclude_ids=ids[:20])
    lost = owner[::29] == 1
    assert lost.any() and (~lost).any() and answer.missing_shards == (1,)
    assert (answer.ids[lost] == -1).all() and answer.unknown_anchor_ids.size == 0
    want_ids, _ = reference_mine(
        remaining, image[::29][~lost], text[::29][~lost], 10, self_ids=anchors[~lost].astype(np.int64), exclude=ids[:20]
    )
    np.testing.assert_array_equal(answer.ids[~lost], want_ids)

    strict = ShardedMinerClient(addresses, CONFIG, strict=True)
    with pytest.raises(grpc.RpcError) as caught:
        strict.mine(10, image=q_image, text=q_text)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    strict.close()

    # The trainer's side: a degraded answer is used and counted; with strict_shards it is a failed Mine.
    expected = degraded.mine(10, anchor_ids=anchors, exclude_ids=anchors).ids
    for strict_shards in (False, True):
        session = MiningSession(
            address=",".join(addresses), k=10, deadline_s=10, wire_dtype="FLOAT32", strict_shards=strict_shards
        )
        prefetcher, counters = MinePrefetcher(session), session.counters
        prefetcher.request(0, anchors.astype(np.int64))
        prefetcher.wait(0, 30)
        hard = prefetcher.take(0)
        if strict_shards:
            assert hard is None and counters.mine_failures == 1 and counters.mine_degraded == 0
        else:
            np.testing.assert_array_equal(hard, expected)
            assert counters.mine_degraded == 1 and counters.mine_failures == 0
        prefetcher.close()
        session.close()
    degraded.close()


@pytest.mark.slow
def test_a_follower_behind_reports_its_lag_in_replies_stats_and_metrics(miner_factory, redis_url, key_prefix, tmp_path):
    leader = miner_factory(*durable(redis_url, key_prefix, "--snapshot-dir", str(tmp_path / "snapshots")))
    follower = miner_factory(*durable(redis_url, key_prefix, "--follow"))
    writer, reader = connected(leader.address), connected(follower.address)
    image, text = random_pairs(np.random.default_rng(5), 64, DIM)
    writer.upsert(np.arange(64), image, text, step=1)
    wait_caught_up(writer, [reader])
    time.sleep(1.2)  # a lag sample after catching up
    assert reader.stats().replica_lag_seconds == 0 and writer.stats().replica_lag_seconds == 0
    assert sample_value(follower, "helip_miner_replica_lag_seconds") == 0
    session = MiningSession(MiningConfig(address=leader.address, followers=follower.address, k=5, deadline_s=10))
    prefetcher, counters = MinePrefetcher(session), session.counters

    # A burst of writes while the follower is paused: once it runs again it has ~1500 log entries to apply.
    follower.process.send_signal(signal.SIGSTOP)
    burst = (
        writer.upsert_request([64 + i % 64], image[i % 64 : i % 64 + 1], text[i % 64 : i % 64 + 1], 2)
        for i in range(1500)
    )
    writer.upsert_stream(burst)
    time.sleep(1.2)
    follower.process.send_signal(signal.SIGCONT)
    seen = {"reply": 0.0, "stats": 0.0, "metric": 0.0, "trainer": 0.0}
    deadline = time.monotonic() + 20
    step = 0
    while reader.stats().log_offset != writer.stats().log_offset or min(seen.values()) == 0:
        assert time.monotonic() < deadline, f"lag never seen everywhere: {seen}"
        prefetcher.request(step, np.arange(4))
        prefetcher.wait(step, 10)
        prefetcher.take(step)
        step += 1
        seen["trainer"] = counters.max_replica_lag_ms / 1000
        seen["reply"] = max(seen["reply"], reader.mine(5, anchor_ids=[1, 2]).replica_lag_seconds)
        seen["stats"] = max(seen["stats"], reader.stats().replica_lag_seconds)
        seen["metric"] = max(seen["metric"], sample_value(follower, "helip_miner_replica_lag_seconds"))
    assert reader.mine(5, anchor_ids=[1]).served_by_follower and not writer.mine(5, anchor_ids=[1]).served_by_follower
    assert all(0 < lag < 60 for lag in seen.values()), seen
    assert counters.mine_by_follower == step and counters.mine_failures == 0
    time.sleep(1.2)  # caught up: the next sample says so
    assert reader.stats().replica_lag_seconds == 0
    prefetcher.close()
    session.close()


def test_lag_is_measured_from_the_oldest_unapplied_entry_by_redis_clock(redis_url, key_prefix):
    import redis

    from helip.miner_service.service.lag import follower_lag
    from helip.miner_service.service.log import Offset

    client = redis.Redis.from_url(redis_url)
    stream = f"{key_prefix}:lag-probe"
    now_ms = int(client.time()[0]) * 1000
    for ms in (now_ms - 60_000, now_ms - 20_000):  # entries written a minute and 20 s ago
        client.xadd(stream, {"op": b"delete", "ids": b"\0" * 8}, id=f"{ms}-0")
    assert 60 <= follower_lag(client, stream, Offset.ZERO).seconds < 70
    assert 20 <= follower_lag(client, stream, Offset(now_ms - 60_000, 0)).seconds < 30
    assert follower_lag(client, stream, Offset(now_ms - 20_000, 0)).seconds == 0
    client.close()
