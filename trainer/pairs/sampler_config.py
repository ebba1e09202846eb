"""How the sampler deals anchors: samples, batch size, hard share, ranks, seed, and the batch arithmetic they give.

Import-light on purpose (no numpy or torch): helip-train's config counts an epoch's steps with it
(`OptimConfig.steps_for`) before anything heavy is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplerConfig:
    n_samples: int
    batch_size: int  # per rank, anchors + hard pairs
    hard_ratio: float = 0.5  # fraction of each batch's slots given to hard pairs (the paper's code alternates: 0.5)
    world_size: int = 1
    rank: int = 0
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.hard_ratio < 1.0:
            raise ValueError(f"hard_ratio must be in [0, 1), got {self.hard_ratio}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of {self.world_size}")
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{self.n_samples} samples are too few for {self.world_size} ranks x "
                f"{self.anchors_per_batch} anchors per batch"
            )

    @property
    def hard_per_batch(self) -> int:
        return int(round(self.batch_size * self.hard_ratio))

    @property
    def anchors_per_batch(self) -> int:
        return self.batch_size - self.hard_per_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.n_samples // (self.world_size * self.anchors_per_batch)
