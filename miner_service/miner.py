"""HardPairMiner: the thread-safe core behind every shell (gRPC servicer, benchmarks, tests).

It owns the pair store, the optional IVF candidate index and the lock. Inputs are numpy arrays that the caller
has validated (miner_service.validation); outputs are numpy arrays. Nothing here knows about gRPC.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch

from miner_service.config import SearchConfig
from miner_service.errors import NotFound
from miner_service.ivf import IvfCandidates
from miner_service.rwlock import ReadWriteLock
from miner_service.search import (
    NEG_INF,
    Scoring,
    SearchQuery,
    candidate_search,
    exact_search,
    make_topk,
    mask_slots,
    score_block,
)
from miner_service.store import PairStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MineResult:
    neighbour_ids: np.ndarray  # [anchors, k] int64, -1 padding
    scores: np.ndarray  # [anchors, k] float32, -inf padding
    neighbour_steps: np.ndarray  # [anchors, k] uint64, 0 padding
    size: int
    unknown_anchor_ids: np.ndarray  # uint64
    used_ivf: bool
    newest_step: int  # the largest step written so far, to measure the neighbours' staleness against


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' asked for but no CUDA device is visible")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # fp16 halves memory and doubles matmul speed on GPUs; CPUs have no fast fp16 GEMM.
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


class HardPairMiner:
    def __init__(self, dim: int, config: SearchConfig = SearchConfig(), max_rows: int = 0):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.storage_dtype, self.device)
        self.block_rows = config.block_rows or (1 << 20 if self.device.type == "cuda" else 1 << 13)
        self.store = PairStore(dim, self.device, self.dtype, max_rows=max_rows)
        self._lock = ReadWriteLock()
        self._newest_step = 0
        # IVF state: the index, the ids written since its snapshot (searched exactly), and a build in flight.
        self._ivf: IvfCandidates | None = None
        self._fresh_ids: set[int] = set()
        self._fresh_during_build: set[int] | None = None
        self._fresh_array: np.ndarray | None = None
        self._build_thread: threading.Thread | None = None
        log.info("miner core: dim=%d device=%s dtype=%s block_rows=%d", dim, self.device, self.dtype, self.block_rows)

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def size(self) -> int:
        return self.store.size

    # ---- writes -------------------------------------------------------------------------------------------
    def upsert(self, ids: np.ndarray, image, text, step) -> tuple[int, int]:
        """Insert or overwrite rows; `step` is one step for all rows or one per row (restores from snapshots).

        Returns (accepted, size). Raises ResourceExhausted past max_rows."""
        with self._lock.write():
            self.store.upsert(ids, image, text, step)
            self._newest_step = max(self._newest_step, int(np.max(step)) if len(ids) else 0)
            self._note_written(ids)
            size = self.store.size
        self._maybe_rebuild_ivf()
        return len(ids), size

    def check_capacity(self, ids: np.ndarray) -> int:
        """Rows that upserting `ids` would add (for callers that must refuse before logging a write)."""
        with self._lock.read():
            return self.store.new_row_count(ids)

    def delete(self, ids: np.ndarray) -> tuple[int, int]:
        with self._lock.write():
            deleted = self.store.delete(ids)
            if self._ivf is not None:
                self._fresh_ids.difference_update(ids.tolist())
                self._fresh_array = None
            return deleted, self.store.size

    def _note_written(self, ids: np.ndarray) -> None:
        if self._ivf is None and self._fresh_during_build is None:
            return
        written = ids.tolist()
        if self._ivf is not None:
            self._fresh_ids.update(written)
            self._fresh_array = None
        if self._fresh_during_build is not None:
            self._fresh_during_build.update(written)

    # ---- search -------------------------------------------------------------------------------------------
    def mine(
        self,
        k: int,
        anchor_ids: np.ndarray | None = None,
        image: np.ndarray | None = None,
        text: np.ndarray | None = None,
        exclude_ids: np.ndarray | None = None,
        max_similarity: float | None = None,
        scoring: Scoring = Scoring.PRODUCT,
        strict_anchors: bool = False,
        self_ids: np.ndarray | None = None,
        cancelled=None,
    ) -> MineResult:
        """Hard neighbours of anchors given by id (stored rows) or by embedding ([anchors, dim] each).

        self_ids: with anchors by embedding, their sample ids (their own rows are then never returned).
        cancelled: optional () -> bool; the exact search stops with SearchCancelled once it says True."""
        cut = self.config.default_max_similarity if not max_similarity else float(max_similarity)
        exclude_ids = np.zeros(0, dtype=np.uint64) if exclude_ids is None else exclude_ids
        with self._lock.read():
            view = self.store.view()
            if anchor_ids is not None:
                anchor_slots = self.store.slots_of(anchor_ids)
                known = anchor_slots >= 0
                unknown = anchor_ids[~known]
                if strict_anchors and len(unknown):
                    raise NotFound(
                        "anchor_ids", f"{len(unknown)} anchor ids are not stored, e.g. {unknown[:5].tolist()}"
                    )
                search_slots = torch.from_numpy(anchor_slots[known]).to(self.device)
                q_image, q_text = view.image[search_slots], view.text[search_slots]
                n_anchors = len(anchor_ids)
            else:
                known = None
                unknown = np.zeros(0, dtype=np.uint64)
                own = self.store.slots_of(self_ids) if self_ids is not None else np.full(len(image), -1)
                search_slots = torch.from_numpy(own.astype(np.int64)).to(self.device)
                q_image = torch.from_numpy(np.ascontiguousarray(image)).to(self.device, self.dtype)
                q_text = torch.from_numpy(np.ascontiguousarray(text)).to(self.device, self.dtype)
                n_anchors = len(image)
            exclude_slots = self.store.slots_of(exclude_ids)
            query = SearchQuery(
                q_image,
                q_text,
                k,
                scoring,
                cut,
                search_slots,
                torch.from_numpy(exclude_slots[exclude_slots >= 0]).to(self.device),
            )
            used_ivf = self._ivf is not None and view.image.shape[0] >= self.config.ivf.min_rows > 0
            if q_image.shape[0] == 0 or view.image.shape[0] == 0:
                scores = torch.full((q_image.shape[0], k), NEG_INF)
                slots = torch.full((q_image.shape[0], k), -1, dtype=torch.int64)
            elif used_ivf:
                scores, slots = self._ivf_search(query, view)
            else:
                scores, slots = exact_search(query, view.image, view.text, self.block_rows, self.config.topk, cancelled)
            slots = slots.cpu().numpy()
            scores = scores.cpu().numpy().astype(np.float32, copy=False)
            valid = slots >= 0
            # Index with the valid slots only: on an empty store there is no row 0 to gather padding from.
            found_ids = np.full(slots.shape, -1, dtype=np.int64)
            found_ids[valid] = view.ids[slots[valid]].astype(np.int64)
            found_steps = np.zeros(slots.shape, dtype=np.uint64)
            found_steps[valid] = view.steps[slots[valid]]
            size = view.image.shape[0]
        if known is not None and not known.all():
            # Unknown anchors keep a row of padding so the reply stays aligned with the request.
            ids_out = np.full((n_anchors, k), -1, dtype=np.int64)
            scores_out = np.full((n_anchors, k), NEG_INF, dtype=np.float32)
            steps_out = np.zeros((n_anchors, k), dtype=np.uint64)
            ids_out[known], scores_out[known], steps_out[known] = found_ids, scores, found_steps
            found_ids, scores, found_steps = ids_out, scores_out, steps_out
        return MineResult(found_ids, scores, found_steps, size, unknown, used_ivf, self._newest_step)

    def _ivf_search(self, query: SearchQuery, view) -> tuple[torch.Tensor, torch.Tensor]:
        q_image = query.image.float().cpu().numpy()
        q_text = query.text.float().cpu().numpy()
        n_candidates = max(64, query.k * self.config.ivf.candidates_per_k)
        candidate_ids = self._ivf.candidates(q_image, q_text, n_candidates)
        candidate_slots = self.store.slots_of(np.where(candidate_ids >= 0, candidate_ids, 0).astype(np.uint64))
        candidate_slots[candidate_ids < 0] = -1
        if self._fresh_array is None:
            self._fresh_array = np.fromiter(self._fresh_ids, dtype=np.uint64, count=len(self._fresh_ids))
        fresh_slots = self.store.slots_of(self._fresh_array)
        fresh_slots = fresh_slots[fresh_slots >= 0]
        # A rewritten row is searched among the fresh rows only, so it cannot be returned twice.
        candidate_slots[np.isin(candidate_slots, fresh_slots)] = -1
        topk = make_topk(query.image.shape[0], query.k, self.device, self.config.topk)
        candidate_search(query, view.image, view.text, torch.from_numpy(candidate_slots).to(self.device), topk)
        fresh = torch.from_numpy(fresh_slots).to(self.device)
        for first in range(0, len(fresh), self.block_rows):
            block = fresh[first : first + self.block_rows]
            block_scores = score_block(query, view.image[block], view.text[block])
            mask_slots(block_scores, query, 0, slot_of_column=block)
            topk.add(block_scores, block)
        return topk.result()

    def fetch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(found mask [n], image [found, dim] float32, text, steps [found]) of the stored rows of `ids`."""
        with self._lock.read():
            slots = self.store.slots_of(ids)
            found = slots >= 0
            view = self.store.view()
            index = torch.from_numpy(slots[found]).to(self.device)
            return (
                found,
                view.image[index].float().cpu().numpy(),
                view.text[index].float().cpu().numpy(),
                view.steps[slots[found]].copy(),
            )

    # ---- IVF maintenance ----------------------------------------------------------------------------------
    def _maybe_rebuild_ivf(self) -> None:
        ivf = self.config.ivf
        if ivf.min_rows <= 0 or self.store.size < ivf.min_rows or self.device.type != "cpu":
            return
        if self._build_thread is not None and self._build_thread.is_alive():
            return
        if self._ivf is not None and len(self._fresh_ids) < ivf.rebuild_fraction * self._ivf.rows:
            return
        self._build_thread = threading.Thread(target=self._rebuild_ivf, name="ivf-rebuild", daemon=True)
        self._build_thread.start()

    def _rebuild_ivf(self) -> None:
        with self._lock.write():  # a consistent snapshot; copying is fast next to the build
            view = self.store.view()
            image = view.image.float().cpu().numpy().copy()
            text = view.text.float().cpu().numpy().copy()
            ids = view.ids.copy()
            self._fresh_during_build = set()
        try:
            built = IvfCandidates.build(image, text, ids, self.config.ivf)
        except Exception:
            log.exception("IVF rebuild failed; the exact search keeps serving")
            with self._lock.write():
                self._fresh_during_build = None
            return
        with self._lock.write():
            self._ivf = built
            self._fresh_ids = self._fresh_during_build
            self._fresh_during_build = None
            self._fresh_array = None

    def wait_for_ivf(self, timeout_s: float | None = None) -> bool:
        """Block until a build in flight finishes (tests, benchmarks). Returns whether an IVF is ready."""
        thread = self._build_thread
        if thread is not None:
            thread.join(timeout_s)
        return self._ivf is not None

    # ---- stats --------------------------------------------------------------------------------------------
    def stats(self) -> MinerStats:
        with self._lock.read():
            view = self.store.view()
            min_step = int(view.steps.min()) if len(view.steps) else 0
            max_step = int(view.steps.max()) if len(view.steps) else 0
            return MinerStats(
                self.store.size,
                self.dim,
                str(self.device),
                min_step,
                max_step,
                self.store.capacity,
                self.store.max_rows,
                self._ivf is not None,
                self._ivf.rows if self._ivf else 0,
                self.config.max_k,
            )
