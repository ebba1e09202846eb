"""The false-negative guard is exact: every path answers as the numpy reference applies the guard to every row.

Random data through the candidate list (most anchors) and the guarded re-search (anchors the list leaves short),
both top-k implementations, anchors by id and by embedding, holes; adversarial data: ties at the ratio (kept out,
as `>=` says), negative similarities, every candidate dropped; the IVF path; the count of what was dropped.
"""

from __future__ import annotations

import numpy as np
import pytest

from helip.miner_service.core import guard
from helip.miner_service.core.api import MineQuery
from helip.miner_service.core.config import IvfConfig, SearchConfig
from helip.miner_service.core.miner import HardPairMiner
from helip.miner_service.core.search import Scoring
from tests.reference import random_pairs, reference_mine

DIM = 8
OFF = 2.0  # no near-duplicate cut: the guard alone decides


def store(rng, n: int, config: SearchConfig, dim: int = DIM):
    miner = HardPairMiner(dim, config)
    image, text = random_pairs(rng, n, dim)
    ids = np.arange(n, dtype=np.uint64) * 7 + 1
    miner.upsert(ids, image, text, 1)
    rows = {int(i): (image[j], text[j]) for j, i in enumerate(ids)}
    gone = ids[5:12]
    miner.delete(gone)
    for i in gone:
        del rows[int(i)]
    return miner, rows


def check(miner, rows, anchors, k, ratio, scoring=Scoring.PRODUCT, cut=OFF, by="id"):
    q_image = np.stack([rows[int(a)][0] for a in anchors])
    q_text = np.stack([rows[int(a)][1] for a in anchors])
    want, want_scores = reference_mine(
        rows, q_image, q_text, k, int(scoring), cut, anchors.astype(np.int64), positive_ratio=ratio
    )
    if by == "id":
        query = MineQuery(k, anchor_ids=anchors, max_similarity=cut, scoring=scoring, positive_ratio=ratio)
    else:
        query = MineQuery(
            k, image=q_image, text=q_text, self_ids=anchors, max_similarity=cut, scoring=scoring,
            positive_ratio=ratio,
        )  # fmt: skip
    got = miner.mine(query)
    where = f"k={k} ratio={ratio} scoring={scoring.name} by {by}"
    np.testing.assert_array_equal(got.neighbour_ids, want, err_msg=where)
    np.testing.assert_allclose(got.scores, want_scores, rtol=1e-5, atol=1e-5, err_msg=where)
    return got


@pytest.mark.parametrize("topk", ["heap", "torch"])
@pytest.mark.parametrize("scoring", list(Scoring))
def test_random_data_every_ratio_both_anchor_kinds(topk, scoring):
    rng = np.random.default_rng(3)
    miner, rows = store(rng, 120, SearchConfig(device="cpu", store_block_rows=16, block_rows=10, topk=topk))
    anchors = np.array(sorted(rows)[::9], dtype=np.uint64)
    for ratio in (0.95, 0.9, 0.8, 0.5, 0.1):  # 0.1 drops most of the list: the guarded re-search answers
        for k in (1, 6, 40, len(rows) + 5):
            for by in ("id", "embedding"):
                check(miner, rows, anchors, k, ratio, scoring, by=by)


def test_with_the_near_duplicate_cut_and_excluded_ids():
    rng = np.random.default_rng(4)
    miner, rows = store(rng, 80, SearchConfig(device="cpu"))
    anchors = np.array(sorted(rows)[:5], dtype=np.uint64)
    q_image = np.stack([rows[int(a)][0] for a in anchors])
    q_text = np.stack([rows[int(a)][1] for a in anchors])
    exclude = np.array(sorted(rows)[10:20], dtype=np.uint64)
    want, _ = reference_mine(rows, q_image, q_text, 5, 1, 0.6, anchors.astype(np.int64), exclude, positive_ratio=0.7)
    got = miner.mine(MineQuery(5, anchor_ids=anchors, exclude_ids=exclude, max_similarity=0.6, positive_ratio=0.7))
    np.testing.assert_array_equal(got.neighbour_ids, want)


def exact_rows(pairs: dict[int, tuple[list, list]]):
    """Rows whose products are exact in float32 (halves and quarters), so ties at the ratio are real ties."""
    miner = HardPairMiner(2, SearchConfig(device="cpu", store_block_rows=4, block_rows=3))
    ids = np.array(sorted(pairs), dtype=np.uint64)
    image = np.array([pairs[int(i)][0] for i in ids], dtype=np.float32)
    text = np.array([pairs[int(i)][1] for i in ids], dtype=np.float32)
    miner.upsert(ids, image, text, 1)
    return miner, {int(i): (image[j], text[j]) for j, i in enumerate(ids)}


def test_a_tie_at_the_ratio_is_dropped_and_a_hair_below_is_kept():
    # Anchor 1: image (1, 0), text (1, 0), positive 1. At ratio 0.5 the bound is exactly 0.5.
    miner, rows = exact_rows(
        {
            1: ([1, 0], [1, 0]),
            2: ([0, 1], [0.5, 0.5]),  # <image_1, text_2> = 0.5: the tie, dropped
            3: ([0.25, 0.5], [0.25, 0.5]),  # both cross terms 0.25: kept
            4: ([0.5, 0.5], [0, 1]),  # <text_1, image_4> = 0.5: the mirror tie, dropped
            5: ([0.375, 0.25], [0.375, 0.25]),  # 0.375 < 0.5: kept
        }
    )
    got = check(miner, rows, np.array([1], dtype=np.uint64), 4, 0.5, Scoring.SUM)
    assert set(got.neighbour_ids[0][got.neighbour_ids[0] >= 0]) == {3, 5}


def test_negative_similarities():
    # Anchor 1's own pair disagrees (positive -0.5): the bound ratio x positive is negative, so only candidates
    # whose cross terms are below it survive.
    miner, rows = exact_rows(
        {
            1: ([1, 0], [-0.5, 0]),
            2: ([-1, 0], [-1, 0]),  # <image_1, text_2> = -1, <text_1, image_2> = 0.5: dropped by the mirror
            3: ([0.75, 0], [-1, 0]),  # -1 and -0.375, below the bound -0.25: kept
            4: ([0, 1], [0, 1]),  # 0 and 0: dropped
            5: ([0.5, 0], [-1, 0]),  # -1 and -0.25, a tie at the bound: dropped
            6: ([0.875, 0], [-0.5, 0]),  # -0.5 and -0.4375: kept
        }
    )
    for scoring in Scoring:
        got = check(miner, rows, np.array([1], dtype=np.uint64), 4, 0.5, scoring)
        assert set(got.neighbour_ids[0][got.neighbour_ids[0] >= 0]) == {3, 6}


def test_every_candidate_dropped_gives_padding():
    rng = np.random.default_rng(5)
    miner, rows = store(rng, 60, SearchConfig(device="cpu", block_rows=7))
    image, text = rows[1]
    # An anchor given by embedding whose own pair scores 1e-6: every row with any positive cross term goes.
    anchor_image = image.copy()
    anchor_text = (image * 1e-6).astype(np.float32)
    mined = miner.mine(MineQuery(5, image=anchor_image[None], text=anchor_text[None], positive_ratio=1.0))
    want, _ = reference_mine(rows, anchor_image[None], anchor_text[None], 5, 1, 0.98, positive_ratio=1.0)
    np.testing.assert_array_equal(mined.neighbour_ids, want)


def test_the_ivf_path_applies_the_guard_too():
    rng = np.random.default_rng(6)
    # Every list probed and every row a candidate: the IVF's answer is the exact one, guard included.
    config = SearchConfig(device="cpu", ivf=IvfConfig(min_rows=300, nprobe=4096, candidates_per_k=400))
    miner, rows = store(rng, 400, config)
    assert miner.wait_for_ivf(60)
    anchors = np.array(sorted(rows)[::40], dtype=np.uint64)
    for ratio in (0.9, 0.3):
        got = check(miner, rows, anchors, 8, ratio)
        assert got.used_ivf


def test_the_count_is_what_the_guard_took_from_the_answer():
    rng = np.random.default_rng(8)
    miner, rows = store(rng, 100, SearchConfig(device="cpu"))
    anchors = np.array(sorted(rows)[:6], dtype=np.uint64)
    q_image = np.stack([rows[int(a)][0] for a in anchors])
    q_text = np.stack([rows[int(a)][1] for a in anchors])
    k, ratio = 5, 0.8
    everything, _ = reference_mine(rows, q_image, q_text, len(rows), 1, OFF, anchors.astype(np.int64))
    guarded, _ = reference_mine(rows, q_image, q_text, k, 1, OFF, anchors.astype(np.int64), positive_ratio=ratio)
    # Dropped ahead of the last neighbour returned: the unguarded ranks up to it, minus the k returned.
    expected = sum(int(np.flatnonzero(everything[a] == guarded[a][-1])[0]) + 1 - k for a in range(len(anchors)))
    got = miner.mine(MineQuery(k, anchor_ids=anchors, max_similarity=OFF, positive_ratio=ratio))
    assert expected > 0 and got.guard_dropped == expected
    assert miner.mine(MineQuery(k, anchor_ids=anchors, max_similarity=OFF)).guard_dropped == 0


def test_list_length_and_keep_first():
    assert guard.list_length(16, 10**6) == 48 and guard.list_length(16, 20) == 20 and guard.list_length(16, 3) == 16
    ids = np.array([[4, 5, 6, 7, -1], [8, 9, -1, -1, -1]])
    keep = np.array([[False, True, False, True, False], [False, False, False, False, False]])
    scores = np.arange(10, dtype=np.float32).reshape(2, 5)
    kept = guard.keep_first(ids, scores, np.ones((2, 5), np.uint64), keep, 2, np.array([False, True]))
    assert kept.ids.tolist() == [[5, 7], [-1, -1]] and kept.dropped.tolist() == [2, 2]
    assert kept.short.tolist() == [False, False]  # row 2 held every candidate: its empty answer is final
    kept = guard.keep_first(ids, scores, np.ones((2, 5), np.uint64), keep, 3, np.array([False, False]))
    assert kept.short.tolist() == [True, True]


def test_anchors_the_list_leaves_short_are_searched_again_with_the_guard(monkeypatch):
    rng = np.random.default_rng(3)
    miner, rows = store(rng, 120, SearchConfig(device="cpu", block_rows=10))
    searched = []
    search_once = miner._search
    monkeypatch.setattr(miner, "_search", lambda query, *a: searched.append(query) or search_once(query, *a))
    anchors = np.array(sorted(rows)[::9], dtype=np.uint64)
    check(miner, rows, anchors, 40, 0.1)
    first, *again = searched
    assert first.k == guard.list_length(40, len(rows)) and not first.positive_ratio
    assert again and all(q.k == 40 and q.positive_ratio == 0.1 and len(q.image) < len(anchors) for q in again)


def test_drops_on_cross_terms_is_the_test_of_survivors():
    # helip-inspect holds the cross terms, not the rows: guard.drops must decide as survivors does, ties included.
    import torch

    rng = np.random.default_rng(9)
    image, text = random_pairs(rng, 40, DIM)
    q_image, q_text = torch.from_numpy(image[:6]), torch.from_numpy(text[:6])
    image_c = torch.from_numpy(image[6:]).expand(6, -1, -1).contiguous()
    text_c = torch.from_numpy(text[6:]).expand(6, -1, -1).contiguous()
    image_text = torch.bmm(text_c, q_image.unsqueeze(2)).squeeze(2).numpy()
    text_image = torch.bmm(image_c, q_text.unsqueeze(2)).squeeze(2).numpy()
    positive = guard.positives(q_image, q_text)
    # Anchors whose bound the cross term meets exactly: candidate 0's caption term is made the bound itself.
    for ratio in (0.95, 0.9, 0.8, 0.5, 0.1, 1.0):
        bound = (positive * ratio).numpy()
        tied = image_text.copy()
        tied[:, 0] = bound
        want = ~guard.survivors(image_c, text_c, q_image, q_text, positive * ratio).numpy()
        np.testing.assert_array_equal(guard.drops(image_text, text_image, positive.numpy(), ratio), want)
        assert guard.drops(tied, text_image, positive.numpy(), ratio)[:, 0].all()
        assert not guard.drops(np.nextafter(tied, -np.inf), text_image - 2, positive.numpy(), ratio)[:, 0].any()
