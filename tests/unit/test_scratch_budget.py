"""Scratch memory: chunk sizing from the per-Mine budget, and admission of Mines against the total budget."""

import threading

import numpy as np
import pytest
import torch

from helip.miner_service.core.api import MineQuery
from helip.miner_service.core.budget import ScratchAdmission, bytes_per_score, chunk_rows
from helip.miner_service.core.config import SearchConfig
from helip.miner_service.core.errors import ResourceExhausted
from helip.miner_service.core.miner import HardPairMiner
from helip.miner_service.core.search import SearchCancelled
from tests.reference import random_pairs, reference_mine

WAIT_S = 30


def test_bytes_per_score_counts_the_score_matrices():
    assert bytes_per_score(torch.float32) == 10  # two float32 similarities, two bool masks
    assert bytes_per_score(torch.float16) == 14  # plus the two half-precision products before widening


def test_chunk_rows_fit_the_budget():
    assert chunk_rows(512, 512 * 10 * 100, 10, 1 << 20) == 100
    assert chunk_rows(1024, 512 * 10 * 100, 10, 1 << 20) == 50  # twice the anchors, half the rows
    assert chunk_rows(4, 1 << 30, 10, 8192) == 8192  # capped by the most rows at once
    assert chunk_rows(8192, 10, 10, 8192) == 1  # a budget below one row still makes progress


def test_a_mine_scores_in_chunks_sized_by_its_anchors_and_stays_exact():
    dim, n = 8, 40
    config = SearchConfig(device="cpu", store_block_rows=64, mine_scratch_bytes=4 * 10 * 5, scratch_budget_bytes=400)
    miner = HardPairMiner(dim, config)
    image, text = random_pairs(np.random.default_rng(1), n, dim)
    miner.upsert(np.arange(n, dtype=np.uint64), image, text, 1)
    assert miner.chunk_rows(4) == 5 and miner.chunk_rows(2) == 10
    asked = []
    anchors = np.array([0, 9, 21, 39], dtype=np.uint64)
    result = miner.mine(MineQuery(6, anchor_ids=anchors), cancelled=lambda: asked.append(1) or False)
    assert len(asked) == n // 5  # one question per chunk of 5 rows
    rows = {i: (image[i], text[i]) for i in range(n)}
    ref_ids, _ = reference_mine(rows, image[anchors.astype(int)], text[anchors.astype(int)], 6, 1, 0.98, anchors)
    np.testing.assert_array_equal(result.neighbour_ids, ref_ids)
    assert miner.admission.in_use_bytes == 0  # given back


def test_budget_settings_are_validated():
    with pytest.raises(ValueError, match="scratch_budget_bytes"):
        SearchConfig(mine_scratch_bytes=200, scratch_budget_bytes=100)
    with pytest.raises(ValueError, match="mine_queue_limit"):
        SearchConfig(mine_queue_limit=-1)
    with pytest.raises(ValueError, match="store_block_rows"):
        SearchConfig(store_block_rows=-1)


def test_settings_left_at_zero_are_filled_in_by_device():
    cpu, cuda = SearchConfig().for_device("cpu"), SearchConfig().for_device("cuda")
    assert (cpu.store_block_rows, cpu.mine_scratch_bytes, cpu.scratch_budget_bytes) == (1 << 16, 256 << 20, 1 << 30)
    assert (cuda.store_block_rows, cuda.mine_scratch_bytes, cuda.scratch_budget_bytes) == (1 << 18, 4 << 30, 8 << 30)
    # What is set stays; a total set alone caps the per-Mine default, a Mine set alone raises the default total.
    assert SearchConfig(store_block_rows=8).for_device("cuda").store_block_rows == 8
    assert SearchConfig(scratch_budget_bytes=1 << 30).for_device("cuda").mine_scratch_bytes == 1 << 30
    assert SearchConfig(mine_scratch_bytes=16 << 30).for_device("cuda").scratch_budget_bytes == 16 << 30
    assert HardPairMiner(4, SearchConfig(device="cpu")).store.block_rows == 1 << 16


class Waiter:
    """A thread that asks for `nbytes` and records when it got them; holds them until `release` is set."""

    def __init__(self, admission, nbytes, admitted_order, cancelled=None):
        self.admitted, self.release = threading.Event(), threading.Event()
        self.error = None
        self.thread = threading.Thread(
            target=self._run, args=(admission, nbytes, admitted_order, cancelled), daemon=True
        )
        self.thread.start()

    def _run(self, admission, nbytes, admitted_order, cancelled):
        try:
            with admission.admitted(nbytes, cancelled):
                admitted_order.append(self)
                self.admitted.set()
                assert self.release.wait(WAIT_S)
        except Exception as error:  # handed to the test thread
            self.error = error
            self.admitted.set()

    def done(self):
        self.release.set()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()


def test_a_mine_that_does_not_fit_waits_until_memory_is_free():
    admission, order = ScratchAdmission(100, queue_limit=4), []
    first = Waiter(admission, 80, order)
    assert first.admitted.wait(WAIT_S) and admission.in_use_bytes == 80
    second = Waiter(admission, 50, order)
    assert admission.wait_for_waiters(1, WAIT_S)
    assert not second.admitted.is_set()
    first.done()
    assert second.admitted.wait(WAIT_S) and second.error is None
    assert admission.in_use_bytes == 50 and admission.waiting == 0
    second.done()
    assert admission.in_use_bytes == 0


def test_waiters_are_served_first_come_first_served():
    admission, order = ScratchAdmission(100, queue_limit=4), []
    holder = Waiter(admission, 100, order)
    assert holder.admitted.wait(WAIT_S)
    big = Waiter(admission, 60, order)
    assert admission.wait_for_waiters(1, WAIT_S)
    small = Waiter(admission, 10, order)  # would fit beside `big`, but not before it
    assert admission.wait_for_waiters(2, WAIT_S)
    holder.done()
    assert big.admitted.wait(WAIT_S) and small.admitted.wait(WAIT_S)
    assert order == [holder, big, small]
    big.done()
    small.done()


def test_past_the_queue_limit_a_mine_is_refused_naming_the_limit():
    admission, order = ScratchAdmission(100, queue_limit=1), []
    holder = Waiter(admission, 100, order)
    assert holder.admitted.wait(WAIT_S)
    queued = Waiter(admission, 10, order)
    assert admission.wait_for_waiters(1, WAIT_S)
    with pytest.raises(ResourceExhausted, match="mine_queue_limit=1"):
        with admission.admitted(10):
            pass
    holder.done()
    assert queued.admitted.wait(WAIT_S) and queued.error is None
    queued.done()
    with ScratchAdmission(100, queue_limit=0).admitted(500):  # above the whole budget: admitted alone
        pass


def test_a_waiting_mine_whose_caller_left_gives_up_its_place():
    admission, order = ScratchAdmission(100, queue_limit=1), []
    holder = Waiter(admission, 100, order)
    assert holder.admitted.wait(WAIT_S)
    gone = threading.Event()
    leaver = Waiter(admission, 10, order, cancelled=gone.is_set)
    assert admission.wait_for_waiters(1, WAIT_S)
    gone.set()
    assert leaver.admitted.wait(WAIT_S) and isinstance(leaver.error, SearchCancelled)
    leaver.done()
    assert admission.waiting == 0 and admission.in_use_bytes == 100
    holder.done()


def test_the_ivf_path_reranks_a_group_of_anchors_at_a_time_with_the_same_answer():
    import dataclasses

    from helip.miner_service.core.config import IvfConfig

    dim, n, rng = 16, 3000, np.random.default_rng(9)
    centres = rng.standard_normal((30, dim)).astype(np.float32)
    image = centres[rng.integers(0, 30, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    text = image + 0.2 * rng.standard_normal((n, dim)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    miner = HardPairMiner(dim, SearchConfig(device="cpu", ivf=IvfConfig(min_rows=2000, nprobe=8)))
    miner.upsert(np.arange(n, dtype=np.uint64), image, text, 1)
    assert miner.wait_for_ivf(60)
    query = MineQuery(10, anchor_ids=np.arange(0, n, 150), exclude_ids=[3, 4])
    whole = miner.mine(query)
    # 80 candidates x (two fp32 rows of 16 + 10 bytes of scores) = 11,040 bytes an anchor: two anchors a group.
    miner.ivf.config = dataclasses.replace(miner.ivf.config, mine_scratch_bytes=25_000)
    assert miner.ivf.anchors_at_once(10) == 2
    grouped = miner.mine(query)
    assert whole.used_ivf and grouped.used_ivf
    np.testing.assert_array_equal(whole.neighbour_ids, grouped.neighbour_ids)
    np.testing.assert_allclose(whole.scores, grouped.scores, rtol=1e-6)
