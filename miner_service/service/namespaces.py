"""Namespaces: one miner serving many training runs, each in a namespace of its own.

A namespace has its own dim, rows (one core: a HardPairMiner, or a DurableMiner around one), log stream,
snapshot directory and metrics label. `NamespaceRegistry` maps names to them; the gRPC servicer asks it for the
namespace a request names and hands the request to that core.

With a durable log the registry itself is persisted: a Redis hash (`log.registry_key`) maps each name to its
dim, fingerprint and generation. A restart recovers exactly the namespaces in the hash; a follower re-reads it
to discover new namespaces and to forget dropped ones. The generation changes whenever a name is created anew
(after a drop or a reset), so a follower that sees a new generation rebuilds that namespace from scratch rather
than applying the new log over the old rows.

Order of durable steps: a create first removes anything left under the name (stream, snapshots), then writes
the registry entry; a drop first removes the rows' stream and snapshots, then the registry entry. A crash in
between leaves at worst an empty namespace that is still listed, never dropped rows that come back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis

from helip.miner_service.core.api import Cancelled, MineQuery, MinerCore, MineResult
from helip.miner_service.core.batching import MineBatcher
from helip.miner_service.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from helip.miner_service.core.miner import HardPairMiner
from helip.miner_service.service import snapshot
from helip.miner_service.service.config import DurabilityConfig, MinerConfig
from helip.miner_service.service.durable import DurableMiner
from helip.miner_service.service.lag import ReplicaLag
from helip.miner_service.service.log import registry_key, stream_key
from helip.miner_service.wire.names import DEFAULT_NAMESPACE

log = logging.getLogger(__name__)

DEFAULT = DEFAULT_NAMESPACE


@dataclass(frozen=True)
class NamespaceRecord:
    """What the registry persists of a namespace."""

    dim: int
    fingerprint: str = ""
    generation: str = ""  # new for every creation of the name

    def encode(self) -> str:
        return json.dumps({"dim": self.dim, "fingerprint": self.fingerprint, "generation": self.generation})

    @classmethod
    def decode(cls, text: str | bytes) -> NamespaceRecord:
        data = json.loads(text)
        return cls(int(data["dim"]), str(data.get("fingerprint", "")), str(data.get("generation", "")))


def new_generation() -> str:
    return uuid.uuid4().hex[:16]


@dataclass(frozen=True)
class NamespaceDurability(DurabilityConfig):
    """The durability settings of one namespace: its own log stream and snapshot directory."""

    namespace: str = DEFAULT

    @property
    def stream(self) -> str:
        return stream_key(self.key_prefix, self.namespace, self.shard_index, self.shard_count)

    @classmethod
    def of(cls, config: DurabilityConfig, namespace: str) -> NamespaceDurability:
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(DurabilityConfig)}
        if config.snapshot_dir:
            fields["snapshot_dir"] = str(snapshot.namespace_dir(Path(config.snapshot_dir), namespace))
        return cls(**fields, namespace=namespace)


@dataclass
class Namespace:
    name: str
    record: NamespaceRecord
    core: HardPairMiner
    durable: DurableMiner | None = None
    batcher: MineBatcher | None = None  # with search.batch_mines: concurrent Mines share a pass

    @property
    def miner(self) -> MinerCore:
        """What requests go to: the durable wrapper when there is a log, else the core."""
        return self.durable or self.core

    def mine(self, query: MineQuery, cancelled: Cancelled | None = None) -> MineResult:
        """A Mine of this namespace: through the batcher when Mines are batched, else alone."""
        return (self.batcher or self.miner).mine(query, cancelled)

    @property
    def dim(self) -> int:
        return self.record.dim

    @property
    def rows(self) -> int:
        return self.core.size


class RedisRegistryStore:
    """The persisted registry: one Redis hash, name -> NamespaceRecord as JSON."""

    def __init__(self, config: DurabilityConfig, timeout_s: float = 5.0):
        self.key = registry_key(config.key_prefix, config.shard_index, config.shard_count)
        self.redis = redis.Redis.from_url(
            config.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=10
        )

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except redis.RedisError as error:
            raise Unavailable("redis", f"the namespace registry could not {what} ({error})") from error

    def load(self) -> dict[str, NamespaceRecord]:
        entries = self._call("be read", self.redis.hgetall, self.key)
        return {name.decode(): NamespaceRecord.decode(value) for name, value in entries.items()}

    def put(self, name: str, record: NamespaceRecord) -> None:
        self._call("take the namespace", self.redis.hset, self.key, name, record.encode())

    def remove(self, name: str) -> None:
        self._call("drop the namespace", self.redis.hdel, self.key, name)

    def delete_stream(self, stream: str) -> None:
        self._call("delete the log stream", self.redis.delete, stream)


class NamespaceRegistry:
    """name -> Namespace, for one miner process. Thread-safe; creates, drops and (as a follower) syncs."""

    def __init__(self, config: MinerConfig, default_core: HardPairMiner | None = None):
        self.config = config
        self.durability = config.durability
        self.store = RedisRegistryStore(config.durability) if config.durability.redis_url else None
        self._default_core = default_core
        self._namespaces: dict[str, Namespace] = {}
        self._lock = threading.RLock()  # the map and create/drop
        self._total_lock = threading.Lock()  # check-then-write against max_total_rows
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._started = False
        self.on_dropped = None  # callback(name), e.g. to remove the name's metrics series

    @property
    def follower(self) -> bool:
        return self.durability.follow

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def open(self) -> None:
        """Recover every persisted namespace (snapshot + log replay) and make sure "default" exists."""
        records = self.store.load() if self.store else {}
        default = records.get(DEFAULT)
        if default is not None and default.dim != self.config.dim:
            raise ValueError(
                f"--dim is {self.config.dim} but the default namespace in Redis ({self.store.key}) holds dim "
                f"{default.dim}: start with --dim {default.dim}, or drop the default namespace first"
            )
        if default is None:
            # Adopt whatever the default stream and snapshots hold (a log written before namespaces existed, or a
            # registry lost with Redis' data): keep the snapshots' generation. A follower leaves it unknown ("")
            # until the leader registers it.
            generation = ""
            if self.durability.snapshot_dir:
                generation = snapshot.read_generation(Path(self.durability.snapshot_dir))
            if self.store and not self.follower:
                generation = generation or new_generation()
                self.store.put(DEFAULT, NamespaceRecord(self.config.dim, "", generation))
            records[DEFAULT] = NamespaceRecord(self.config.dim, "", generation)
        for name, record in sorted(records.items()):
            self._namespaces[name] = self._build(name, record, self._default_core if name == DEFAULT else None)

    def start(self) -> None:
        self._started = True
        with self._lock:
            for namespace in self._namespaces.values():
                if namespace.durable is not None:
                    namespace.durable.start()
        if self.store is not None and self.follower:
            self._watcher = threading.Thread(target=self._watch, name="namespaces", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        """Stop background work; each durable namespace writes its final snapshot."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(10)
        with self._lock:
            for namespace in self._namespaces.values():
                if namespace.durable is not None:
                    namespace.durable.stop()

    # ---- lookups --------------------------------------------------------------------------------------------
    def get(self, name: str) -> Namespace:
        with self._lock:
            namespace = self._namespaces.get(name)
        if namespace is None:
            raise NotFound("namespace", f"no namespace {name!r} on this miner (known: {', '.join(self.names())})")
        return namespace

    def find(self, name: str) -> Namespace | None:
        with self._lock:
            return self._namespaces.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._namespaces)

    def all(self) -> list[Namespace]:
        with self._lock:
            return [self._namespaces[name] for name in sorted(self._namespaces)]

    def lag(self) -> ReplicaLag:
        """A follower's lag: the worst over its durable namespaces (each tails a stream of its own)."""
        lags = [namespace.durable.lag() for namespace in self.all() if namespace.durable is not None]
        return max(lags, key=lambda lag: lag.seconds, default=ReplicaLag())

    def total_rows(self) -> int:
        return sum(namespace.rows for namespace in self.all())

    # ---- writes ---------------------------------------------------------------------------------------------
    def for_write(self, name: str, dim: int) -> Namespace:
        """The namespace an upsert goes to, created with the write's dim on the first write."""
        namespace = self.find(name)
        if namespace is not None:
            return namespace
        namespace, _ = self.ensure(name, dim, "", reset=False)
        return namespace

    def upsert(self, namespace: Namespace, ids, image, text, step) -> tuple[int, int]:
        """The namespace's upsert, refused with RESOURCE_EXHAUSTED past max_total_rows (max_rows is the core's)."""
        limit = self.config.max_total_rows
        if not limit:
            return namespace.miner.upsert(ids, image, text, step)
        with self._total_lock:
            total = self.total_rows()
            new_rows = namespace.core.check_capacity(ids)
            if total + new_rows > limit:
                raise ResourceExhausted(
                    "ids",
                    f"{new_rows} new rows would exceed max_total_rows={limit} over all namespaces (stored: {total})",
                )
            return namespace.miner.upsert(ids, image, text, step)

    def ensure(self, name: str, dim: int, fingerprint: str, reset: bool) -> tuple[Namespace, bool]:
        """(namespace, created): create `name` unless it exists; with `reset`, drop it first."""
        self._refuse_on_follower()
        with self._lock:
            existing = self._namespaces.get(name)
            if existing is not None and reset:
                self._drop_locked(existing)
                existing = None
            if existing is not None:
                if dim and dim != existing.dim:
                    raise FailedPrecondition(
                        "dim", f"namespace {name!r} holds dim {existing.dim}, not {dim}; drop or reset it to change"
                    )
                if fingerprint and not existing.record.fingerprint:
                    record = dataclasses.replace(existing.record, fingerprint=fingerprint)
                    if self.store:
                        self.store.put(name, record)
                    existing.record = record
                return existing, False
            if name == DEFAULT and dim and dim != self.config.dim:
                raise FailedPrecondition("dim", f"the default namespace has the configured dim {self.config.dim}")
            dim = dim or (self.config.dim if name == DEFAULT else 0)
            if dim <= 0:
                raise InvalidArgument("dim", f"namespace {name!r} does not exist; creating it needs a dim > 0")
            if name != DEFAULT and dim > self.config.max_namespace_dim:
                raise InvalidArgument("dim", f"{dim} exceeds max_namespace_dim={self.config.max_namespace_dim}")
            if name != DEFAULT and len(self._namespaces) >= self.config.max_namespaces:
                raise ResourceExhausted(
                    "namespace",
                    f"this miner holds max_namespaces={self.config.max_namespaces} namespaces; drop one first",
                )
            record = NamespaceRecord(dim, fingerprint, new_generation())
            if self.store:
                self._remove_durable_state(name)  # leftovers of an interrupted drop must not come back
                self.store.put(name, record)
            namespace = self._build(name, record)
            if self._started and namespace.durable is not None:
                namespace.durable.start()
            self._namespaces[name] = namespace
            log.info("namespace %r created: dim=%d fingerprint=%r", name, dim, fingerprint)
            return namespace, True

    def drop(self, name: str) -> int:
        """Drop `name` (rows, stream, snapshots; durably). "default" is emptied and stays. Returns rows dropped."""
        self._refuse_on_follower()
        with self._lock:
            namespace = self._namespaces.get(name)
            if namespace is None:
                raise NotFound("namespace", f"no namespace {name!r} on this miner")
            rows = namespace.rows
            self._drop_locked(namespace)
            if name == DEFAULT:
                self.ensure(DEFAULT, self.config.dim, "", reset=False)
            return rows

    def _drop_locked(self, namespace: Namespace) -> None:
        self._namespaces.pop(namespace.name, None)
        if namespace.durable is not None:
            namespace.durable.stop()
        if self.store:
            self._remove_durable_state(namespace.name)
            self.store.remove(namespace.name)
        log.info("namespace %r dropped (%d rows)", namespace.name, namespace.rows)
        if self.on_dropped is not None:
            self.on_dropped(namespace.name)

    def _remove_durable_state(self, name: str) -> None:
        self.store.delete_stream(NamespaceDurability.of(self.durability, name).stream)
        if self.durability.snapshot_dir:
            snapshot.remove_all(snapshot.namespace_dir(Path(self.durability.snapshot_dir), name))

    def _refuse_on_follower(self) -> None:
        if self.follower:
            raise FailedPrecondition("", "this miner is a read-only follower; send writes to the leader")

    # ---- construction and following -------------------------------------------------------------------------
    def _build(self, name: str, record: NamespaceRecord, core: HardPairMiner | None = None) -> Namespace:
        core = core or HardPairMiner(record.dim, self.config.search, max_rows=self.config.max_rows)
        namespace = Namespace(name, record, core)
        if self.store is not None:
            durability = NamespaceDurability.of(self.durability, name)
            if durability.snapshot_dir:
                snapshot.claim_generation(Path(durability.snapshot_dir), record.generation)
            namespace.durable = DurableMiner(core, durability)
            namespace.durable.recover()
        search = self.config.search
        if search.batch_mines:
            max_anchors = search.batch_max_anchors or search.max_anchors
            namespace.batcher = MineBatcher(namespace.miner, search.batch_window_ms / 1000, max_anchors)
        return namespace

    def sync(self) -> None:
        """Follower: take the leader's namespaces (new ones, dropped ones, ones created anew) from the registry."""
        records = self.store.load()
        with self._lock:
            for name, namespace in list(self._namespaces.items()):
                record = records.get(name)
                if record is None and name == DEFAULT:
                    continue  # the leader has not registered it yet; it always exists
                known = namespace.record.generation
                if record is None or (known and record.generation != known):
                    self._forget(namespace)
                elif record != namespace.record:
                    namespace.record = record  # a fingerprint was set, or the leader registered "default"
            missing = {name: record for name, record in records.items() if name not in self._namespaces}
        for name, record in sorted(missing.items()):
            # Built outside the lock: replaying a long log must not hold up requests to the other namespaces.
            namespace = self._build(name, record)
            if namespace.durable is not None:
                namespace.durable.start()
            with self._lock:
                self._namespaces[name] = namespace
            log.info("following namespace %r (dim %d, %d rows)", name, record.dim, namespace.rows)

    def _forget(self, namespace: Namespace) -> None:
        self._namespaces.pop(namespace.name, None)
        if namespace.durable is not None:
            namespace.durable.stop()
            if namespace.durable.snapshot_dir is not None:
                snapshot.remove_all(namespace.durable.snapshot_dir)
        log.info("namespace %r gone on the leader: forgotten", namespace.name)
        if self.on_dropped is not None:
            self.on_dropped(namespace.name)

    def _watch(self) -> None:
        interval_s = max(0.2, self.durability.follow_poll_ms / 1000)
        while not self._stop.wait(interval_s):
            try:
                self.sync()
            except Exception as error:  # Redis away: keep serving what we have, retry
                log.warning("follower could not read the namespace registry (%s); retrying", error)
