"""Miner configuration: one typed dataclass, built from defaults < config file < environment < flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from helip.miner_service.core.config import SearchConfig
from helip.miner_service.core.settings import nest, overlay
from helip.miner_service.service.log import stream_key
from helip.miner_service.wire.names import DEFAULT_NAMESPACE
from helip.miner_service.wire.security import SecurityConfig

ENV_PREFIX = "HELIP_MINER_"


@dataclass(frozen=True)
class DurabilityConfig:
    redis_url: str = field(default="", repr=False)  # empty: no log, rows in memory only; repr: it may hold a password
    key_prefix: str = "helip"
    snapshot_dir: str = ""  # required by a leader with a log (the CLI refuses without): the log is trimmed below it
    snapshot_interval_s: float = 300.0  # 0: only on shutdown
    keep_snapshots: int = 2
    follow: bool = False  # a read-only follower tailing the leader's log
    shard_index: int = 0
    shard_count: int = 1
    follow_poll_ms: int = 200

    @property
    def stream(self) -> str:
        """The log stream of the default namespace (namespaces.NamespaceDurability names the others')."""
        return stream_key(self.key_prefix, DEFAULT_NAMESPACE, self.shard_index, self.shard_count)


@dataclass(frozen=True)
class MinerConfig:
    dim: int = 256
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9464  # 0: pick a free port, -1: no /metrics endpoint
    metrics_host: str = "127.0.0.1"
    max_rows: int = 0  # rows per namespace; 0: no limit
    max_total_rows: int = 0  # rows over all namespaces together; 0: no limit
    max_namespaces: int = 64  # namespaces one miner holds at most (each is a metrics label value)
    max_namespace_dim: int = 4096  # largest dim a client may create a namespace with (the configured dim may be more)
    workers: int = 16  # gRPC handler threads
    # 4096 x 1024 fp32 rows per modality is 32 MiB for the pair; leave room for ids and framing.
    max_message_bytes: int = 64 * 1024 * 1024
    grace_s: float = 10.0  # on SIGTERM, in-flight requests get this long to finish
    log_level: str = "INFO"
    search: SearchConfig = field(default_factory=SearchConfig)
    durability: DurabilityConfig = field(default_factory=DurabilityConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)


def load_file(path: str | Path, base: MinerConfig | None = None) -> MinerConfig:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return overlay(base or MinerConfig(), data, str(path))


def from_environment(base: MinerConfig, environ=os.environ) -> MinerConfig:
    """HELIP_MINER_PORT=..., HELIP_MINER_SEARCH__MAX_K=... (double underscore = nesting)."""
    values = {key[len(ENV_PREFIX) :].lower(): value for key, value in environ.items() if key.startswith(ENV_PREFIX)}
    return overlay(base, nest(values, "__"), "environment") if values else base


def with_overrides(base: MinerConfig, overrides: dict) -> MinerConfig:
    """Apply flat or dotted overrides such as {"port": 1, "search.max_k": 64}; None values are skipped."""
    return overlay(base, nest(overrides), "flags")
