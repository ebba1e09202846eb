"""A real gRPC server with search.batch_mines: concurrent Mines share passes, each caller gets its own answer.

In process (port 0), with and without a durable log (Redis: the batcher then sits on the durable core). A bad Mine
and a Mine of unknown strict anchors sent in the same burst get their own refusals; the others are answered as the
core answers them alone; /metrics counts how many Mines each pass served.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.miner_service.core.api import MineQuery
from helip.miner_service.core.config import SearchConfig
from helip.miner_service.service.config import DurabilityConfig, MinerConfig
from helip.miner_service.service.server import MinerServer
from tests.reference import random_pairs

DIM = 16
ROWS = 2000
WAIT_S = 30


@pytest.fixture(params=["memory", "durable"])
def durability(request, redis_url, tmp_path):
    if request.param == "memory":
        yield DurabilityConfig()
        return
    prefix = f"helip-test-batch-{uuid.uuid4().hex[:8]}"
    yield DurabilityConfig(redis_url=redis_url, key_prefix=prefix, snapshot_dir=str(tmp_path / "snapshots"))
    import redis

    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def test_a_burst_of_mines_is_served_in_shared_passes(durability):
    search = SearchConfig(device="cpu", batch_mines=True, batch_window_ms=100)
    config = MinerConfig(dim=DIM, port=0, metrics_port=-1, workers=24, search=search, durability=durability)
    server = MinerServer(config).start()
    address = f"127.0.0.1:{server.port}"
    client = MinerClient(ClientConfig(address=address, retries=0, timeout_s=WAIT_S))
    try:
        client.wait_ready(WAIT_S)
        rng = np.random.default_rng(3)
        image, text = random_pairs(rng, ROWS, DIM)
        ids = np.arange(ROWS, dtype=np.uint64) + 1
        client.upsert(ids, image, text, step=1)
        anchors = [rng.choice(ids, 32, replace=False) for _ in range(16)]
        excluded = [rng.choice(ids, 64, replace=False) for _ in range(16)]
        requests = [
            pb.MineRequest(anchor_ids=a.tolist(), exclude_ids=e.tolist(), k=4 + i)
            for i, (a, e) in enumerate(zip(anchors, excluded))
        ]
        bad = pb.MineRequest(anchor_ids=[1, 2], k=0)
        unknown = pb.MineRequest(anchor_ids=[10**9], k=3, strict_anchors=True)
        with ThreadPoolExecutor(18) as pool:
            calls = [pool.submit(client.stub.Mine, r, timeout=WAIT_S) for r in [*requests, bad, unknown]]
            replies = [call.result() for call in calls[:16]]
            with pytest.raises(grpc.RpcError) as refused:
                calls[16].result()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "k" in refused.value.details()
            with pytest.raises(grpc.RpcError) as missing:
                calls[17].result()
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        core = server.registry.get("default").miner
        for i, reply in enumerate(replies):
            want = core.mine(MineQuery(4 + i, anchor_ids=anchors[i], exclude_ids=excluded[i]))
            got = np.array(reply.neighbour_ids).reshape(32, 4 + i)
            np.testing.assert_array_equal(got, want.neighbour_ids, err_msg=f"caller {i}")
            assert not set(got.ravel().tolist()) & set(excluded[i].tolist())
        passes = server.metrics.registry.get_sample_value("helip_miner_mine_pass_mines_count", {"namespace": "default"})
        served = server.metrics.registry.get_sample_value("helip_miner_mine_pass_mines_sum", {"namespace": "default"})
        assert passes >= 16 and served > passes  # Mines answered, some of them together
        assert client.mine(3, anchor_ids=[1, 2]).ids.shape == (2, 3)  # and it serves on
    finally:
        client.close()
        server.stop(grace_s=0)
