"""The core's settings: search, scratch and IVF, and their by-device defaults. Import-light (no torch, no faiss)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class IvfConfig:
    min_rows: int = 2_000_000  # below this the exact search is used (0 disables the IVF)
    nprobe: int = 32
    candidates_per_k: int = 8  # candidates fetched per wanted neighbour, re-ranked exactly
    rebuild_fraction: float = 0.1  # rebuild once this fraction of the covered rows was rewritten or added
    max_train_points: int = 200_000


DEFAULT_MAX_SIMILARITY = 0.98  # the paper's code drops candidates above this similarity as near-duplicates


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
    # Scratch memory (core.budget): one Mine's score matrices stay within mine_scratch_bytes; Mines run
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
