"""Batches, one step ahead: mining answers for the next batches are awaited, composed and loaded off the step.

`take(step)` returns the batch of `step` (loaded in the background while the previous step trained) and
starts: the Mine call for step + 1 + prefetch, and the loading of step + 1.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from trainer.composer import ComposedBatch, compose_batch
from trainer.data import collate
from trainer.mining import MiningPrefetcher
from trainer.sampler import AnchorSampler


@dataclass
class LoadedBatch:
    step: int
    composed: ComposedBatch
    ids: torch.Tensor  # [B] int64
    images: torch.Tensor  # [B, 3, H, W]
    tokens: torch.Tensor  # [B, L]
    mining_wait_s: float  # time spent waiting for this batch's Mine answer (in the loader, off the step)


class BatchSource:
    def __init__(self, dataset, sampler: AnchorSampler, prefetcher: MiningPrefetcher | None, batch_size: int,
                 seed: int, rank: int, top: int, prefetch: int, threads: int = 2):
        self.dataset = dataset
        self.sampler = sampler
        self.prefetcher = prefetcher
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.top = top
        self.prefetch = prefetch
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch")
        self._fetch = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="fetch")
        self._loading: dict[int, Future] = {}

    def _request_mining(self, first: int, last: int) -> None:
        if self.prefetcher is None:
            return
        for step in range(first, last + 1):
            self.prefetcher.request(step, self.sampler.anchors(step))

    def _load(self, step: int) -> LoadedBatch:
        started = time.perf_counter()
        neighbours = self.prefetcher.result(step) if self.prefetcher is not None else None
        waited = time.perf_counter() - started
        # Seeded per (seed, rank, step): a resumed run composes the same fallbacks as an uninterrupted one.
        rng = np.random.default_rng([self.seed, self.rank, step])
        composed = compose_batch(self.sampler.anchors(step), neighbours, self.batch_size, len(self.dataset), rng,
                                 top=self.top)
        samples = list(self._fetch.map(self.dataset.__getitem__, composed.ids.tolist()))
        ids, images, tokens = collate(samples)
        return LoadedBatch(step, composed, ids, images, tokens, waited)

    def take(self, step: int) -> LoadedBatch:
        if step not in self._loading:  # the first step, or after a resume
            self._request_mining(step, step + self.prefetch)
            self._loading[step] = self._loader.submit(self._load, step)
        batch = self._loading.pop(step).result()
        self._request_mining(step + 1, step + 1 + self.prefetch)
        self._loading[step + 1] = self._loader.submit(self._load, step + 1)
        return batch

    def close(self) -> None:
        for future in self._loading.values():
            future.cancel()
        self._loader.shutdown(wait=True, cancel_futures=True)
        self._fetch.shutdown(wait=True, cancel_futures=True)
