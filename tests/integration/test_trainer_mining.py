"""The trainer's mining side against a real miner process: prefetch, composition, fallback and recovery."""

from __future__ import annotations

import socket
import time

import numpy as np
import torch

from trainer.batches import BatchSource
from trainer.composer import compose_batch
from trainer.mining import EmbeddingPusher, MiningConfig, MiningCounters, MiningPrefetcher, make_client
from trainer.sampler import AnchorSampler, SamplerConfig

DIM = 16
N = 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clustered(rng, n, dim):
    centres = rng.standard_normal((20, dim)).astype(np.float32)
    image = centres[np.arange(n) % 20] + 0.2 * rng.standard_normal((n, dim)).astype(np.float32)
    text = image + 0.1 * rng.standard_normal((n, dim)).astype(np.float32)
    return (image / np.linalg.norm(image, axis=1, keepdims=True),
            text / np.linalg.norm(text, axis=1, keepdims=True))


class TensorPairs:
    """A tiny in-memory data set with the trainer's sample contract (id, image, tokens)."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        return i, torch.full((3, 4, 4), float(i)), torch.full((5,), i, dtype=torch.long)


def push_all(config, image, text):
    counters = MiningCounters()
    client = make_client(config)
    client.wait_ready(30)  # a restarted miner: let the channel reconnect before counting on it
    pusher = EmbeddingPusher(client, config, counters)
    for first in range(0, N, 100):
        ids = np.arange(first, first + 100, dtype=np.uint64)
        assert pusher.push(ids, image[first:first + 100].astype(np.float16), text[first:first + 100].astype(np.float16), 1)
    assert pusher.flush(30)
    pusher.close()
    assert counters.pushed_rows == N and counters.push_failures == 0


def test_prefetch_compose_fallback_and_recovery(miner_factory):
    port = free_port()
    miner = miner_factory("--dim", str(DIM), "--port", str(port))
    config = MiningConfig(address=f"127.0.0.1:{port}", k=10, prefetch=2, deadline_s=5.0)
    image, text = clustered(np.random.default_rng(0), N, DIM)
    push_all(config, image, text)

    counters = MiningCounters()
    prefetcher = MiningPrefetcher(make_client(config), config, counters)
    sampler = AnchorSampler(SamplerConfig(n_samples=N, batch_size=16, hard_ratio=0.5, seed=1))
    for step in range(3):
        prefetcher.request(step, sampler.anchors(step))
    for step in range(3):
        anchors = sampler.anchors(step)
        neighbours = prefetcher.result(step)
        assert neighbours.shape == (8, 10)
        assert not np.isin(neighbours, anchors).any()  # the rest of the batch is excluded
        batch = compose_batch(anchors, neighbours, 16, N, np.random.default_rng(step), top=10)
        assert len(set(batch.ids.tolist())) == 16 and batch.n_hard == 8
        for anchor_pos, hard_pos in batch.couples:
            anchor = batch.ids[anchor_pos]
            row = list(anchors).index(anchor)
            assert batch.ids[hard_pos] in neighbours[row]
            # Clustered data: hard pairs come from the anchor's own cluster.
            assert batch.ids[hard_pos] % 20 == anchor % 20
    assert counters.mine_failures == 0

    # The miner goes away: mining fails fast, the batch falls back to random samples, training would go on.
    miner.stop()
    prefetcher.request(10, sampler.anchors(10))
    assert prefetcher.result(10) is None
    assert counters.mine_failures + counters.mine_late == 1
    batch = compose_batch(sampler.anchors(10), None, 16, N, np.random.default_rng(0))
    assert batch.n_fallback == 8 and len(set(batch.ids.tolist())) == 16

    # It comes back on the same address (empty: a miner without Redis keeps rows in memory only).
    miner_factory("--dim", str(DIM), "--port", str(port))
    push_all(config, image, text)
    deadline = time.monotonic() + 20
    while True:
        prefetcher.request(20, sampler.anchors(20))
        neighbours = prefetcher.result(20)
        if neighbours is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert neighbours is not None and (neighbours >= 0).all()
    prefetcher.close()


def test_batch_source_mines_ahead(miner_factory):
    miner = miner_factory("--dim", str(DIM))
    config = MiningConfig(address=miner.address, k=10, prefetch=2, deadline_s=5.0)
    image, text = clustered(np.random.default_rng(1), N, DIM)
    push_all(config, image, text)
    counters = MiningCounters()
    prefetcher = MiningPrefetcher(make_client(config), config, counters)
    sampler = AnchorSampler(SamplerConfig(n_samples=N, batch_size=16, hard_ratio=0.5, seed=2))
    source = BatchSource(TensorPairs(), sampler, prefetcher, batch_size=16, seed=2, rank=0, top=10, prefetch=2)
    for step in range(5):
        batch = source.take(step)
        assert batch.step == step and batch.composed.n_hard == 8
        assert batch.ids.tolist() == batch.composed.ids.tolist()
        assert batch.images[:, 0, 0, 0].long().tolist() == batch.ids.tolist()
        # While this step "trains", the Mine calls for the next `prefetch` steps are already in flight.
        assert {step + 1, step + 2, step + 3} <= set(prefetcher._pending) | {step + 1}
    source.close()
    prefetcher.close()
    assert counters.mine_calls >= 5 and counters.mine_failures == 0  # step 5 may already be loading
