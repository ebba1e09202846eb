"""Rows in fixed-size blocks: growth, holes, placement, and readers and writers that meet one block at a time."""

import threading

import numpy as np
import pytest
import torch

from helip.miner_service.core.api import MineQuery
from helip.miner_service.core.config import SearchConfig
from helip.miner_service.core.miner import HardPairMiner, resolve_devices
from helip.miner_service.core.search import Scoring
from helip.miner_service.core.store import PairStore, block_device
from tests.reference import random_pairs, reference_mine

DIM = 8
WAIT_S = 30  # generous: a step that should not block fails the test instead of hanging it


def make_miner(store_block_rows=8, block_rows=8, topk="auto", device="cpu"):
    config = SearchConfig(device=device, block_rows=block_rows, store_block_rows=store_block_rows, topk=topk)
    return HardPairMiner(DIM, config)


def put(miner, rows, rng, ids, step=1):
    image, text = random_pairs(rng, len(ids), DIM)
    miner.upsert(np.asarray(ids, dtype=np.uint64), image, text, step)
    rows.update({int(i): (image[j], text[j]) for j, i in enumerate(ids)})
    return image, text


def assert_matches_reference(miner, rows, anchors, k=6, exclude=(), scoring=Scoring.PRODUCT):
    anchors = np.asarray(anchors, dtype=np.uint64)
    result = miner.mine(MineQuery(k, anchor_ids=anchors, exclude_ids=np.asarray(exclude), scoring=scoring))
    q_image = np.stack([rows[int(a)][0] for a in anchors])
    q_text = np.stack([rows[int(a)][1] for a in anchors])
    ref_ids, ref_scores = reference_mine(
        rows, q_image, q_text, k, int(scoring), 0.98, anchors.astype(np.int64), exclude
    )
    np.testing.assert_array_equal(result.neighbour_ids, ref_ids)
    np.testing.assert_allclose(result.scores, ref_scores, rtol=1e-5, atol=1e-5)
    return result


@pytest.mark.parametrize("topk", ["heap", "torch"])
def test_growth_adds_one_block_at_a_time_and_never_moves_rows(topk):
    rng = np.random.default_rng(1)
    miner, rows = make_miner(topk=topk), {}
    put(miner, rows, rng, range(5))
    first_block = miner.store.blocks()[0]
    first_rows = first_block.image.data_ptr()
    for start, stop in [(5, 15), (15, 17), (17, 40)]:
        put(miner, rows, rng, range(start, stop))
        assert miner.store.capacity == -(-stop // 8) * 8  # whole blocks, nothing doubled
        assert_matches_reference(miner, rows, [0, 7, 8, stop - 1], exclude=[1, 9, 16])
    assert miner.store.blocks()[0] is first_block and first_block.image.data_ptr() == first_rows
    assert miner.stats().capacity == 40 and miner.size == 40


def test_delete_and_upsert_across_blocks_reuse_holes():
    rng = np.random.default_rng(2)
    miner, rows = make_miner(), {}
    put(miner, rows, rng, range(30))  # blocks 0..3, the last one part full
    deleted, size = miner.delete(np.array([2, 12, 12, 25, 999], dtype=np.uint64))  # blocks 0, 1, 3; 12 twice
    assert (deleted, size) == (3, 27)
    for gone in (2, 12, 25):
        del rows[gone]
    assert_matches_reference(miner, rows, [0, 11, 29], k=30)  # k past the size: padding, no deleted row
    put(miner, rows, rng, [3, 17, 100, 101, 102], step=5)  # two overwrites in blocks 0 and 2, three new rows
    assert miner.store.capacity == 32  # the three holes took the new rows
    assert_matches_reference(miner, rows, [100, 3, 17], exclude=[101])
    found, image, _, steps = miner.fetch(np.array([17, 12, 102], dtype=np.uint64))
    assert found.tolist() == [True, False, True] and steps.tolist() == [5, 5]
    np.testing.assert_allclose(image[0], rows[17][0], rtol=1e-6)
    stats = miner.stats()
    assert (stats.size, stats.min_step, stats.max_step) == (30, 1, 5)


def test_block_placement_is_round_robin_over_devices():
    devices = [torch.device("cuda:0"), torch.device("cuda:1"), torch.device("cuda:2")]
    assert [block_device(i, devices).index for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    cpus = [torch.device("cpu")] * 2
    store = PairStore(DIM, cpus, torch.float32, block_rows=4)
    image, text = random_pairs(np.random.default_rng(3), 10, DIM)
    store.upsert(np.arange(10, dtype=np.uint64), image, text, 1)
    assert [block.device for block in store.blocks()] == cpus + cpus[:1]


def test_rows_spread_over_devices_search_like_one():
    """Two "devices" (both the CPU here): queries go to each block's device, its top-k comes back to the first."""
    rng = np.random.default_rng(4)
    spread, rows = make_miner(device="cpu,cpu", topk="torch"), {}
    image, text = put(spread, rows, rng, range(50))
    assert len({block.index % 2 for block in spread.store.blocks()}) == 2
    for scoring in Scoring:
        assert_matches_reference(spread, rows, [0, 25, 49], exclude=[3, 30], scoring=scoring)


def test_device_lists_are_checked():
    with pytest.raises(ValueError, match="mixes"):
        resolve_devices("cpu,cuda:0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_devices("cuda:0,cuda:1")


class PausedMine:
    """A Mine in a thread that stops between blocks: `cancelled` is asked before each chunk (one chunk a block)."""

    def __init__(self, miner, query, pause_before_chunk: int):
        self.paused, self.resume = threading.Event(), threading.Event()
        self.result, self.calls = None, 0
        self.pause_before_chunk = pause_before_chunk
        self.thread = threading.Thread(target=self._run, args=(miner, query), daemon=True)
        self.thread.start()
        assert self.paused.wait(WAIT_S), "the Mine never reached the pause"

    def _cancelled(self) -> bool:
        self.calls += 1
        if self.calls == self.pause_before_chunk:
            self.paused.set()
            assert self.resume.wait(WAIT_S)
        return False

    def _run(self, miner, query):
        self.result = miner.mine(query, cancelled=self._cancelled)

    def finish(self):
        self.resume.set()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()
        return self.result


def run_with_timeout(work) -> None:
    done = threading.Event()
    thread = threading.Thread(target=lambda: (work(), done.set()), daemon=True)
    thread.start()
    assert done.wait(WAIT_S), "the write waited for the Mine"


def test_a_write_proceeds_while_a_mine_is_between_blocks():
    rng = np.random.default_rng(5)
    miner, rows = make_miner(), {}
    put(miner, rows, rng, range(32))  # four full blocks
    query = MineQuery(5, anchor_ids=np.array([0, 20], dtype=np.uint64), max_similarity=2.0)
    mine = PausedMine(miner, query, pause_before_chunk=2)  # block 0 scored, block 1 not yet
    seen_by_mine = dict(rows)
    # One write into the scored block and one into a block still to come: neither waits for the Mine.
    new_image, new_text = random_pairs(rng, 2, DIM)
    run_with_timeout(lambda: miner.upsert(np.array([3, 12], dtype=np.uint64), new_image, new_text, 2))
    rows[3], rows[12] = (new_image[0], new_text[0]), (new_image[1], new_text[1])
    seen_by_mine[12] = rows[12]  # block 1 is scored after the write: the Mine sees the new row 12, the old row 3
    result = mine.finish()
    q_image = np.stack([seen_by_mine[0][0], seen_by_mine[20][0]])
    q_text = np.stack([seen_by_mine[0][1], seen_by_mine[20][1]])
    ref_ids, ref_scores = reference_mine(seen_by_mine, q_image, q_text, 5, 1, 2.0, np.array([0, 20]))
    np.testing.assert_array_equal(result.neighbour_ids, ref_ids)
    np.testing.assert_allclose(result.scores, ref_scores, rtol=1e-5, atol=1e-5)
    steps = dict(zip(result.neighbour_ids.ravel().tolist(), result.neighbour_steps.ravel().tolist()))
    assert all(steps[i] == (2 if i in (3, 12) else 1) for i in steps)  # steps as stored when the reply was made


def test_rows_deleted_or_excluded_ids_inserted_during_a_mine_are_not_returned():
    rng = np.random.default_rng(6)
    miner, rows = make_miner(), {}
    put(miner, rows, rng, range(24))
    anchor = rows[0]
    # Row 1 (block 0) is the anchor's nearest neighbour; the Mine scores block 0, then row 1 is deleted.
    miner.upsert(np.array([1], dtype=np.uint64), anchor[0][None] * 0.99, anchor[1][None] * 0.99, 1)
    query = MineQuery(3, anchor_ids=np.array([0], dtype=np.uint64), exclude_ids=[500], max_similarity=2.0)
    mine = PausedMine(miner, query, pause_before_chunk=2)
    run_with_timeout(lambda: miner.delete(np.array([1], dtype=np.uint64)))
    # Excluded id 500 was not stored when the Mine began; it lands in block 3, which the Mine scores later.
    run_with_timeout(lambda: miner.upsert(np.array([500], dtype=np.uint64), anchor[0][None], anchor[1][None], 1))
    result = mine.finish()
    assert 1 not in result.neighbour_ids and 500 not in result.neighbour_ids
    assert (result.neighbour_ids[0, :2] >= 0).all()  # the rest of the answer moved up; padding at the end


def test_a_write_to_one_block_does_not_wait_for_a_reader_of_another():
    rng = np.random.default_rng(7)
    miner, rows = make_miner(), {}
    put(miner, rows, rng, range(16))
    reader_of_block_1 = miner.store.blocks()[1].lock
    with reader_of_block_1.read():
        image, text = random_pairs(rng, 1, DIM)
        run_with_timeout(lambda: miner.upsert(np.array([2], dtype=np.uint64), image, text, 3))  # block 0


def test_copy_rows_lets_writers_in_between_blocks():
    rng = np.random.default_rng(8)
    miner, rows = make_miner(), {}
    put(miner, rows, rng, range(20))
    miner.delete(np.array([4], dtype=np.uint64))
    copies = miner.store.copy_rows()
    ids, _, image, _ = next(copies)  # block 0 copied; the copy is paused between blocks
    image_new, text_new = random_pairs(rng, 1, DIM)
    run_with_timeout(lambda: miner.upsert(np.array([9], dtype=np.uint64), image_new, text_new, 4))
    rest = list(copies)
    assert ids.tolist() == [0, 1, 2, 3, 5, 6, 7]  # the hole is not copied
    all_ids = np.concatenate([ids] + [part[0] for part in rest])
    assert sorted(all_ids.tolist()) == [i for i in range(20) if i != 4]
    np.testing.assert_allclose(image[0], rows[0][0], rtol=1e-6)


def test_the_ivf_path_is_on_for_a_cpu_miner_only_when_asked():
    from helip.miner_service.core.config import IvfConfig

    assert HardPairMiner(DIM, SearchConfig(device="cpu", ivf=IvfConfig(min_rows=10))).stats().ivf_enabled
    assert not HardPairMiner(DIM, SearchConfig(device="cpu", ivf=IvfConfig(min_rows=0))).stats().ivf_enabled


def test_a_write_meets_a_search_once_going_against_its_direction():
    rng = np.random.default_rng(9)
    miner, rows = make_miner(), {}
    put(miner, rows, rng, range(32))  # blocks 0..3
    blocks = miner.store.blocks()
    image, text = random_pairs(rng, 4, DIM)
    writer = threading.Thread(
        target=miner.upsert, args=(np.array([1, 9, 17, 25], dtype=np.uint64), image, text, 7), daemon=True
    )
    with blocks[1].lock.read():  # a search scoring block 1; it goes on to blocks 2 and 3 next
        writer.start()
        assert blocks[1].lock.wait_for_writers(1, WAIT_S)
        # Blocks 3 and 2, ahead of the search, are written already; block 0, behind it, comes after block 1.
        assert [int(blocks[b].steps[1]) for b in range(4)] == [1, 1, 7, 7]
    writer.join(WAIT_S)
    assert [int(blocks[b].steps[1]) for b in range(4)] == [7, 7, 7, 7]


def test_gather_returns_rows_in_the_order_asked_and_zeros_where_not_found():
    rng = np.random.default_rng(3)
    miner, rows = make_miner(store_block_rows=4), {}
    put(miner, rows, rng, range(20), step=7)
    miner.delete(np.array([5], dtype=np.uint64))
    store = miner.store
    ids = np.array([17, 5, 2, 11, 0, 9], dtype=np.uint64)  # over several blocks, out of block order
    slots = store.slots_of(ids)
    slots[1] = 5  # the deleted id's old slot
    expected = ids.copy()
    expected[3] = 12  # slot of 11, but another id expected there: not found
    got = store.gather(slots, expected_ids=expected)
    np.testing.assert_array_equal(got.found, [True, False, True, False, True, True])
    for position, sample in enumerate(ids.tolist()):
        if got.found[position]:
            np.testing.assert_allclose(got.image[position].numpy(), rows[sample][0], rtol=1e-6)
            np.testing.assert_allclose(got.text[position].numpy(), rows[sample][1], rtol=1e-6)
        else:
            assert not got.image[position].any() and not got.text[position].any()
    np.testing.assert_array_equal(got.steps, np.where(got.found, 7, 0))
    steps, found = store.steps_of(slots, expected_ids=expected)
    np.testing.assert_array_equal(found, got.found)
    np.testing.assert_array_equal(steps, got.steps)
