"""Hard-pair batches for any PyTorch loop: a batch sampler for `torch.utils.data.DataLoader`.

    sampler = HardPairSampler(len(dataset), batch_size=256, miner="miner:50051", num_workers=8)
    loader = hard_pair_loader(dataset, sampler)          # DataLoader(batch_sampler=sampler, workers, pinning)
    for batch in loader:                                 # helip.trainer.pairs.data.PairBatch
        layout = sampler.layout(batch.ids)               # which rows are (anchor, hard pair) couples
        out = model(batch.images, batch.tokens)
        loss = helip_loss(out["image_features"], out["text_features"], out["logit_scale"], layout.couples)
        ...
        pusher.push(batch.ids, out["image_features"], out["text_features"], step)

The sampler runs in the main process and yields lists of sample ids; the DataLoader's worker processes load
them. Each batch is this rank's anchors (a seeded permutation per epoch, striped over ranks) followed, anchor by
anchor, by one hard pair drawn from the miner's neighbours of that anchor. Mining for a batch is requested
`lookahead` batches before the DataLoader asks for it: the workers x prefetch_factor batches the DataLoader keeps
in flight, plus `MiningConfig.prefetch`. When the DataLoader asks, the batch is composed from whatever answer
has arrived; a missing answer (late, failed, breaker open) makes its hard slots random samples, counted.
Nothing waits for the miner, except once when an iterator starts: before the first batch is handed out, the
answers for the batches the DataLoader takes at once are awaited for at most `MiningConfig.deadline_s`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from helip.trainer.pairs.breaker import CLOSED
from helip.trainer.pairs.composer import ComposedBatch, compose_batch
from helip.trainer.pairs.data import collate_pairs
from helip.trainer.pairs.mining import MinePrefetcher, MiningConfig, MiningCounters, make_client
from helip.trainer.pairs.sampler import AnchorSampler, SamplerConfig
from helip.trainer.pairs.streaming import CoverageWatch, index_rows, ramp_share

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchLayout:
    """How one delivered batch was composed, in the positions of the delivered batch."""

    step: int
    couples: torch.Tensor  # [m, 2] int64 (anchor row, hard-pair row), for the margin loss
    n_hard: int  # hard slots filled with a mined pair
    n_fallback: int  # hard slots filled at random (no answer in time, or no usable neighbour)
    n_slots: int  # rows in the batch
    n_plain: int = 0  # hard slots left random on purpose: mining not started yet, or ramping up (streaming)

    @property
    def hard_fraction(self) -> float:
        return self.n_hard / self.n_slots if self.n_slots else 0.0


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class HardPairSampler(Sampler[list[int]]):
    def __init__(
        self,
        n_samples: int,
        batch_size: int,
        miner=None,
        config: MiningConfig = MiningConfig(),
        *,
        hard_ratio: float = 0.5,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        steps: int | None = None,
        start_step: int = 0,
        counters: MiningCounters | None = None,
    ):
        """n_samples: ids are 0..n_samples-1. batch_size: per rank, anchors + hard pairs.
        miner: a miner address ("host:port", comma-separated shards), a client, or None (no mining: hard slots
            are random samples). rank, world_size: default to torch.distributed's, else 0 and 1.
        num_workers, prefetch_factor: those of the DataLoader this sampler feeds (they set the lookahead).
        steps: None yields one epoch per iterator (call set_epoch, as with DistributedSampler); a number yields
            global steps start_step..steps-1 in one iterator, across epochs. start_step: resume here.
        """
        if rank is None or world_size is None:
            rank, world_size = _world()
        self.anchors = AnchorSampler(
            SamplerConfig(
                n_samples=n_samples,
                batch_size=batch_size,
                hard_ratio=hard_ratio,
                world_size=world_size,
                rank=rank,
                seed=seed,
            )
        )
        if num_workers < 0 or prefetch_factor < 1:
            raise ValueError(f"num_workers must be >= 0 and prefetch_factor >= 1, got {num_workers}, {prefetch_factor}")
        if steps is not None and not 0 <= start_step <= steps:
            raise ValueError(f"start_step {start_step} outside [0, steps={steps}]")
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.config = config
        self.seed = seed
        self.rank = rank
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.steps = steps
        self.start_step = start_step
        self.epoch = 0
        # Batches the DataLoader holds beyond the one training; with no workers it asks just in time.
        self.in_loader = num_workers * prefetch_factor
        self.lookahead = self.in_loader + config.prefetch + 1
        self.counters = counters or MiningCounters()
        self._owns_client = isinstance(miner, str)
        if isinstance(miner, str):
            miner = make_client(dataclasses.replace(config, address=miner))
        self.client = miner
        mining = miner is not None and self.anchors.config.hard_per_batch > 0
        self.prefetcher = MinePrefetcher(miner, config, self.counters) if mining else None
        # Streaming mode: mining waits for start_step and the index's coverage, then ramps in.
        self.coverage = CoverageWatch(
            lambda: index_rows(miner), int(np.ceil(config.start_coverage * n_samples)), config.coverage_poll_s
        )
        if self.prefetcher is not None:
            self.coverage.start()
        self.first_mined_step: int | None = None
        self._records: deque[tuple[int, ComposedBatch]] = deque(maxlen=4 * self.lookahead + 64)
        self._warned_foreign = False

    # ---- what a DataLoader calls ------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _step_range(self) -> range:
        if self.steps is not None:
            return range(self.start_step, self.steps)
        per_epoch = self.anchors.steps_per_epoch
        first = self.epoch * per_epoch
        return range(max(first, self.start_step), first + per_epoch)

    def __len__(self) -> int:
        return len(self._step_range())

    def __iter__(self):
        steps = self._step_range()
        if not steps:
            return
        self._request(steps.start, min(steps.stop, steps.start + self.lookahead))
        self._await_first(steps)
        for step in steps:
            self._request(step + self.lookahead, min(steps.stop, step + self.lookahead + 1))
            yield self.compose(step).ids.tolist()

    # ---- composition -----------------------------------------------------------------------------------------
    def _request(self, first: int, stop: int) -> None:
        if self.prefetcher is None:
            return
        for step in range(first, stop):
            if step < self.config.start_step or not self.coverage.reached.is_set():
                continue
            if self.first_mined_step is None:
                self.first_mined_step = step
                log.info("mining starts with the batch of step %d", step)
            self.prefetcher.request(step, self.anchors.anchors(step))

    def _await_first(self, steps: range) -> None:
        """Before training starts: the DataLoader takes `in_loader` + 1 batches at once; let their answers in."""
        if self.prefetcher is None or self.prefetcher.breaker.state != CLOSED:
            return
        deadline = time.monotonic() + self.config.deadline_s
        for step in steps[: self.in_loader + 1]:
            self.prefetcher.wait(step, max(0.0, deadline - time.monotonic()))

    def compose(self, step: int) -> ComposedBatch:
        """The batch of `step` from whatever mining answer is in now (used by __iter__; public for tests)."""
        neighbours = self.prefetcher.take(step) if self.prefetcher is not None else None
        max_mined = None
        if self.prefetcher is not None:
            share = ramp_share(step, self.first_mined_step, self.config.ramp_steps)
            max_mined = round(share * self.anchors.config.hard_per_batch)
            if share == 0.0:
                self.counters.add(mine_not_started=1)
        # Seeded per (seed, rank, step): a resumed run composes the same fallbacks as an uninterrupted one.
        rng = np.random.default_rng([self.seed, self.rank, step])
        composed = compose_batch(
            self.anchors.anchors(step),
            neighbours,
            self.batch_size,
            self.n_samples,
            rng,
            top=self.config.k,
            max_mined=max_mined,
        )
        if composed.n_foreign:
            self.counters.add(foreign_ids=composed.n_foreign)
            if not self._warned_foreign:
                self._warned_foreign = True
                log.warning(
                    "the miner returned ids this data set does not hold (%d in step %d's answer; ids are "
                    "0..%d): it holds rows of another data set. They are dropped and counted "
                    "(foreign_ids).",
                    composed.n_foreign,
                    step,
                    self.n_samples - 1,
                )
        self._records.append((step, composed))
        return composed

    def layout(self, batch_ids) -> BatchLayout:
        """The layout of a batch the DataLoader delivered, found by its ids (batches arrive in the order they
        were composed; a bad sample's substitute changes a row's id, so the best-matching recent batch wins)."""
        delivered = batch_ids.tolist() if isinstance(batch_ids, torch.Tensor) else np.asarray(batch_ids).tolist()
        wanted = set(delivered)
        best, best_overlap = None, 0
        for index, (_step, composed) in enumerate(self._records):
            overlap = len(wanted.intersection(composed.ids.tolist()))
            if overlap > best_overlap:
                best, best_overlap = index, overlap
            if overlap == len(wanted):
                break
        if best is None or best_overlap * 2 < len(wanted):
            raise KeyError(f"no batch composed by this sampler matches the ids {delivered[:8]}...")
        for _ in range(best):  # batches composed before this one were never delivered (an abandoned iterator)
            self._records.popleft()
        step, composed = self._records.popleft()
        position = {sample: row for row, sample in enumerate(delivered)}
        ids = composed.ids.tolist()
        couples = [
            (position[ids[a]], position[ids[h]])
            for a, h in composed.couples.tolist()
            if ids[a] in position and ids[h] in position
        ]
        return BatchLayout(
            step=step,
            couples=torch.tensor(couples, dtype=torch.long).reshape(-1, 2),
            n_hard=len(couples),
            n_fallback=composed.n_fallback + composed.n_hard - len(couples),
            n_slots=len(delivered),
            n_plain=composed.n_plain,
        )

    def close(self) -> None:
        self.coverage.close()
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self._owns_client and self.client is not None:
            self.client.close()


# gRPC's threads do not survive fork(): a worker forked while a Mine call is in flight can crash. Workers start
# from a clean forkserver process instead (the data set must be picklable, as it must be for spawn).
WORKER_START_METHOD = "forkserver"


def worker_options(num_workers: int, prefetch_factor: int = 2) -> dict:
    """DataLoader keyword arguments for `num_workers` workers in a process that talks to a miner."""
    if num_workers == 0:
        return {"num_workers": 0}
    return {
        "num_workers": num_workers,
        "prefetch_factor": prefetch_factor,
        "persistent_workers": True,
        "multiprocessing_context": WORKER_START_METHOD,
    }


def hard_pair_loader(dataset, sampler: HardPairSampler, pin_memory: bool | None = None, **kwargs) -> DataLoader:
    """A DataLoader over `dataset` fed by `sampler`, with the worker count and prefetch the sampler plans for.
    Batches are helip.trainer.pairs.data.PairBatch; other DataLoader arguments pass through."""
    options = {**worker_options(sampler.num_workers, sampler.prefetch_factor), **kwargs}
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_pairs,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        **options,
    )
