"""A write that fails part way leaves the store as it was: growth that cannot allocate its block hands out nothing."""

import numpy as np
import pytest
import torch

from helip.miner_service.core.store import PairStore
from tests.reference import random_pairs
from tests.unit.test_block_store import DIM


def test_a_block_that_cannot_be_allocated_hands_out_no_slots():
    # Block 1 goes to a device this machine cannot allocate on: the stand-in for a full GPU when the store grows.
    store = PairStore(DIM, [torch.device("cpu"), torch.device("ipu")], torch.float32, block_rows=8)
    rng = np.random.default_rng(31)
    image, text = random_pairs(rng, 12, DIM)
    store.upsert(np.arange(5, dtype=np.uint64), image[:5], text[:5], 1)
    with pytest.raises((RuntimeError, NotImplementedError)):  # what the device raises; the store survives it
        store.upsert(np.arange(10, 16, dtype=np.uint64), image[5:11], text[5:11], 2)  # needs block 1
    assert (store.size, store.capacity) == (5, 8)
    store.delete(np.array([4], dtype=np.uint64))
    # Still room in block 0: the hole and two fresh slots, none of them handed out by the failed write.
    store.upsert(np.array([20, 21, 22], dtype=np.uint64), image[9:12], text[9:12], 3)
    assert (store.size, store.capacity) == (7, 8)
    ids, steps, stored_image, stored_text = store.copy_all()
    assert sorted(ids.tolist()) == [0, 1, 2, 3, 20, 21, 22] and len(stored_image) == 7
    blocks = store.blocks()
    assert blocks[0].used == 7 and blocks[0].holes == 0 and blocks[0].live[:7].all()  # no slot left unwritten
    np.testing.assert_array_equal(stored_image[ids == 20][0], image[9])


def every_slot_below_used_is_live_or_a_hole(store) -> bool:
    """The search masks dead slots only in blocks with holes: a slot below `used` never written would be scored."""
    return all(int(np.count_nonzero(~b.live[: b.used])) == b.holes for b in store.blocks())


def test_rows_that_cannot_be_copied_to_the_blocks_device_change_nothing():
    store = PairStore(DIM, [torch.device("cpu")], torch.float32, block_rows=8)
    rng = np.random.default_rng(32)
    image, text = random_pairs(rng, 14, DIM)
    store.upsert(np.arange(10, dtype=np.uint64), image[:10], text[:10], 1)  # block 0 full, block 1 in use
    store.delete(np.array([3], dtype=np.uint64))  # a hole to reuse
    unreadable = torch.empty((4, DIM), device="meta")  # the stand-in for a copy that fails (a full device)
    new_and_old = np.array([20, 21, 22, 5], dtype=np.uint64)  # three new rows (the hole, block 1) and one rewrite
    with pytest.raises(NotImplementedError):
        store.upsert(new_and_old, unreadable, unreadable, 2)
    assert store.size == 9 and every_slot_below_used_is_live_or_a_hole(store)
    found = store.gather(store.slots_of(new_and_old), expected_ids=new_and_old).found
    assert found.tolist() == [False, False, False, True]
    # The slots the failed write was given are free again: the same write, readable, lands in them.
    store.upsert(new_and_old, image[10:14], text[10:14], 3)
    assert store.size == 12 and every_slot_below_used_is_live_or_a_hole(store)
    assert [b.used for b in store.blocks()] == [8, 4]
