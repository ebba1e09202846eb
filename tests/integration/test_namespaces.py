"""Namespaces on a real gRPC server: own dims and rows side by side, v1 requests, drop, limits, bad names,
and (against a real Redis) kill -9 with two namespaces, a drop that stays dropped, a follower that discovers."""

from __future__ import annotations

import dataclasses
import signal
import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helip.miner.v1 import miner_pb2 as pb
from helip.miner.v1 import miner_pb2_grpc as pb_grpc
from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.miner_service.core.config import SearchConfig
from helip.miner_service.service.config import MinerConfig
from helip.miner_service.service.server import MinerServer
from tests.reference import random_pairs, reference_mine

DIM = 16


@pytest.fixture
def server_factory():
    """In-process miners on port 0 (no durable log): the gRPC server is real, only the process is shared."""
    started: list[MinerServer] = []

    def factory(**overrides) -> MinerServer:
        config = MinerConfig(dim=DIM, port=0, metrics_port=0, workers=4, search=SearchConfig(device="cpu"))
        for name, value in overrides.items():
            config = dataclasses.replace(config, **{name: value})
        server = MinerServer(config).start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop(0)


def client_for(address: str, namespace: str = "") -> MinerClient:
    client = MinerClient(ClientConfig(address=address, wire_dtype=pb.FLOAT32, timeout_s=20, namespace=namespace))
    client.wait_ready(30)
    return client


def address_of(server: MinerServer) -> str:
    return f"127.0.0.1:{server.port}"


def put(client: MinerClient, rng, ids, dim: int, step: int = 1) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    image, text = random_pairs(rng, len(ids), dim)
    client.upsert(np.asarray(ids, dtype=np.uint64), image, text, step)
    return {int(i): (image[j], text[j]) for j, i in enumerate(ids)}


def assert_mines_like_reference(client: MinerClient, rows, anchors) -> None:
    anchors = np.asarray(anchors, dtype=np.uint64)
    got = client.mine(6, anchor_ids=anchors)
    q_image = np.stack([rows[int(a)][0] for a in anchors])
    q_text = np.stack([rows[int(a)][1] for a in anchors])
    ref_ids, ref_scores = reference_mine(rows, q_image, q_text, 6, pb.PRODUCT, 0.98, anchors.astype(np.int64))
    np.testing.assert_array_equal(got.ids, ref_ids)
    np.testing.assert_allclose(got.scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert got.size == len(rows)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_two_namespaces_of_different_dims_each_equal_the_reference(server_factory):
    server = server_factory()
    address = address_of(server)
    rng = np.random.default_rng(3)
    default, small, large = client_for(address), client_for(address, "run-a"), client_for(address, "run.b_2")
    # The same ids in all three: a namespace never sees another's rows.
    default_rows = put(default, rng, range(120), DIM)
    small_rows = put(small, rng, range(120), 8)  # created by its first write, with the write's dim
    assert large.ensure_namespace(dim=32, fingerprint="fp-b").created
    large_rows = put(large, rng, range(0, 240, 2), 32)

    assert_mines_like_reference(default, default_rows, [0, 7, 119])
    assert_mines_like_reference(small, small_rows, [0, 7, 119])
    assert_mines_like_reference(large, large_rows, [0, 14, 238])
    found, image, _ = small.fetch([5])
    np.testing.assert_array_equal(image[0], small_rows[5][0])

    stats = default.stats()
    assert (stats.namespace, stats.dim, stats.size, stats.total_rows) == ("default", DIM, 120, 360)
    listed = {n.name: (n.dim, n.rows, n.fingerprint) for n in stats.namespaces}
    assert listed == {"default": (DIM, 120, ""), "run-a": (8, 120, ""), "run.b_2": (32, 120, "fp-b")}
    assert (large.stats().dim, large.stats().namespace) == (32, "run.b_2")

    # A request built as a v1 client builds it (no namespace field) is about "default".
    stub = pb_grpc.MinerStub(default.channel)
    reply = stub.Mine(pb.MineRequest(anchor_ids=[0, 7, 119], k=6))
    np.testing.assert_array_equal(np.array(reply.neighbour_ids).reshape(3, 6), default.mine(6, [0, 7, 119]).ids)
    assert stub.Stats(pb.StatsRequest()).dim == DIM

    # Wrong dim for an existing namespace names the field and the namespace's dim.
    error = rpc_error(lambda: put(small, rng, [1], DIM))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "image.shape" in error.details()

    # Metrics: per-namespace series.
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("helip_miner_rows", (("namespace", "run-a"),))] == 120
    assert samples[("helip_miner_upserted_rows_total", (("namespace", "run.b_2"),))] == 120
    assert samples[("helip_miner_mine_seconds_count", (("namespace", "run-a"),))] == 1
    assert samples[("helip_miner_namespaces", ())] == 3


def test_drop_removes_a_namespace_and_ensure_checks_dim_fingerprint_and_reset(server_factory):
    server = server_factory()
    address = address_of(server)
    rng = np.random.default_rng(4)
    default, run = client_for(address), client_for(address, "run")
    put(default, rng, range(50), DIM)
    put(run, rng, range(80), 8)

    # ensure: a fingerprint is taken when there was none, then reported unchanged; another dim is refused.
    reply = run.ensure_namespace(dim=8, fingerprint="fp-1")
    assert (reply.created, reply.info.rows, reply.info.fingerprint) == (False, 80, "fp-1")
    assert run.ensure_namespace(dim=8, fingerprint="fp-2").info.fingerprint == "fp-1"
    error = rpc_error(lambda: run.ensure_namespace(dim=12))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "dim" in error.details()
    # reset: dropped and created empty with the new settings.
    reply = run.ensure_namespace(dim=12, fingerprint="fp-3", reset=True)
    assert (reply.created, reply.info.rows, reply.info.dim, reply.info.fingerprint) == (True, 0, 12, "fp-3")

    assert run.drop_namespace().dropped_rows == 0
    error = rpc_error(lambda: run.mine(3, anchor_ids=[1]))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "namespace" in error.details()
    assert rpc_error(lambda: run.drop_namespace()).code() == grpc.StatusCode.NOT_FOUND
    assert [n.name for n in default.stats().namespaces] == ["default"]
    metrics = {s.labels.get("namespace") for m in server.metrics.registry.collect() for s in m.samples if s.labels}
    assert "run" not in metrics

    # Dropping "default" empties it; it stays, with the configured dim.
    assert default.drop_namespace().dropped_rows == 50
    stats = default.stats()
    assert (stats.size, stats.dim, [n.name for n in stats.namespaces]) == (0, DIM, ["default"])
    assert default.mine(3, anchor_ids=[1]).unknown_anchor_ids.tolist() == [1]


def test_bad_namespace_names_are_invalid_argument_and_the_server_keeps_serving(server_factory):
    address = address_of(server_factory())
    rng = np.random.default_rng(5)
    default = client_for(address)
    put(default, rng, range(10), DIM)
    for bad in ("../etc", "a:b", "-lead", "x" * 65, "sp ace", "ünï"):
        client = client_for(address, bad)
        for call in (
            lambda c=client: put(c, rng, [1], DIM),
            lambda c=client: c.mine(3, anchor_ids=[1]),
            lambda c=client: c.stats(),
            lambda c=client: c.ensure_namespace(dim=8),
            lambda c=client: c.drop_namespace(),
        ):
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (bad, error)
            assert error.details().startswith("namespace:"), error.details()
        client.close()
    error = rpc_error(lambda: client_for(address, "fp").ensure_namespace(dim=8, fingerprint="f" * 1025))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("fingerprint:")
    error = rpc_error(lambda: client_for(address, "nodim").ensure_namespace())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("dim:")
    assert default.stats().size == 10
    assert [n.name for n in default.stats().namespaces] == ["default"]


def test_row_and_namespace_limits_name_the_limit(server_factory):
    address = address_of(server_factory(max_rows=30, max_total_rows=50, max_namespaces=2, max_namespace_dim=64))
    rng = np.random.default_rng(6)
    default, run, third = client_for(address), client_for(address, "run"), client_for(address, "third")
    put(default, rng, range(30), DIM)
    error = rpc_error(lambda: put(default, rng, [30], DIM))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_rows=30" in error.details()
    put(run, rng, range(20), 8)
    error = rpc_error(lambda: put(run, rng, [20], 8))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_total_rows=50" in error.details()
    put(run, rng, range(20), 8)  # overwriting stored ids adds no rows
    error = rpc_error(lambda: put(third, rng, [0], 8))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_namespaces=2" in error.details()
    error = rpc_error(lambda: client_for(address, "wide").ensure_namespace(dim=65))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_namespace_dim=64" in error.details()
    assert default.stats().total_rows == 50


# ---- durable: real Redis, real processes ------------------------------------------------------------------------


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


def assert_rows(client: MinerClient, expected) -> None:
    ids = np.array(sorted(expected), dtype=np.uint64)
    found, image, text = client.fetch(ids)
    assert found.all(), f"{int((~found).sum())} acknowledged rows missing in {client.namespace or 'default'}"
    np.testing.assert_array_equal(image, np.stack([expected[int(i)][0] for i in ids]))
    np.testing.assert_array_equal(text, np.stack([expected[int(i)][1] for i in ids]))


@pytest.mark.slow
def test_kill_9_with_two_namespaces_loses_nothing_and_a_drop_stays_dropped(
    miner_factory, redis_url, key_prefix, tmp_path
):
    import redis

    args = durable_args(redis_url, key_prefix, tmp_path / "snapshots", "--snapshot-interval-s", "0.3")
    leader = miner_factory(*args)
    follower = miner_factory(*durable_args(redis_url, key_prefix, tmp_path / "follower", "--follow"))
    rng = np.random.default_rng(7)
    default, other, doomed = (client_for(leader.address, n) for n in ("", "other", "doomed"))
    acked = {"": {}, "other": {}}
    for round_ in range(6):  # writes before and after scheduled snapshots
        acked[""].update(put(default, rng, range(round_ * 40, round_ * 40 + 60), DIM, step=round_))
        acked["other"].update(put(other, rng, range(round_ * 30, round_ * 30 + 50), 8, step=round_))
        time.sleep(0.15)
    put(doomed, rng, range(25), 4)
    time.sleep(0.5)  # a snapshot of "doomed" exists before it is dropped
    assert doomed.drop_namespace().dropped_rows == 25
    # "again" is created anew by a reset (another dim): a follower must not keep its first life's rows.
    again = client_for(leader.address, "again")
    put(again, rng, range(40), 4)
    time.sleep(0.5)
    assert again.ensure_namespace(dim=6, fingerprint="second", reset=True).created
    acked["again"] = put(again, rng, range(3), 6)
    for client in (default, other, doomed, again):
        client.close()

    # The follower discovered "other" (created after it started), and forgot "doomed".
    reader = client_for(follower.address, "other")
    deadline = time.monotonic() + 15
    expected = {"default": len(acked[""]), "other": len(acked["other"]), "again": 3}
    while {n.name: n.rows for n in reader.stats().namespaces} != expected:
        assert time.monotonic() < deadline, f"follower did not converge: {reader.stats().namespaces}"
        time.sleep(0.1)
    assert_rows(reader, acked["other"])
    reader.close()
    with client_for(follower.address, "again") as reader:
        assert_rows(reader, acked["again"])
        assert (reader.stats().dim, reader.stats().size) == (6, 3)

    leader.process.send_signal(signal.SIGKILL)
    leader.process.wait(10)
    restarted = miner_factory(*args)
    for name, rows in acked.items():
        with client_for(restarted.address, name) as client:
            assert_rows(client, rows)
            assert client.stats().size == len(rows)
    with client_for(restarted.address) as client:
        stats = client.stats()
        assert {n.name: (n.dim, n.rows) for n in stats.namespaces} == {
            "default": (DIM, len(acked[""])),
            "other": (8, len(acked["other"])),
            "again": (6, 3),
        }
        assert stats.role == "leader"
    assert not (tmp_path / "snapshots" / "namespaces" / "doomed").exists() or not any(
        (tmp_path / "snapshots" / "namespaces" / "doomed").iterdir()
    )
    keys = {k.decode() for k in redis.Redis.from_url(redis_url).scan_iter(f"{key_prefix}:*")}
    assert not any(":ns:doomed:" in k for k in keys), keys
    assert f"{key_prefix}:miner:ns:other:log:shard-0-of-1" in keys
