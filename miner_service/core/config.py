"""The core's settings: search, scratch and IVF, and their by-device defaults. Import-light (no torch, no faiss)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

IVF_CODECS = ("flat", "fp16", "sq8", "pq")  # the IVF copy of the rows: core.ivf.factory_string


@dataclass(frozen=True)
class IvfConfig:
    """The approximate candidate index (FAISS IVF) of large namespaces; its candidates are re-ranked exactly."""

    min_rows: int = 2_000_000  # use the IVF candidate index from this many rows on (0: exact only)
    nprobe: int = 32  # IVF lists probed per query
    candidates_per_k: int = 8  # candidates fetched per wanted neighbour, re-ranked exactly
    rebuild_fraction: float = 0.1  # rebuild once this fraction of the covered rows was rewritten or added
    max_train_points: int = 200_000  # rows sampled to train the IVF's centroids
    # How the IVF stores its copy of the rows' [x; t] (core.ivf.IVF_CODECS): flat float32 (8 x dim bytes a row),
    # fp16 (4 x dim), sq8 (2 x dim) or pq (at most 64 bytes). The candidates are re-ranked exactly from the store
    # whatever the codec, so a smaller code costs recall only (bench/ivf.py --codec measures it), never exactness
    # of the scores returned.
    codec: str = "flat"

    def __post_init__(self):
        for name, low in (("min_rows", 0), ("nprobe", 1), ("candidates_per_k", 1), ("max_train_points", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"search.ivf.{name} must be >= {low}, got {getattr(self, name)}")
        if self.codec not in IVF_CODECS:
            raise ValueError(f"search.ivf.codec must be one of {list(IVF_CODECS)}, got {self.codec!r}")
        if not 0.0 < self.rebuild_fraction <= 1.0:
            raise ValueError(f"search.ivf.rebuild_fraction must be in (0, 1], got {self.rebuild_fraction}")


STORAGE_DTYPES = ("auto", "float32", "float16", "bfloat16")
KERNELS = ("auto", "torch", "triton")
TOPK_KINDS = ("auto", "heap", "torch")
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
    """How a Mine searches: device, storage precision, top-k, limits and scratch memory."""

    device: str = "auto"  # "auto" (cuda when visible), "cpu", "cuda", "cuda:N"
    storage_dtype: str = "auto"  # "auto" (float16 on cuda, float32 on cpu), "float32", "float16", "bfloat16"
    block_rows: int = 0  # stored rows scored at once; 0 picks by device
    store_block_rows: int = 0  # rows per storage block (growth allocates one, a writer locks one); 0: by device
    topk: str = "auto"  # running top-k: "auto" (FAISS heaps on the CPU, torch.topk on a GPU), "heap", "torch"
    # The exact search's kernel: "torch" (matrix products, then a top-k over the scores), "triton" (core.fused: one
    # fused kernel; a CUDA device, or TRITON_INTERPRET=1 on the CPU for tests) or "auto" (torch until the fused
    # kernel is measured on a GPU: docs/BENCHMARKS.md, GPU check).
    kernel: str = "auto"
    topk_segment: int = 0  # torch top-k: select per segment of this many columns first (0: one pass per row)
    max_k: int = 1024  # largest k a Mine may ask for
    max_anchors: int = 8192  # most anchors one Mine may ask about
    default_max_similarity: float = DEFAULT_MAX_SIMILARITY  # near-duplicate cut of a Mine that sets none
    # Scratch memory (core.budget): one Mine's score matrices stay within mine_scratch_bytes; Mines run
    # together within scratch_budget_bytes, the rest wait in a queue of mine_queue_limit, then are refused.
    # 0: by device (DEVICE_DEFAULTS).
    mine_scratch_bytes: int = 0  # scratch memory of one Mine: its anchors x rows scored at once (0: by device)
    scratch_budget_bytes: int = 0  # scratch memory of all running Mines together (0: by device)
    mine_queue_limit: int = 32  # Mines that may wait for scratch memory; more are refused (RESOURCE_EXHAUSTED)
    # Mines batched across callers (core.batching): concurrent Mines of a namespace share one pass over the rows,
    # each keeping its own k, exclusions and deadline.
    batch_mines: bool = False  # serve concurrent Mines of a namespace in one pass over the rows
    batch_window_ms: float = 1.0  # with batch_mines: how long a pass waits after its oldest Mine arrived for others
    batch_max_anchors: int = 0  # with batch_mines: most anchors in one pass (0: max_anchors)
    ivf: IvfConfig = field(default_factory=IvfConfig)

    def __post_init__(self):
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"search.storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.storage_dtype!r}"
            )
        if self.kernel not in KERNELS:
            raise ValueError(f"search.kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.topk not in TOPK_KINDS:
            raise ValueError(f"search.topk must be one of {', '.join(TOPK_KINDS)}, got {self.topk!r}")
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
        if self.batch_window_ms < 0:
            raise ValueError(f"search.batch_window_ms must be >= 0, got {self.batch_window_ms}")
        if self.batch_max_anchors < 0:
            raise ValueError(f"search.batch_max_anchors must be >= 0 (0: max_anchors), got {self.batch_max_anchors}")
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
