"""The trainer's side of online mining: Mine calls P batches ahead, and embeddings pushed in the background.

Neither ever blocks a training step for long: a Mine answer that is not there by its deadline, or an error, gives
`None` (the composer then falls back to random samples), and a full push queue drops the newest embeddings.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import grpc
import numpy as np

from helip.miner.v1 import miner_pb2 as pb
from miner_service.client import ClientConfig, MinerClient
from miner_service.sharding import ShardedMinerClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MiningConfig:
    address: str = ""  # host:port of the miner, or of every shard comma-separated; empty: start a local one
    k: int = 50  # neighbours asked per anchor; the composer draws one of them (the paper's code: top 50)
    prefetch: int = 2  # batches mined ahead of the one training
    deadline_s: float = 2.0  # how long a step waits for a Mine answer that is not in yet
    rpc_timeout_s: float = 30.0
    scoring: str = "PRODUCT"
    max_similarity: float = 0.0  # 0: the miner's default near-duplicate cut
    push_queue: int = 64  # upserts waiting to be sent before new ones are dropped
    wire_dtype: str = "FLOAT16"
    # Before the first step, embed the whole training set once with the starting model and push it, so that
    # epoch one already has hard pairs (the paper's offline pass, streamed). Off: epoch one mostly falls back.
    bootstrap_index: bool = False
    # Push each step's embeddings (online HELIP). Off with bootstrap_index on: the index stays as the starting
    # model saw the data, i.e. the paper's offline mining.
    update_index: bool = True
    # Security towards the miner: TLS (trusting tls_ca_file, else the system roots), a client certificate for
    # mutual TLS, and a bearer token read from token_file (else $HELIP_AUTH_TOKEN).
    tls: bool = False
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_server_name: str = ""
    token_file: str = ""


@dataclass
class MiningCounters:
    """What the trainer logs and exports about mining (read by the engine each step)."""

    mine_calls: int = 0
    mine_failures: int = 0
    mine_late: int = 0
    waited_s: float = 0.0
    pushed_rows: int = 0
    push_failures: int = 0
    dropped_pushes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas) -> None:
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


def make_client(config: MiningConfig):
    """A MinerClient, or a ShardedMinerClient when `address` lists several shards ("host:a,host:b,...")."""
    # Retries are off: a failed Mine falls back at once, and a failed push is counted; the channel reconnects
    # by itself (its backoff is capped low so that a restarted miner is used again within a second or two).
    client_config = ClientConfig.with_token_from(
        config.token_file, address=config.address, timeout_s=config.rpc_timeout_s, retries=0,
        wire_dtype=pb.DType.Value(config.wire_dtype), tls=config.tls, tls_ca_file=config.tls_ca_file,
        tls_cert_file=config.tls_cert_file, tls_key_file=config.tls_key_file,
        tls_server_name=config.tls_server_name)
    addresses = [a.strip() for a in config.address.split(",") if a.strip()]
    if len(addresses) > 1:
        return ShardedMinerClient(addresses, client_config)
    return MinerClient(client_config)


class MiningPrefetcher:
    """Keeps the Mine calls for the next `prefetch` batches in flight."""

    def __init__(self, client: MinerClient, config: MiningConfig, counters: MiningCounters):
        self.client = client
        self.config = config
        self.counters = counters
        self._pool = ThreadPoolExecutor(max_workers=max(1, config.prefetch), thread_name_prefix="mine")
        self._pending: dict[int, Future] = {}
        self._scoring = pb.Scoring.Value(config.scoring)
        self._last_error_log = 0.0

    def request(self, step: int, anchor_ids: np.ndarray) -> None:
        """Start mining for the batch of `step` (idempotent). The anchors exclude each other."""
        if step in self._pending:
            return
        self._pending[step] = self._pool.submit(self._mine, anchor_ids)

    def _mine(self, anchor_ids: np.ndarray) -> np.ndarray:
        neighbours = self.client.mine(self.config.k, anchor_ids=anchor_ids, exclude_ids=anchor_ids,
                                      max_similarity=self.config.max_similarity, scoring=self._scoring)
        return neighbours.ids

    def result(self, step: int) -> np.ndarray | None:
        """Neighbour ids [anchors, k] for the batch of `step`, or None (not requested, late, or failed)."""
        future = self._pending.pop(step, None)
        for old in [s for s in self._pending if s < step]:  # answers for steps that were skipped
            self._pending.pop(old).cancel()
        if future is None:
            return None
        started = time.perf_counter()
        try:
            ids = future.result(timeout=self.config.deadline_s)
            self.counters.add(mine_calls=1)
            return ids
        except FutureTimeout:
            future.cancel()
            self.counters.add(mine_calls=1, mine_late=1)
            self._log_fallback(f"Mine for step {step} missed its {self.config.deadline_s} s deadline")
        except grpc.RpcError as error:
            self.counters.add(mine_calls=1, mine_failures=1)
            self._log_fallback(f"Mine for step {step} failed: {error.code().name} {error.details()}")
        finally:
            self.counters.add(waited_s=time.perf_counter() - started)
        return None

    def _log_fallback(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_error_log > 10.0:  # a down miner would otherwise log every step
            log.warning("%s; falling back to random samples", message)
            self._last_error_log = now

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


class EmbeddingPusher:
    """A bounded queue and one sender thread: the step enqueues and returns; a full queue drops and counts."""

    def __init__(self, client: MinerClient, config: MiningConfig, counters: MiningCounters):
        self.client = client
        self.counters = counters
        self._queue: queue.Queue = queue.Queue(maxsize=config.push_queue)
        self._thread = threading.Thread(target=self._run, name="push", daemon=True)
        self._last_error_log = 0.0
        self._thread.start()

    def push(self, ids: np.ndarray, image: np.ndarray, text: np.ndarray, step: int) -> bool:
        """Queue one batch of normalised embeddings (fp16 numpy, [n, dim]); False when it was dropped."""
        try:
            self._queue.put_nowait((ids, image, text, step))
            return True
        except queue.Full:
            self.counters.add(dropped_pushes=1)
            return False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            ids, image, text, step = item
            try:
                self.client.upsert(ids, image, text, step)
                self.counters.add(pushed_rows=len(ids))
            except grpc.RpcError as error:
                self.counters.add(push_failures=1)
                now = time.monotonic()
                if now - self._last_error_log > 10.0:
                    log.warning("push of %d rows failed: %s %s", len(ids), error.code().name, error.details())
                    self._last_error_log = now
            finally:
                self._queue.task_done()

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
