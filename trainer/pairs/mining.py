"""The client side of online mining: its settings, its counters, and Mine calls kept in flight ahead of use.

Nothing here ever makes a caller wait for the miner. `MinePrefetcher.request` starts a Mine call in a small
thread pool and returns; `MinePrefetcher.take` hands back the answer only if it has already arrived, else None
(the batch composer then falls back to random samples). Calls go through a circuit breaker, so a hung or dead
miner costs a few deadlines, not one per batch.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import grpc
import numpy as np

from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.client.replicas import ReplicatedMinerClient
from helip.miner_service.client.sharded import ShardedMinerClient
from helip.miner_service.client.single import ClientConfig, MinerClient, Neighbours
from helip.trainer.pairs.breaker import CircuitBreaker
from helip.trainer.pairs.mining_config import MiningConfig
from helip.trainer.pairs.refusals import is_refusal, refusal

log = logging.getLogger(__name__)


@dataclass
class MiningCounters:
    """Running totals of what mining did for one rank; thread-safe, read by loggers and metrics."""

    mine_calls: int = 0  # Mine calls sent
    mine_failures: int = 0  # ...that failed (error or past deadline_s)
    mine_late: int = 0  # answers not there when their batch was composed (the batch fell back)
    mine_skipped: int = 0  # batches not asked for because the circuit breaker was open
    mine_not_started: int = 0  # batches composed before mining started (start_step, start_coverage)
    foreign_ids: int = 0  # neighbour ids the data set does not hold (a miner with other rows), dropped
    breaker_opened: int = 0
    pushed_rows: int = 0
    push_failures: int = 0
    dropped_pushes: int = 0  # push batches dropped: queue full, or breaker open
    mine_by_follower: int = 0  # Mine answers that came from a read-only follower (sharded: from any shard's)
    mine_degraded: int = 0  # sharded Mine answers that lacked some shards (mining.strict_shards off)
    max_replica_lag_ms: int = 0  # the most a follower that answered was behind its leader, in milliseconds
    guard_dropped: int = 0  # mined candidates the false-negative guard (mining.positive_ratio) dropped
    # Mine answers that held no neighbour for any anchor: an index (nearly) empty of other rows, or every candidate
    # over the near-duplicate cut (a model whose embeddings collapsed), or all dropped by the guard. Logged (once a
    # minute) only when the index held more rows than the anchors asked.
    mine_empty: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas) -> None:
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def raise_to(self, **values) -> None:
        """Set each named counter to the given value where that is higher (running maxima)."""
        with self.lock:
            for name, value in values.items():
                setattr(self, name, max(getattr(self, name), value))

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lock"}


def make_client(config: MiningConfig):
    """A client of the MinerClient interface for `address` and `followers`: per shard a MinerClient, or a
    ReplicatedMinerClient when the shard has followers (reads go to them, writes to the leader); several shards
    ("host:a,host:b,...") behind a ShardedMinerClient (degraded or strict, per strict_shards)."""
    # Retries are off: a failed Mine falls back at once, and a failed push is counted; the channel reconnects
    # by itself (its backoff is capped low so that a restarted miner is used again within a second or two).
    client_config = ClientConfig.with_token_from(
        config.token_file,
        address=config.address,
        timeout_s=config.rpc_timeout_s,
        retries=0,
        wire_dtype=pb.DType.Value(config.wire_dtype),
        tls=config.tls,
        tls_ca_file=config.tls_ca_file,
        tls_cert_file=config.tls_cert_file,
        tls_key_file=config.tls_key_file,
        tls_server_name=config.tls_server_name,
        namespace=config.namespace,
    )
    shards = [
        ReplicatedMinerClient(leader, followers, client_config, config.follower_retry_s)
        if followers
        else MinerClient(dataclasses.replace(client_config, address=leader))
        for leader, followers in zip(config.shard_addresses, config.shard_followers)
    ]
    if len(shards) > 1:
        return ShardedMinerClient(shards, client_config, strict=config.strict_shards)
    return shards[0] if shards else MinerClient(client_config)


class RateLimitedLog:
    """A warning at most every `every_s` seconds: a down miner would otherwise log once per batch."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0):
        self._logger = logger
        self._every_s = every_s
        self._last = -float("inf")

    def warning(self, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._last >= self._every_s:
            self._last = now
            self._logger.warning(message, *args)


class MinePrefetcher:
    """Mine calls for batches ahead, at most `max_in_flight` running at once, behind a circuit breaker.

    `session` (a MiningSession, or a client for default settings) gives the client, the settings, the counters
    and the refusal latch: a refusal stops all further asking (see refusals.py), an outage opens the breaker."""

    def __init__(self, session):
        from helip.trainer.pairs.session import MiningSession  # the session module builds prefetchers: no cycle

        self.session = MiningSession.of(session)
        self.client = self.session.client
        self.config = config = self.session.config
        self.counters = self.session.counters
        self.breaker = CircuitBreaker(config.breaker, on_open=lambda: self.counters.add(breaker_opened=1))
        self._pool = ThreadPoolExecutor(max_workers=config.max_in_flight, thread_name_prefix="mine")
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._scoring = pb.Scoring.Value(config.scoring)
        self._warn = RateLimitedLog(log)
        self._empty_warn = RateLimitedLog(log, every_s=60.0)  # its own limit: it must not hide failures

    def request(self, step: int, anchor_ids: np.ndarray, owner: object = None) -> bool:
        """Start mining for the batch of `step` (idempotent); False when it was skipped. Never blocks.
        owner: whose answer it is (any hashable, e.g. one per iterator): `take` and `drop` touch only the answers
        of the owner they are given, so two iterators over one sampler never take or cancel each other's."""
        key = (owner, step)
        with self._lock:
            if key in self._pending:
                return True
            if self.session.refusals.refused:
                return False
            if not self.breaker.allow():
                self.counters.add(mine_skipped=1)
                return False
            # At most max_in_flight calls run; the rest queue, and a queued call whose batch is composed
            # before it started is cancelled (take), so a hung miner never holds more than max_in_flight threads.
            self._pending[key] = self._pool.submit(self._mine, np.asarray(anchor_ids, dtype=np.int64))
        return True

    def _mine(self, anchor_ids: np.ndarray) -> np.ndarray | None:
        try:
            self.counters.add(mine_calls=1)
            neighbours = self.client.mine(
                self.config.k,
                anchor_ids=anchor_ids,
                exclude_ids=anchor_ids,
                max_similarity=self.config.max_similarity,
                scoring=self._scoring,
                positive_ratio=self.config.positive_ratio,
                timeout_s=self.config.deadline_s,
            )
            self.breaker.success()
            self._count(neighbours)
            return neighbours.ids
        except grpc.RpcError as error:
            self.counters.add(mine_failures=1)
            if is_refusal(error):  # a mistake, not an outage: stop asking, and stop the run at its next batch
                self.session.refusals.record(refusal(error, "Mine"))
                return None
            self.breaker.failure()
            self._warn.warning(
                "Mine failed (%s %s); batches fall back to random samples; breaker %s",
                error.code().name,
                error.details(),
                self.breaker.state,
            )
            return None

    def _count(self, neighbours: Neighbours) -> None:
        self.counters.add(guard_dropped=neighbours.guard_dropped)
        if neighbours.ids.size and not (neighbours.ids >= 0).any():
            self.counters.add(mine_empty=1)
            if neighbours.size > len(neighbours.ids):  # there were other rows: not just an index still filling up
                self._empty_warn.warning(
                    "Mine answered no neighbour for any of %d anchors among %d rows (%d dropped by the guard): "
                    "every candidate is over the near-duplicate cut (mining.max_similarity %s; a model whose "
                    "embeddings collapsed) or excluded; those batches fall back to random samples",
                    len(neighbours.ids),
                    neighbours.size,
                    neighbours.guard_dropped,
                    self.config.max_similarity or "0: the miner's default",
                )
        if neighbours.served_by_follower:
            self.counters.add(mine_by_follower=1)
            self.counters.raise_to(max_replica_lag_ms=round(neighbours.replica_lag_seconds * 1000))
        if neighbours.missing_shards:
            self.counters.add(mine_degraded=1)
            self._warn.warning(
                "Mine answered without shards %s (their rows are not among the hard pairs)",
                list(neighbours.missing_shards),
            )

    def take(self, step: int, owner: object = None) -> np.ndarray | None:
        """Neighbour ids [anchors, k] for `step` (asked by `owner`) if the answer is already in, else None.
        Never blocks."""
        with self._lock:
            future = self._pending.pop((owner, step), None)
            # The owner's answers for batches it skipped over; another owner may still be behind this step.
            for old in [key for key in self._pending if key[0] == owner and key[1] < step]:
                self._pending.pop(old).cancel()
        if future is None:
            return None
        if not future.done():
            future.cancel()  # a call not started yet never starts; a running one finishes and is dropped
            self.counters.add(mine_late=1)
            return None
        return future.result()

    def wait(self, step: int, timeout_s: float, owner: object = None) -> None:
        """Block up to `timeout_s` for `owner`'s answer of `step`: only for use before training starts."""
        with self._lock:
            future = self._pending.get((owner, step))
        if future is not None:
            try:
                future.exception(timeout=timeout_s)
            except (TimeoutError, CancelledError):
                pass

    def drop(self, owner: object) -> None:
        """Cancel and forget `owner`'s answers not taken (an iterator that ended or was abandoned)."""
        with self._lock:
            for key in [key for key in self._pending if key[0] == owner]:
                self._pending.pop(key).cancel()

    def close(self) -> None:
        with self._lock:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
