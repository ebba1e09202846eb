"""The exact search equals the numpy reference in the quiescent case, whatever the block and chunk sizes.

Stores whose size is not a multiple of the block, holes from deletes (a whole block among them), a re-used hole,
k past the number of rows, anchors by id and by embedding, excluded ids (stored or not), every scoring, with and
without the near-duplicate cut, and both running top-k implementations.
"""

import numpy as np
import pytest

from miner_service.config import SearchConfig
from miner_service.core_api import MineQuery
from miner_service.miner import HardPairMiner
from miner_service.search import Scoring
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
