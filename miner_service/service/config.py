"""Miner configuration: one typed dataclass, built from defaults < config file < environment < flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from helip.miner_service.core.config import SearchConfig
from helip.miner_service.core.settings import layered, nest
from helip.miner_service.service.log import stream_key
from helip.miner_service.wire.names import DEFAULT_NAMESPACE
from helip.miner_service.wire.security import SecurityConfig

ENV_PREFIX = "HELIP_MINER_"


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class DurabilityConfig:
    """The durable log in Redis, snapshots, and the shard and follower roles."""

    redis_url: str = field(default="", repr=False)  # Redis of the durable log; empty: rows in memory only
    key_prefix: str = "helip"  # prefix of the log's Redis keys
    snapshot_dir: str = ""  # snapshots go here, and the newest is restored on start (a leader with a log needs it)
    snapshot_interval_s: float = 300.0  # seconds between scheduled snapshots (0: only on shutdown)
    keep_snapshots: int = 2  # snapshots kept; the log is trimmed below the oldest kept
    follow: bool = False  # a read-only follower: tail the leader's log, serve Mine, refuse writes
    shard_index: int = 0  # this miner owns the ids with shard_of(id) == shard_index (see shard_count)
    shard_count: int = 1  # shards that split the id space (1: not sharded)
    follow_poll_ms: int = 200  # how long a follower's read of the log blocks waiting for new entries

    def __post_init__(self):
        if self.snapshot_interval_s < 0:
            raise ValueError(
                f"durability.snapshot_interval_s must be >= 0 (0: only on shutdown), got {self.snapshot_interval_s}"
            )
        if self.keep_snapshots < 1:
            raise ValueError(f"durability.keep_snapshots must be >= 1, got {self.keep_snapshots}")
        if self.shard_count < 1:
            raise ValueError(f"durability.shard_count must be >= 1, got {self.shard_count}")
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(
                f"durability.shard_index must be in 0..{self.shard_count - 1} (shard_count {self.shard_count}), "
                f"got {self.shard_index}"
            )
        if self.follow_poll_ms < 1:
            raise ValueError(f"durability.follow_poll_ms must be >= 1, got {self.follow_poll_ms}")
        # A leader trims its log only below its snapshots: without a snapshot directory it would keep every write.
        if self.redis_url and not self.follow and not self.snapshot_dir:
            raise ValueError(
                "durability.snapshot_dir is required with a Redis log (durability.redis_url): the log is trimmed "
                "below each snapshot, so without snapshots it grows without bound"
            )

    @property
    def stream(self) -> str:
        """The log stream of the default namespace (namespaces.NamespaceDurability names the others')."""
        return stream_key(self.key_prefix, DEFAULT_NAMESPACE, self.shard_index, self.shard_count)


@dataclass(frozen=True)
class MinerConfig:
    """The miner process: where it listens, what it holds, and its search, durability and security."""

    dim: int = 256  # embedding dimension per modality of the default namespace
    host: str = "127.0.0.1"  # address to bind gRPC on
    port: int = 50051  # gRPC port (0: pick a free one)
    metrics_port: int = 9464  # Prometheus /metrics port (0: pick a free one, -1: no /metrics endpoint)
    metrics_host: str = "127.0.0.1"  # address to bind /metrics on
    max_rows: int = 0  # refuse upserts past this many rows in a namespace (0: no limit)
    max_total_rows: int = 0  # refuse upserts past this many rows over all namespaces together (0: no limit)
    max_namespaces: int = 64  # namespaces one miner holds at most (each is a metrics label value)
    max_namespace_dim: int = 4096  # largest dim a client may create a namespace with (the configured dim may be more)
    workers: int = 16  # gRPC handler threads
    # Largest gRPC message either way (4096 x 1024 fp32 rows per modality is 32 MiB for the pair, plus ids and framing)
    max_message_bytes: int = 64 * 1024 * 1024
    grace_s: float = 10.0  # on SIGTERM, in-flight requests get this long to finish
    log_level: str = "INFO"  # DEBUG, INFO, WARNING, ERROR or CRITICAL
    search: SearchConfig = field(default_factory=SearchConfig)
    durability: DurabilityConfig = field(default_factory=DurabilityConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self):
        for name, low in (
            ("dim", 1),
            ("max_namespaces", 1),
            ("max_namespace_dim", 1),
            ("workers", 1),
            ("max_message_bytes", 1),
            ("max_rows", 0),
            ("max_total_rows", 0),
        ):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535 (0: a free one), got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in -1..65535 (0: a free one, -1: off), got {self.metrics_port}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")


def read_file(path: str | Path) -> dict:
    """A YAML file of MinerConfig fields, as a mapping."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def environment_settings(environ=os.environ) -> dict:
    """HELIP_MINER_PORT=..., HELIP_MINER_SEARCH__MAX_K=... (double underscore = nesting) as a nested mapping."""
    values = {key[len(ENV_PREFIX) :].lower(): value for key, value in environ.items() if key.startswith(ENV_PREFIX)}
    return nest(values, "__")


def load(path: str | Path | None = None, environ=os.environ, flags: dict | None = None) -> MinerConfig:
    """Defaults < YAML file < environment (HELIP_MINER_*) < dotted flags, built once: each source's keys and values
    are checked under its own name, then MinerConfig checks the result as a whole."""
    sources = [(read_file(path), str(path))] if path else []
    sources += [(environment_settings(environ), "environment"), (nest(flags or {}), "flags")]
    return layered(MinerConfig(), *sources)
