"""The miner core's interface: one request type for Mine, its result types, and the `MinerCore` Protocol.

Every shell (gRPC servicer, benchmarks, tests) talks to a core through `MinerCore`; the plain in-memory core
(`HardPairMiner`) and the core behind a durable log (`DurableMiner`) both implement it, so a shell never needs to
know which one it holds. Requests arrive validated (service.validation builds a `MineQuery` from protobuf);
the core only asserts its invariants.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from helip.miner_service.core.search import Scoring

_NO_IDS = np.zeros(0, dtype=np.uint64)


@dataclass(frozen=True)
class MineQuery:
    """One Mine: k hard neighbours for anchors given by id (stored rows) or by embedding ([anchors, dim] each).

    exclude_ids: never returned for any anchor (the rest of the caller's batch).
    max_similarity: candidates whose image or text similarity exceeds it are dropped; 0 means the miner's default.
    strict_anchors: anchors by id that are not stored raise NotFound instead of coming back as padding.
    positive_ratio: the false-negative guard (core.guard; 0: off): candidate j is dropped for anchor i when
        <image_i, text_j> or <text_i, image_j> reaches positive_ratio x <image_i, text_i>.
    self_ids: with anchors by embedding, their sample ids, so that their own rows are never returned.
    """

    k: int
    anchor_ids: np.ndarray | None = None  # uint64 [anchors]
    image: np.ndarray | None = None  # [anchors, dim] float
    text: np.ndarray | None = None
    exclude_ids: np.ndarray = field(default_factory=lambda: _NO_IDS)
    max_similarity: float = 0.0
    scoring: Scoring = Scoring.PRODUCT
    strict_anchors: bool = False
    self_ids: np.ndarray | None = None
    positive_ratio: float = 0.0

    def __post_init__(self):
        by_id = self.anchor_ids is not None
        assert by_id != (self.image is not None), "give anchor_ids or anchor embeddings, not both"
        assert by_id or self.text is not None, "anchors by embedding need both image and text"
        assert self.k > 0, "k must be positive"
        assert 0.0 <= self.positive_ratio <= 1.0, "positive_ratio must be in [0, 1] (0: off)"
        # Plain lists and signed arrays are accepted from library callers; the core works on uint64 ids.
        for name in ("anchor_ids", "exclude_ids", "self_ids"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, np.asarray(value, dtype=np.uint64).reshape(-1))
        object.__setattr__(self, "scoring", Scoring(self.scoring))

    @property
    def n_anchors(self) -> int:
        return len(self.anchor_ids) if self.anchor_ids is not None else len(self.image)


@dataclass(frozen=True)
class MineResult:
    neighbour_ids: np.ndarray  # [anchors, k] int64, -1 padding
    scores: np.ndarray  # [anchors, k] float32, -inf padding
    neighbour_steps: np.ndarray  # [anchors, k] uint64, 0 padding
    size: int
    unknown_anchor_ids: np.ndarray  # uint64
    used_ivf: bool
    newest_step: int  # the largest step written so far, to measure the neighbours' staleness against
    guard_dropped: int = 0  # candidates the false-negative guard dropped ahead of the neighbours returned
    pass_mines: int = 1  # Mines answered by the pass over the rows that answered this one (1: searched alone)


@dataclass(frozen=True)
class MinerStats:
    size: int
    dim: int
    device: str
    min_step: int
    max_step: int
    capacity: int
    max_rows: int
    ivf_ready: bool
    ivf_rows: int
    max_k: int
    ivf_enabled: bool = False  # whether this core uses the IVF path at all (off on a GPU miner without faiss-gpu)
    role: str = "standalone"  # "standalone", or with a durable log "leader" / "follower"
    log_offset: str = ""  # with a durable log: the last entry applied


Cancelled = Callable[[], bool]


@runtime_checkable
class MinerCore(Protocol):
    """What a shell may ask of a miner core. Implementations are thread-safe."""

    @property
    def dim(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def device(self): ...  # torch.device the rows live on

    def upsert(self, ids: np.ndarray, image, text, step) -> tuple[int, int]:
        """Insert or overwrite rows (ids unique); `step` is one for all rows or one per row. (accepted, size)."""

    def delete(self, ids: np.ndarray) -> tuple[int, int]:
        """Remove stored ids (unknown ones are ignored). (deleted, size)."""

    def check_capacity(self, ids: np.ndarray) -> int:
        """Rows that upserting `ids` would add (to refuse before logging a write)."""

    def mine(self, query: MineQuery, cancelled: Cancelled | None = None) -> MineResult:
        """Hard neighbours; `cancelled` is asked between blocks and stops the search with SearchCancelled."""

    def mine_many(self, queries: list[MineQuery], cancelled: Cancelled | None = None) -> list[MineResult | Exception]:
        """Several Mines in one pass over the rows, each answered as `mine` would answer it alone; a Mine that
        cannot start gets its error in its place (core.batching serves concurrent callers through this)."""

    def fetch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(found mask [n], image [found, dim] float32, text, steps [found]) of the stored rows of `ids`."""

    def stats(self) -> MinerStats: ...
