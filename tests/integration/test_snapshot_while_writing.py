"""A snapshot taken while writes move rows, restored with its log into a new core, equals the leader (real Redis).

In process: the leader is a DurableMiner over a real Redis stream; its snapshot's block-by-block copy is held at
one block while a write moves an id to a block the copy has still to reach.
"""

from __future__ import annotations

import threading

import numpy as np

from helip.miner_service.core.api import MineQuery
from helip.miner_service.core.config import SearchConfig
from helip.miner_service.core.miner import HardPairMiner
from helip.miner_service.service.config import DurabilityConfig
from helip.miner_service.service.durable import DurableMiner
from tests.reference import random_pairs

DIM = 8
WAIT_S = 30
IDS = np.uint64


def durable(redis_url, key_prefix, snapshot_dir) -> DurableMiner:
    core = HardPairMiner(DIM, SearchConfig(device="cpu", store_block_rows=8, block_rows=8))
    config = DurabilityConfig(
        redis_url=redis_url, key_prefix=key_prefix, snapshot_dir=str(snapshot_dir), snapshot_interval_s=0
    )
    return DurableMiner(core, config)


def test_restore_of_a_snapshot_taken_while_an_id_moves_equals_the_leader(redis_url, key_prefix, tmp_path):
    leader = durable(redis_url, key_prefix, tmp_path)
    leader.recover()
    rng = np.random.default_rng(41)
    image, text = random_pairs(rng, 24, DIM)
    leader.upsert(np.arange(24, dtype=IDS), image, text, 1)  # blocks 0..2
    moved_image, moved_text = random_pairs(rng, 1, DIM)

    held = leader.core.store.blocks()[1].lock
    with held.write():  # the snapshot copies block 0, then waits here
        snapshotter = threading.Thread(target=leader.snapshot_now, daemon=True)
        snapshotter.start()
        assert held.wait_for_readers(1, WAIT_S)
        leader.delete(np.array([1, 20], dtype=IDS))  # frees slots 1 (block 0, copied) and 20 (block 2, not yet)
        leader.upsert(np.array([1], dtype=IDS), moved_image, moved_text, 2)  # id 1 moves to slot 20
    snapshotter.join(WAIT_S)
    assert not snapshotter.is_alive()

    restored = durable(redis_url, key_prefix, tmp_path)
    restored.recover()  # the snapshot, then the log after its offset (the delete and the upsert)
    assert restored.replayed_entries == 2
    assert restored.size == leader.size == 23
    ids = np.arange(24, dtype=IDS)
    for a, b in zip(leader.fetch(ids), restored.fetch(ids)):
        np.testing.assert_array_equal(a, b)
    restored.delete(np.array([1], dtype=IDS))  # no copy of id 1 outlives its delete
    query = MineQuery(24, anchor_ids=np.array([0], dtype=IDS), max_similarity=2.0)
    assert 1 not in restored.mine(query).neighbour_ids
    assert restored.size == 22
