"""When mining starts and how fast hard pairs ramp in: the streaming mode's schedule.

Streaming mode mines from an index that only the training pushes fill (no bootstrap pass). Early on the index
holds a few rows written by a model that has barely trained, so mining waits until

- the global step has reached `MiningConfig.start_step` (a warm-up for a model trained from scratch, whose first
  embeddings say little), and
- the index holds at least `MiningConfig.start_coverage` of the data set's samples (measured by polling the
  miner's Stats in a background thread, never on the step's path),

and then the share of hard slots given a mined pair grows linearly from 1/ramp_steps to all of them over
`MiningConfig.ramp_steps` steps. Until then the hard slots hold random samples: the batch is a plain CLIP batch,
and those slots count as `plain`, not as fallbacks (mining was not meant to fill them yet).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def ramp_share(step: int, first_mined_step: int | None, ramp_steps: int) -> float:
    """Share of a batch's hard slots that take a mined pair at `step`, mining having started at
    `first_mined_step` (None: not started)."""
    if first_mined_step is None or step < first_mined_step:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - first_mined_step + 1) / ramp_steps)


class CoverageWatch:
    """Polls how many rows the miner holds until they reach `needed`; `reached` is then set for good.

    A failed poll (miner down) is logged at debug level and retried: the breaker and fallbacks already report an
    unreachable miner, and coverage simply stays unreached meanwhile.
    """

    def __init__(self, rows: Callable[[], int], needed: int, poll_s: float = 2.0):
        self.needed = needed
        self.poll_s = poll_s
        self.seen_rows = 0
        self.reached = threading.Event()
        self._rows = rows
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if needed <= 0:
            self.reached.set()

    def start(self) -> CoverageWatch:
        if not self.reached.is_set() and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="coverage-watch", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen_rows = self._rows()
            except Exception as error:  # any transport error: the next poll retries
                log.debug("coverage poll failed: %s", error)
            else:
                if self.seen_rows >= self.needed:
                    log.info("the index holds %d rows (>= %d): mining starts", self.seen_rows, self.needed)
                    self.reached.set()
                    return
            self._stop.wait(self.poll_s)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
