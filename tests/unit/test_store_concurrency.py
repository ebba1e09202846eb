"""Mines, copies and writes that interleave: what a Mine returns and what a copy holds when rows move meanwhile.

Each test pauses a Mine (or a copy) between blocks at a known point, writes, and lets it finish: deterministic,
no sleeps.
"""

import threading

import numpy as np

from miner_service.core_api import MineQuery
from tests.reference import random_pairs
from tests.unit.test_block_store import DIM, WAIT_S, PausedMine, make_miner, put, run_with_timeout

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


def copy_all_while(miner, paused_at_block: int, writes):
    """miner.copy_rows() in a thread, held before block `paused_at_block` while `writes()` runs in this one."""
    copied = {}
    blocker = miner.store.blocks()[paused_at_block].lock
    with blocker.write():
        copier = threading.Thread(target=lambda: copied.update(rows=miner.copy_rows()), daemon=True)
        copier.start()
        assert blocker.wait_for_readers(1, WAIT_S), "the copy never reached the held block"
        writes()
    copier.join(WAIT_S)
    assert not copier.is_alive()
    return copied["rows"]


def test_a_copy_taken_while_an_id_moves_holds_it_once_and_restores_with_the_log_to_the_same_rows():
    rng = np.random.default_rng(12)
    miner, rows = make_miner(), {}
    put(miner, rows, rng, range(24))  # blocks 0..2
    moved_image, moved_text = random_pairs(rng, 1, DIM)

    def writes_after_the_offset(core):  # what a log replays after the snapshot's offset
        core.delete(np.array([1, 20], dtype=IDS))  # frees slots 1 (block 0) and 20 (block 2)
        core.upsert(np.array([1], dtype=IDS), moved_image, moved_text, 2)  # id 1 takes slot 20

    # Block 0 is copied with the old row 1; the copy then waits at block 1 while row 1 moves to block 2.
    ids, steps, image, text = copy_all_while(miner, 1, lambda: writes_after_the_offset(miner))
    assert sorted(ids.tolist()) == sorted(set(ids.tolist())), "an id is in the copy twice"
    assert set(ids.tolist()) == set(range(24)) - {20}

    restored = make_miner()  # restore as DurableMiner.recover does, then replay the log after the offset
    restored.upsert(ids, image, text, steps, enforce_max_rows=False)
    writes_after_the_offset(restored)
    assert restored.size == miner.size == 23
    for core in (miner, restored):
        found, image_now, _, steps_now = core.fetch(np.arange(24, dtype=IDS))
        assert found.tolist() == [i != 20 for i in range(24)]
        np.testing.assert_allclose(image_now[1], moved_image[0], rtol=1e-6)
        assert steps_now[1] == 2
    query = MineQuery(23, anchor_ids=np.array([0, 5], dtype=IDS), max_similarity=2.0)
    np.testing.assert_array_equal(miner.mine(query).neighbour_ids, restored.mine(query).neighbour_ids)
