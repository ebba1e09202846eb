"""Bad samples: counted, logged with their id and reason, and fatal only past a configured fraction.

The data sets step over a bad sample (see helip.trainer.pairs.data) and report it in the batch; the training loop hands
every batch to `BadSampleLedger.record`. One corrupt JPEG in a million is noise; a tenth of the set missing
is a broken mount, and training on the rest would quietly give a different model, so that stops the run.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from helip.trainer.pairs.data import BadSample, PairBatch

log = logging.getLogger(__name__)


class TooManyBadSamples(RuntimeError):
    pass


class BadSampleLedger:
    def __init__(
        self,
        max_fraction: float = 0.01,
        min_samples: int = 1000,
        on_bad: Callable[[BadSample], None] | None = None,
        log_first: int = 20,
    ):
        """max_fraction: the run stops once bad / (good + bad) exceeds it, judged after `min_samples` samples.
        on_bad: called once per bad sample (metrics). The first `log_first` are logged one by one."""
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {max_fraction}")
        if min_samples < 1:
            raise ValueError(f"data.bad_min_samples must be >= 1, got {min_samples}")
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.on_bad = on_bad
        self.log_first = log_first
        self.good = 0
        self.bad = 0
        self.by_kind: Counter[str] = Counter()

    @property
    def fraction(self) -> float:
        return self.bad / max(1, self.good + self.bad)

    def record(self, batch: PairBatch) -> None:
        """Count one batch; raises TooManyBadSamples when the bad fraction is past the limit."""
        self.good += len(batch)
        for bad in batch.skipped:
            self.bad += 1
            self.by_kind[bad.kind] += 1
            if self.bad <= self.log_first:
                log.warning("skipped bad sample %d (%s): %s", bad.id, bad.kind, bad.detail)
            elif self.bad == self.log_first + 1:
                log.warning(
                    "more bad samples: further ones are counted (helip_trainer_bad_samples_total), "
                    "not logged one by one"
                )
            if self.on_bad is not None:
                self.on_bad(bad)
        if self.good + self.bad >= self.min_samples and self.fraction > self.max_fraction:
            raise TooManyBadSamples(
                f"{self.bad} of {self.good + self.bad} samples were bad ({self.fraction:.1%} > "
                f"data.max_bad_fraction={self.max_fraction:.1%}): {dict(self.by_kind)}. Check the data set "
                f"(the first bad ids are in the log) or raise data.max_bad_fraction."
            )
