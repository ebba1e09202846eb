"""A circuit breaker for calls to the miner: after a run of failures, stop calling for a while, then probe.

A hung miner (stopped, overloaded, partitioned) costs its callers a deadline per call; a dead one costs a
connection error. Either way the trainer gains nothing by asking again at once. The breaker opens after
`failures` consecutive failures, refuses calls for `cooldown_s` (doubling on every failed probe, up to
`max_cooldown_s`), then lets exactly one call through as a probe: success closes it, failure opens it again.

Pure and thread-safe; the clock is injectable so tests can step time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    failures: int = 3  # consecutive failures that open the breaker
    cooldown_s: float = 2.0  # first wait before a probe
    max_cooldown_s: float = 30.0  # the wait doubles on each failed probe, up to this

    def __post_init__(self):
        if self.failures < 1:
            raise ValueError(f"breaker failures must be >= 1, got {self.failures}")
        if not 0 < self.cooldown_s <= self.max_cooldown_s:
            raise ValueError(
                f"breaker cooldown_s must be in (0, max_cooldown_s={self.max_cooldown_s}], got {self.cooldown_s}"
            )


class CircuitBreaker:
    def __init__(
        self,
        config: BreakerConfig = BreakerConfig(),
        clock: Callable[[], float] = time.monotonic,
        on_open: Callable[[], None] | None = None,
    ):
        """on_open: called each time the breaker opens (outside its lock), e.g. to count it."""
        self.config = config
        self._on_open = on_open
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._consecutive = 0
        self._cooldown_s = config.cooldown_s
        self._opened_at = 0.0
        self.opened = 0  # times the breaker opened (a metric)

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    def allow(self) -> bool:
        """May a call go out now? In the open state, the first caller after the cooldown becomes the probe."""
        with self._lock:
            if self._state == CLOSED:
                return True
            if self._state == OPEN and self._clock() - self._opened_at >= self._cooldown_s:
                self._state = HALF_OPEN
                return True
            return False  # open and cooling down, or a probe is already out

    def success(self) -> None:
        with self._lock:
            self._state = CLOSED
            self._consecutive = 0
            self._cooldown_s = self.config.cooldown_s

    def failure(self) -> None:
        with self._lock:
            self._consecutive += 1
            opens = self._state == HALF_OPEN or (self._state == CLOSED and self._consecutive >= self.config.failures)
            if self._state == HALF_OPEN:
                self._cooldown_s = min(self._cooldown_s * 2, self.config.max_cooldown_s)
            if opens:
                self._state = OPEN
                self._opened_at = self._clock()
                self.opened += 1
        if opens and self._on_open is not None:
            self._on_open()
