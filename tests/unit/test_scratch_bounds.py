"""Scratch memory stays within mine_scratch_bytes on every path of a Mine, and admission covers it."""

import dataclasses

import numpy as np
import pytest

from helip.miner_service.core.api import MineQuery
from helip.miner_service.core.config import IvfConfig, SearchConfig
from helip.miner_service.core.miner import HardPairMiner
from helip.miner_service.core.search import SearchCancelled
from tests.reference import random_pairs

DIM, ROW_BYTES = 16, 2 * 16 * 4  # an fp32 pair: image and text


class GatherSizes:
    """Records how many rows each store.gather copies, then does the real gather."""

    def __init__(self, store):
        self.rows, self._gather = [], store.gather
        store.gather = self

    def __call__(self, slots, *args, **kwargs):
        self.rows.append(len(slots))
        return self._gather(slots, *args, **kwargs)


def test_the_ivf_paths_fresh_rows_are_copied_a_budgets_worth_at_a_time():
    rng = np.random.default_rng(21)
    budget = 25_000  # 80 candidates x (128 + 10) bytes = 11,040 an anchor; 181 fresh rows at 138 bytes
    config = SearchConfig(
        device="cpu",
        mine_scratch_bytes=budget,
        scratch_budget_bytes=1 << 20,
        ivf=IvfConfig(min_rows=2000, nprobe=8, rebuild_fraction=0.5),
    )
    miner = HardPairMiner(DIM, config)
    image, text = random_pairs(rng, 3000, DIM)
    miner.upsert(np.arange(3000, dtype=np.uint64), image, text, 1)
    assert miner.wait_for_ivf(60)
    fresh_image, fresh_text = random_pairs(rng, 600, DIM)  # searched exactly until a rebuild (none: 600 < 1500)
    miner.upsert(np.arange(3000, 3600, dtype=np.uint64), fresh_image, fresh_text, 2)
    assert len(miner.ivf.current().fresh_ids) == 600
    query = MineQuery(10, anchor_ids=np.array([5], dtype=np.uint64), max_similarity=2.0)
    _set_config(miner, dataclasses.replace(config, mine_scratch_bytes=1 << 30, scratch_budget_bytes=1 << 30))
    roomy = miner.mine(query)  # everything in one chunk
    _set_config(miner, config)

    sizes = GatherSizes(miner.store)
    result = miner.mine(query)
    assert result.used_ivf and roomy.used_ivf
    assert max(sizes.rows) * ROW_BYTES <= budget, f"gathered {max(sizes.rows)} rows at once"
    assert sum(sizes.rows) >= 600  # every fresh row was still searched
    rows_at_once = miner.chunk_rows(1)
    fresh_chunk = miner.ivf.fresh_rows_at_once(1, rows_at_once) * (ROW_BYTES + 10)
    assert fresh_chunk <= budget
    assert miner.scratch_bytes(1, rows_at_once, 10) >= fresh_chunk  # admitted for what it uses
    np.testing.assert_array_equal(result.neighbour_ids, roomy.neighbour_ids)
    np.testing.assert_allclose(result.scores, roomy.scores, rtol=1e-6)


def _set_config(miner, config):
    miner.config = miner.ivf.config = config


@pytest.mark.parametrize("path", ["exact", "ivf"])
def test_a_mine_whose_caller_left_stops_and_gives_its_scratch_back(path):
    rng = np.random.default_rng(22)
    ivf = IvfConfig(min_rows=2000, nprobe=8, rebuild_fraction=0.5) if path == "ivf" else IvfConfig(min_rows=0)
    # 10,000 bytes: one anchor a group on the IVF path, 1,000 rows a chunk for one anchor on the exact path.
    config = SearchConfig(device="cpu", mine_scratch_bytes=10_000, scratch_budget_bytes=10_000, ivf=ivf)
    miner = HardPairMiner(DIM, config)
    image, text = random_pairs(rng, 3000, DIM)
    miner.upsert(np.arange(3000, dtype=np.uint64), image, text, 1)
    if path == "ivf":
        assert miner.wait_for_ivf(60)
        miner.upsert(np.arange(3000, 3600, dtype=np.uint64), *random_pairs(rng, 600, DIM), 2)  # fresh rows
    asked, in_use_while_asked = [], []

    def leaves_at_the_third_question():
        asked.append(1)
        in_use_while_asked.append(miner.admission.in_use_bytes)
        return len(asked) >= 3

    anchors = np.arange(0, 12, dtype=np.uint64) if path == "ivf" else np.array([7], dtype=np.uint64)
    with pytest.raises(SearchCancelled):
        miner.mine(MineQuery(10, anchor_ids=anchors), cancelled=leaves_at_the_third_question)
    assert len(asked) == 3 and in_use_while_asked[-1] > 0  # stopped mid-search, holding scratch
    assert (miner.admission.in_use_bytes, miner.admission.waiting) == (0, 0)
    # The budget is whole again: a Mine asking for all of it is admitted at once.
    assert miner.mine(MineQuery(10, anchor_ids=anchors)).used_ivf == (path == "ivf")
