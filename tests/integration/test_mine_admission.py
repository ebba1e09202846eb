"""A real gRPC server (in process, port 0): a burst of Mines past the scratch queue is refused, then it serves on."""

from __future__ import annotations

import grpc
import numpy as np

from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.miner_service.core.config import SearchConfig
from helip.miner_service.core.miner import HardPairMiner
from helip.miner_service.service.config import MinerConfig
from helip.miner_service.service.server import MinerServer
from tests.reference import random_pairs

DIM = 8
WAIT_S = 30


def test_a_burst_past_the_queue_gets_resource_exhausted_and_the_server_keeps_serving():
    search = SearchConfig(device="cpu", mine_scratch_bytes=1 << 20, scratch_budget_bytes=1 << 20, mine_queue_limit=1)
    config = MinerConfig(dim=DIM, port=0, metrics_port=-1, workers=8, search=search)
    core = HardPairMiner(DIM, search)
    server = MinerServer(config, miner=core).start()
    client = MinerClient(ClientConfig(address=f"127.0.0.1:{server.port}", retries=0, timeout_s=WAIT_S))
    try:
        client.wait_ready(WAIT_S)
        image, text = random_pairs(np.random.default_rng(1), 100, DIM)
        client.upsert(np.arange(100, dtype=np.uint64), image, text, step=1)
        request = pb.MineRequest(anchor_ids=[1, 2, 3], k=5)
        with core.admission.admitted(search.scratch_budget_bytes):  # every Mine now has to wait
            first = client.stub.Mine.future(request, timeout=WAIT_S)
            assert core.admission.wait_for_waiters(1, WAIT_S)  # the queue (1) is full
            burst = [client.stub.Mine.future(request, timeout=WAIT_S) for _ in range(4)]
            for call in burst:
                assert call.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "mine_queue_limit=1" in call.exception().details()
            assert not first.done()
        reply = first.result()  # admitted once the memory was free
        assert reply.k == 5 and len(reply.neighbour_ids) == 15
        assert client.mine(5, anchor_ids=[4, 5]).ids.shape == (2, 5)
        assert client.stats().size == 100
    finally:
        client.close()
        server.stop(grace_s=0)
