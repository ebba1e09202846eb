"""How far a follower is behind its leader, sampled in the background (never on a Mine's path).

A follower's lag is the age of the oldest log entry it has not applied yet: 0 when it is caught up, and otherwise
how old the newest write a reader cannot see through it may be. Both ends of that age come from Redis (the entry's
"<ms>-<seq>" id and Redis' own clock), so the follower's clock does not enter it. One sample is one small Lua
script (it returns an entry id and the time, never an entry's rows).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from helip.miner_service.service.log import Offset

log = logging.getLogger(__name__)

LAG_SAMPLE_INTERVAL_S = 1.0
# The first entry after `applied` (its id only) and Redis' clock, in one round trip.
_OLDEST_UNAPPLIED = """
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', 1)
local now = redis.call('TIME')
local oldest = ''
if #entries > 0 then oldest = entries[1][1] end
return {oldest, now[1], now[2]}
"""


@dataclass(frozen=True)
class ReplicaLag:
    seconds: float = 0.0  # age of the oldest unapplied log entry; 0: caught up

    @property
    def behind(self) -> bool:
        return self.seconds > 0


def lag_of(oldest_unapplied: Offset | None, now_ms: float) -> ReplicaLag:
    """The lag when `oldest_unapplied` (None: nothing) is the first entry not applied yet and Redis' clock reads
    `now_ms`. A follower that is behind never reports 0, even for an entry written this very millisecond."""
    if oldest_unapplied is None:
        return ReplicaLag()
    return ReplicaLag(max(now_ms - oldest_unapplied.ms, 1.0) / 1000.0)


def follower_lag(redis_client, stream: str, applied: Offset) -> ReplicaLag:
    """The lag of a follower that has applied the log `stream` up to and including `applied`."""
    oldest, seconds, micros = redis_client.eval(_OLDEST_UNAPPLIED, 1, stream, str(applied))
    oldest_unapplied = Offset.parse(oldest) if oldest else None
    return lag_of(oldest_unapplied, int(seconds) * 1000.0 + int(micros) / 1000.0)


class LagSampler:
    """Samples `measure()` every `interval_s` on a thread of its own; `current` is the latest sample.

    A failed sample (Redis away) keeps the previous value and is logged (once per run of failures: the follow loop
    already reports Redis being away every second); the next interval retries.
    """

    def __init__(
        self,
        measure: Callable[[], ReplicaLag],
        interval_s: float = LAG_SAMPLE_INTERVAL_S,
        on_sample: Callable[[ReplicaLag], None] | None = None,
    ):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.current = ReplicaLag()
        self._measure = measure
        self._interval_s = interval_s
        self._on_sample = on_sample
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def sample(self) -> ReplicaLag:
        try:
            self.current = self._measure()
            self._failing = False
        except Exception as error:  # the follower keeps serving; its last known lag stands
            report = log.debug if self._failing else log.warning
            report("could not sample the follower's lag (%s); keeping %.3f s", error, self.current.seconds)
            self._failing = True
        if self._on_sample is not None:
            self._on_sample(self.current)
        return self.current

    def start(self) -> LagSampler:
        self._thread = threading.Thread(target=self._run, name="lag-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        self.sample()
        while not self._stop.wait(self._interval_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
