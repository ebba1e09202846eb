"""Miner configuration: one typed dataclass, built from defaults < config file < environment < flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from miner_service.ivf import IvfConfig
from miner_service.log import DEFAULT_NAMESPACE, stream_key
from miner_service.security import SecurityConfig
from miner_service.settings import nest, overlay

DEFAULT_MAX_SIMILARITY = 0.98  # the paper's code drops candidates above this similarity as near-duplicates
ENV_PREFIX = "HELIP_MINER_"


# The search settings left at 0, by device. On a GPU the score matrices of a chunk cost the same few passes over
# memory whatever their size, so fewer, larger chunks are faster: at 10M rows and 512 anchors on an H200, a Mine
# took 290 ms with 64K-row blocks and 256 MiB of scratch, 151 ms with 256K-row blocks and 4 GiB
# (bench/gpu_check.py, docs/BENCHMARKS.md). Scratch is per namespace: lower it on a GPU shared by many.
DEVICE_DEFAULTS = {
    "cpu": {
        "block_rows": 1 << 12,
        "store_block_rows": 1 << 16,
        "mine_scratch_bytes": 256 << 20,
        "scratch_budget_bytes": 1 << 30,
    },
    "cuda": {
        "block_rows": 1 << 20,
        "store_block_rows": 1 << 18,
        "mine_scratch_bytes": 4 << 30,
        "scratch_budget_bytes": 8 << 30,
    },
}


@dataclass(frozen=True)
class SearchConfig:
    device: str = "auto"  # "auto" (cuda when visible), "cpu", "cuda", "cuda:N"
    storage_dtype: str = "auto"  # "auto" (float16 on cuda, float32 on cpu), "float32", "float16"
    block_rows: int = 0  # stored rows scored at once; 0 picks by device
    store_block_rows: int = 0  # rows per storage block (growth allocates one, a writer locks one); 0: by device
    topk: str = "auto"  # running top-k: "auto" (FAISS heaps on the CPU, torch.topk on a GPU), "heap", "torch"
    topk_segment: int = 0  # torch top-k: select per segment of this many columns first (0: one pass per row)
    max_k: int = 1024
    max_anchors: int = 8192
    default_max_similarity: float = DEFAULT_MAX_SIMILARITY
    # Scratch memory (miner_service.budget): one Mine's score matrices stay within mine_scratch_bytes; Mines run
    # together within scratch_budget_bytes, the rest wait in a queue of mine_queue_limit, then are refused.
    # 0: by device (DEVICE_DEFAULTS).
    mine_scratch_bytes: int = 0
    scratch_budget_bytes: int = 0
    mine_queue_limit: int = 32
    ivf: IvfConfig = field(default_factory=IvfConfig)

    def __post_init__(self):
        if self.block_rows < 0:
            raise ValueError(f"search.block_rows must be >= 0 (0: by device), got {self.block_rows}")
        for name in ("max_k", "max_anchors"):
            if getattr(self, name) < 1:
                raise ValueError(f"search.{name} must be >= 1, got {getattr(self, name)}")
        if self.topk_segment < 0:
            raise ValueError(f"search.topk_segment must be >= 0 (0: off), got {self.topk_segment}")
        for name in ("store_block_rows", "mine_scratch_bytes", "scratch_budget_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"search.{name} must be >= 0 (0: by device), got {getattr(self, name)}")
        if self.scratch_budget_bytes and self.scratch_budget_bytes < self.mine_scratch_bytes:
            raise ValueError(
                f"search.scratch_budget_bytes ({self.scratch_budget_bytes}) must be at least "
                f"search.mine_scratch_bytes ({self.mine_scratch_bytes}): one Mine must fit"
            )
        if self.mine_queue_limit < 0:
            raise ValueError(f"search.mine_queue_limit must be >= 0, got {self.mine_queue_limit}")

    def for_device(self, device_type: str) -> SearchConfig:
        """This config with the by-device settings (0) filled in for a "cpu" or "cuda" device."""
        defaults = DEVICE_DEFAULTS["cuda" if device_type == "cuda" else "cpu"]
        mine_scratch = self.mine_scratch_bytes or min(
            defaults["mine_scratch_bytes"], self.scratch_budget_bytes or defaults["mine_scratch_bytes"]
        )
        return replace(
            self,
            block_rows=self.block_rows or defaults["block_rows"],
            store_block_rows=self.store_block_rows or defaults["store_block_rows"],
            mine_scratch_bytes=mine_scratch,
            # A Mine larger than the default total still fits: the total grows to it.
            scratch_budget_bytes=self.scratch_budget_bytes or max(defaults["scratch_budget_bytes"], mine_scratch),
        )


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
