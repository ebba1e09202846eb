import numpy as np
import pytest

from helip.miner_service.core.api import MineQuery
from helip.miner_service.core.config import IVF_CODECS, IvfConfig, SearchConfig
from helip.miner_service.core.errors import NotFound, ResourceExhausted
from helip.miner_service.core.miner import HardPairMiner
from helip.miner_service.core.search import Scoring
from tests.reference import clustered_pairs, random_pairs, reference_mine

DIM = 16


def make_miner(block_rows=37, topk="auto", **kw):
    return HardPairMiner(DIM, SearchConfig(device="cpu", block_rows=block_rows, topk=topk), **kw)


def fill(miner, rng, n, first_id=0, step=1):
    image, text = random_pairs(rng, n, DIM)
    ids = np.arange(first_id, first_id + n, dtype=np.uint64)
    miner.upsert(ids, image, text, step)
    return {int(i): (image[j], text[j]) for j, i in enumerate(ids)}


@pytest.mark.parametrize("topk", ["heap", "torch"])  # torch: the GPU path's selection, run on the CPU
@pytest.mark.parametrize("scoring", list(Scoring))
def test_mine_by_id_matches_reference(scoring, topk):
    rng = np.random.default_rng(1)
    miner = make_miner(topk=topk)
    rows = fill(miner, rng, 200)
    anchors = np.array([3, 50, 199, 0], dtype=np.uint64)
    exclude = [7, 8, 9, 120]
    result = miner.mine(
        MineQuery(5, anchor_ids=anchors, exclude_ids=np.array(exclude, dtype=np.uint64), scoring=scoring)
    )
    q_image = np.stack([rows[int(a)][0] for a in anchors])
    q_text = np.stack([rows[int(a)][1] for a in anchors])
    ref_ids, ref_scores = reference_mine(
        rows, q_image, q_text, 5, int(scoring), 0.98, anchors.astype(np.int64), exclude
    )
    np.testing.assert_array_equal(result.neighbour_ids, ref_ids)
    np.testing.assert_allclose(result.scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert (result.neighbour_steps == 1).all()


def test_mine_by_embedding_and_near_duplicate_cut():
    rng = np.random.default_rng(2)
    miner = make_miner()
    rows = fill(miner, rng, 100)
    # The anchor is a stored row: without an id it is only removed by the near-duplicate cut.
    q_image, q_text = rows[10][0][None], rows[10][1][None]
    result = miner.mine(MineQuery(3, image=q_image, text=q_text))
    assert 10 not in result.neighbour_ids
    no_cut = miner.mine(MineQuery(3, image=q_image, text=q_text, max_similarity=1.5))
    assert no_cut.neighbour_ids[0, 0] == 10
    ref_ids, _ = reference_mine(rows, q_image, q_text, 3, 1, 0.98)
    np.testing.assert_array_equal(result.neighbour_ids, ref_ids)


def test_overwrite_delete_and_padding():
    rng = np.random.default_rng(3)
    miner = make_miner()
    rows = fill(miner, rng, 10)
    image, text = random_pairs(rng, 2, DIM)
    miner.upsert(np.array([4, 42], dtype=np.uint64), image, text, step=7)
    rows[4], rows[42] = (image[0], text[0]), (image[1], text[1])
    assert miner.size == 11
    deleted, size = miner.delete(np.array([0, 5, 999], dtype=np.uint64))
    assert (deleted, size) == (2, 9)
    del rows[0], rows[5]
    result = miner.mine(MineQuery(20, anchor_ids=np.array([42], dtype=np.uint64), max_similarity=2.0))
    ref_ids, ref_scores = reference_mine(rows, image[1:], text[1:], 20, 1, 2.0, np.array([42]))
    np.testing.assert_array_equal(result.neighbour_ids, ref_ids)
    assert (result.neighbour_ids[0, 8:] == -1).all()
    assert np.isneginf(result.scores[0, 8:]).all()
    stats = miner.stats()
    assert (stats.size, stats.min_step, stats.max_step) == (9, 1, 7)


def test_unknown_anchors_padded_or_not_found():
    rng = np.random.default_rng(4)
    miner = make_miner()
    fill(miner, rng, 20)
    result = miner.mine(MineQuery(2, anchor_ids=np.array([1, 500], dtype=np.uint64)))
    assert result.unknown_anchor_ids.tolist() == [500]
    assert (result.neighbour_ids[1] == -1).all() and (result.neighbour_ids[0] >= 0).all()
    with pytest.raises(NotFound):
        miner.mine(MineQuery(2, anchor_ids=np.array([1, 500], dtype=np.uint64), strict_anchors=True))


def test_max_rows_refuses_and_keeps_rows():
    rng = np.random.default_rng(5)
    miner = make_miner(max_rows=10)
    fill(miner, rng, 8)
    with pytest.raises(ResourceExhausted):
        fill(miner, rng, 5, first_id=100)
    assert miner.size == 8
    fill(miner, rng, 8)  # overwrites need no room
    assert miner.size == 8


def test_sparse_large_ids():
    rng = np.random.default_rng(6)
    miner = make_miner()
    image, text = random_pairs(rng, 3, DIM)
    ids = np.array([2**63 + 5, 2**40, 1], dtype=np.uint64)
    miner.upsert(ids, image, text, 1)
    result = miner.mine(MineQuery(2, anchor_ids=ids[:1], max_similarity=2))
    assert set(result.neighbour_ids[0].astype(np.uint64).tolist()) == {2**40, 1}
    miner.delete(ids[:1])
    assert miner.size == 2


@pytest.mark.parametrize("topk, codec", [("heap", "flat"), ("torch", "flat"), *(("heap", c) for c in IVF_CODECS[1:])])
def test_ivf_path_recall_and_fresh_rows(topk, codec):
    rng = np.random.default_rng(7)
    ivf = IvfConfig(min_rows=3000, nprobe=16, rebuild_fraction=0.5, codec=codec)
    config = SearchConfig(device="cpu", topk=topk, ivf=ivf)
    miner = HardPairMiner(DIM, config)
    # Real embeddings cluster (that is what an IVF exploits); i.i.d. Gaussian rows would not.
    image, text = clustered_pairs(rng, 4000, DIM, clusters=40, spread=0.3, text_noise=0.2)
    miner.upsert(np.arange(4000, dtype=np.uint64), image, text, 1)
    rows = {i: (image[i], text[i]) for i in range(4000)}
    assert miner.wait_for_ivf(60)
    fresh = fill(miner, rng, 50, first_id=10_000)  # after the snapshot: searched exactly
    rows.update(fresh)
    anchors = np.array([10_003, 5, 77, 3999], dtype=np.uint64)
    result = miner.mine(MineQuery(10, anchor_ids=anchors))
    assert result.used_ivf
    q_image = np.stack([rows[int(a)][0] for a in anchors])
    q_text = np.stack([rows[int(a)][1] for a in anchors])
    ref_ids, _ = reference_mine(rows, q_image, q_text, 10, 1, 0.98, anchors.astype(np.int64))
    recall = np.mean([len(set(r) & set(g)) / 10 for r, g in zip(result.neighbour_ids, ref_ids)])
    assert recall >= 0.8, recall
    assert (result.neighbour_ids != anchors[:, None].astype(np.int64)).all()
    # Whatever the codec, the scores returned are exact (re-ranked from the stored rows), best first.
    for a, (ids, scores) in enumerate(zip(result.neighbour_ids, result.scores)):
        exact = [(q_image[a] @ rows[int(i)][0]) * (q_text[a] @ rows[int(i)][1]) for i in ids]
        np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-5)
        assert (np.diff(scores) <= 1e-6).all()


def test_ivf_codecs_placement_and_sizes():
    from helip.miner_service.core import ivf

    assert [ivf.pq_subvectors(w) for w in (512, 1024, 1536, 64, 200, 6)] == [64, 64, 64, 8, 25, 1]
    assert ivf.factory_string(512, 1000, "pq") == "IVF1000,PQ64" and ivf.factory_string(32, 64, "sq8") == "IVF64,SQ8"
    # A CPU miner keeps its IVF on the CPU; a GPU miner on the GPU if its FAISS has GPUs, else none (exact).
    assert (ivf.placement("cpu", 0), ivf.placement("cuda", 1), ivf.placement("cuda", 0)) == ("cpu", "gpu", None)
    assert ivf.faiss_gpus() == 0  # faiss-cpu here: the GPU placement is exercised by tests/gpu
    rng = np.random.default_rng(3)
    image, text = random_pairs(rng, 2000, 128)
    ids = np.arange(2000, dtype=np.uint64)
    sizes = {c: ivf.IvfCandidates.build(image, text, ids, IvfConfig(codec=c)).code_bytes for c in IVF_CODECS}
    assert sizes == {"flat": 1024, "fp16": 512, "sq8": 256, "pq": 32}  # [x; t] is 256 wide
    with pytest.raises(ValueError, match="search.ivf.codec must be one of"):
        IvfConfig(codec="opq")


def test_search_stops_when_the_caller_is_gone():
    from helip.miner_service.core.search import SearchCancelled

    miner = make_miner(block_rows=10)
    fill(miner, np.random.default_rng(8), 100)
    asked = []

    def cancelled():
        asked.append(1)
        return len(asked) > 3  # the caller leaves while the fourth block is due

    with pytest.raises(SearchCancelled, match="after 30 of 100 rows"):
        miner.mine(MineQuery(3, anchor_ids=np.array([1], dtype=np.uint64)), cancelled=cancelled)
    assert miner.mine(MineQuery(3, anchor_ids=np.array([1], dtype=np.uint64)), cancelled=lambda: False).size == 100


def test_both_cores_implement_the_protocol_explicitly():
    from helip.miner_service.core.api import MinerCore
    from helip.miner_service.service.durable import DurableMiner

    assert isinstance(make_miner(), MinerCore)
    members = ("dim", "size", "device", "upsert", "delete", "check_capacity", "mine", "fetch", "stats")
    assert all(name in vars(DurableMiner) for name in members)  # defined, not forwarded
    assert "__getattr__" not in vars(DurableMiner)


def test_mine_query_takes_plain_lists_and_checks_its_shape():
    query = MineQuery(3, anchor_ids=[1, 2], exclude_ids=[5], scoring=2)
    assert query.anchor_ids.dtype == np.uint64 and query.exclude_ids.tolist() == [5]
    assert query.scoring == Scoring.SUM and query.n_anchors == 2
    with pytest.raises(AssertionError):
        MineQuery(3, anchor_ids=[1], image=np.zeros((1, DIM)), text=np.zeros((1, DIM)))
