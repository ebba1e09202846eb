"""Mines batched across callers: concurrent Mines of one namespace answered by one pass over the rows.

A small Mine (a trainer rank's 128 anchors) reads every stored row for few products, so on a GPU it is bound by
memory bandwidth, and sixteen ranks' Mines one after another read the rows sixteen times. Merged, their anchors
share one read (core.miner.HardPairMiner.mine_many), and each Mine still gets exactly its own answer: its k, its
exclusions, its anchors.

Continuous batching without a thread of its own: the first caller that finds no pass running leads. It waits
until `window_s` after the oldest queued Mine arrived, so that Mines sent together are searched together, takes
the queue (up to `max_anchors` anchors, whole Mines), runs the pass, hands out the answers, and passes the lead to
the oldest Mine that queued meanwhile. A Mine that arrives during a pass therefore waits for at most that pass, then
joins the next; its latency cost is bounded by the window plus one pass. A caller that goes away while queued
(deadline, cancel) leaves the queue; a pass stops only when every caller in it has gone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from helip.miner_service.core.api import Cancelled, MineQuery, MineResult
from helip.miner_service.core.search import SearchCancelled

log = logging.getLogger(__name__)

# How often a queued caller looks whether it has gone away (its deadline passed) while it waits.
POLL_S = 0.02


@dataclass(eq=False)
class _Queued:
    query: MineQuery
    cancelled: Cancelled | None
    arrived: float
    woken: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # woken to lead the next pass, not with an answer
    outcome: MineResult | Exception | None = None

    def gone(self) -> bool:
        return self.cancelled is not None and self.cancelled()


class MineBatcher:
    """Serves `mine` calls of one core (a MinerCore) through merged passes (`core.mine_many`). Thread-safe."""

    def __init__(self, core, window_s: float, max_anchors: int):
        if window_s < 0 or max_anchors < 1:
            raise ValueError(f"window_s must be >= 0 and max_anchors >= 1, got {window_s}, {max_anchors}")
        self.core = core
        self.window_s = window_s
        self.max_anchors = max_anchors
        self._lock = threading.Lock()
        self._queue: deque[_Queued] = deque()
        self._leading = False

    def mine(self, query: MineQuery, cancelled: Cancelled | None = None) -> MineResult:
        """The Mine's answer, from a pass it shares with the Mines queued beside it (MinerCore.mine's contract)."""
        me = _Queued(query, cancelled, time.monotonic())
        with self._lock:
            self._queue.append(me)
            if not self._leading:
                self._leading = me.lead = True
                me.woken.set()
        self._wait(me)
        if me.lead:
            self._lead()
        if isinstance(me.outcome, Exception):
            raise me.outcome
        return me.outcome

    def _wait(self, me: _Queued) -> None:
        while not me.woken.wait(POLL_S if me.cancelled is not None else None):
            if me.gone():
                with self._lock:
                    if not me.woken.is_set() and me in self._queue:
                        self._queue.remove(me)
                        me.outcome = SearchCancelled("the caller went away while its Mine was queued")
                        return

    def _lead(self) -> None:
        """Run one pass for the oldest queued Mines (this caller's among them), then hand the lead on."""
        with self._lock:
            oldest = self._queue[0].arrived
        pause = oldest + self.window_s - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        with self._lock:
            batch = [self._queue.popleft()]  # the leader is always the oldest: it takes its own Mine
            anchors = batch[0].query.n_anchors
            while self._queue and anchors + self._queue[0].query.n_anchors <= self.max_anchors:
                anchors += self._queue[0].query.n_anchors
                batch.append(self._queue.popleft())
        live = []
        for queued in batch:
            if queued.gone():
                queued.outcome = SearchCancelled("the caller went away before its Mine's pass began")
            else:
                live.append(queued)
        try:
            if live:
                outcomes = self.core.mine_many(
                    [queued.query for queued in live], cancelled=lambda: all(queued.gone() for queued in live)
                )
                for queued, outcome in zip(live, outcomes):
                    queued.outcome = outcome
        except Exception as error:  # the pass failed (cancelled, refused, a bug): every Mine in it hears why
            for queued in live:
                queued.outcome = error
        finally:
            with self._lock:
                for queued in batch[1:]:
                    queued.woken.set()
                if self._queue:
                    self._queue[0].lead = True
                    self._queue[0].woken.set()
                else:
                    self._leading = False
