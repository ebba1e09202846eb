"""The IVF candidate path of a CPU miner: an index over a copy of the rows, rebuilt in the background, plus the
ids written since that copy (searched exactly), and the exact re-rank of the candidates.

The IVF is a FAISS index on the CPU for a CPU miner and on the miner's GPU for a GPU miner whose FAISS has GPU support
(the faiss-gpu wheel); a GPU miner with faiss-cpu searches exactly and this path stays off (docs/OPERATIONS.md,
"Storage and memory"), which the miner says at startup. Thread-safe: a small lock guards the state, never held while
searching or building.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch

from helip.miner_service.core.budget import chunk_rows
from helip.miner_service.core.config import SearchConfig
from helip.miner_service.core.ivf import IvfCandidates, faiss_gpus, placement
from helip.miner_service.core.search import (
    NEG_INF,
    SearchCancelled,
    SearchQuery,
    candidate_search,
    make_topk,
    mask_slots,
    score_block,
)
from helip.miner_service.core.store import PairStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IvfSnapshot:
    """What one Mine searches: the index, and the ids written after the copy it was built from."""

    index: IvfCandidates
    fresh_ids: np.ndarray  # uint64


class IvfPath:
    def __init__(self, store: PairStore, config: SearchConfig, device: torch.device, bytes_per_score: int):
        self.store = store
        self.config = config
        self.device = device
        self.bytes_per_score = bytes_per_score
        self.placement = placement(device.type, faiss_gpus()) if config.ivf.min_rows > 0 else None
        self.enabled = self.placement is not None
        if config.ivf.min_rows > 0 and not self.enabled:
            log.warning(
                "IVF candidate path off on %s: this FAISS has no GPU support (faiss-gpu-cu12 in place of faiss-cpu "
                "has), so ivf.min_rows=%d is ignored and every Mine is exact",
                device,
                config.ivf.min_rows,
            )
        self._lock = threading.Lock()
        self._index: IvfCandidates | None = None
        self._fresh_ids: set[int] = set()
        self._fresh_during_build: set[int] | None = None
        self._fresh_array: np.ndarray | None = None
        self._build_thread: threading.Thread | None = None

    # ---- state ------------------------------------------------------------------------------------------------
    def current(self) -> IvfSnapshot | None:
        """The index to search now, or None (off, not built yet, or the store shrank below ivf.min_rows)."""
        with self._lock:
            if self._index is None or self.store.size < self.config.ivf.min_rows:
                return None
            if self._fresh_array is None:
                self._fresh_array = np.fromiter(self._fresh_ids, dtype=np.uint64, count=len(self._fresh_ids))
            return IvfSnapshot(self._index, self._fresh_array)

    def note_written(self, ids: np.ndarray) -> None:
        with self._lock:
            written = ids.tolist() if self._index is not None or self._fresh_during_build is not None else ()
            if self._index is not None:
                self._fresh_ids.update(written)
                self._fresh_array = None
            if self._fresh_during_build is not None:
                self._fresh_during_build.update(written)
        self._maybe_rebuild()

    def note_deleted(self, ids: np.ndarray) -> None:
        with self._lock:
            if self._index is not None:
                self._fresh_ids.difference_update(ids.tolist())
                self._fresh_array = None

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until a build in flight finishes (tests, benchmarks). Returns whether an index is ready."""
        thread = self._build_thread
        if thread is not None:
            thread.join(timeout_s)
        return self._index is not None

    # ---- rebuilds ---------------------------------------------------------------------------------------------
    def _maybe_rebuild(self) -> None:
        ivf = self.config.ivf
        if not self.enabled or self.store.size < ivf.min_rows:
            return
        with self._lock:
            if self._build_thread is not None and self._build_thread.is_alive():
                return
            if self._index is not None and len(self._fresh_ids) < ivf.rebuild_fraction * self._index.rows:
                return
            # Set before the copy starts: rows written while it runs are searched exactly until the next build.
            self._fresh_during_build = set()
            self._build_thread = threading.Thread(target=self._rebuild, name="ivf-rebuild", daemon=True)
            self._build_thread.start()

    def _rebuild(self) -> None:
        try:
            ids, _, image, text = self.store.copy_all()  # block by block: writers keep going
            gpu = (self.device.index or 0) if self.placement == "gpu" else None
            built = IvfCandidates.build(image, text, ids, self.config.ivf, gpu=gpu)
        except Exception:
            log.exception("IVF rebuild failed; the exact search keeps serving")
            with self._lock:
                self._fresh_during_build = None
            return
        with self._lock:
            self._index = built
            self._fresh_ids = self._fresh_during_build
            self._fresh_during_build = None
            self._fresh_array = None

    # ---- search -----------------------------------------------------------------------------------------------
    def candidate_bytes(self, k: int) -> tuple[int, int]:
        """(candidates per anchor, scratch bytes per anchor): the gathered candidate rows and their scores."""
        n_candidates = max(64, k * self.config.ivf.candidates_per_k)
        return n_candidates, n_candidates * (2 * self.store.dim * self.store.dtype.itemsize + self.bytes_per_score)

    def anchors_at_once(self, k: int) -> int:
        """Anchors whose candidates are gathered and re-ranked together, within mine_scratch_bytes."""
        return max(1, self.config.mine_scratch_bytes // self.candidate_bytes(k)[1])

    def fresh_rows_at_once(self, n_anchors: int, rows_at_once: int) -> int:
        """Fresh rows gathered and scored at once for n_anchors: their copies and scores within mine_scratch_bytes."""
        return chunk_rows(1, self.config.mine_scratch_bytes, self._fresh_row_bytes(n_anchors), rows_at_once)

    def fresh_chunk_bytes(self, n_anchors: int, rows_at_once: int) -> int:
        return self.fresh_rows_at_once(n_anchors, rows_at_once) * self._fresh_row_bytes(n_anchors)

    def _fresh_row_bytes(self, n_anchors: int) -> int:
        return 2 * self.store.dim * self.store.dtype.itemsize + n_anchors * self.bytes_per_score

    def search(
        self, query: SearchQuery, ivf: IvfSnapshot, rows_at_once: int, cancelled=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, ids) [anchors, k], a group of anchors at a time (a group's candidates are its scratch).

        cancelled: optional () -> bool, asked before each group and each chunk of fresh rows (SearchCancelled)."""
        parts = []
        group_size = self.anchors_at_once(query.k)
        for first in range(0, query.image.shape[0], group_size):
            _stop_if(cancelled, f"stopped before anchor {first} of {query.image.shape[0]}")
            group = query.anchors(slice(first, first + group_size))
            topk = make_topk(group.image.shape[0], query.k, self.device, self.config.topk, self.config.topk_segment)
            self._rerank_candidates(group, ivf.index, ivf.fresh_ids, topk)
            fresh_rows = self.fresh_rows_at_once(group.image.shape[0], rows_at_once)
            self._search_fresh(group, ivf.fresh_ids, fresh_rows, topk, cancelled)
            parts.append(topk.result())
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _rerank_candidates(self, query: SearchQuery, index: IvfCandidates, fresh_ids: np.ndarray, topk) -> None:
        n_candidates = self.candidate_bytes(query.k)[0]
        candidate_ids = index.candidates(
            query.image.float().cpu().numpy(), query.text.float().cpu().numpy(), n_candidates
        )
        # A rewritten row is searched among the fresh rows only, so it cannot be returned twice.
        candidate_ids[np.isin(candidate_ids, fresh_ids.astype(np.int64))] = -1
        flat_ids = candidate_ids.reshape(-1)
        slots = np.full(flat_ids.shape, -1, dtype=np.int64)
        valid = flat_ids >= 0
        slots[valid] = self.store.slots_of(flat_ids[valid].astype(np.uint64))
        rows = self.store.gather(slots, expected_ids=flat_ids.astype(np.uint64), device=self.device)
        slots[~rows.found] = -1
        shape = candidate_ids.shape
        candidate_search(
            query,
            rows.image.view(*shape, self.store.dim),
            rows.text.view(*shape, self.store.dim),
            torch.from_numpy(slots.reshape(shape)).to(self.device),
            torch.from_numpy(np.where(rows.found, flat_ids, -1).reshape(shape)).to(self.device),
            topk,
        )

    def _search_fresh(self, query: SearchQuery, fresh_ids: np.ndarray, rows_at_once: int, topk, cancelled) -> None:
        fresh_slots = self.store.slots_of(fresh_ids)
        fresh_ids, fresh_slots = fresh_ids[fresh_slots >= 0], fresh_slots[fresh_slots >= 0]
        for first in range(0, len(fresh_slots), rows_at_once):
            _stop_if(cancelled, f"stopped after {first} of {len(fresh_slots)} fresh rows")
            chunk = slice(first, first + rows_at_once)
            fresh = self.store.gather(fresh_slots[chunk], expected_ids=fresh_ids[chunk], device=self.device)
            slot_of_column = torch.from_numpy(np.where(fresh.found, fresh_slots[chunk], -1)).to(self.device)
            scores = score_block(query, fresh.image, fresh.text)
            mask_slots(scores, query, 0, slot_of_column=slot_of_column)
            scores[:, torch.from_numpy(~fresh.found).to(self.device)] = NEG_INF
            topk.add(scores, torch.from_numpy(fresh_ids[chunk].astype(np.int64)).to(self.device))


def _stop_if(cancelled, where: str) -> None:
    if cancelled is not None and cancelled():
        raise SearchCancelled(where)
