"""Embeddings to the miner, off the training step: a bounded queue and one sender thread.

`EmbeddingPusher.push` is what a training loop calls after each step with the batch's sample ids and the
normalised embeddings it computed anyway. It takes torch tensors (CPU or CUDA) or numpy arrays and returns at
once: CUDA tensors are copied to pinned host memory on the current stream without a synchronisation, and the
sender thread waits for that copy, not the step. A full queue, or a miner behind an open circuit breaker,
drops the batch and counts it: a lost push only makes a few rows staler.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from helip.trainer.pairs.breaker import CircuitBreaker
from helip.trainer.pairs.mining import RateLimitedLog
from helip.trainer.pairs.refusals import is_refusal, refusal

log = logging.getLogger(__name__)


@dataclass
class _HostCopy:
    """fp16 rows on the host, possibly still arriving from a GPU (then `ready` is the copy's CUDA event)."""

    rows: torch.Tensor | np.ndarray
    ready: object = None

    def numpy(self) -> np.ndarray:
        if self.ready is not None:
            self.ready.synchronize()
        return self.rows.numpy() if isinstance(self.rows, torch.Tensor) else self.rows


def _to_host(rows) -> _HostCopy:
    if isinstance(rows, np.ndarray):
        return _HostCopy(rows.astype(np.float16, copy=False))
    rows = rows.detach()
    if rows.is_cuda:
        host = torch.empty(rows.shape, dtype=torch.float16, pin_memory=True)
        host.copy_(rows.to(torch.float16), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _HostCopy(host, event)
    return _HostCopy(rows.to(torch.float16).contiguous().clone())  # the caller may reuse its buffer


def _ids(ids) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids).astype(np.uint64, copy=False).ravel()


class EmbeddingPusher:
    """Sends (ids, image_emb, text_emb, step) batches to the miner in the background.

    `session` (a MiningSession, or a client for default settings) gives the client, the queue size, the counters
    and the refusal latch: a refusal stops the sending and is raised by the next `push`."""

    def __init__(self, session):
        from helip.trainer.pairs.session import MiningSession  # the session module builds pushers: no cycle

        self.session = MiningSession.of(session)
        self.client = self.session.client
        self.counters = self.session.counters
        config = self.session.config
        self.breaker = CircuitBreaker(config.breaker, on_open=lambda: self.counters.add(breaker_opened=1))
        self._queue: queue.Queue = queue.Queue(maxsize=config.push_queue)
        self._thread = threading.Thread(target=self._run, name="push", daemon=True)
        self._warn = RateLimitedLog(log)
        self._thread.start()

    def push(self, ids, image_emb, text_emb, step: int, block: bool = False, timeout_s: float | None = None) -> bool:
        """Queue one batch of L2-normalised embeddings ([n, dim] each, row i of sample ids[i]).

        Returns False when the batch was dropped (queue full; with `block`, full for `timeout_s`). Raises
        MinerRefused once the miner refused a push or a Mine (no retry would help).
        """
        self.session.check()
        item = (_ids(ids), _to_host(image_emb), _to_host(text_emb), int(step))
        try:
            self._queue.put(item, block=block, timeout=timeout_s)
            return True
        except queue.Full:
            self.counters.add(dropped_pushes=1)
            return False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._send(*item)
            finally:
                self._queue.task_done()

    def _send(self, ids: np.ndarray, image: _HostCopy, text: _HostCopy, step: int) -> None:
        if self.session.refusals.refused or not self.breaker.allow():
            self.counters.add(dropped_pushes=1)
            return
        image_rows, text_rows = image.numpy(), text.numpy()
        unique, first = np.unique(ids, return_index=True)
        if len(unique) < len(ids):
            # A batch can hold a sample twice (a bad sample's substitute already in the batch); the miner refuses
            # duplicate ids in one request, and both copies are the same sample: send it once.
            ids, image_rows, text_rows = unique, image_rows[first], text_rows[first]
        try:
            self.client.upsert(ids, image_rows, text_rows, step)
            self.breaker.success()
            self.counters.add(pushed_rows=len(ids))
        except grpc.RpcError as error:
            self.counters.add(push_failures=1)
            if is_refusal(error):
                self.session.refusals.record(refusal(error, f"a push of {len(ids)} rows"))
                return
            self.breaker.failure()
            self._warn.warning("push of %d rows failed: %s %s", len(ids), error.code().name, error.details())

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything queued was sent (or failed). Returns False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        self.flush(timeout_s)
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout_s)
