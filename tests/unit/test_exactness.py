"""The exact search equals the numpy reference in the quiescent case, whatever the block and chunk sizes.

Stores whose size is not a multiple of the block, holes from deletes (a whole block among them), a re-used hole,
k past the number of rows, anchors by id and by embedding, excluded ids (stored or not), every scoring, with and
without the near-duplicate cut, and both running top-k implementations.
"""

import functools

import numpy as np
import pytest
import torch

from helip.miner_service.core import search
from helip.miner_service.core.api import MineQuery
from helip.miner_service.core.config import SearchConfig
from helip.miner_service.core.miner import HardPairMiner
from helip.miner_service.core.search import Scoring
from tests.reference import random_pairs, reference_mine

DIM = 8
# (rows per storage block, stored rows scored at once)
LAYOUTS = [(5, 1), (5, 3), (8, 8), (8, 100), (64, 7)]


def build(store_block_rows, chunk, topk):
    rng = np.random.default_rng(store_block_rows * 1000 + chunk)
    miner = HardPairMiner(
        DIM, SearchConfig(device="cpu", store_block_rows=store_block_rows, block_rows=chunk, topk=topk)
    )
    image, text = random_pairs(rng, 37, DIM)
    # Near-duplicates of row 0 (similarity above 0.98): dropped by the cut, top of the list without it.
    image[30:33] = image[0] + 0.01 * rng.standard_normal((3, DIM)).astype(np.float32)
    text[30:33] = text[0] + 0.01 * rng.standard_normal((3, DIM)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    ids = np.arange(37, dtype=np.uint64) * 3  # not the slots
    miner.upsert(ids, image, text, 1)
    rows = {int(i): (image[j], text[j]) for j, i in enumerate(ids)}
    gone = [3 * j for j in (1, 4, 36)] + [3 * j for j in range(10, 15)]  # a block's worth at 5 rows a block
    miner.delete(np.asarray(gone, dtype=np.uint64))
    for i in gone:
        del rows[i]
    extra_image, extra_text = random_pairs(rng, 1, DIM)
    miner.upsert(np.array([1000], dtype=np.uint64), extra_image, extra_text, 2)  # takes a hole
    rows[1000] = (extra_image[0], extra_text[0])
    return miner, rows


@pytest.mark.parametrize("topk", ["heap", "torch"])
@pytest.mark.parametrize("scoring", list(Scoring))
def test_exact_search_equals_the_reference(scoring, topk):
    for store_block_rows, chunk in LAYOUTS:
        miner, rows = build(store_block_rows, chunk, topk)
        layout = f"blocks of {store_block_rows}, chunks of {chunk}"
        anchors = np.array([0, 6, 1000, 3 * 35], dtype=np.uint64)
        q_image = np.stack([rows[int(a)][0] for a in anchors])
        q_text = np.stack([rows[int(a)][1] for a in anchors])
        exclude = np.array([9, 90, 7, 3], dtype=np.uint64)  # 7 was never stored, 3 is deleted
        for k in (1, 5, len(rows) + 3):
            for cut in (0.98, 2.0):
                want_ids, want_scores = reference_mine(
                    rows, q_image, q_text, k, int(scoring), cut, anchors.astype(np.int64), exclude
                )
                by_id = MineQuery(k, anchor_ids=anchors, exclude_ids=exclude, max_similarity=cut, scoring=scoring)
                by_embedding = MineQuery(
                    k, image=q_image, text=q_text, self_ids=anchors, exclude_ids=exclude, max_similarity=cut,
                    scoring=scoring,
                )  # fmt: skip
                for query in (by_id, by_embedding):
                    got = miner.mine(query)
                    where = f"{layout}, k={k}, cut={cut}, by {'id' if query is by_id else 'embedding'}"
                    np.testing.assert_array_equal(got.neighbour_ids, want_ids, err_msg=where)
                    np.testing.assert_allclose(got.scores, want_scores, rtol=1e-5, atol=1e-5, err_msg=where)


@pytest.mark.parametrize("scoring", list(Scoring))
def test_the_device_form_of_the_slot_mask_gives_the_same_answers_on_a_cpu(scoring, monkeypatch):
    """The GPU's sync-free masking of self and excluded rows, run on the CPU through the whole search."""
    monkeypatch.setattr(search, "mask_slots", functools.partial(search.mask_slots, sync_free=True))
    for store_block_rows, chunk in LAYOUTS:
        miner, rows = build(store_block_rows, chunk, "torch")
        anchors = np.array([0, 6, 1000, 3 * 35], dtype=np.uint64)
        exclude = np.array([9, 90, 7, 3], dtype=np.uint64)
        q_image = np.stack([rows[int(a)][0] for a in anchors])
        q_text = np.stack([rows[int(a)][1] for a in anchors])
        want_ids, _ = reference_mine(rows, q_image, q_text, 5, int(scoring), 0.98, anchors.astype(np.int64), exclude)
        got = miner.mine(MineQuery(5, anchor_ids=anchors, exclude_ids=exclude, max_similarity=0.98, scoring=scoring))
        np.testing.assert_array_equal(got.neighbour_ids, want_ids, err_msg=f"blocks of {store_block_rows}")


def test_both_forms_of_the_slot_mask_set_the_same_entries():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n_anchors, n_cols, first_slot = int(rng.integers(1, 9)), int(rng.integers(1, 12)), int(rng.integers(0, 30))
        self_slots = rng.integers(-1, 45, n_anchors)
        exclude = rng.integers(0, 45, int(rng.integers(0, 6)))  # repeats and out-of-range slots included
        query = search.SearchQuery(
            torch.zeros(n_anchors, 2), torch.zeros(n_anchors, 2), 3, Scoring.PRODUCT, 2.0,
            torch.from_numpy(self_slots), torch.from_numpy(exclude),
        )  # fmt: skip
        scores = torch.from_numpy(rng.standard_normal((n_anchors, n_cols)).astype(np.float32))
        indexed, sync_free = scores.clone(), scores.clone()
        search.mask_slots(indexed, query, first_slot, sync_free=False)
        search.mask_slots(sync_free, query, first_slot, sync_free=True)
        torch.testing.assert_close(sync_free, indexed, msg=f"trial {trial}")
        assert (indexed == search.NEG_INF).any() or not (
            np.isin(exclude, np.arange(first_slot, first_slot + n_cols)).any()
            or np.isin(self_slots, np.arange(first_slot, first_slot + n_cols)).any()
        )


@pytest.mark.parametrize("segment", [1, 2, 4, 16])
def test_the_segmented_top_k_equals_the_plain_one(segment):
    rng = np.random.default_rng(segment)
    for cols in (1, 3, 4, 16, 48, 64):
        for k in (1, 3, 5):
            plain, segmented = search.TorchTopK(6, k, "cpu"), search.TorchTopK(6, k, "cpu", segment=segment)
            for first in range(0, 3 * cols, cols):  # three blocks, running top-k across them
                scores = torch.from_numpy(rng.standard_normal((6, cols)).astype(np.float32))
                scores[0, : cols // 2] = search.NEG_INF  # filtered candidates stay out
                slots = torch.arange(first, first + cols, dtype=torch.int64)
                plain.add(scores, slots)
                segmented.add(scores.clone(), slots)
            for want, got in zip(plain.result(), segmented.result()):
                torch.testing.assert_close(got, want, msg=f"{cols} columns, k={k}")


def test_a_segmented_miner_answers_like_the_reference():
    for store_block_rows, chunk in LAYOUTS:
        rng = np.random.default_rng(7)
        miner = HardPairMiner(
            DIM,
            SearchConfig(
                device="cpu", store_block_rows=store_block_rows, block_rows=chunk, topk="torch", topk_segment=2
            ),
        )
        image, text = random_pairs(rng, 37, DIM)
        ids = np.arange(37, dtype=np.uint64)
        miner.upsert(ids, image, text, 1)
        rows = {int(i): (image[j], text[j]) for j, i in enumerate(ids)}
        anchors = np.array([0, 5, 36], dtype=np.uint64)
        want, _ = reference_mine(rows, image[[0, 5, 36]], text[[0, 5, 36]], 4, 1, 0.98, anchors.astype(np.int64), [])
        got = miner.mine(MineQuery(4, anchor_ids=anchors))
        np.testing.assert_array_equal(got.neighbour_ids, want, err_msg=f"blocks of {store_block_rows}, chunks {chunk}")
