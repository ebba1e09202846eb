"""The fused Triton Mine kernel (core.fused) answers as the torch path does, run on the CPU by Triton's interpreter.

Small shapes (the interpreter runs a program in numpy: seconds a Mine), chosen to cross every edge: two anchor
groups (37 anchors, BLOCK_A 32), a dimension that is not a multiple of BLOCK_D, rows that end mid-tile, holes,
own rows, shared and per-Mine (merged) exclusions, the near-duplicate cut, every scoring, negative similarities,
everything filtered, k past the rows left, the largest k the kernel takes, clustered rows with exact ties (against
the numpy reference); and what it leaves to the torch path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helip.miner_service.core.api import MineQuery
from helip.miner_service.core.config import SearchConfig
from helip.miner_service.core.miner import HardPairMiner
from helip.miner_service.core.search import Scoring, SearchQuery
from tests.reference import clustered_pairs, random_pairs, reference_mine

fused = pytest.importorskip("helip.miner_service.core.fused")
# tests/conftest.py turns the interpreter on where no CUDA device is visible; on a GPU machine tests/gpu runs the
# compiled kernel instead.
pytestmark = pytest.mark.skipif(not fused.interpreted(), reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py)")

DIM = 24


def pair_of_miners(image, text, ids, **search):
    """The same rows in a torch-path miner and a fused-kernel miner."""
    miners = []
    for kernel in ("torch", "triton"):
        miner = HardPairMiner(image.shape[1], SearchConfig(device="cpu", kernel=kernel, **search))
        miner.upsert(ids, image, text, np.arange(len(ids)) % 5 + 1)
        miners.append(miner)
    return miners


def assert_same(torch_path, kernel, where: str) -> None:
    np.testing.assert_array_equal(kernel.neighbour_ids, torch_path.neighbour_ids, err_msg=where)
    np.testing.assert_allclose(kernel.scores, torch_path.scores, rtol=1e-5, atol=1e-6, err_msg=where)
    np.testing.assert_array_equal(kernel.neighbour_steps, torch_path.neighbour_steps, err_msg=where)


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(11)
    image, text = random_pairs(rng, 150, DIM)
    return image, text, np.arange(150, dtype=np.uint64) * 2 + 3


@pytest.fixture(scope="module")
def miners(rows):
    image, text, ids = rows
    # Two store blocks of 128 rows, searched 100 rows at a time: chunks end mid-tile and mid-block.
    plain, kernel = pair_of_miners(image, text, ids, store_block_rows=128, block_rows=100)
    for miner in (plain, kernel):
        miner.delete(ids[40:47])  # holes
    return plain, kernel


@pytest.mark.parametrize(
    "scoring, cut",
    [(Scoring.PRODUCT, 0.6), (Scoring.SUM, 2.0), (Scoring.IMAGE, 2.0), (Scoring.TEXT, 0.5)],
)
def test_every_scoring_with_its_filters_equals_the_torch_path(rows, miners, scoring, cut):
    _, _, ids = rows
    query = MineQuery(6, anchor_ids=ids[::4], exclude_ids=ids[60:90:2], max_similarity=cut, scoring=scoring)
    assert query.n_anchors == 38  # two anchor groups
    plain, kernel = miners
    assert_same(plain.mine(query), kernel.mine(query), f"{scoring.name} cut {cut}")


def test_anchors_by_embedding_with_and_without_own_ids(rows, miners):
    image, text, ids = rows
    plain, kernel = miners
    for query in (
        MineQuery(5, image=image[:9], text=text[:9], self_ids=ids[:9]),
        MineQuery(5, image=-image[:9], text=text[:9] * 0.5),  # negative similarities rank the far rows
    ):
        assert_same(plain.mine(query), kernel.mine(query), "by embedding")


def test_merged_mines_keep_their_own_exclusions(rows, miners):
    _, _, ids = rows
    plain, kernel = miners
    queries = [
        MineQuery(4, anchor_ids=ids[0:5], exclude_ids=ids[5:80]),
        MineQuery(7, anchor_ids=ids[5:9], exclude_ids=ids[0:5]),
        MineQuery(3, anchor_ids=ids[100:103]),
    ]
    for i, (want, got) in enumerate(zip(plain.mine_many(queries), kernel.mine_many(queries))):
        assert_same(want, got, f"Mine {i} of the pass")
        assert got.pass_mines == 3


def test_everything_filtered_and_k_past_the_rows_left_give_padding():
    rng = np.random.default_rng(2)
    image, text = random_pairs(rng, 20, DIM)
    ids = np.arange(20, dtype=np.uint64)
    plain, kernel = pair_of_miners(image, text, ids)
    everything = MineQuery(4, anchor_ids=ids[:3], exclude_ids=ids)
    got = kernel.mine(everything)
    assert (got.neighbour_ids == -1).all() and np.isneginf(got.scores).all()
    past = MineQuery(30, anchor_ids=ids[:3], exclude_ids=ids[3:10])  # 12 rows left for each anchor
    want, got = plain.mine(past), kernel.mine(past)
    assert_same(want, got, "k past the rows")
    assert ((got.neighbour_ids >= 0).sum(axis=1) == 12).all()


def test_the_largest_k_the_kernel_takes(rows, miners):
    _, _, ids = rows
    plain, kernel = miners
    query = MineQuery(fused.MAX_K, anchor_ids=ids[:3], exclude_ids=ids[3:20])
    assert fused.supports(kernel._resolve(query).search, kernel.device)
    assert_same(plain.mine(query), kernel.mine(query), "k = MAX_K")


def test_half_precision_rows_agree_within_rounding():
    rng = np.random.default_rng(5)
    image, text = random_pairs(rng, 90, DIM)
    ids = np.arange(90, dtype=np.uint64)
    plain, kernel = pair_of_miners(image, text, ids, storage_dtype="float16")
    query = MineQuery(5, anchor_ids=ids[:6], exclude_ids=ids[10:20])
    want, got = plain.mine(query), kernel.mine(query)
    np.testing.assert_allclose(got.scores, want.scores, atol=2e-3)
    # Where fp16 rounding could swap two neighbours, their scores are within it; elsewhere the ids agree.
    clear = np.abs(np.diff(want.scores, axis=1, append=-np.inf)) > 4e-3
    assert (got.neighbour_ids[clear] == want.neighbour_ids[clear]).all()


def test_what_the_kernel_leaves_to_the_torch_path(rows, miners):
    _, _, ids = rows
    plain, kernel = miners
    search = kernel._resolve(MineQuery(4, anchor_ids=ids[:3], positive_ratio=0.5)).search
    assert not fused.supports(search, kernel.device)  # the guard's cross terms
    assert not fused.supports(search.without_guard().with_k(fused.MAX_K + 1), kernel.device)
    big = MineQuery(fused.MAX_K + 1, anchor_ids=ids[:2])
    assert_same(plain.mine(big), kernel.mine(big), "k past MAX_K: the torch path")
    many = SearchQuery.merge([search.without_guard()] * (fused.MAX_MINES + 1))
    assert not fused.supports(many, kernel.device)  # more Mines than row_bits has bits


def test_row_bits_or_the_mines_that_exclude_a_row():
    def query(excluded):
        return SearchQuery(
            torch.zeros(1, 4), torch.zeros(1, 4), 2, Scoring.PRODUCT, 2.0, torch.tensor([-1]),
            torch.tensor(excluded, dtype=torch.int64),
        )  # fmt: skip

    merged = SearchQuery.merge([query([11, 12, 12]), query([12, 14]), query([])])
    bits = fused.row_bits(merged, 10, 5, live=torch.tensor([True, True, True, False, True]))
    assert bits.tolist() == [0, 0b01, 0b11, -1, 0b10]
    assert fused.anchor_bits(merged).tolist() == [1, 2, 4]
    shared = fused.row_bits(query([10, 13]), 10, 5, live=None)
    assert shared.tolist() == [-1, 0, 0, -1, 0] and fused.anchor_bits(query([])).tolist() == [-1]


def test_the_kernel_needs_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="search.kernel 'triton' needs a CUDA device"):
        HardPairMiner(8, SearchConfig(device="cpu", kernel="triton"))
    with pytest.raises(ValueError, match="search.kernel must be one of"):
        SearchConfig(kernel="cuda")


def same_up_to_ties(got_ids, got_scores, all_ids, all_scores, where: str) -> None:
    """The top k (got) of a ranking of every row (all): the same scores, and at each score ids tied there."""
    k = got_ids.shape[1]
    np.testing.assert_allclose(got_scores, all_scores[:, :k], rtol=1e-5, atol=1e-6, err_msg=where)
    for a in range(len(got_ids)):
        for j in np.flatnonzero(got_ids[a] >= 0):
            tied = all_ids[a][np.isclose(all_scores[a], got_scores[a][j], atol=1e-6)]
            assert got_ids[a][j] in tied, f"{where}, anchor {a}: {got_ids[a][j]} is not among {tied}"
        assert len(set(got_ids[a].tolist())) == k, f"{where}, anchor {a}: an id twice"


def test_clustered_rows_with_exact_ties_equal_the_reference():
    # Five tight clusters (every anchor's nearest are its cluster's), each row stored twice under two ids: ties.
    rng = np.random.default_rng(9)
    image, text = clustered_pairs(rng, 40, DIM, clusters=5, spread=0.05, text_noise=0.05)
    image, text = np.concatenate([image, image]), np.concatenate([text, text])
    ids = np.arange(80, dtype=np.uint64)
    kernel = HardPairMiner(DIM, SearchConfig(device="cpu", kernel="triton"))
    kernel.upsert(ids, image, text, 1)
    rows = {int(i): (image[i], text[i]) for i in ids}
    anchors = ids[::7]
    for scoring in (Scoring.PRODUCT, Scoring.SUM):
        got = kernel.mine(MineQuery(9, anchor_ids=anchors, exclude_ids=ids[70:], max_similarity=2.0, scoring=scoring))
        kept = {i: rows[i] for i in rows if i < 70}
        all_ids, all_scores = reference_mine(
            kept, image[anchors.astype(int)], text[anchors.astype(int)], 80, int(scoring), 2.0, anchors.astype(np.int64)
        )
        same_up_to_ties(got.neighbour_ids, got.scores, all_ids, all_scores, scoring.name)
