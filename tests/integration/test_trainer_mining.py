"""The public mining API against a real miner process: HardPairSampler in a DataLoader with worker processes,
EmbeddingPusher, fallback while the miner is down, the circuit breaker, and recovery."""

from __future__ import annotations

import time

import numpy as np
import torch

from helip import HardPairSampler, MinerClient, MiningConfig, MiningSession
from helip.trainer.pairs.data import Sample
from tests.conftest import free_port

DIM = 16
N = 400


def clustered(rng, n, dim):
    centres = rng.standard_normal((20, dim)).astype(np.float32)
    image = centres[np.arange(n) % 20] + 0.2 * rng.standard_normal((n, dim)).astype(np.float32)
    text = image + 0.1 * rng.standard_normal((n, dim)).astype(np.float32)
    return (image / np.linalg.norm(image, axis=1, keepdims=True), text / np.linalg.norm(text, axis=1, keepdims=True))


class TensorPairs(torch.utils.data.Dataset):
    """A tiny in-memory data set with the sample contract (id, image, tokens); picklable for workers."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        return Sample(i, torch.full((3, 4, 4), float(i)), torch.full((5,), i, dtype=torch.long))


def push_all(config, image, text, as_torch=False):
    session = MiningSession(config)
    session.client.wait_ready(30)  # a restarted miner: let the channel reconnect before counting on it
    pusher, counters = session.pusher(), session.counters
    for first in range(0, N, 100):
        ids = np.arange(first, first + 100)
        rows_i, rows_t = image[first : first + 100], text[first : first + 100]
        if as_torch:  # what a training loop hands over: torch tensors, ids as a LongTensor
            ids, rows_i, rows_t = torch.from_numpy(ids), torch.from_numpy(rows_i), torch.from_numpy(rows_t)
        assert pusher.push(ids, rows_i, rows_t, 1)
    assert pusher.flush(30)
    session.close()
    assert counters.pushed_rows == N and counters.push_failures == 0


def test_dataloader_workers_get_hard_pairs_from_the_miner(miner_factory):
    miner = miner_factory("--dim", str(DIM))
    config = MiningConfig(address=miner.address, k=10, prefetch=2, deadline_s=5.0)
    image, text = clustered(np.random.default_rng(0), N, DIM)
    push_all(config, image, text, as_torch=True)
    session = MiningSession(config)
    loader = session.loader(TensorPairs(), 16, hard_ratio=0.5, seed=2, num_workers=2, prefetch_factor=2, steps=12)
    sampler = loader.batch_sampler
    assert sampler.lookahead == 2 * 2 + 2 + 1
    steps, same_cluster = [], 0
    for batch in loader:
        layout = batch.layout
        steps.append(layout.step)
        # Every image carries its id: the workers loaded exactly the ids the sampler composed.
        assert batch.images[:, 0, 0, 0].long().tolist() == batch.ids.tolist()
        assert layout.n_hard == 8 and layout.n_fallback == 0 and len(layout.couples) == 8
        for anchor_row, hard_row in layout.couples.tolist():
            anchor, hard = int(batch.ids[anchor_row]), int(batch.ids[hard_row])
            assert anchor_row % 2 == 0 and hard_row == anchor_row + 1  # anchor, its hard pair, anchor, ...
            same_cluster += hard % 20 == anchor % 20
    assert steps == list(range(12))
    # Clustered data: hard pairs mostly come from the anchor's own cluster (the miner's near-duplicate cut
    # removes the closest members of small clusters, so not always).
    assert same_cluster >= 0.75 * 12 * 8
    assert session.counters.mine_failures == 0 and session.counters.mine_late == 0
    session.close()


def test_miner_down_falls_back_opens_the_breaker_and_recovers(miner_factory):
    port = free_port()
    miner = miner_factory("--dim", str(DIM), "--port", str(port))
    config = MiningConfig(
        address=f"127.0.0.1:{port}",
        k=10,
        prefetch=0,
        deadline_s=2.0,
        breaker_failures=2,
        breaker_cooldown_s=0.5,
        breaker_max_cooldown_s=1.0,
    )
    image, text = clustered(np.random.default_rng(0), N, DIM)
    push_all(config, image, text)
    session = MiningSession(config)
    sampler, counters = session.sampler(N, 16, seed=1, steps=10_000), session.counters
    steps = iter(sampler)

    def next_layout():
        ids = next(steps)
        time.sleep(0.05)  # a training step: the next batch's Mine call has time to answer
        return sampler.layout(ids)

    assert next_layout().n_hard == 8

    miner.stop()  # composition never waits: batches fall back at once, and the breaker stops the calls
    started = time.monotonic()
    fallbacks = [next_layout() for _ in range(20)]
    assert time.monotonic() - started < 10
    assert sum(layout.n_fallback for layout in fallbacks) >= 8 * 15
    assert counters.breaker_opened >= 1 and counters.mine_skipped > 0
    calls_while_down = counters.mine_calls

    # Back on the same address (empty: without Redis a miner keeps rows in memory only): a probe closes the
    # breaker and hard pairs return.
    miner_factory("--dim", str(DIM), "--port", str(port))
    push_all(config, image, text)
    deadline = time.monotonic() + 30
    while next_layout().n_hard < 8:
        assert time.monotonic() < deadline, counters.snapshot()
    assert counters.mine_calls > calls_while_down
    session.close()


def test_foreign_ids_from_a_shared_miner_are_dropped_and_counted(miner_factory):
    miner = miner_factory("--dim", str(DIM))
    image, text = clustered(np.random.default_rng(2), 2 * N, DIM)
    with MinerClient(miner.address) as client:  # another data set's rows first, ids N..2N-1
        client.upsert(np.arange(N, 2 * N, dtype=np.uint64), image[N:], text[N:], 1)
    config = MiningConfig(address=miner.address, k=10, deadline_s=5.0)
    push_all(config, image[:N], text[:N])
    with MiningSession(config) as session:
        sampler = HardPairSampler(N, 16, session, seed=3, steps=6)
        for ids in sampler:
            assert max(ids) < N
            sampler.layout(ids)
        assert session.counters.foreign_ids > 0  # the clusters of both sets overlap, so foreign rows were offered


def test_the_guard_setting_reaches_every_mine_and_its_drops_are_counted(miner_factory):
    miner = miner_factory("--dim", str(DIM))
    ratio = 0.6
    config = MiningConfig(address=miner.address, k=10, prefetch=2, deadline_s=5.0, positive_ratio=ratio)
    image, text = clustered(np.random.default_rng(1), N, DIM)
    push_all(config, image, text)
    with MiningSession(config) as session:
        loader = session.loader(TensorPairs(), 16, hard_ratio=0.5, seed=3, steps=6)
        couples = 0
        for batch in loader:
            for anchor_row, hard_row in batch.layout.couples.tolist():
                a, j = int(batch.ids[anchor_row]), int(batch.ids[hard_row])
                # No hard pair whose caption fits the anchor's image (or the mirror) at the ratio or above (the
                # miner judged rows sent as float16: a tolerance of their rounding).
                assert max(image[a] @ text[j], text[a] @ image[j]) < ratio * (image[a] @ text[a]) + 2e-3
                couples += 1
        # Clustered pairs: the nearest candidates fit each other's captions, so the guard had work to do.
        assert couples > 0 and session.counters.guard_dropped > 0
