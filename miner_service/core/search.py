"""Exact hard-pair search over the stored rows: blocked matrix products, filters, and a running top-k.

Torch matrix products on whatever device the rows live on, so the CPU and GPU paths are one code path (DESIGN
§2, "GPU first, CPU always"); only the running top-k differs (FAISS heaps on the CPU, torch.topk on the GPU).
Scores are computed chunk by chunk over the store's blocks so that memory stays at O(anchors × chunk_rows) however
many rows are stored; the top-k is labelled by sample id, which stays right however rows are written meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import IntEnum

import faiss
import numpy as np
import torch


class Scoring(IntEnum):
    """Values equal the contract's Scoring enum."""

    PRODUCT = 1
    SUM = 2
    IMAGE = 3
    TEXT = 4


@dataclass(frozen=True)
class SearchQuery:
    """One search: anchors × k, with the filters that apply to every block.

    self_slots: [anchors] int64 slot of each anchor's own row (-1 when the anchor was given by embedding).
    exclude_slots: [m] int64 slots never returned (any anchor).
    max_similarity: candidates whose image or text similarity exceeds it are dropped (>= 1: no cut).
    positive_ratio, positive: the false-negative guard (0: off). Candidate j is dropped for anchor i when
        <image_i, text_j> >= ratio * positive_i or <text_i, image_j> >= ratio * positive_i, where positive_i is
        <image_i, text_i>, the anchor's own pair ([anchors] float32). Scored in the block it costs two more
        matrix products, so a Mine applies it to a candidate list first (core.guard) and here only for the anchors
        whose list ran short.
    exclude_owner, anchor_owner: a search that serves several Mines at once (core.batching) excludes each Mine's
        slots for its own anchors only: excluded slot e applies to anchor a when exclude_owner[e] ==
        anchor_owner[a] ([m] and [anchors] int64). None: every excluded slot applies to every anchor.
    """

    image: torch.Tensor  # [anchors, dim], same device and dtype as the rows
    text: torch.Tensor
    k: int
    scoring: Scoring
    max_similarity: float
    self_slots: torch.Tensor
    exclude_slots: torch.Tensor
    positive_ratio: float = 0.0
    positive: torch.Tensor | None = None
    exclude_owner: torch.Tensor | None = None
    anchor_owner: torch.Tensor | None = None

    def anchors(self, part) -> SearchQuery:
        """The same search for some of the anchors (a slice or an index tensor)."""
        return replace(
            self,
            image=self.image[part],
            text=self.text[part],
            self_slots=self.self_slots[part],
            positive=None if self.positive is None else self.positive[part],
            anchor_owner=None if self.anchor_owner is None else self.anchor_owner[part],
        )

    def to(self, device: torch.device) -> SearchQuery:
        return replace(
            self,
            image=self.image.to(device),
            text=self.text.to(device),
            self_slots=self.self_slots.to(device),
            exclude_slots=self.exclude_slots.to(device),
            positive=None if self.positive is None else self.positive.to(device),
            exclude_owner=None if self.exclude_owner is None else self.exclude_owner.to(device),
            anchor_owner=None if self.anchor_owner is None else self.anchor_owner.to(device),
        )

    def with_k(self, k: int) -> SearchQuery:
        return replace(self, k=k)

    def without_guard(self) -> SearchQuery:
        return replace(self, positive_ratio=0.0, positive=None)

    @property
    def shares_settings(self) -> tuple:
        """What searches must share to run as one pass (merge): scoring, the near-duplicate cut, the guard."""
        return (self.scoring, self.max_similarity, self.positive_ratio)

    @staticmethod
    def merge(queries: list[SearchQuery]) -> SearchQuery:
        """One search for the anchors of several, each keeping its own exclusions; k is the largest k.

        Every query must share `shares_settings`. Anchor rows come in the order of `queries`; query q's anchors
        are owned by q, so its excluded slots mask only them."""
        first = queries[0]
        assert all(q.shares_settings == first.shares_settings for q in queries), "merged searches share settings"
        assert all(q.exclude_owner is None for q in queries), "a merged search is not merged again"
        device = first.image.device
        owner = torch.arange(len(queries), device=device)
        return replace(
            first,
            image=torch.cat([q.image for q in queries]),
            text=torch.cat([q.text for q in queries]),
            k=max(q.k for q in queries),
            self_slots=torch.cat([q.self_slots for q in queries]),
            exclude_slots=torch.cat([q.exclude_slots for q in queries]),
            positive=None if first.positive is None else torch.cat([q.positive for q in queries]),
            exclude_owner=owner.repeat_interleave(torch.tensor([len(q.exclude_slots) for q in queries], device=device)),
            anchor_owner=owner.repeat_interleave(torch.tensor([len(q.image) for q in queries], device=device)),
        )


NEG_INF = float("-inf")


def score_block(query: SearchQuery, image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
    """Scores [anchors, rows] of the anchors against a block of rows, near-duplicates set to -inf (float32)."""
    cut = query.max_similarity < 1.0
    need_image = cut or query.scoring != Scoring.TEXT
    need_text = cut or query.scoring != Scoring.IMAGE
    image_sim = (query.image @ image_rows.T).float() if need_image else None
    text_sim = (query.text @ text_rows.T).float() if need_text else None
    near_duplicate = None
    if cut:
        near_duplicate = image_sim > query.max_similarity
        near_duplicate |= text_sim > query.max_similarity
    if query.scoring == Scoring.PRODUCT:
        scores = image_sim.mul_(text_sim)
    elif query.scoring == Scoring.SUM:
        scores = image_sim.add_(text_sim)
    elif query.scoring == Scoring.IMAGE:
        scores = image_sim
    else:
        scores = text_sim
    if near_duplicate is not None:
        scores.masked_fill_(near_duplicate, NEG_INF)
    if query.positive_ratio:
        bound = (query.positive * query.positive_ratio).unsqueeze(1)
        scores.masked_fill_((query.image @ text_rows.T).float() >= bound, NEG_INF)
        scores.masked_fill_((query.text @ image_rows.T).float() >= bound, NEG_INF)
    return scores


def mask_slots(
    scores: torch.Tensor, query: SearchQuery, first_slot: int, slot_of_column=None, sync_free: bool | None = None
) -> None:
    """Set self and excluded candidates to -inf in a score block whose columns are slots first_slot.. (in place).

    When the block's columns are not a contiguous slot range, `slot_of_column` ([rows] int64) gives each
    column's slot instead. sync_free (default: off the CPU) masks a slot range without asking the device how many
    entries fall in it (see `_mask_range_sync_free`); both forms set the same entries.
    """
    if slot_of_column is None:
        if sync_free is None:
            sync_free = scores.device.type != "cpu"
        if sync_free:
            _mask_range_sync_free(scores, query, first_slot)
        else:
            _mask_range_indexed(scores, query, first_slot)
        return
    if query.exclude_owner is not None:
        scores.masked_fill_(_owned(query, slot_of_column.unsqueeze(0).expand_as(scores)), NEG_INF)
    elif query.exclude_slots.numel():
        scores[:, torch.isin(slot_of_column, query.exclude_slots)] = NEG_INF
    own = slot_of_column.unsqueeze(0) == query.self_slots.unsqueeze(1)
    scores.masked_fill_(own, NEG_INF)


def _mask_range_indexed(scores: torch.Tensor, query: SearchQuery, first_slot: int) -> None:
    """The CPU form: pick the excluded columns and the anchors whose own row is in range, then index them."""
    n_cols = scores.shape[1]
    excluded = query.exclude_slots - first_slot
    in_range = (excluded >= 0) & (excluded < n_cols)
    if query.exclude_owner is not None:
        picked = torch.nonzero(in_range).flatten()
        if picked.numel():
            _mask_owned_columns(scores, query, excluded[picked], query.exclude_owner[picked], None)
    elif in_range.any():
        scores[:, excluded[in_range]] = NEG_INF
    own = query.self_slots - first_slot
    anchors = torch.nonzero((query.self_slots >= 0) & (own >= 0) & (own < n_cols)).flatten()
    if anchors.numel():
        scores[anchors, own[anchors]] = NEG_INF


def _mask_range_sync_free(scores: torch.Tensor, query: SearchQuery, first_slot: int) -> None:
    """The device form: fixed-shape kernels only. Boolean indexing and nonzero make the host wait for the device
    to finish everything queued so far; once per chunk that made a Mine over 10M rows on a GPU ~80 times slower
    than its matrix products (bench/gpu_check.py)."""
    n_cols = scores.shape[1]
    if query.exclude_owner is not None and query.exclude_slots.numel():
        excluded = query.exclude_slots - first_slot
        in_range = (excluded >= 0) & (excluded < n_cols)
        _mask_owned_columns(scores, query, torch.where(in_range, excluded, 0), query.exclude_owner, in_range)
    elif query.exclude_slots.numel():
        excluded = query.exclude_slots - first_slot
        in_range = (excluded >= 0) & (excluded < n_cols)
        # One spare column takes the out-of-range entries, so the fill needs no count of them.
        hit = torch.zeros(n_cols + 1, dtype=torch.bool, device=scores.device)
        hit.index_fill_(0, torch.where(in_range, excluded, n_cols), True)
        scores.masked_fill_(hit[:n_cols], NEG_INF)
    own = query.self_slots - first_slot
    in_range = (query.self_slots >= 0) & (own >= 0) & (own < n_cols)
    # min(score, -inf) where the anchor's own row is in this range, min(score, +inf) = score elsewhere.
    bound = torch.full((len(own), 1), float("inf"), dtype=scores.dtype, device=scores.device)
    bound.masked_fill_(in_range.unsqueeze(1), NEG_INF)
    scores.scatter_reduce_(1, torch.where(in_range, own, 0).unsqueeze(1), bound, reduce="amin")


def _mask_owned_columns(
    scores: torch.Tensor, query: SearchQuery, columns: torch.Tensor, owners: torch.Tensor, in_range
) -> None:
    """Set scores[a, columns[e]] to -inf where anchor a is owned by owners[e] (and in_range[e], when given).

    A column excluded by two Mines appears twice with different anchors to mask, so the masks are combined by a
    minimum (-inf masks, +inf leaves the score), never by assignment, which would let the last write win."""
    hit = query.anchor_owner.unsqueeze(1) == owners.unsqueeze(0)  # [anchors, m]
    if in_range is not None:
        hit &= in_range.unsqueeze(0)
    bound = torch.full(hit.shape, float("inf"), dtype=scores.dtype, device=scores.device)
    bound.masked_fill_(hit, NEG_INF)
    scores.scatter_reduce_(1, columns.unsqueeze(0).expand_as(hit), bound, reduce="amin")


# Owner and slot combined in one key: slots stay far below 2^40 (a trillion rows).
_OWNER_SHIFT = 40


def _owned(query: SearchQuery, slots: torch.Tensor) -> torch.Tensor:
    """[anchors, c] bool: slots ([anchors, c], -1 none) that their anchor's own Mine excludes."""
    keys = (query.anchor_owner.unsqueeze(1) << _OWNER_SHIFT) + slots
    excluded = (query.exclude_owner << _OWNER_SHIFT) + query.exclude_slots
    return torch.isin(keys, excluded) & (slots >= 0)


class TorchTopK:
    """Running top-k by concatenate-and-select; the GPU path (torch.topk is fast there).

    segment > 0: a block whose column count is a multiple of it is first cut into rows of `segment` columns, each
    row's top-k taken, and those (k per segment) merged; exact, since a row's top k are among its segments' top k.
    """

    def __init__(self, n_anchors: int, k: int, device, segment: int = 0):
        self.k = k
        self.segment = segment
        self.scores = torch.full((n_anchors, k), NEG_INF, device=device)
        self.slots = torch.full((n_anchors, k), -1, dtype=torch.int64, device=device)

    def add(self, scores: torch.Tensor, slots: torch.Tensor) -> None:
        """Offer a block of candidates; `slots` (labels: slots or ids, int64) is [cols] (shared by all anchors) or
        [anchors, cols]."""
        top_scores, top_cols = self._block_top(scores)
        top_slots = slots[top_cols] if slots.dim() == 1 else torch.gather(slots, 1, top_cols)
        # Blocks on other devices send only their top-k over, never a block of scores.
        top_scores, top_slots = top_scores.to(self.scores.device), top_slots.to(self.scores.device)
        merged_scores = torch.cat([self.scores, top_scores], dim=1)
        merged_slots = torch.cat([self.slots, top_slots], dim=1)
        self.scores, keep = torch.topk(merged_scores, self.k, dim=1)
        self.slots = torch.gather(merged_slots, 1, keep)

    def _block_top(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates of one block: (scores, columns), at least its top k per anchor."""
        n_anchors, cols = scores.shape
        take = min(self.k, cols)
        segment = self.segment
        if not segment or cols % segment or cols == segment or take > segment or not scores.is_contiguous():
            return torch.topk(scores, take, dim=1)
        top, cols_in = torch.topk(scores.view(n_anchors, cols // segment, segment), take, dim=2)
        cols_in += torch.arange(0, cols, segment, device=scores.device).unsqueeze(1)
        return top.flatten(1), cols_in.flatten(1)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.slots[self.scores == NEG_INF] = -1
        return self.scores, self.slots


class HeapTopK:
    """Running top-k in FAISS' per-anchor min-heaps; the CPU path.

    Selecting 16 of 2^20 scores per anchor with torch.topk costs more than the matrix products on a CPU; the
    heaps scan each block once (OpenMP over anchors) and keep only what beats the current k-th best.
    """

    def __init__(self, n_anchors: int, k: int):
        self.k = k
        self.scores = np.empty((n_anchors, k), dtype=np.float32)
        self.slots = np.empty((n_anchors, k), dtype=np.int64)
        self.heaps = faiss.float_minheap_array_t()
        self.heaps.nh, self.heaps.k = n_anchors, k
        self.heaps.val, self.heaps.ids = faiss.swig_ptr(self.scores), faiss.swig_ptr(self.slots)
        self.heaps.heapify()  # values -FLT_MAX, ids -1: a -inf (filtered) score never enters

    def add(self, scores: torch.Tensor, slots: torch.Tensor) -> None:
        values = scores.contiguous().numpy()
        ids = np.ascontiguousarray(slots.numpy(), dtype=np.int64)
        stride = 0 if ids.ndim == 1 else ids.shape[1]  # stride 0: the same slots for every anchor
        self.heaps.addn_with_ids(
            values.shape[1], faiss.swig_ptr(values), faiss.swig_ptr(ids), stride, 0, values.shape[0]
        )

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.heaps.reorder()
        self.scores[self.slots < 0] = NEG_INF
        return torch.from_numpy(self.scores), torch.from_numpy(self.slots)


def make_topk(n_anchors: int, k: int, device: torch.device, kind: str = "auto", segment: int = 0):
    """kind: "auto" (heaps on the CPU, torch elsewhere), "heap" (CPU only) or "torch" (segment: see TorchTopK)."""
    if kind == "heap" or (kind == "auto" and device.type == "cpu"):
        return HeapTopK(n_anchors, k)
    return TorchTopK(n_anchors, k, device, segment)


class SearchCancelled(Exception):
    """The caller went away (deadline passed, client cancelled) before the search finished."""


def offer_chunk_scores(query: SearchQuery, block, first: int, last: int, topk) -> None:
    """Offer rows [first, last) of `block` to `topk` as a full [anchors, rows] score matrix with every filter applied
    (the torch path; core.fused.offer_chunk_top is the fused kernel's). Called under the block's read lock."""
    scores = score_block(query, block.image[first:last], block.text[first:last])
    if block.holes:
        scores.masked_fill_(~block.live_mask[first:last], NEG_INF)
    mask_slots(scores, query, block.first_slot + first)
    topk.add(scores, block.labels[first:last])


def exact_search(
    query: SearchQuery, blocks, chunk_rows: int, topk, cancelled=None, offer_chunk=offer_chunk_scores
) -> None:
    """Offer every stored row of `blocks` (store.RowBlock) to `topk`, labelled by id, `chunk_rows` rows at a time.

    Each chunk is offered (offer_chunk: the torch path's scores, or the fused kernel's per-chunk top k) under its
    block's read lock only, so a writer waits for at most one chunk of this search. Rows past a block's `used` mark
    when the search reaches it were written after the search began and are left out. cancelled: optional () -> bool,
    asked between chunks; True stops the search with SearchCancelled, so that an abandoned Mine frees its CPU within
    one chunk instead of at the end."""
    scanned, total = 0, sum(block.used for block in blocks)
    on_device = {query.image.device: query}
    for block in blocks:
        if block.device not in on_device:
            on_device[block.device] = query.to(block.device)
        local = on_device[block.device]
        for first in range(0, block.used, chunk_rows):
            if cancelled is not None and cancelled():
                raise SearchCancelled(f"stopped after {scanned} of {total} rows")
            with block.lock.read():
                last = min(first + chunk_rows, block.used)
                offer_chunk(local, block, first, last, topk)
            scanned += last - first


def candidate_search(
    query: SearchQuery,
    image_c: torch.Tensor,
    text_c: torch.Tensor,
    candidate_slots: torch.Tensor,
    candidate_ids: torch.Tensor,
    topk,
) -> None:
    """Exact re-rank of per-anchor candidates with all filters, into `topk` labelled by id.

    image_c, text_c: [anchors, c, dim] the candidates' rows; candidate_slots / candidate_ids: [anchors, c] int64,
    -1 where there is no candidate."""
    valid = candidate_slots >= 0
    image_sim = torch.bmm(image_c, query.image.unsqueeze(2)).squeeze(2).float()
    text_sim = torch.bmm(text_c, query.text.unsqueeze(2)).squeeze(2).float()
    scores = {
        Scoring.PRODUCT: lambda: image_sim * text_sim,
        Scoring.SUM: lambda: image_sim + text_sim,
        Scoring.IMAGE: lambda: image_sim.clone(),
        Scoring.TEXT: lambda: text_sim.clone(),
    }[query.scoring]()
    if query.max_similarity < 1.0:
        scores.masked_fill_((image_sim > query.max_similarity) | (text_sim > query.max_similarity), NEG_INF)
    if query.positive_ratio:
        bound = (query.positive * query.positive_ratio).unsqueeze(1)
        scores.masked_fill_(torch.bmm(text_c, query.image.unsqueeze(2)).squeeze(2).float() >= bound, NEG_INF)
        scores.masked_fill_(torch.bmm(image_c, query.text.unsqueeze(2)).squeeze(2).float() >= bound, NEG_INF)
    scores.masked_fill_(~valid, NEG_INF)
    scores.masked_fill_(candidate_slots == query.self_slots.unsqueeze(1), NEG_INF)
    if query.exclude_owner is not None:
        scores.masked_fill_(_owned(query, candidate_slots), NEG_INF)
    elif query.exclude_slots.numel():
        scores.masked_fill_(torch.isin(candidate_slots, query.exclude_slots), NEG_INF)
    topk.add(scores, candidate_ids)
