"""HardPairMiner: the thread-safe in-memory core (a `MinerCore`) behind every shell.

It owns the pair store (rows in blocks, each with its own lock: miner_service.store) and the optional IVF candidate
index. Inputs are numpy arrays that the caller has validated (miner_service.validation); outputs are numpy arrays.
Nothing here knows about gRPC.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from miner_service.budget import ScratchAdmission, bytes_per_score, chunk_rows
from miner_service.config import SearchConfig
from miner_service.core_api import Cancelled, MineQuery, MineResult, MinerStats
from miner_service.errors import NotFound
from miner_service.ivf import IvfCandidates
from miner_service.search import (
    NEG_INF,
    SearchQuery,
    candidate_search,
    exact_search,
    make_topk,
    mask_slots,
    score_block,
)
from miner_service.store import PairStore

log = logging.getLogger(__name__)


def resolve_devices(name: str) -> list[torch.device]:
    """ "auto", "cpu", "cuda", "cuda:N", or a comma-separated list of CUDA devices to spread the blocks over."""
    if name == "auto":
        return [torch.device("cuda" if torch.cuda.is_available() else "cpu")]
    devices = [torch.device(part.strip()) for part in name.split(",")]
    if len({device.type for device in devices}) > 1:
        raise ValueError(f"device '{name}' mixes device types; give CPU or CUDA devices")
    if devices[0].type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' asked for but no CUDA device is visible")
    return devices


def resolve_device(name: str) -> torch.device:
    return resolve_devices(name)[0]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # fp16 halves memory and doubles matmul speed on GPUs; CPUs have no fast fp16 GEMM.
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


class HardPairMiner:
    def __init__(self, dim: int, config: SearchConfig = SearchConfig(), max_rows: int = 0):
        self.config = config
        self.devices = resolve_devices(config.device)
        self.device = self.devices[0]
        self.dtype = resolve_dtype(config.storage_dtype, self.device)
        # The most stored rows scored at once; the scratch budget makes it fewer for Mines with many anchors.
        self.block_rows = config.block_rows or (1 << 20 if self.device.type == "cuda" else 1 << 13)
        self.admission = ScratchAdmission(config.scratch_budget_bytes, config.mine_queue_limit)
        self._bytes_per_score = bytes_per_score(self.dtype)
        self.store = PairStore(dim, self.devices, self.dtype, max_rows=max_rows, block_rows=config.store_block_rows)
        self._newest_step = 0
        # Small shared state under _state_lock, never held while searching: the newest step, and the IVF state (the
        # index, the ids written since its snapshot, searched exactly, and a build in flight). The IVF is a CPU FAISS
        # index: a GPU miner searches exactly (docs/OPERATIONS.md, "Storage and memory").
        self.ivf_enabled = config.ivf.min_rows > 0 and self.device.type == "cpu"
        self._state_lock = threading.Lock()
        self._ivf: IvfCandidates | None = None
        self._fresh_ids: set[int] = set()
        self._fresh_during_build: set[int] | None = None
        self._fresh_array: np.ndarray | None = None
        self._build_thread: threading.Thread | None = None
        log.info(
            "miner core: dim=%d devices=%s dtype=%s store blocks of %d rows, scored %d rows at a time",
            dim,
            ",".join(map(str, self.devices)),
            self.dtype,
            self.store.block_rows,
            self.block_rows,
        )
        if config.ivf.min_rows > 0 and not self.ivf_enabled:
            log.warning(
                "IVF candidate path off on %s: ivf.min_rows=%d is ignored, every Mine is exact",
                self.device,
                config.ivf.min_rows,
            )

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def size(self) -> int:
        return self.store.size

    @property
    def max_rows(self) -> int:
        return self.store.max_rows

    # ---- writes -------------------------------------------------------------------------------------------
    def upsert(self, ids: np.ndarray, image, text, step, enforce_max_rows: bool = True) -> tuple[int, int]:
        """Insert or overwrite rows; `step` is one step for all rows or one per row (restores from snapshots).

        Returns (accepted, size). Raises ResourceExhausted past max_rows, unless `enforce_max_rows` is off (a log
        replay: its writes were checked before they were logged)."""
        self.store.upsert(ids, image, text, step, enforce_max_rows=enforce_max_rows)
        self._note_written(ids, int(np.max(step)) if len(ids) else 0)
        self._maybe_rebuild_ivf()
        return len(ids), self.store.size

    def check_capacity(self, ids: np.ndarray) -> int:
        """Rows that upserting `ids` would add (for callers that must refuse before logging a write)."""
        return self.store.new_row_count(ids)

    def delete(self, ids: np.ndarray) -> tuple[int, int]:
        deleted = self.store.delete(ids)
        with self._state_lock:
            if self._ivf is not None:
                self._fresh_ids.difference_update(ids.tolist())
                self._fresh_array = None
        return deleted, self.store.size

    def _note_written(self, ids: np.ndarray, newest_step: int) -> None:
        with self._state_lock:
            self._newest_step = max(self._newest_step, newest_step)
            if self._ivf is None and self._fresh_during_build is None:
                return
            written = ids.tolist()
            if self._ivf is not None:
                self._fresh_ids.update(written)
                self._fresh_array = None
            if self._fresh_during_build is not None:
                self._fresh_during_build.update(written)

    # ---- search -------------------------------------------------------------------------------------------
    def mine(self, query: MineQuery, cancelled: Cancelled | None = None) -> MineResult:
        """Hard neighbours of the query's anchors (see MineQuery).

        cancelled: optional () -> bool; the exact search stops with SearchCancelled once it says True."""
        k = query.k
        unknown = np.zeros(0, dtype=np.uint64)
        known = None
        if query.anchor_ids is not None:
            slots = self.store.slots_of(query.anchor_ids)
            anchors = self.store.gather(slots, expected_ids=query.anchor_ids)
            known = anchors.found
            unknown = query.anchor_ids[~known]
            if query.strict_anchors and len(unknown):
                raise NotFound("anchor_ids", f"{len(unknown)} anchor ids are not stored, e.g. {unknown[:5].tolist()}")
            self_ids = query.anchor_ids[known]
            self_slots = slots[known]
            on_device = torch.from_numpy(known).to(self.device)
            q_image, q_text = anchors.image[on_device], anchors.text[on_device]
        else:
            self_ids = query.self_ids
            self_slots = self.store.slots_of(self_ids) if self_ids is not None else np.full(len(query.image), -1)
            q_image = torch.from_numpy(np.ascontiguousarray(query.image)).to(self.device, self.dtype)
            q_text = torch.from_numpy(np.ascontiguousarray(query.text)).to(self.device, self.dtype)
        exclude_slots = self.store.slots_of(query.exclude_ids)
        search = SearchQuery(
            q_image,
            q_text,
            k,
            query.scoring,
            query.max_similarity or self.config.default_max_similarity,
            torch.from_numpy(self_slots.astype(np.int64)).to(self.device),
            torch.from_numpy(exclude_slots[exclude_slots >= 0]).to(self.device),
        )
        with self._state_lock:
            ivf, fresh_ids = self._ivf, self._fresh_id_array()
        used_ivf = ivf is not None and self.store.size >= self.config.ivf.min_rows > 0
        n_search = q_image.shape[0]
        rows_at_once = self.chunk_rows(n_search)
        anchors_at_once = self.ivf_anchors_at_once(k) if used_ivf else n_search
        scores, labels = torch.full((n_search, k), NEG_INF), torch.full((n_search, k), -1, dtype=torch.int64)
        if n_search and self.store.size:
            scratch = self.scratch_bytes(n_search, rows_at_once, k if used_ivf else 0)
            with self.admission.admitted(scratch, cancelled):
                if used_ivf:
                    scores, labels = self._ivf_search(search, ivf, fresh_ids, rows_at_once, anchors_at_once)
                else:
                    topk = make_topk(n_search, k, self.device, self.config.topk)
                    exact_search(search, self.store.blocks(), rows_at_once, topk, cancelled)
                    scores, labels = topk.result()
        found_ids, scores, found_steps = self._finish(
            labels.cpu().numpy(), scores.cpu().numpy().astype(np.float32, copy=False), query.exclude_ids, self_ids
        )
        if known is not None and not known.all():
            # Unknown anchors keep a row of padding so the reply stays aligned with the request.
            n_anchors = len(query.anchor_ids)
            ids_out = np.full((n_anchors, k), -1, dtype=np.int64)
            scores_out = np.full((n_anchors, k), NEG_INF, dtype=np.float32)
            steps_out = np.zeros((n_anchors, k), dtype=np.uint64)
            ids_out[known], scores_out[known], steps_out[known] = found_ids, scores, found_steps
            found_ids, scores, found_steps = ids_out, scores_out, steps_out
        return MineResult(found_ids, scores, found_steps, self.store.size, unknown, used_ivf, self._newest_step)

    def chunk_rows(self, n_anchors: int) -> int:
        """Stored rows one Mine with n_anchors scores at once, within mine_scratch_bytes."""
        return chunk_rows(n_anchors, self.config.mine_scratch_bytes, self._bytes_per_score, self.block_rows)

    def _ivf_candidate_bytes(self, k: int) -> tuple[int, int]:
        """(candidates per anchor, scratch bytes per anchor) of the IVF path: the gathered rows and their scores."""
        n_candidates = max(64, k * self.config.ivf.candidates_per_k)
        return n_candidates, n_candidates * (2 * self.dim * self.dtype.itemsize + self._bytes_per_score)

    def ivf_anchors_at_once(self, k: int) -> int:
        """Anchors whose IVF candidates are gathered and re-ranked together, within mine_scratch_bytes."""
        return max(1, self.config.mine_scratch_bytes // self._ivf_candidate_bytes(k)[1])

    def scratch_bytes(self, n_anchors: int, rows_at_once: int, ivf_k: int = 0) -> int:
        """What one Mine is admitted for: its score chunk, or on the IVF path a group of anchors' candidates."""
        if not ivf_k:
            return n_anchors * rows_at_once * self._bytes_per_score
        group = min(n_anchors, self.ivf_anchors_at_once(ivf_k))
        return group * (self._ivf_candidate_bytes(ivf_k)[1] + rows_at_once * self._bytes_per_score)

    def _finish(self, ids: np.ndarray, scores: np.ndarray, exclude_ids: np.ndarray, self_ids: np.ndarray | None):
        """Ids, scores and current steps of the neighbours, with the filters applied once more by id.

        The search masked excluded and own rows by the slots they had when it began; a row deleted, or an excluded
        id inserted, while it ran is dropped here, and the neighbours after it move up (padding at the end)."""
        found = ids >= 0
        slots = np.full(ids.shape, -1, dtype=np.int64)
        slots[found] = self.store.slots_of(ids[found].astype(np.uint64))
        keep = slots >= 0
        if len(exclude_ids):
            keep &= ~np.isin(ids, exclude_ids.astype(np.int64))
        if self_ids is not None:
            keep &= ids != self_ids.astype(np.int64)[:, None]
        steps = np.zeros(ids.shape, dtype=np.uint64)
        steps[keep] = self.store.gather(slots[keep], expected_ids=ids[keep].astype(np.uint64)).steps
        if not (keep == found).all():
            order = np.argsort(~keep, axis=1, kind="stable")
            ids, scores, steps, keep = (np.take_along_axis(a, order, axis=1) for a in (ids, scores, steps, keep))
            ids[~keep], scores[~keep], steps[~keep] = -1, NEG_INF, 0
        return ids, scores, steps

    def _fresh_id_array(self) -> np.ndarray:
        if self._fresh_array is None:
            self._fresh_array = np.fromiter(self._fresh_ids, dtype=np.uint64, count=len(self._fresh_ids))
        return self._fresh_array

    def _ivf_search(
        self, query: SearchQuery, ivf: IvfCandidates, fresh_ids: np.ndarray, rows_at_once: int, anchors_at_once: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, ids) of the IVF path, `anchors_at_once` anchors at a time (each group's candidate rows are
        gathered at once, so a group is what the scratch budget bounds)."""
        parts = []
        for first in range(0, query.image.shape[0], anchors_at_once):
            group = query.anchors(slice(first, first + anchors_at_once))
            topk = make_topk(group.image.shape[0], query.k, self.device, self.config.topk)
            self._ivf_group(group, ivf, fresh_ids, rows_at_once, topk)
            parts.append(topk.result())
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _ivf_group(self, query: SearchQuery, ivf: IvfCandidates, fresh_ids: np.ndarray, rows_at_once: int, topk):
        q_image = query.image.float().cpu().numpy()
        q_text = query.text.float().cpu().numpy()
        n_anchors = q_image.shape[0]
        n_candidates = self._ivf_candidate_bytes(query.k)[0]
        candidate_ids = ivf.candidates(q_image, q_text, n_candidates)
        # A rewritten row is searched among the fresh rows only, so it cannot be returned twice.
        candidate_ids[np.isin(candidate_ids, fresh_ids.astype(np.int64))] = -1
        flat_ids = candidate_ids.reshape(-1)
        slots = np.full(flat_ids.shape, -1, dtype=np.int64)
        valid = flat_ids >= 0
        slots[valid] = self.store.slots_of(flat_ids[valid].astype(np.uint64))
        rows = self.store.gather(slots, expected_ids=flat_ids.astype(np.uint64))
        slots[~rows.found] = -1
        shape = (n_anchors, n_candidates)
        candidate_search(
            query,
            rows.image.view(*shape, self.dim),
            rows.text.view(*shape, self.dim),
            torch.from_numpy(slots.reshape(shape)).to(self.device),
            torch.from_numpy(np.where(rows.found, flat_ids, -1).reshape(shape)).to(self.device),
            topk,
        )
        fresh_slots = self.store.slots_of(fresh_ids)
        fresh_ids, fresh_slots = fresh_ids[fresh_slots >= 0], fresh_slots[fresh_slots >= 0]
        for first in range(0, len(fresh_slots), rows_at_once):
            chunk = slice(first, first + rows_at_once)
            fresh = self.store.gather(fresh_slots[chunk], expected_ids=fresh_ids[chunk])
            slot_of_column = torch.from_numpy(np.where(fresh.found, fresh_slots[chunk], -1)).to(self.device)
            block_scores = score_block(query, fresh.image, fresh.text)
            mask_slots(block_scores, query, 0, slot_of_column=slot_of_column)
            block_scores[:, torch.from_numpy(~fresh.found).to(self.device)] = NEG_INF
            topk.add(block_scores, torch.from_numpy(fresh_ids[chunk].astype(np.int64)).to(self.device))

    def fetch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(found mask [n], image [found, dim] float32, text, steps [found]) of the stored rows of `ids`."""
        rows = self.store.gather(self.store.slots_of(ids), expected_ids=np.asarray(ids, dtype=np.uint64))
        found = torch.from_numpy(rows.found).to(self.device)
        return (
            rows.found,
            rows.image[found].float().cpu().numpy(),
            rows.text[found].float().cpu().numpy(),
            rows.steps[rows.found],
        )

    def copy_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids, steps, image float32, text) of all stored rows, copied block by block (writers keep going)."""
        parts = list(self.store.copy_rows())
        if not parts:
            empty = np.zeros((0, self.dim), dtype=np.float32)
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64), empty, empty.copy()
        return tuple(np.concatenate(column) for column in zip(*parts))

    # ---- IVF maintenance ----------------------------------------------------------------------------------
    def _maybe_rebuild_ivf(self) -> None:
        ivf = self.config.ivf
        if not self.ivf_enabled or self.store.size < ivf.min_rows:
            return
        with self._state_lock:
            if self._build_thread is not None and self._build_thread.is_alive():
                return
            if self._ivf is not None and len(self._fresh_ids) < ivf.rebuild_fraction * self._ivf.rows:
                return
            # Set before the copy starts: rows written while it runs are searched exactly until the next build.
            self._fresh_during_build = set()
            self._build_thread = threading.Thread(target=self._rebuild_ivf, name="ivf-rebuild", daemon=True)
            self._build_thread.start()

    def _rebuild_ivf(self) -> None:
        try:
            ids, _, image, text = self.copy_rows()
            built = IvfCandidates.build(image, text, ids, self.config.ivf)
        except Exception:
            log.exception("IVF rebuild failed; the exact search keeps serving")
            with self._state_lock:
                self._fresh_during_build = None
            return
        with self._state_lock:
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
        min_step, max_step = self.store.step_range()
        ivf = self._ivf
        return MinerStats(
            self.store.size,
            self.dim,
            str(self.device),
            min_step,
            max_step,
            self.store.capacity,
            self.store.max_rows,
            ivf is not None,
            ivf.rows if ivf else 0,
            self.config.max_k,
            ivf_enabled=self.ivf_enabled,
        )
