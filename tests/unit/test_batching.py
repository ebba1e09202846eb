"""Mines batched across callers: each Mine in a shared pass gets exactly the answer it gets alone.

The core (`mine_many`): Mines with different k, exclusions, anchors by id and by embedding, unknown and strict
anchors, scorings, near-duplicate cuts and guard ratios, on both top-k kinds, many small blocks (the exclusion masks
per block), the IVF path; the exclusion masks of a merged search (a slot excluded by two Mines, both mask forms).
The batcher (`MineBatcher`): concurrent callers, the window, the anchor cap, a caller that leaves while queued, a
failed pass, the lead handed on.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from helip.miner_service.core.api import MineQuery
from helip.miner_service.core.batching import MineBatcher
from helip.miner_service.core.config import IvfConfig, SearchConfig
from helip.miner_service.core.errors import NotFound
from helip.miner_service.core.miner import HardPairMiner
from helip.miner_service.core.search import NEG_INF, Scoring, SearchCancelled, SearchQuery, mask_slots
from tests.reference import random_pairs, reference_mine

DIM = 8
OFF = 2.0


def store(n: int, config: SearchConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    miner = HardPairMiner(DIM, config)
    image, text = random_pairs(rng, n, DIM)
    ids = np.arange(n, dtype=np.uint64) * 3 + 5
    miner.upsert(ids, image, text, np.arange(n) % 7 + 1)
    miner.delete(ids[10:15])  # holes in a block
    return miner, ids[np.r_[0:10, 15:n]], image, text


def mixed_queries(ids: np.ndarray, image: np.ndarray, text: np.ndarray, rng) -> list[MineQuery]:
    """Mines as different as callers send them, most sharing the trainer's settings."""
    pick = lambda n: rng.choice(ids, n, replace=False)  # noqa: E731
    row = lambda i: int((i - 5) // 3)  # noqa: E731
    by_embedding = pick(6)
    rows = [row(i) for i in by_embedding]
    return [
        MineQuery(5, anchor_ids=pick(4), exclude_ids=pick(30)),
        MineQuery(16, anchor_ids=pick(7), exclude_ids=pick(3)),
        MineQuery(9, anchor_ids=np.r_[pick(3), [10**9, 10**9 + 1]]),  # two unknown anchors: padding rows
        MineQuery(12, image=image[rows], text=text[rows], self_ids=by_embedding, exclude_ids=pick(50)),
        MineQuery(7, image=image[rows[:2]] + 0.01, text=text[rows[:2]]),  # by embedding, no own ids
        MineQuery(6, anchor_ids=pick(5), scoring=Scoring.SUM, exclude_ids=pick(10)),
        MineQuery(6, anchor_ids=pick(5), scoring=Scoring.SUM),
        MineQuery(8, anchor_ids=pick(4), max_similarity=0.5),
        MineQuery(8, anchor_ids=pick(6), positive_ratio=0.3, exclude_ids=pick(20)),
        MineQuery(30, anchor_ids=pick(3), positive_ratio=0.3),  # k past the list: searched again with the guard
        MineQuery(4, anchor_ids=pick(2), positive_ratio=0.9),
        MineQuery(3, anchor_ids=[10**9], strict_anchors=True),  # not stored: NotFound, for this Mine only
    ]


def assert_same(got, want, where: str) -> None:
    np.testing.assert_array_equal(got.neighbour_ids, want.neighbour_ids, err_msg=where)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-6, err_msg=where)
    np.testing.assert_array_equal(got.neighbour_steps, want.neighbour_steps, err_msg=where)
    np.testing.assert_array_equal(got.unknown_anchor_ids, want.unknown_anchor_ids, err_msg=where)
    assert got.guard_dropped == want.guard_dropped, where


def alone(miner, query):
    try:
        return miner.mine(query)
    except NotFound as error:
        return error


@pytest.mark.parametrize("topk", ["heap", "torch"])
def test_mine_many_answers_each_mine_as_it_is_answered_alone(topk):
    # Small blocks: every Mine's exclusions fall in different blocks, so the per-block masks are exercised.
    miner, ids, image, text = store(600, SearchConfig(device="cpu", topk=topk, block_rows=64, store_block_rows=128))
    queries = mixed_queries(ids, image, text, np.random.default_rng(1))
    outcomes = miner.mine_many(queries)
    assert sum(q.positive_ratio == 0.3 for q in queries) == 2  # two guarded Mines share their pass
    for i, (query, got) in enumerate(zip(queries, outcomes)):
        want = alone(miner, query)
        if isinstance(want, NotFound):
            assert isinstance(got, NotFound) and got.field == "anchor_ids", i
            continue
        assert_same(got, want, f"Mine {i}")
        assert got.neighbour_ids.shape == (query.n_anchors, query.k)
    # Mines sharing settings shared a pass: the PRODUCT ones without guard and cut (5 of them), the SUM pair.
    assert [getattr(o, "pass_mines", None) for o in outcomes] == [5, 5, 5, 5, 5, 2, 2, 1, 2, 2, 1, None]


def test_mine_many_equals_the_reference():
    miner, ids, image, text = store(300, SearchConfig(device="cpu", block_rows=32))
    rows = {int(i): (image[(int(i) - 5) // 3], text[(int(i) - 5) // 3]) for i in ids}
    rng = np.random.default_rng(2)
    anchors = [rng.choice(ids, 5, replace=False) for _ in range(3)]
    excluded = [rng.choice(ids, 40, replace=False) for _ in range(3)]
    outcomes = miner.mine_many(
        [MineQuery(6, anchor_ids=a, exclude_ids=e, max_similarity=OFF) for a, e in zip(anchors, excluded)]
    )
    for a, e, got in zip(anchors, excluded, outcomes):
        kept = {i: rows[i] for i in rows if i not in set(e.tolist())}
        q_image = np.stack([rows[int(i)][0] for i in a])
        q_text = np.stack([rows[int(i)][1] for i in a])
        want, _ = reference_mine(kept, q_image, q_text, 6, int(Scoring.PRODUCT), OFF, a.astype(np.int64))
        np.testing.assert_array_equal(got.neighbour_ids, want)


def test_the_ivf_path_keeps_each_mines_exclusions():
    config = SearchConfig(device="cpu", ivf=IvfConfig(min_rows=300, nprobe=4096, candidates_per_k=400))
    miner, ids, image, text = store(400, config)
    assert miner.wait_for_ivf(60)
    miner.upsert(ids[:20], image[:20], text[:20] * -1, 9)  # fresh rows beside the index
    rng = np.random.default_rng(4)
    queries = [
        MineQuery(8, anchor_ids=rng.choice(ids, 4, replace=False), exclude_ids=rng.choice(ids, 60, replace=False))
        for _ in range(4)
    ]
    for query, got in zip(queries, miner.mine_many(queries)):
        assert got.used_ivf
        assert_same(got, miner.mine(query), "ivf")


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_slot_excluded_by_two_mines_is_masked_for_both_and_only_them(sync_free):
    def query(excluded: list[int]) -> SearchQuery:
        return SearchQuery(
            torch.zeros(2, DIM), torch.zeros(2, DIM), 3, Scoring.PRODUCT, OFF,
            torch.full((2,), -1), torch.tensor(excluded, dtype=torch.int64),
        )  # fmt: skip

    merged = SearchQuery.merge([query([12, 14]), query([12]), query([])])
    scores = torch.zeros(6, 5)
    mask_slots(scores, merged, 10, sync_free=sync_free)  # the block holds slots 10..14
    masked = (scores == NEG_INF).nonzero().tolist()
    assert masked == [[0, 2], [0, 4], [1, 2], [1, 4], [2, 2], [3, 2]]
    by_column = torch.zeros(6, 5)
    mask_slots(by_column, merged, 0, slot_of_column=torch.tensor([10, 11, 12, 13, 14]))
    assert (by_column == NEG_INF).nonzero().tolist() == masked


# ---- the batcher ----------------------------------------------------------------------------------------------
def test_concurrent_callers_share_passes_and_get_their_own_answers():
    miner, ids, image, text = store(800, SearchConfig(device="cpu"))
    batcher = MineBatcher(miner, window_s=0.05, max_anchors=10_000)
    rng = np.random.default_rng(5)
    queries = [
        MineQuery(int(rng.integers(3, 20)), anchor_ids=rng.choice(ids, 16, replace=False), exclude_ids=ids[:: 40 + i])
        for i in range(16)
    ]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(batcher.mine, queries))
    for i, (query, got) in enumerate(zip(queries, results)):
        assert_same(got, miner.mine(query), f"caller {i}")
    assert max(r.pass_mines for r in results) > 1  # a 50 ms window gathers the burst
    assert sum(1 / r.pass_mines for r in results) < len(queries)


def test_the_anchor_cap_splits_a_burst_into_passes():
    miner, ids, *_ = store(200, SearchConfig(device="cpu"))
    batcher = MineBatcher(miner, window_s=0.05, max_anchors=20)
    queries = [MineQuery(4, anchor_ids=ids[i * 10 : i * 10 + 10]) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(batcher.mine, queries))
    assert all(r.pass_mines <= 2 for r in results)  # 10 anchors a Mine, 20 a pass
    for query, got in zip(queries, results):
        assert_same(got, miner.mine(query), "capped")


class SlowCore:
    """A core whose passes take `pass_s` and are recorded; optionally failing."""

    def __init__(self, miner, pass_s: float, error: Exception | None = None):
        self.miner, self.pass_s, self.error = miner, pass_s, error
        self.passes: list[int] = []
        self.started = threading.Event()

    def mine_many(self, queries, cancelled=None):
        self.started.set()
        time.sleep(self.pass_s)
        self.passes.append(len(queries))
        if self.error is not None:
            raise self.error
        return self.miner.mine_many(queries, cancelled)


def test_mines_that_arrive_during_a_pass_join_the_next_one():
    miner, ids, *_ = store(100, SearchConfig(device="cpu"))
    core = SlowCore(miner, pass_s=0.3)
    batcher = MineBatcher(core, window_s=0.0, max_anchors=1000)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(batcher.mine, MineQuery(3, anchor_ids=ids[:2]))
        assert core.started.wait(10)
        rest = [pool.submit(batcher.mine, MineQuery(3, anchor_ids=ids[i : i + 2])) for i in range(2, 14, 2)]
        assert first.result(10).pass_mines == 1
        assert all(f.result(10).pass_mines == 6 for f in rest)
    assert core.passes == [1, 6]
    assert not batcher._leading and not batcher._queue  # the lead ended with the queue


def test_a_caller_that_leaves_while_queued_is_dropped_and_the_rest_are_served():
    miner, ids, *_ = store(100, SearchConfig(device="cpu"))
    core = SlowCore(miner, pass_s=0.3)
    batcher = MineBatcher(core, window_s=0.0, max_anchors=1000)
    gone = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(batcher.mine, MineQuery(3, anchor_ids=ids[:2]))
        assert core.started.wait(10)
        leaving = pool.submit(batcher.mine, MineQuery(3, anchor_ids=ids[2:4]), gone.is_set)
        staying = pool.submit(batcher.mine, MineQuery(3, anchor_ids=ids[4:6]))
        time.sleep(0.05)
        gone.set()
        with pytest.raises(SearchCancelled):
            leaving.result(10)
        assert first.result(10).neighbour_ids.shape == (2, 3)
        assert staying.result(10).pass_mines == 1
    assert core.passes == [1, 1]


def test_a_failed_pass_reaches_every_caller_in_it_and_the_next_caller_is_served():
    miner, ids, *_ = store(100, SearchConfig(device="cpu"))
    core = SlowCore(miner, pass_s=0.05, error=RuntimeError("the pass broke"))
    batcher = MineBatcher(core, window_s=0.05, max_anchors=1000)
    with ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(batcher.mine, MineQuery(3, anchor_ids=ids[i : i + 2])) for i in range(0, 6, 2)]
        for call in calls:
            with pytest.raises(RuntimeError, match="the pass broke"):
                call.result(10)
    core.error = None
    assert batcher.mine(MineQuery(3, anchor_ids=ids[:2])).neighbour_ids.shape == (2, 3)


def test_the_batcher_refuses_a_bad_setting():
    with pytest.raises(ValueError, match="max_anchors"):
        MineBatcher(None, window_s=0.0, max_anchors=0)
    with pytest.raises(ValueError, match="search.batch_window_ms"):
        SearchConfig(batch_window_ms=-1)
    with pytest.raises(ValueError, match="search.batch_max_anchors"):
        SearchConfig(batch_max_anchors=-1)
