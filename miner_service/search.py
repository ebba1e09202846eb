"""Exact hard-pair search over the stored rows: blocked matrix products, filters, and a running top-k.

Torch matrix products on whatever device the rows live on, so the CPU and GPU paths are one code path (DESIGN
§2, "GPU first, CPU always"); only the running top-k differs (FAISS heaps on the CPU, torch.topk on the GPU).
Scores are computed block by block over the rows so that memory stays at O(anchors × block_rows) however many rows
are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """

    image: torch.Tensor  # [anchors, dim], same device and dtype as the rows
    text: torch.Tensor
    k: int
    scoring: Scoring
    max_similarity: float
    self_slots: torch.Tensor
    exclude_slots: torch.Tensor


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
    return scores


def mask_slots(scores: torch.Tensor, query: SearchQuery, first_slot: int, slot_of_column=None) -> None:
    """Set self and excluded candidates to -inf in a score block whose columns are slots first_slot.. (in place).

    When the block's columns are not a contiguous slot range, `slot_of_column` ([rows] int64) gives each
    column's slot instead.
    """
    n_cols = scores.shape[1]
    if slot_of_column is None:
        excluded = query.exclude_slots - first_slot
        excluded = excluded[(excluded >= 0) & (excluded < n_cols)]
        if excluded.numel():
            scores[:, excluded] = NEG_INF
        own = query.self_slots - first_slot
        anchors = torch.nonzero((query.self_slots >= 0) & (own >= 0) & (own < n_cols)).flatten()
        if anchors.numel():
            scores[anchors, own[anchors]] = NEG_INF
        return
    if query.exclude_slots.numel():
        scores[:, torch.isin(slot_of_column, query.exclude_slots)] = NEG_INF
    own = slot_of_column.unsqueeze(0) == query.self_slots.unsqueeze(1)
    scores.masked_fill_(own, NEG_INF)


class TorchTopK:
    """Running top-k by concatenate-and-select; the GPU path (torch.topk is fast there)."""

    def __init__(self, n_anchors: int, k: int, device):
        self.k = k
        self.scores = torch.full((n_anchors, k), NEG_INF, device=device)
        self.slots = torch.full((n_anchors, k), -1, dtype=torch.int64, device=device)

    def add(self, scores: torch.Tensor, slots: torch.Tensor) -> None:
        """Offer a block of candidates; `slots` is [cols] (shared by all anchors) or [anchors, cols]."""
        take = min(self.k, scores.shape[1])
        top_scores, top_cols = torch.topk(scores, take, dim=1)
        top_slots = slots[top_cols] if slots.dim() == 1 else torch.gather(slots, 1, top_cols)
        merged_scores = torch.cat([self.scores, top_scores], dim=1)
        merged_slots = torch.cat([self.slots, top_slots], dim=1)
        self.scores, keep = torch.topk(merged_scores, self.k, dim=1)
        self.slots = torch.gather(merged_slots, 1, keep)

    def add_range(self, scores: torch.Tensor, first_slot: int) -> None:
        self.add(scores, torch.arange(first_slot, first_slot + scores.shape[1], device=scores.device))

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

    def add_range(self, scores: torch.Tensor, first_slot: int) -> None:
        values = scores.contiguous().numpy()
        self.heaps.addn(values.shape[1], faiss.swig_ptr(values), first_slot, 0, values.shape[0])

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.heaps.reorder()
        self.scores[self.slots < 0] = NEG_INF
        return torch.from_numpy(self.scores), torch.from_numpy(self.slots)


def make_topk(n_anchors: int, k: int, device: torch.device, kind: str = "auto"):
    """kind: "auto" (heaps on the CPU, torch elsewhere), "heap" (CPU only) or "torch"."""
    if kind == "heap" or (kind == "auto" and device.type == "cpu"):
        return HeapTopK(n_anchors, k)
    return TorchTopK(n_anchors, k, device)


class SearchCancelled(Exception):
    """The caller went away (deadline passed, client cancelled) before the search finished."""


def exact_search(
    query: SearchQuery,
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    block_rows: int,
    topk_kind: str = "auto",
    cancelled=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores float32, slots int64; both [anchors, k], best first, -inf / -1 padding) over all rows.

    cancelled: optional () -> bool, asked between blocks; True stops the search with SearchCancelled, so that an
    abandoned Mine frees its CPU (and the store's read lock) within one block instead of at the end."""
    n_rows = image_rows.shape[0]
    topk = make_topk(query.image.shape[0], query.k, image_rows.device, topk_kind)
    for first in range(0, n_rows, block_rows):
        if cancelled is not None and cancelled():
            raise SearchCancelled(f"stopped after {first} of {n_rows} rows")
        last = min(first + block_rows, n_rows)
        scores = score_block(query, image_rows[first:last], text_rows[first:last])
        mask_slots(scores, query, first)
        topk.add_range(scores, first)
    return topk.result()


def candidate_search(
    query: SearchQuery, image_rows: torch.Tensor, text_rows: torch.Tensor, candidate_slots: torch.Tensor, topk
) -> None:
    """Exact re-rank of per-anchor candidates ([anchors, c] slots, -1 = none) with all filters, into `topk`."""
    valid = candidate_slots >= 0
    safe = candidate_slots.clamp(min=0)
    image_c = image_rows[safe]  # [anchors, c, dim]
    text_c = text_rows[safe]
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
    scores.masked_fill_(~valid, NEG_INF)
    scores.masked_fill_(candidate_slots == query.self_slots.unsqueeze(1), NEG_INF)
    if query.exclude_slots.numel():
        scores.masked_fill_(torch.isin(candidate_slots, query.exclude_slots), NEG_INF)
    topk.add(scores, candidate_slots)
