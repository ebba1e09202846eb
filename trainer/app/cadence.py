"""When the loop checkpoints, exports an epoch and evaluates: pure arithmetic on micro-step counts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Due:
    """What falls due after a micro-step."""

    checkpoint: bool = False  # a resumable DeepSpeed checkpoint (the last step has its own, always)
    epoch: int = 0  # an epoch just ended: export epoch_N (0: none)
    periodic_eval: bool = False  # the synth layout and the retrieval CSV (run.eval_every)
    zero_shot_eval: bool = False  # data.zeroshot_dir (run.zeroshot_frequency epochs)

    @property
    def evaluate(self) -> bool:
        return self.periodic_eval or self.zero_shot_eval


@dataclass(frozen=True)
class Cadence:
    """Intervals in micro-steps (0: never) over a run of `total` micro-steps.

    An epoch is the sampler's: every sample once as an anchor, `epoch` micro-steps on each rank. Zero-shot counts
    epochs as open_clip's --zeroshot-frequency does. Nothing but the epoch export falls due on the last micro-step:
    the loop's end saves, exports and evaluates the final model itself.
    """

    total: int
    checkpoint_every: int
    epoch: int
    eval_every: int
    zeroshot_every: int

    def __post_init__(self) -> None:
        for name in ("total", "checkpoint_every", "epoch", "eval_every", "zeroshot_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"Cadence.{name} must be >= 0, got {getattr(self, name)}")
        if self.epoch == 0:
            raise ValueError("Cadence.epoch must be > 0 micro-steps")

    @classmethod
    def of_run(
        cls, total: int, accumulation: int, epoch: int, checkpoint_every: int, eval_every: int, zeroshot_epochs: int
    ) -> Cadence:
        """From the config's units: optimizer steps (checkpoint_every, eval_every) and epochs (zero-shot)."""
        return cls(
            total=total,
            checkpoint_every=checkpoint_every * accumulation,
            epoch=epoch,
            eval_every=eval_every * accumulation,
            zeroshot_every=zeroshot_epochs * epoch,
        )

    def due(self, done: int) -> Due:
        """What falls due once `done` micro-steps have run."""

        def every(interval: int) -> bool:
            return bool(interval) and done % interval == 0 and done != self.total

        return Due(
            checkpoint=every(self.checkpoint_every),
            epoch=done // self.epoch if done % self.epoch == 0 else 0,
            periodic_eval=every(self.eval_every),
            zero_shot_eval=every(self.zeroshot_every),
        )
