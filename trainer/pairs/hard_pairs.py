"""Hard-pair batches for any PyTorch loop: a batch sampler for `torch.utils.data.DataLoader`.

    sampler = HardPairSampler(len(dataset), batch_size=256, session=session, num_workers=8)  # or session.sampler
    loader = hard_pair_loader(dataset, sampler)          # DataLoader(batch_sampler=sampler, workers, pinning)
    for batch in loader:                                 # PairBatch, its layout with it
        out = model(batch.images, batch.tokens)
        loss = helip_loss(out["image_features"], out["text_features"], out["logit_scale"], batch.layout.couples)
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

The layout travels with the batch: each yielded index is a `SampleIndex` (an int, so any dataset can use it) that
also carries its batch's `BatchLayout`; `hard_pair_loader` hands the dataset plain ints and puts the layout on the
collated `PairBatch`. So a layout is exact for every batch, whatever the workers, substitutes of bad samples,
resumed or concurrent iterators.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from helip.trainer.pairs.breaker import CLOSED
from helip.trainer.pairs.composer import ComposedBatch, compose_batch
from helip.trainer.pairs.data import PairBatch, collate_pairs
from helip.trainer.pairs.mining import MinePrefetcher, MiningConfig, MiningCounters
from helip.trainer.pairs.sampler import AnchorSampler, SamplerConfig
from helip.trainer.pairs.streaming import CoverageWatch, ramp_share

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchLayout:
    """How one batch was composed, in the positions of its rows."""

    step: int
    couples: torch.Tensor  # [m, 2] int64 (anchor row, hard-pair row), for the margin loss
    n_hard: int  # hard slots filled with a mined pair
    n_fallback: int  # hard slots filled at random (no answer in time, or no usable neighbour)
    n_slots: int  # rows in the batch
    n_plain: int = 0  # hard slots left random on purpose: mining not started yet, or ramping up (streaming)
    ids: torch.Tensor | None = None  # [n_slots] int64: the sample ids as composed (before any substitute)

    @property
    def hard_fraction(self) -> float:
        return self.n_hard / self.n_slots if self.n_slots else 0.0

    @classmethod
    def of(cls, step: int, composed: ComposedBatch) -> BatchLayout:
        return cls(
            step=step,
            couples=torch.from_numpy(np.ascontiguousarray(composed.couples, dtype=np.int64)).reshape(-1, 2),
            n_hard=composed.n_hard,
            n_fallback=composed.n_fallback,
            n_slots=len(composed.ids),
            n_plain=composed.n_plain,
            ids=torch.from_numpy(np.ascontiguousarray(composed.ids, dtype=np.int64)),
        )

    def delivered(self, delivered_ids: torch.Tensor) -> BatchLayout:
        """This layout for the rows as delivered: a row whose bad sample was replaced by a substitute no longer
        holds the composed pair, so couples touching it are dropped (their hard slot counts as a fallback)."""
        if self.ids is None or torch.equal(self.ids, delivered_ids):
            return self
        replaced = self.ids != delivered_ids
        keep = ~(replaced[self.couples[:, 0]] | replaced[self.couples[:, 1]])
        lost = int((~keep).sum())
        return dataclasses.replace(
            self, couples=self.couples[keep], n_hard=self.n_hard - lost, n_fallback=self.n_fallback + lost
        )


class SampleIndex(int):
    """A sample id (an int to any dataset) that carries the layout of the batch it was composed into."""

    layout: BatchLayout | None

    def __new__(cls, sample_id: int, layout: BatchLayout | None = None):
        index = super().__new__(cls, sample_id)
        index.layout = layout
        return index

    def __reduce__(self):  # DataLoader workers receive indices pickled: keep the layout
        return SampleIndex, (int(self), self.layout)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class HardPairSampler(Sampler[list[int]]):
    """A batch sampler of hard-pair batches for one rank (see the module docstring). Usually made by
    `MiningSession.sampler` or `MiningSession.loader`."""

    def __init__(
        self,
        n_samples: int,
        batch_size: int,
        session=None,
        *,
        hard_ratio: float = 0.5,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        steps: int | None = None,
        start_step: int = 0,
    ):
        """n_samples: ids are 0..n_samples-1. batch_size: per rank, anchors + hard pairs.
        session: the MiningSession to mine through (a bare client gets default settings), or None (no mining:
            hard slots are random samples). rank, world_size: default to torch.distributed's, else 0 and 1.
        num_workers, prefetch_factor: those of the DataLoader this sampler feeds (they set the lookahead).
        steps: None yields one epoch per iterator (call set_epoch, as with DistributedSampler); a number yields
            global steps start_step..steps-1 in one iterator, across epochs. start_step: resume here.
        """
        from helip.trainer.pairs.session import MiningSession  # the session module builds samplers: no cycle

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
        self.session = MiningSession.of(session) if session is not None else None
        self.config = self.session.config if self.session is not None else MiningConfig()
        self.counters = self.session.counters if self.session is not None else MiningCounters()
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.steps = steps
        self.start_step = start_step
        self.epoch = 0
        # Batches the DataLoader holds beyond the one training; with no workers it asks just in time.
        self.in_loader = num_workers * prefetch_factor
        self.lookahead = self.in_loader + self.config.prefetch + 1
        mining = self.session is not None and self.anchors.config.hard_per_batch > 0
        self.prefetcher = MinePrefetcher(self.session) if mining else None
        # Streaming mode: mining waits for start_step and the index's coverage, then ramps in.
        client = self.session.client if self.session is not None else None
        self.coverage = CoverageWatch(
            lambda: client.size(), int(np.ceil(self.config.start_coverage * n_samples)), self.config.coverage_poll_s
        )
        if self.prefetcher is not None:
            self.coverage.start()
        self.first_mined_step: int | None = None
        self._warned_foreign = False

    # ---- what a DataLoader calls ------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Make the next iterator yield `epoch`'s batches (with steps=None; call it before each epoch, as with
        DistributedSampler). An iterator already running keeps its epoch."""
        self.epoch = epoch

    def _step_range(self) -> range:
        if self.steps is not None:
            return range(self.start_step, self.steps)
        per_epoch = self.anchors.steps_per_epoch
        first = self.epoch * per_epoch
        return range(max(first, self.start_step), first + per_epoch)

    def __len__(self) -> int:
        """Batches the next iterator yields: the rest of this epoch (steps=None), else start_step..steps-1."""
        return len(self._step_range())

    def __iter__(self):
        """Each batch as a list of SampleIndex (ids carrying the batch's layout). Iterators are independent:
        each mines for its own batches, so two live at once neither take nor cancel each other's answers."""
        steps = self._step_range()
        if not steps:
            return
        owner = object()  # this iterator's key to its answers in the shared prefetcher
        try:
            self._request(steps.start, min(steps.stop, steps.start + self.lookahead), owner)
            self._await_first(steps, owner)
            for step in steps:
                self._request(step + self.lookahead, min(steps.stop, step + self.lookahead + 1), owner)
                composed = self.compose(step, owner)
                layout = BatchLayout.of(step, composed)
                yield [SampleIndex(sample_id, layout) for sample_id in composed.ids.tolist()]
        finally:  # ended or abandoned (closed, collected): its answers in flight are not needed
            if self.prefetcher is not None:
                self.prefetcher.drop(owner)

    # ---- composition -----------------------------------------------------------------------------------------
    def _request(self, first: int, stop: int, owner: object) -> None:
        if self.prefetcher is None:
            return
        for step in range(first, stop):
            if step < self.config.start_step or not self.coverage.reached.is_set():
                continue
            if self.first_mined_step is None:
                # With no coverage to wait for, mining starts at mining.start_step wherever this iterator
                # starts, so a resumed run ramps in as the uninterrupted one did; a wait for coverage starts
                # it at the first step asked once the coverage is seen (a resumed run ramps in again).
                self.first_mined_step = self.config.start_step if self.coverage.needed <= 0 else step
                log.info("mining starts with the batch of step %d", self.first_mined_step)
            self.prefetcher.request(step, self.anchors.anchors(step), owner)

    def _await_first(self, steps: range, owner: object) -> None:
        """Before training starts: the DataLoader takes `in_loader` + 1 batches at once; let their answers in."""
        if self.prefetcher is None or self.prefetcher.breaker.state != CLOSED:
            return
        deadline = time.monotonic() + self.config.deadline_s
        for step in steps[: self.in_loader + 1]:
            self.prefetcher.wait(step, max(0.0, deadline - time.monotonic()), owner)

    def compose(self, step: int, owner: object = None) -> ComposedBatch:
        """The batch of `step` from whatever mining answer `owner` (the iterator that asked) has in now (used by
        __iter__; public for tests). Raises MinerRefused once the miner refused this session's calls."""
        if self.session is not None:
            self.session.check()
        neighbours = self.prefetcher.take(step, owner) if self.prefetcher is not None else None
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
        return composed

    def layout(self, batch) -> BatchLayout:
        """The layout of a batch this sampler composed: a PairBatch from `hard_pair_loader` (its `layout`), or a
        list of indices this sampler yielded."""
        layout = getattr(batch, "layout", None)
        if layout is None and isinstance(batch, list) and batch:
            layout = getattr(batch[0], "layout", None)
        if layout is None:
            raise ValueError(
                "this batch carries no layout: build its DataLoader with hard_pair_loader (or session.loader)"
            )
        return layout

    def close(self) -> None:
        """Stop this sampler's mining for good (answers in flight cancelled, threads ended): iterate no more after
        it. The session and its client stay open (MiningSession.close closes them, and calls this)."""
        self.coverage.close()
        if self.prefetcher is not None:
            self.prefetcher.close()


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
        "multiprocessing_context": worker_context(),
    }


# What every worker imports before its first sample: preloaded once in the forkserver, so that a worker forks with
# them in memory instead of importing them itself (a bootstrap pass of the demo set waited 9.9 s for its workers'
# first batches without this, 4.5 to 5.2 s with it; docs/BENCHMARKS.md). A module missing here is skipped, not an error.
WORKER_PRELOAD = ["torch", "torchvision", "open_clip", "helip.trainer.pairs.data"]


def worker_context():
    """The multiprocessing context of DataLoader workers: forkserver, with WORKER_PRELOAD preloaded (it takes
    effect when the forkserver starts, i.e. for the first DataLoader with workers in this process)."""
    context = multiprocessing.get_context(WORKER_START_METHOD)
    context.set_forkserver_preload(WORKER_PRELOAD)
    return context


class LayoutCarrier(torch.utils.data.Dataset):
    """`dataset` as the DataLoader sees it behind a HardPairSampler: the dataset gets plain int ids; each sample
    comes back with the layout its index carried, and `collate` puts that layout on the PairBatch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[int(index)], getattr(index, "layout", None)

    @staticmethod
    def collate(samples) -> PairBatch:
        batch = collate_pairs([sample for sample, _ in samples])
        layout = samples[0][1]
        return dataclasses.replace(batch, layout=layout.delivered(batch.ids) if layout is not None else None)


def hard_pair_loader(dataset, sampler: HardPairSampler, pin_memory: bool | None = None, **kwargs) -> DataLoader:
    """A DataLoader over `dataset` fed by `sampler`, with the worker count and prefetch the sampler plans for.
    Batches are PairBatch with their `layout`; other DataLoader arguments pass through."""
    options = {**worker_options(sampler.num_workers, sampler.prefetch_factor), **kwargs}
    return DataLoader(
        LayoutCarrier(dataset),
        batch_sampler=sampler,
        collate_fn=LayoutCarrier.collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        **options,
    )
