"""Exact hard-pair search over the stored rows: blocked matrix products, filters, and a running top-k.

Pure torch on whatever device the rows live on, so the CPU and GPU paths are one code path (DESIGN §2, "GPU
first, CPU always"). Scores are computed block by block over the rows so that memory stays at
O(anchors × block_rows) however many rows are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

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


def merge_topk(best_scores: torch.Tensor, best_slots: torch.Tensor, scores: torch.Tensor,
               slots: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a block's candidates into the running top-k. `slots` is [rows] or [anchors, rows]."""
    take = min(k, scores.shape[1])
    top_scores, top_cols = torch.topk(scores, take, dim=1)
    top_slots = slots[top_cols] if slots.dim() == 1 else torch.gather(slots, 1, top_cols)
    merged_scores = torch.cat([best_scores, top_scores], dim=1)
    merged_slots = torch.cat([best_slots, top_slots], dim=1)
    keep_scores, keep = torch.topk(merged_scores, k, dim=1)
    return keep_scores, torch.gather(merged_slots, 1, keep)


def empty_topk(n_anchors: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.full((n_anchors, k), NEG_INF, device=device),
            torch.full((n_anchors, k), -1, dtype=torch.int64, device=device))


def exact_search(query: SearchQuery, image_rows: torch.Tensor, text_rows: torch.Tensor,
                 block_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores float32, slots int64; both [anchors, k], best first, -inf / -1 padding) over all rows."""
    n_rows = image_rows.shape[0]
    device = image_rows.device
    best_scores, best_slots = empty_topk(query.image.shape[0], query.k, device)
    for first in range(0, n_rows, block_rows):
        last = min(first + block_rows, n_rows)
        scores = score_block(query, image_rows[first:last], text_rows[first:last])
        mask_slots(scores, query, first)
        slots = torch.arange(first, last, device=device)
        best_scores, best_slots = merge_topk(best_scores, best_slots, scores, slots, query.k)
    best_slots[best_scores == NEG_INF] = -1
    return best_scores, best_slots


def candidate_search(query: SearchQuery, image_rows: torch.Tensor, text_rows: torch.Tensor,
                     candidate_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k re-rank of per-anchor candidates ([anchors, c] slots, -1 = none) with all filters."""
    valid = candidate_slots >= 0
    safe = candidate_slots.clamp(min=0)
    image_c = image_rows[safe]  # [anchors, c, dim]
    text_c = text_rows[safe]
    image_sim = torch.bmm(image_c, query.image.unsqueeze(2)).squeeze(2).float()
    text_sim = torch.bmm(text_c, query.text.unsqueeze(2)).squeeze(2).float()
    scores = {Scoring.PRODUCT: lambda: image_sim * text_sim, Scoring.SUM: lambda: image_sim + text_sim,
              Scoring.IMAGE: lambda: image_sim.clone(), Scoring.TEXT: lambda: text_sim.clone()}[query.scoring]()
    if query.max_similarity < 1.0:
        scores.masked_fill_((image_sim > query.max_similarity) | (text_sim > query.max_similarity), NEG_INF)
    scores.masked_fill_(~valid, NEG_INF)
    scores.masked_fill_(candidate_slots == query.self_slots.unsqueeze(1), NEG_INF)
    if query.exclude_slots.numel():
        scores.masked_fill_(torch.isin(candidate_slots, query.exclude_slots), NEG_INF)
    best_scores, best_slots = empty_topk(query.image.shape[0], query.k, scores.device)
    best_scores, best_slots = merge_topk(best_scores, best_slots, scores, candidate_slots, query.k)
    best_slots[best_scores == NEG_INF] = -1
    return best_scores, best_slots
