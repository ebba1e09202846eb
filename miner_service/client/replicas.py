"""Read replicas: one shard's leader and its followers, spoken to as one miner.

Reads (Mine, Fetch) go to the followers in turn; a follower that fails with UNAVAILABLE or DEADLINE_EXCEEDED
hands the call to the next follower, then to the leader, and rests for `retry_after_s` before it is tried again
(followers still resting are the last resort, after the leader). A follower that does not know the namespace yet
(it learns of new ones within a poll of the leader's registry) hands the call on too, without resting, so a
namespace is readable as soon as it is created. Writes (Upsert, UpsertStream, Delete), namespace changes and Stats
go to the leader only: a follower refuses writes.

Reads may lag: a follower answers from what it has applied of the leader's log (`Neighbours.replica_lag_seconds`
says how far behind it was), so a read just after a write may not see it yet.

Within one follower address gRPC does what it already does well: the channel balances round-robin over every
address the name resolves to (a headless Service naming several follower pods) and, with client-side health
checking, skips a server that reports NOT_SERVING (as a miner does from the start of its graceful shutdown).
Across addresses, and to the leader, failover needs the client logic here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import grpc

from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.client.protocol import MineCalls, MineQuery
from helip.miner_service.client.single import ClientConfig, FetchedRows, MinerClient, Neighbours
from helip.miner_service.wire.names import SERVICE_NAME
from helip.miner_service.wire.status import refused_field

log = logging.getLogger(__name__)

T = TypeVar("T")
# A follower that answers these could not serve the call; another replica may. Other codes (a bad request,
# NOT_FOUND under strict_anchors, an auth failure) would be answered alike by every replica and are raised.
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
DEFAULT_RETRY_AFTER_S = 5.0
FOLLOWER_SERVICE_CONFIG = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": SERVICE_NAME}}
)


class ReplicaRotation:
    """The order in which replicas 0..n_followers-1 (followers) and n_followers (the leader) are tried.

    Followers that have not failed within `retry_after_s` come first, starting one further along at every call
    (round-robin); then the leader; then the resting followers, soonest back first. Thread-safe.
    """

    def __init__(self, n_followers: int, retry_after_s: float = DEFAULT_RETRY_AFTER_S, clock=time.monotonic):
        if n_followers < 0:
            raise ValueError(f"n_followers must be >= 0, got {n_followers}")
        if retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {retry_after_s}")
        self.n_followers = n_followers
        self.leader = n_followers
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._resting_until = [0.0] * n_followers
        self._next = 0
        self._lock = threading.Lock()

    def order(self) -> list[int]:
        """The replicas to try for one call, in order (every replica once); moves the round-robin on."""
        with self._lock:
            now = self._clock()
            turn = [(self._next + i) % self.n_followers for i in range(self.n_followers)]
            if self.n_followers:
                self._next = (self._next + 1) % self.n_followers
            ready = [f for f in turn if self._resting_until[f] <= now]
            resting = sorted((f for f in turn if self._resting_until[f] > now), key=self._resting_until.__getitem__)
            return [*ready, self.leader, *resting]

    def failed(self, replica: int) -> None:
        """`replica` could not serve a call: a follower rests for retry_after_s (the leader never rests)."""
        if replica != self.leader:
            with self._lock:
                self._resting_until[replica] = self._clock() + self.retry_after_s

    def succeeded(self, replica: int) -> None:
        """`replica` answered: a resting follower is back in turn at once."""
        if replica != self.leader:
            with self._lock:
                self._resting_until[replica] = 0.0

    def resting(self) -> list[int]:
        """The followers resting now, in index order."""
        with self._lock:
            now = self._clock()
            return [f for f in range(self.n_followers) if self._resting_until[f] > now]


class ReplicatedMinerClient(MineCalls):
    """The MinerClient interface over one leader address and its follower addresses (gRPC targets).

    `config` is the leader's; followers get the same settings with retries off (failing over is their retry)
    and a round-robin, health-checked channel. A read's deadline (timeout_s, else config.timeout_s) covers all its
    attempts; every attempt but the last gets at most half of what is left, so a hung follower leaves time to ask
    another.
    """

    def __init__(
        self,
        leader: str,
        followers: Sequence[str],
        config: ClientConfig = ClientConfig(),
        retry_after_s: float = DEFAULT_RETRY_AFTER_S,
    ):
        if not leader:
            raise ValueError("ReplicatedMinerClient needs the leader's address")
        self.config = config
        self.leader = MinerClient(dataclasses.replace(config, address=leader))
        follower_config = dataclasses.replace(config, retries=0, service_config=FOLLOWER_SERVICE_CONFIG)
        self.followers = [MinerClient(dataclasses.replace(follower_config, address=a)) for a in followers]
        self.rotation = ReplicaRotation(len(self.followers), retry_after_s)
        self._replicas = [*self.followers, self.leader]

    def close(self) -> None:
        """Close the leader's and every follower's channel."""
        for replica in self._replicas:
            replica.close()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait for the leader; followers get a second each (one that is down is failed over until it is back)."""
        self.leader.wait_ready(timeout_s)
        for address, follower in zip(self.follower_addresses, self.followers):
            try:
                follower.wait_ready(min(1.0, timeout_s))
            except grpc.FutureTimeoutError:
                log.warning("follower %s is not ready; reads fail over to the other replicas", address)

    @property
    def follower_addresses(self) -> list[str]:
        """The followers' addresses, in rotation order (index i is replica i of `rotation`)."""
        return [f.config.address for f in self.followers]

    # ---- reads: followers first --------------------------------------------------------------------------------
    def _read(self, call: Callable[[MinerClient, float], T], timeout_s: float | None) -> T:
        deadline = time.monotonic() + (timeout_s or self.config.timeout_s)
        order = self.rotation.order()
        last_error: grpc.RpcError | None = None
        for position, replica in enumerate(order):
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                break
            attempt_s = left_s if position == len(order) - 1 else left_s / 2
            try:
                result = call(self._replicas[replica], attempt_s)
            except grpc.RpcError as error:
                if replica != self.rotation.leader and _namespace_unknown(error):
                    last_error = error  # behind, not down: the next replica answers, and this one is asked again
                    continue
                if error.code() not in FAILOVER_CODES:
                    raise
                last_error = error
                self.rotation.failed(replica)
                log.info(
                    "%s %s failed (%s); trying the next replica",
                    "leader" if replica == self.rotation.leader else "follower",
                    self._replicas[replica].config.address,
                    error.code().name,
                )
                continue
            self.rotation.succeeded(replica)
            return result
        assert last_error is not None  # the first attempt always runs: its deadline is still ahead
        raise last_error

    def mine_query(self, query: MineQuery, timeout_s: float | None = None) -> Neighbours:
        """A Mine answered by a follower when one can (Neighbours.served_by_follower says so)."""
        return self._read(lambda replica, t: replica.mine_query(query, t), timeout_s)

    def fetch_rows(self, ids, timeout_s: float | None = None) -> FetchedRows:
        """The stored rows of `ids` (see MinerClient.fetch_rows), read from a follower when one can answer."""
        return self._read(lambda replica, t: replica.fetch_rows(ids, timeout_s=t), timeout_s)

    # ---- writes and Stats: the leader ---------------------------------------------------------------------------
    def upsert_request(self, ids, image, text, step: int = 0) -> pb.UpsertRequest:
        """One UpsertRequest of these rows in the leader's wire dtype, for `upsert_stream`."""
        return self.leader.upsert_request(ids, image, text, step)

    def upsert_request_bytes(self, ids, image, text, step: int = 0) -> bytes:
        """`upsert_request(...)` serialised with one copy of the embeddings (see MinerClient.upsert_request_bytes)."""
        return self.leader.upsert_request_bytes(ids, image, text, step)

    def upsert(self, ids, image, text, step: int = 0, timeout_s: float | None = None) -> pb.UpsertReply:
        """Write the rows on the leader (followers copy them from its log); its reply: accepted, rows stored."""
        return self.leader.upsert(ids, image, text, step, timeout_s)

    def upsert_stream(self, requests: Iterable[pb.UpsertRequest], timeout_s: float | None = None) -> pb.UpsertReply:
        """Stream the requests to the leader; not retried (the leader may have applied a prefix)."""
        return self.leader.upsert_stream(requests, timeout_s)

    def delete(self, ids, timeout_s: float | None = None) -> pb.DeleteReply:
        """Delete `ids` on the leader; its reply: rows deleted, rows left."""
        return self.leader.delete(ids, timeout_s)

    def stats(self, timeout_s: float | None = None) -> pb.StatsReply:
        """The leader's Stats: what the followers hold once they have caught up."""
        return self.leader.stats(timeout_s)

    @property
    def namespace(self) -> str:
        """The namespace every call names (the leader's and the followers' alike)."""
        return self.leader.namespace

    def ensure_namespace(
        self, dim: int = 0, fingerprint: str = "", reset: bool = False, timeout_s: float | None = None
    ) -> pb.EnsureNamespaceReply:
        """Create the namespace on the leader unless it exists (see MinerClient.ensure_namespace)."""
        return self.leader.ensure_namespace(dim, fingerprint, reset, timeout_s)

    def drop_namespace(self, timeout_s: float | None = None) -> pb.DropNamespaceReply:
        """Drop the namespace on the leader; followers forget it within a poll of its registry."""
        return self.leader.drop_namespace(timeout_s)


def _namespace_unknown(error: grpc.RpcError) -> bool:
    return error.code() == grpc.StatusCode.NOT_FOUND and refused_field(error) == "namespace"
