"""Scratch memory of Mines: how many stored rows one Mine scores at once, and how many Mines run at once.

A Mine's scratch is its score matrices, [anchors, chunk rows] each, so it grows with anchors x chunk rows. Two
settings bound it, the same way on a CPU and a GPU (the device only decides where the scratch lives):
- `mine_scratch_bytes`: one Mine's budget; the chunk is as many rows as fit it for that Mine's anchor count;
- `scratch_budget_bytes`: all Mines together. A Mine that does not fit waits, first come first served, in a
  queue of at most `mine_queue_limit` Mines; past that it is refused (ResourceExhausted), so a burst gets a fast
  answer it can retry instead of a pile-up behind the score matrices.
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager

import torch

from helip.miner_service.core.errors import ResourceExhausted
from helip.miner_service.core.search import SearchCancelled

CANCEL_POLL_S = 0.05  # how often a waiting Mine asks whether its caller is still there


def bytes_per_score(dtype: torch.dtype) -> int:
    """Scratch bytes per (anchor, stored row) of the exact search.

    The float32 image and text similarities, two bool masks of the near-duplicate cut, and, for half-precision
    rows, the two matrix products before they are widened to float32."""
    widened = 0 if dtype == torch.float32 else 2 * dtype.itemsize
    return 4 + 4 + 1 + 1 + widened


def chunk_rows(n_anchors: int, budget_bytes: int, per_score: int, most_rows: int) -> int:
    """Stored rows to score at once so that n_anchors x rows x per_score stays within budget_bytes.

    At least one row (a budget below one row's scores still lets the Mine run, slowly), at most `most_rows`."""
    return max(1, min(most_rows, budget_bytes // max(1, n_anchors * per_score)))


class ScratchAdmission:
    """Admits Mines against a total scratch budget; FIFO, with a bounded queue. Thread-safe."""

    def __init__(self, total_bytes: int, queue_limit: int):
        assert total_bytes > 0 and queue_limit >= 0
        self.total_bytes = total_bytes
        self.queue_limit = queue_limit
        self._cond = threading.Condition()
        self._in_use = 0
        self._queue: deque[object] = deque()

    @property
    def in_use_bytes(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @contextmanager
    def admitted(self, nbytes: int, cancelled=None):
        """Hold `nbytes` of the budget for the block; wait in the queue while they are not free.

        A request above the whole budget is admitted alone. Raises ResourceExhausted when the queue is full and
        SearchCancelled when `cancelled()` turns True while waiting."""
        nbytes = min(nbytes, self.total_bytes)
        with self._cond:
            if self._queue or self._in_use + nbytes > self.total_bytes:
                self._wait_turn(nbytes, cancelled)
            self._in_use += nbytes
        try:
            yield
        finally:
            with self._cond:
                self._in_use -= nbytes
                self._cond.notify_all()

    def _wait_turn(self, nbytes: int, cancelled) -> None:
        if len(self._queue) >= self.queue_limit:
            raise ResourceExhausted(
                "",
                f"{len(self._queue)} Mines already wait for scratch memory (mine_queue_limit={self.queue_limit}, "
                f"scratch_budget_bytes={self.total_bytes}, in use {self._in_use}); retry later",
            )
        ticket = object()
        self._queue.append(ticket)
        self._cond.notify_all()  # wakes wait_for_waiters
        try:
            while self._queue[0] is not ticket or self._in_use + nbytes > self.total_bytes:
                if cancelled is not None and cancelled():
                    raise SearchCancelled("the caller left while the Mine waited for scratch memory")
                self._cond.wait(CANCEL_POLL_S if cancelled is not None else None)
        finally:
            self._queue.remove(ticket)
            self._cond.notify_all()

    def wait_for_waiters(self, count: int, timeout_s: float | None = None) -> bool:
        """Block until at least `count` Mines wait (tests, benchmarks). Returns whether they do."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._queue) >= count, timeout_s)
