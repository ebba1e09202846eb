"""HardPairSampler's own logic, with an in-process stand-in for the miner client (the real miner is exercised in
tests/integration/test_trainer_mining.py): lookahead, never waiting, layouts of delivered batches, epochs."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch

from helip.miner_service.client.single import Neighbours
from helip.trainer.pairs.hard_pairs import HardPairSampler
from helip.trainer.pairs.mining import MiningConfig
from helip.trainer.pairs.session import MiningSession


class ScriptedMiner:
    """Answers Mine with id (anchor + N/2) mod N (a fixed 'hard pair' per anchor), optionally held back or failing."""

    namespace = ""

    def __init__(self):
        self.release = threading.Event()
        self.release.set()
        self.fail = False
        self.calls = []

    def mine(self, k, anchor_ids, exclude_ids, max_similarity, scoring, timeout_s, positive_ratio=0.0):
        self.calls.append(np.asarray(anchor_ids).tolist())
        if not self.release.wait(timeout_s):
            raise _Deadline()
        if self.fail:
            raise _Deadline()
        ids = ((np.asarray(anchor_ids, dtype=np.int64) + N // 2) % N)[:, None]
        return Neighbours(ids, np.ones(ids.shape, np.float32), np.zeros(ids.shape, np.uint64), 0, np.zeros(0))

    def size(self):
        return N


class _Deadline(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self):
        return "scripted"


N = 100_000
CONFIG = MiningConfig(
    k=1, prefetch=2, deadline_s=0.5, breaker_failures=2, breaker_cooldown_s=60, breaker_max_cooldown_s=60
)


def _session(miner) -> MiningSession:
    return MiningSession(CONFIG, client=miner)


def _drain(sampler, pause_s=0.02):
    layouts = []
    for ids in sampler:
        time.sleep(pause_s)  # the training step
        layouts.append(sampler.layout(ids))
    return layouts


def test_lookahead_covers_the_loader_and_every_batch_gets_its_hard_pairs():
    miner = ScriptedMiner()
    sampler = HardPairSampler(N, 8, _session(miner), num_workers=3, prefetch_factor=2, steps=10)
    assert sampler.lookahead == 3 * 2 + 2 + 1
    iterator = iter(sampler)
    first = next(iterator)
    assert len(miner.calls) >= sampler.lookahead  # asked ahead before the first batch was handed out
    layout = sampler.layout(first)
    assert layout.n_hard == 4 and all(first[h] == (first[a] + N // 2) % N for a, h in layout.couples.tolist())
    layouts = [layout] + [sampler.layout(ids) for ids in iterator if time.sleep(0.02) is None]
    assert [lay.step for lay in layouts] == list(range(10))
    assert all(lay.n_hard == 4 for lay in layouts)


def test_a_hung_miner_never_holds_up_a_batch_and_the_breaker_stops_calls():
    miner = ScriptedMiner()
    sampler = HardPairSampler(N, 8, _session(miner), steps=40)
    miner.release.clear()  # the miner hangs (SIGSTOP): every call runs into its deadline
    started = time.monotonic()
    layouts = _drain(sampler, pause_s=0.05)
    assert time.monotonic() - started < 0.5 + 40 * 0.05 + 1.0  # one bounded wait at the start, none after
    assert sum(lay.n_fallback for lay in layouts) >= 4 * 35
    assert sampler.counters.breaker_opened == 1 and sampler.counters.mine_skipped > 20
    assert len(miner.calls) < 12  # the breaker held the rest back
    miner.release.set()
    sampler.close()


def test_the_layout_travels_with_each_batch_and_follows_substitutes():
    sampler = HardPairSampler(N, 8, _session(ScriptedMiner()), steps=5)
    iterator = iter(sampler)
    batches = [next(iterator) for _ in range(4)]
    # Batches arrive in any order, some never (an abandoned iterator): each carries its own layout.
    assert [sampler.layout(b).step for b in (batches[2], batches[0], batches[3])] == [2, 0, 3]
    assert all(index.layout is batches[1][0].layout for index in batches[1])
    # Batch 1 arrives with a bad sample's substitute in the first anchor's hard-pair row.
    delivered = torch.tensor([int(i) for i in batches[1]])
    delivered[1] = N - 1
    layout = sampler.layout(batches[1]).delivered(delivered)
    assert layout.step == 1 and layout.n_hard == 3 and layout.n_fallback == 1
    assert [0, 1] not in layout.couples.tolist() and [2, 3] in layout.couples.tolist()
    with pytest.raises(ValueError, match="carries no layout"):
        sampler.layout([7777, 7778, 7779, 7780])


def test_epochs_and_resume_offsets():
    sampler = HardPairSampler(100, 10, None, hard_ratio=0.5, rank=1, world_size=2)
    assert sampler.anchors.steps_per_epoch == 10 and len(sampler) == 10
    epoch0 = [ids[0] for ids in sampler]
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert len(epoch1) == 10 and [ids[0] for ids in epoch1] != epoch0
    assert all(len(ids) == 10 and len(set(ids)) == 10 for ids in epoch1)
    resumed = HardPairSampler(100, 10, None, rank=1, world_size=2, start_step=13)
    resumed.set_epoch(1)
    assert len(resumed) == 7 and list(resumed) == epoch1[3:]  # fallbacks are seeded per step: the same batches


class EmptyMiner(ScriptedMiner):
    """Answers every Mine with no neighbour from an index of `rows` rows (all over the near-duplicate cut, say)."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows

    def mine(self, k, anchor_ids, exclude_ids, max_similarity, scoring, timeout_s, positive_ratio=0.0):
        ids = np.full((len(anchor_ids), k), -1, dtype=np.int64)
        shape = ids.shape
        return Neighbours(ids, np.zeros(shape, np.float32), np.zeros(shape, np.uint64), self.rows, np.zeros(0))


@pytest.mark.parametrize("rows, warned", [(N, 1), (4, 0)])
def test_answers_without_any_neighbour_are_counted_and_explained_once(caplog, rows, warned):
    # N rows and nothing found: worth a warning. Only the 4 anchors themselves: an index still filling up.
    sampler = HardPairSampler(N, 8, _session(EmptyMiner(rows)), steps=6)
    with caplog.at_level("WARNING", logger="helip.trainer.pairs.mining"):
        layouts = _drain(sampler, pause_s=0.01)
    sampler.close()
    assert all(lay.n_hard == 0 and lay.n_fallback == 4 for lay in layouts)
    assert sampler.counters.mine_empty == sampler.counters.mine_calls >= 6 and sampler.counters.mine_late == 0
    warnings = [r.getMessage() for r in caplog.records if "no neighbour" in r.getMessage()]
    assert len(warnings) == warned and all("near-duplicate cut" in w for w in warnings), warnings


def test_mines_answered_with_neighbours_are_not_counted_empty():
    sampler = HardPairSampler(N, 8, _session(ScriptedMiner()), steps=3)
    _drain(sampler, pause_s=0.01)
    sampler.close()
    assert sampler.counters.mine_empty == 0
