"""A write that fails part way leaves the store as it was: growth that cannot allocate its block hands out nothing."""

import numpy as np
import pytest
import torch

from miner_service.store import PairStore
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
