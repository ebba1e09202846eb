"""Mines, copies and writes that interleave: what a Mine returns and what a copy holds when rows move meanwhile.

Each test pauses a Mine (or a copy) between blocks at a known point, writes, and lets it finish: deterministic,
no sleeps.
"""

import numpy as np

from miner_service.core_api import MineQuery
from tests.unit.test_block_store import PausedMine, make_miner, put, run_with_timeout

IDS = np.uint64


def test_an_id_deleted_and_reinserted_further_on_during_a_mine_is_returned_once():
    rng = np.random.default_rng(11)
    miner, rows = make_miner(), {}  # blocks of 8 rows, one chunk a block
    put(miner, rows, rng, range(24))  # blocks 0..2
    anchor_image, anchor_text = rows[0]
    near = (anchor_image[None] * 0.99, anchor_text[None] * 0.99)
    miner.upsert(np.array([1], dtype=IDS), *near, 1)  # row 1 (block 0) is the anchor's nearest neighbour
    query = MineQuery(4, anchor_ids=np.array([0], dtype=IDS), max_similarity=2.0)
    mine = PausedMine(miner, query, pause_before_chunk=2)  # block 0 scored: row 1 is among the candidates
    # Deleting 1 and 20 frees slots 1 and 20; re-inserting 1 takes slot 20, in block 2, which the Mine scores next.
    run_with_timeout(lambda: miner.delete(np.array([1, 20], dtype=IDS)))
    run_with_timeout(lambda: miner.upsert(np.array([1], dtype=IDS), *near, 2))
    assert miner.store.slots_of(np.array([1], dtype=IDS))[0] // miner.store.block_rows == 2
    result = mine.finish()
    returned = result.neighbour_ids[0][result.neighbour_ids[0] >= 0].tolist()
    assert returned[0] == 1
    assert len(returned) == len(set(returned)), f"an id came back twice: {returned}"
