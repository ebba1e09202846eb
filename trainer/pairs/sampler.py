"""Which anchors each rank trains on, batch by batch, known in advance (so mining can run ahead).

Every epoch is a seeded permutation of all sample ids, dealt to ranks in contiguous stripes; each rank cuts its
stripe into batches of `anchors_per_batch`. Batch b of epoch e is a pure function of (seed, e, rank, b), which
makes resuming at a step exact and lets the prefetcher ask for batch b+P while b trains.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from helip.trainer.pairs.sampler_config import SamplerConfig


class AnchorSampler:
    def __init__(self, config: SamplerConfig):
        self.config = config

    @property
    def steps_per_epoch(self) -> int:
        return self.config.steps_per_epoch

    @lru_cache(maxsize=2)  # noqa: B019 (two epochs' permutations per sampler, freed with it)
    def _stripe(self, epoch: int) -> np.ndarray:
        c = self.config
        order = np.random.default_rng([c.seed, epoch]).permutation(c.n_samples)
        per_rank = c.steps_per_epoch * c.anchors_per_batch  # drop the tail so every rank has as many steps
        return order[c.rank * per_rank : (c.rank + 1) * per_rank]

    def anchors(self, step: int) -> np.ndarray:
        """Anchor ids (int64) of this rank's batch at global step `step` (steps run on across epochs)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        n = self.config.anchors_per_batch
        return self._stripe(epoch)[index * n : (index + 1) * n]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch
