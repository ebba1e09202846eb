"""The streaming mode's schedule: mining starts at start_step and at a coverage of the index, then ramps in."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from helip.trainer.pairs.composer import compose_batch
from helip.trainer.pairs.hard_pairs import HardPairSampler
from helip.trainer.pairs.mining import MiningConfig
from helip.trainer.pairs.session import MiningSession
from helip.trainer.pairs.streaming import CoverageWatch, ramp_share
from tests.unit.test_hard_pairs import CONFIG, N, ScriptedMiner


class GrowingMiner(ScriptedMiner):
    """The scripted miner, with a row count that a test sets (what Stats reports)."""

    def __init__(self, rows: int = 0):
        super().__init__()
        self.rows = rows

    def size(self, timeout_s=None):
        return self.rows


def test_ramp_share_grows_linearly_from_the_first_mined_step():
    assert ramp_share(5, None, 10) == 0.0
    assert ramp_share(4, 5, 10) == 0.0
    assert [ramp_share(s, 5, 4) for s in range(5, 10)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert ramp_share(5, 5, 0) == 1.0


def test_compose_batch_leaves_slots_past_max_mined_plain_not_fallback():
    anchors = np.arange(8)
    neighbours = (anchors + 100)[:, None]
    batch = compose_batch(anchors, neighbours, 16, 1000, np.random.default_rng(0), max_mined=3)
    assert (batch.n_hard, batch.n_fallback, batch.n_plain) == (3, 0, 5)
    assert len(set(batch.ids.tolist())) == 16
    # No answer while mining was meant to fill 3 slots: those 3 are fallbacks, the rest plain.
    batch = compose_batch(anchors, None, 16, 1000, np.random.default_rng(0), max_mined=3)
    assert (batch.n_hard, batch.n_fallback, batch.n_plain) == (0, 3, 5)
    batch = compose_batch(anchors, neighbours, 16, 1000, np.random.default_rng(0))
    assert (batch.n_hard, batch.n_fallback, batch.n_plain) == (8, 0, 0)


def test_no_mine_before_start_step_then_hard_pairs_ramp_in():
    miner = GrowingMiner(rows=N)
    config = dataclasses.replace(CONFIG, start_step=6, ramp_steps=4)
    sampler = HardPairSampler(N, 16, MiningSession(config, client=miner), steps=14, seed=1)
    layouts = []
    for ids in sampler:
        time.sleep(0.02)  # the training step: lets the answers in
        layouts.append(sampler.layout(ids))
    sampler.close()
    assert sorted(miner.calls[0]) == sorted(sampler.anchors.anchors(6).tolist())  # the first Mine: step 6's
    assert len(miner.calls) == 14 - 6
    assert [layout.n_hard for layout in layouts[:6]] == [0] * 6
    assert [layout.n_plain for layout in layouts[:6]] == [8] * 6
    assert [layout.n_hard for layout in layouts[6:11]] == [2, 4, 6, 8, 8]
    assert sampler.counters.snapshot()["mine_not_started"] == 6


def test_mining_waits_for_the_index_to_cover_the_data_set():
    miner = GrowingMiner(rows=0)
    config = dataclasses.replace(CONFIG, start_coverage=0.5, coverage_poll_s=0.01)
    sampler = HardPairSampler(N, 16, MiningSession(config, client=miner), steps=400, seed=1)
    hard = []
    for step, ids in enumerate(sampler):
        if step == 20:
            miner.rows = N // 2  # half the data set pushed: coverage reached
        time.sleep(0.005)
        hard.append(sampler.layout(ids).n_hard)
        if step > 60 and hard[-1] == 8:
            break
    sampler.close()
    assert hard[:20] == [0] * 20 and hard[-1] == 8
    assert sampler.coverage.reached.is_set() and sampler.coverage.seen_rows == N // 2


def test_coverage_watch_keeps_polling_through_failures():
    answers = iter([RuntimeError("down"), 3, 10])

    def rows():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    watch = CoverageWatch(rows, needed=10, poll_s=0.01).start()
    assert watch.reached.wait(5)
    watch.close()
    assert watch.seen_rows == 10
    assert CoverageWatch(rows, needed=0).reached.is_set()  # nothing needed: reached at once, no thread


@pytest.mark.parametrize(
    ("field", "value"), [("start_step", -1), ("ramp_steps", -1), ("start_coverage", 1.5), ("coverage_poll_s", 0)]
)
def test_streaming_settings_are_validated(field, value):
    with pytest.raises(ValueError, match=f"mining.{field}"):
        MiningConfig(**{field: value})
