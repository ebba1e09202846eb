"""The durable miner against a real Redis: crash recovery, snapshots, followers, shards, Redis outages."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import numpy as np
import pytest

from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.client.sharded import ShardedMinerClient
from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.miner_service.wire.shards import shard_of
from tests.reference import random_pairs

DIM = 16


def client_for(address: str, retries: int = 0) -> MinerClient:
    client = MinerClient(ClientConfig(address=address, wire_dtype=pb.FLOAT32, retries=retries, timeout_s=20))
    client.wait_ready(30)
    return client


def durable_args(redis_url, key_prefix, snapshot_dir, *extra):
    return (
        "--dim",
        str(DIM),
        "--redis-url",
        redis_url,
        "--key-prefix",
        key_prefix,
        "--snapshot-dir",
        str(snapshot_dir),
        *extra,
    )


def assert_rows(client: MinerClient, expected: dict[int, tuple[np.ndarray, np.ndarray]], absent=()):
    ids = np.array(sorted(expected), dtype=np.uint64)
    found, image, text = client.fetch(ids)
    assert found.all(), f"{int((~found).sum())} acknowledged rows missing, e.g. {ids[~found][:5].tolist()}"
    np.testing.assert_array_equal(image, np.stack([expected[int(i)][0] for i in ids]))
    np.testing.assert_array_equal(text, np.stack([expected[int(i)][1] for i in ids]))
    if len(absent):
        gone, _, _ = client.fetch(np.array(sorted(absent), dtype=np.uint64))
        assert not gone.any(), "deleted rows came back"


@pytest.mark.slow
def test_kill_9_under_load_loses_no_acknowledged_write(miner_factory, redis_url, key_prefix, tmp_path):
    args = durable_args(redis_url, key_prefix, tmp_path / "snapshots", "--snapshot-interval-s", "0.5")
    miner = miner_factory(*args)
    stop = threading.Event()
    records = []

    def writer(index: int) -> None:
        rng = np.random.default_rng(index)
        own = np.arange(index * 10_000, index * 10_000 + 300, dtype=np.uint64)
        acked: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        deleted: set[int] = set()
        uncertain: set[int] = set()
        client = client_for(miner.address)
        while not stop.is_set():
            ids = rng.choice(own, 20, replace=False)
            try:
                if rng.random() < 0.15:
                    client.delete(ids)
                    for i in ids.tolist():
                        acked.pop(i, None)
                        deleted.add(i)
                else:
                    image, text = random_pairs(rng, 20, DIM)
                    client.upsert(ids, image, text, step=1)
                    for j, i in enumerate(ids.tolist()):
                        acked[i] = (image[j], text[j])
                        deleted.discard(i)
            except grpc.RpcError:
                uncertain.update(ids.tolist())  # in flight when the miner died: applied or not, both fine
                break
        records.append((acked, deleted, uncertain))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(3.0)  # several snapshots and plenty of log entries after them
    miner.process.send_signal(signal.SIGKILL)
    miner.process.wait()
    stop.set()
    for t in threads:
        t.join(30)
    restarted = miner_factory(*args)
    client = client_for(restarted.address)
    for acked, deleted, uncertain in records:
        assert len(acked) > 50
        assert_rows(client, {i: v for i, v in acked.items() if i not in uncertain}, deleted - uncertain)
    assert client.stats().role == "leader"


def test_snapshot_plus_replay_equals_a_miner_that_never_stopped(miner_factory, redis_url, key_prefix, tmp_path):
    args = durable_args(redis_url, key_prefix, tmp_path / "snapshots", "--snapshot-interval-s", "0")
    leader = miner_factory(*args)
    never_stopped = miner_factory("--dim", str(DIM))
    clients = [client_for(leader.address), client_for(never_stopped.address)]
    rng = np.random.default_rng(0)
    image, text = random_pairs(rng, 400, DIM)
    for c in clients:
        c.upsert(np.arange(400), image, text, step=1)
    assert leader.stop(signal.SIGTERM) == 0  # writes the shutdown snapshot
    assert list((tmp_path / "snapshots").iterdir())
    leader = miner_factory(*args)
    clients[0] = client_for(leader.address)
    more_image, more_text = random_pairs(rng, 100, DIM)
    for c in clients:  # after the snapshot: only in the log
        c.upsert(np.arange(350, 450), more_image, more_text, step=2)
        c.delete(np.arange(0, 30))
    leader.process.send_signal(signal.SIGKILL)
    leader.process.wait()
    leader = miner_factory(*args)
    clients[0] = client_for(leader.address)
    a, b = clients[0].stats(), clients[1].stats()
    assert (a.size, a.min_step, a.max_step) == (b.size, b.min_step, b.max_step) == (420, 1, 2)
    anchors = np.arange(30, 450, 7)
    for scoring in (pb.PRODUCT, pb.SUM):
        x, y = (c.mine(10, anchor_ids=anchors, scoring=scoring) for c in clients)
        np.testing.assert_array_equal(x.ids, y.ids)
        np.testing.assert_allclose(x.scores, y.scores, rtol=1e-6)
    assert "+ 2 log entries" in leader.log()


def test_follower_converges_and_refuses_writes(miner_factory, redis_url, key_prefix, tmp_path):
    leader = miner_factory(*durable_args(redis_url, key_prefix, tmp_path / "leader"))
    follower = miner_factory(*durable_args(redis_url, key_prefix, tmp_path / "follower", "--follow"))
    writer, reader = client_for(leader.address), client_for(follower.address)
    rng = np.random.default_rng(1)
    lags = []
    for round_ in range(10):
        image, text = random_pairs(rng, 50, DIM)
        writer.upsert(np.arange(round_ * 50, round_ * 50 + 50), image, text, step=round_)
        acked = time.perf_counter()
        want = writer.stats().log_offset
        while reader.stats().log_offset != want:
            assert time.perf_counter() - acked < 10, "follower did not catch up"
            time.sleep(0.002)
        lags.append(time.perf_counter() - acked)
    assert reader.stats().size == 500 and reader.stats().role == "follower"
    np.testing.assert_array_equal(reader.mine(5, anchor_ids=[3, 77]).ids, writer.mine(5, anchor_ids=[3, 77]).ids)
    with pytest.raises(grpc.RpcError) as caught:
        reader.upsert([1], *random_pairs(rng, 1, DIM))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    print(f"follower lag: median {np.median(lags) * 1e3:.1f} ms, max {max(lags) * 1e3:.1f} ms")


@pytest.mark.parametrize("scoring", [pb.PRODUCT, pb.SUM, pb.IMAGE, pb.TEXT])
def test_three_shards_answer_like_one_miner(miner_factory, scoring):
    shards = [miner_factory("--dim", str(DIM), "--shard", f"{i}/3") for i in range(3)]
    single = client_for(miner_factory("--dim", str(DIM)).address)
    sharded = ShardedMinerClient([s.address for s in shards], ClientConfig(wire_dtype=pb.FLOAT32))
    sharded.wait_ready(30)
    image, text = random_pairs(np.random.default_rng(2), 600, DIM)
    ids = np.arange(600, dtype=np.uint64) * 7 + 3
    sharded.upsert(ids, image, text, step=1)
    single.upsert(ids, image, text, step=1)
    sizes = [client_for(s.address).stats().size for s in shards]
    assert sum(sizes) == 600 and min(sizes) > 150  # the hash spreads ids evenly
    anchors = ids[::13]
    exclude = ids[5:40]
    x = sharded.mine(12, anchor_ids=np.append(anchors, 999_999), exclude_ids=exclude, scoring=scoring)
    y = single.mine(12, anchor_ids=np.append(anchors, 999_999), exclude_ids=exclude, scoring=scoring)
    np.testing.assert_array_equal(x.ids, y.ids)
    np.testing.assert_allclose(x.scores, y.scores, rtol=1e-6)
    assert x.unknown_anchor_ids.tolist() == [999_999]
    q_image, q_text = random_pairs(np.random.default_rng(3), 4, DIM)
    x = sharded.mine(8, image=q_image, text=q_text, scoring=scoring)
    y = single.mine(8, image=q_image, text=q_text, scoring=scoring)
    np.testing.assert_array_equal(x.ids, y.ids)
    # A shard refuses ids it does not own.
    stray = ids[shard_of(ids, 3) != 0][:1]
    with pytest.raises(grpc.RpcError) as caught:
        client_for(shards[0].address).upsert(stray, image[:1], text[:1])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "shard" in caught.value.details()
    sharded.close()


@pytest.mark.slow
def test_redis_outage_refuses_writes_keeps_mining_and_recovers(miner_factory, private_redis, tmp_path):
    args = (
        "--dim",
        str(DIM),
        "--redis-url",
        private_redis.url,
        "--key-prefix",
        "outage",
        "--snapshot-dir",
        str(tmp_path / "snapshots"),
        "--snapshot-interval-s",
        "0",
    )
    miner = miner_factory(*args)
    client = client_for(miner.address)
    rng = np.random.default_rng(4)
    acked = {}
    image, text = random_pairs(rng, 100, DIM)
    client.upsert(np.arange(100), image, text)
    acked.update({i: (image[i], text[i]) for i in range(100)})
    private_redis.stop()
    more_image, more_text = random_pairs(rng, 10, DIM)
    with pytest.raises(grpc.RpcError) as caught:
        client.upsert(np.arange(100, 110), more_image, more_text)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "redis" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        client.delete([1, 2])
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert client.mine(5, anchor_ids=[1, 2]).ids.shape == (2, 5)  # reads keep serving from memory
    assert client.stats().size == 100  # the refused writes were not applied
    private_redis.start()
    deadline = time.monotonic() + 30
    while True:  # the miner reconnects by itself
        try:
            client.upsert(np.arange(100, 110), more_image, more_text)
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
            time.sleep(0.2)
    acked.update({100 + i: (more_image[i], more_text[i]) for i in range(10)})
    assert_rows(client, acked)
    miner.process.send_signal(signal.SIGKILL)
    miner.process.wait()
    client = client_for(miner_factory(*args).address)
    assert_rows(client, acked)  # and all of it is in the log
