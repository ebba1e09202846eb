"""Miner configuration: one typed dataclass, built from defaults < config file < environment < flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from miner_service.ivf import IvfConfig
from miner_service.log import DEFAULT_NAMESPACE, stream_key
from miner_service.security import SecurityConfig
from miner_service.settings import nest, overlay

DEFAULT_MAX_SIMILARITY = 0.98  # the paper's code drops candidates above this similarity as near-duplicates
ENV_PREFIX = "HELIP_MINER_"


@dataclass(frozen=True)
class SearchConfig:
    device: str = "auto"  # "auto" (cuda when visible), "cpu", "cuda", "cuda:N"
    storage_dtype: str = "auto"  # "auto" (float16 on cuda, float32 on cpu), "float32", "float16"
    block_rows: int = 0  # stored rows scored at once; 0 picks by device
    store_block_rows: int = 1 << 16  # rows per storage block: growth allocates one block, a writer locks one
    topk: str = "auto"  # running top-k: "auto" (FAISS heaps on the CPU, torch.topk on a GPU), "heap", "torch"
    max_k: int = 1024
    max_anchors: int = 8192
    default_max_similarity: float = DEFAULT_MAX_SIMILARITY
    # Scratch memory (miner_service.budget): one Mine's score matrices stay within mine_scratch_bytes; Mines run
    # together within scratch_budget_bytes, the rest wait in a queue of mine_queue_limit, then are refused.
    mine_scratch_bytes: int = 256 << 20
    scratch_budget_bytes: int = 1 << 30
    mine_queue_limit: int = 32
    ivf: IvfConfig = field(default_factory=IvfConfig)

    def __post_init__(self):
        if self.block_rows < 0:
            raise ValueError(f"search.block_rows must be >= 0 (0: by device), got {self.block_rows}")
        for name in ("max_k", "max_anchors"):
            if getattr(self, name) < 1:
                raise ValueError(f"search.{name} must be >= 1, got {getattr(self, name)}")
        if self.store_block_rows <= 0:
            raise ValueError(f"search.store_block_rows must be positive, got {self.store_block_rows}")
        if self.mine_scratch_bytes <= 0:
            raise ValueError(f"search.mine_scratch_bytes must be positive, got {self.mine_scratch_bytes}")
        if self.scratch_budget_bytes < self.mine_scratch_bytes:
            raise ValueError(
                f"search.scratch_budget_bytes ({self.scratch_budget_bytes}) must be at least "
                f"search.mine_scratch_bytes ({self.mine_scratch_bytes}): one Mine must fit"
            )
        if self.mine_queue_limit < 0:
            raise ValueError(f"search.mine_queue_limit must be >= 0, got {self.mine_queue_limit}")


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
