"""HardPairMiner: the thread-safe in-memory core (a `MinerCore`) behind every shell.

It owns the pair store (rows in blocks, each with its own lock: core.store), the optional IVF candidate
path (core.ivf_path) and the admission of Mines to scratch memory (core.budget). Inputs are numpy
arrays that the caller has validated (service.validation); outputs are numpy arrays. Nothing here knows
about gRPC.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch

from helip.miner_service.core import guard
from helip.miner_service.core.api import Cancelled, MineQuery, MineResult, MinerStats
from helip.miner_service.core.budget import ScratchAdmission, bytes_per_score, chunk_rows
from helip.miner_service.core.config import SearchConfig
from helip.miner_service.core.errors import MinerError, NotFound
from helip.miner_service.core.ivf_path import IvfPath
from helip.miner_service.core.search import NEG_INF, SearchQuery, exact_search, make_topk, offer_chunk_scores
from helip.miner_service.core.store import PairStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Resolved:
    """One Mine, resolved against the store: its search, its anchors' own ids, which anchors are stored."""

    query: MineQuery
    search: SearchQuery
    self_ids: np.ndarray | None
    known: np.ndarray | None  # anchors by id: [anchors] bool stored; None for anchors by embedding
    unknown: np.ndarray


@dataclass(frozen=True)
class _Answer:
    ids: np.ndarray
    scores: np.ndarray
    steps: np.ndarray
    dropped: int


def _first_k(found: tuple[np.ndarray, np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first k columns of (ids, scores, steps): a Mine's own k out of a pass searched for a larger one."""
    return tuple(np.ascontiguousarray(a[:, :k]) for a in found)


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
        self.devices = resolve_devices(config.device)
        self.device = self.devices[0]
        self.config = config = config.for_device(self.device.type)
        self.dtype = resolve_dtype(config.storage_dtype, self.device)
        # The most stored rows scored at once; the scratch budget makes it fewer for Mines with many anchors.
        self.block_rows = config.block_rows
        self.admission = ScratchAdmission(config.scratch_budget_bytes, config.mine_queue_limit)
        self._bytes_per_score = bytes_per_score(self.dtype)
        # A capped store never needs a block larger than its cap (a small namespace, a test miner).
        store_block_rows = min(config.store_block_rows, max_rows) if max_rows else config.store_block_rows
        self.store = PairStore(dim, self.devices, self.dtype, max_rows=max_rows, block_rows=store_block_rows)
        self._newest_step = 0
        self._step_lock = threading.Lock()
        self.ivf = IvfPath(self.store, config, self.device, self._bytes_per_score)
        self.fused = _fused_kernel(config.kernel, self.device)
        log.info(
            "miner core: dim=%d devices=%s dtype=%s store blocks of %d rows, scored %d rows at a time",
            dim,
            ",".join(map(str, self.devices)),
            self.dtype,
            self.store.block_rows,
            self.block_rows,
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
        with self._step_lock:
            self._newest_step = max(self._newest_step, int(np.max(step)) if len(ids) else 0)
        self.ivf.note_written(ids)
        return len(ids), self.store.size

    def check_capacity(self, ids: np.ndarray) -> int:
        """Rows that upserting `ids` would add (for callers that must refuse before logging a write)."""
        return self.store.new_row_count(ids)

    def delete(self, ids: np.ndarray) -> tuple[int, int]:
        deleted = self.store.delete(ids)
        self.ivf.note_deleted(ids)
        return deleted, self.store.size

    # ---- search -------------------------------------------------------------------------------------------
    def mine(self, query: MineQuery, cancelled: Cancelled | None = None) -> MineResult:
        """Hard neighbours of the query's anchors (see MineQuery).

        cancelled: optional () -> bool; the exact search stops with SearchCancelled once it says True."""
        resolved = self._resolve(query)
        ivf = self.ivf.current()  # one index and its fresh ids for the whole Mine, however rebuilds go meanwhile
        (answer,) = self._answer([resolved], ivf, cancelled)
        return self._result(resolved, answer, ivf is not None, 1)

    def mine_many(self, queries: list[MineQuery], cancelled: Cancelled | None = None) -> list[MineResult | Exception]:
        """Several Mines answered by one pass over the rows for each set of shared settings (scoring, the
        near-duplicate cut, the guard's ratio): their anchors are searched together, each Mine keeping its own k,
        its own exclusions and its own anchors' rows. Each answer equals the one `mine` gives alone (up to the order
        of equal scores). A Mine that cannot start (strict anchors not stored) gets its error in its place; an
        error of the pass (SearchCancelled, an admission refusal) is raised for all. cancelled: as in `mine`, for
        the pass (core.batching stops a pass only when every caller in it has gone)."""
        outcomes: list[MineResult | Exception | None] = [None] * len(queries)
        groups: dict[tuple, list[tuple[int, _Resolved]]] = {}
        for position, query in enumerate(queries):
            try:
                resolved = self._resolve(query)
            except MinerError as error:
                outcomes[position] = error
                continue
            groups.setdefault(resolved.search.shares_settings, []).append((position, resolved))
        ivf = self.ivf.current()
        for members in groups.values():
            answers = self._answer([resolved for _, resolved in members], ivf, cancelled)
            for (position, resolved), answer in zip(members, answers):
                outcomes[position] = self._result(resolved, answer, ivf is not None, len(members))
        return outcomes

    def _resolve(self, query: MineQuery) -> _Resolved:
        """The Mine's anchors as rows on the device, with its filters as slots (NotFound for strict anchors)."""
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
            query.k,
            query.scoring,
            query.max_similarity or self.config.default_max_similarity,
            torch.from_numpy(self_slots.astype(np.int64)).to(self.device),
            torch.from_numpy(exclude_slots[exclude_slots >= 0]).to(self.device),
            query.positive_ratio,
            guard.positives(q_image, q_text) if query.positive_ratio else None,
        )
        return _Resolved(query, search, self_ids, known, unknown)

    def _result(self, resolved: _Resolved, answer: _Answer, used_ivf: bool, pass_mines: int) -> MineResult:
        query, known = resolved.query, resolved.known
        found_ids, scores, found_steps = answer.ids, answer.scores, answer.steps
        if known is not None and not known.all():
            # Unknown anchors keep a row of padding so the reply stays aligned with the request.
            n_anchors, k = len(query.anchor_ids), query.k
            ids_out = np.full((n_anchors, k), -1, dtype=np.int64)
            scores_out = np.full((n_anchors, k), NEG_INF, dtype=np.float32)
            steps_out = np.zeros((n_anchors, k), dtype=np.uint64)
            ids_out[known], scores_out[known], steps_out[known] = found_ids, scores, found_steps
            found_ids, scores, found_steps = ids_out, scores_out, steps_out
        return MineResult(
            found_ids,
            scores,
            found_steps,
            self.store.size,
            resolved.unknown,
            used_ivf,
            self._newest_step,
            answer.dropped,
            pass_mines,
        )

    def _answer(self, members: list[_Resolved], ivf, cancelled) -> list[_Answer]:
        """Each member's neighbours, searched in one pass (their searches share settings)."""
        searches = [member.search for member in members]
        merged = searches[0] if len(searches) == 1 else SearchQuery.merge(searches)
        bounds = np.cumsum([0] + [len(search.image) for search in searches])
        parts = [slice(bounds[i], bounds[i + 1]) for i in range(len(members))]
        if merged.positive_ratio:
            return self._guarded_search(merged, members, parts, ivf, cancelled)
        labels, scores = self._search(merged, ivf, cancelled)
        answers = []
        for member, part in zip(members, parts):
            ids, own_scores, steps = self._finish(labels[part], scores[part], member.query.exclude_ids, member.self_ids)
            answers.append(_Answer(*_first_k((ids, own_scores, steps), member.query.k), 0))
        return answers

    def _search(self, search: SearchQuery, ivf, cancelled) -> tuple[np.ndarray, np.ndarray]:
        """(ids [anchors, k] int64 with -1 padding, scores float32): the IVF's answer when one is ready, else the
        exact search, within the Mine's admitted scratch memory."""
        n_search, k = search.image.shape[0], search.k
        labels, scores = torch.full((n_search, k), -1, dtype=torch.int64), torch.full((n_search, k), NEG_INF)
        if n_search and self.store.size:
            rows_at_once = self.chunk_rows(n_search)
            scratch = self.scratch_bytes(n_search, rows_at_once, k if ivf is not None else 0)
            with self.admission.admitted(scratch, cancelled):
                if ivf is not None:
                    scores, labels = self.ivf.search(search, ivf, rows_at_once, cancelled)
                else:
                    topk = make_topk(n_search, k, self.device, self.config.topk, self.config.topk_segment)
                    fused = self.fused is not None and self.fused.supports(search, self.device)
                    offer = self.fused.offer_chunk_top if fused else offer_chunk_scores
                    exact_search(search, self.store.blocks(), rows_at_once, topk, cancelled, offer)
                    scores, labels = topk.result()
        return labels.cpu().numpy(), scores.cpu().numpy().astype(np.float32, copy=False)

    def _guarded_search(self, merged: SearchQuery, members: list[_Resolved], parts: list[slice], ivf, cancelled):
        """The Mines with the false-negative guard (core.guard): a longer unguarded list, the guard on its rows,
        then a guarded search of every row for the anchors the list left short."""
        size = self.store.size
        wide = merged.without_guard().with_k(guard.list_length(merged.k, size))
        labels, scores = self._search(wide, ivf, cancelled)
        kept_lists, short = [], []
        for member, part in zip(members, parts):
            # Each Mine judges the list it would have searched alone, so that its drop count is its own too.
            length = guard.list_length(member.query.k, size)
            own_labels, own_scores = labels[part, :length], scores[part, :length]
            complete = (own_labels < 0).any(axis=1) | (length >= size)
            ids, own_scores, steps = self._finish(own_labels, own_scores, member.query.exclude_ids, member.self_ids)
            keep = self._guard_keeps(ids, member.search)
            kept = guard.keep_first(ids, own_scores, steps, keep, member.query.k, complete)
            kept_lists.append(kept)
            short.append(np.flatnonzero(kept.short) + part.start)
        short = np.concatenate(short)
        if len(short):
            part_of_short = merged.anchors(torch.from_numpy(short).to(self.device))
            again_labels, again_scores = self._search(part_of_short, ivf, cancelled)
            for member, part, kept in zip(members, parts, kept_lists):
                rows = np.flatnonzero((short >= part.start) & (short < part.stop))
                if not len(rows):
                    continue
                local = short[rows] - part.start
                own = member.self_ids[local] if member.self_ids is not None else None
                found = self._finish(again_labels[rows], again_scores[rows], member.query.exclude_ids, own)
                kept.ids[local], kept.scores[local], kept.steps[local] = _first_k(found, member.query.k)
        return [_Answer(kept.ids, kept.scores, kept.steps, int(kept.dropped.sum())) for kept in kept_lists]

    def _guard_keeps(self, ids: np.ndarray, search: SearchQuery) -> np.ndarray:
        """[anchors, c] bool: the candidates (ids, -1 padding) the guard keeps, judged on their rows as stored now."""
        flat = ids.reshape(-1)
        slots = np.full(flat.shape, -1, dtype=np.int64)
        listed = flat >= 0
        slots[listed] = self.store.slots_of(flat[listed].astype(np.uint64))
        rows = self.store.gather(slots, expected_ids=flat.astype(np.uint64), device=self.device)
        shape = (*ids.shape, self.store.dim)
        keeps = guard.survivors(
            rows.image.view(shape),
            rows.text.view(shape),
            search.image,
            search.text,
            search.positive * search.positive_ratio,
        )
        return keeps.cpu().numpy() & rows.found.reshape(ids.shape)

    def chunk_rows(self, n_anchors: int) -> int:
        """Stored rows one Mine with n_anchors scores at once, within mine_scratch_bytes."""
        rows = chunk_rows(n_anchors, self.config.mine_scratch_bytes, self._bytes_per_score, self.block_rows)
        segment = self.config.topk_segment
        # Whole segments, so that every full chunk takes the segmented top-k (TorchTopK).
        return rows - rows % segment if segment and rows > segment else rows

    def scratch_bytes(self, n_anchors: int, rows_at_once: int, ivf_k: int = 0) -> int:
        """What one Mine is admitted for: its score chunk, or on the IVF path a group of anchors' candidates and a
        chunk of the fresh rows with their scores."""
        if not ivf_k:
            return n_anchors * rows_at_once * self._bytes_per_score
        group = min(n_anchors, self.ivf.anchors_at_once(ivf_k))
        return group * self.ivf.candidate_bytes(ivf_k)[1] + self.ivf.fresh_chunk_bytes(group, rows_at_once)

    def _finish(self, ids: np.ndarray, scores: np.ndarray, exclude_ids: np.ndarray, self_ids: np.ndarray | None):
        """Ids, scores and current steps of the neighbours, with the filters applied once more by id.

        The search masked excluded and own rows by the slots they had when it began; a row deleted, or an excluded
        id inserted, while it ran is dropped here, and the neighbours after it move up (padding at the end). An id
        deleted and re-inserted into a slot the search had still to reach was scored twice: its first (best)
        place is kept."""
        found = ids >= 0
        slots = np.full(ids.shape, -1, dtype=np.int64)
        slots[found] = self.store.slots_of(ids[found].astype(np.uint64))
        keep = (slots >= 0) & ~_repeated_in_row(ids)
        if len(exclude_ids):
            keep &= ~np.isin(ids, exclude_ids.astype(np.int64))
        if self_ids is not None:
            keep &= ids != self_ids.astype(np.int64)[:, None]
        steps = np.zeros(ids.shape, dtype=np.uint64)
        steps[keep], still_found = self.store.steps_of(slots[keep], expected_ids=ids[keep].astype(np.uint64))
        keep[keep] = still_found  # deleted since the lookup above
        if not (keep == found).all():
            order = np.argsort(~keep, axis=1, kind="stable")
            ids, scores, steps, keep = (np.take_along_axis(a, order, axis=1) for a in (ids, scores, steps, keep))
            ids[~keep], scores[~keep], steps[~keep] = -1, NEG_INF, 0
        return ids, scores, steps

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
        return self.store.copy_all()

    def wait_for_ivf(self, timeout_s: float | None = None) -> bool:
        """Block until an IVF build in flight finishes (tests, benchmarks). Returns whether an IVF is ready."""
        return self.ivf.wait(timeout_s)

    # ---- stats --------------------------------------------------------------------------------------------
    def stats(self) -> MinerStats:
        min_step, max_step = self.store.step_range()
        ivf = self.ivf.current()
        return MinerStats(
            self.store.size,
            self.dim,
            str(self.device),
            min_step,
            max_step,
            self.store.capacity,
            self.store.max_rows,
            ivf is not None,
            ivf.index.rows if ivf else 0,
            self.config.max_k,
            ivf_enabled=self.ivf.enabled,
        )


def _fused_kernel(kernel: str, device: torch.device):
    """core.fused when search.kernel asks for it (imported only then: it needs triton), else None."""
    if kernel != "triton":
        return None
    try:
        from helip.miner_service.core import fused
    except ImportError as error:
        raise ValueError(f"search.kernel 'triton' needs the triton package ({error})") from error
    if device.type != "cuda" and not fused.interpreted():
        raise ValueError("search.kernel 'triton' needs a CUDA device (or TRITON_INTERPRET=1 to run it on the CPU)")
    return fused


def _repeated_in_row(ids: np.ndarray) -> np.ndarray:
    """[anchors, k] bool: True where an id (>= 0) already appeared earlier in its row."""
    order = np.argsort(ids, axis=1, kind="stable")
    in_order = np.take_along_axis(ids, order, axis=1)
    repeated_in_order = np.zeros(ids.shape, dtype=bool)
    repeated_in_order[:, 1:] = (in_order[:, 1:] == in_order[:, :-1]) & (in_order[:, 1:] >= 0)
    repeated = np.empty_like(repeated_in_order)
    np.put_along_axis(repeated, order, repeated_in_order, axis=1)
    return repeated
