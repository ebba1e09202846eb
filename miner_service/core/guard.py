"""The false-negative guard on a Mine's candidate list: hard, not wrong.

A mined pair j is a false negative for anchor i when j's caption describes i's image about as well as i's own
caption does (or the mirror). The guard drops candidate j when

    <image_i, text_j> >= ratio * <image_i, text_i>   or   <text_i, image_j> >= ratio * <text_i, image_i>

(the ratio test of NV-Retriever's "TopK-PercPos" and sentence-transformers' `relative_margin`, on both cross
terms). Scoring every stored row's cross terms would double a Mine's matrix products, so a guarded Mine first
searches a longer list (`list_length`) without the guard, then applies it here to the list's rows only; an anchor
left with fewer than k survivors is searched again with the guard inside every block (search.score_block), so the
answer is always exactly that of the guard applied to every row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Candidates searched per wanted neighbour while the guard is on: a guard that drops up to about half of the
# nearest pairs still finds its k in the first list; one that drops more costs a second, guarded search.
LIST_FACTOR = 2
LIST_EXTRA = 16


def list_length(k: int, rows: int) -> int:
    """How long a candidate list a guarded Mine of k searches first (never more than the rows stored)."""
    return max(k, min(rows, LIST_FACTOR * k + LIST_EXTRA))


def positives(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """<image_i, text_i> of each anchor's own pair, float32 [anchors]."""
    return (image.float() * text.float()).sum(dim=1)


def survivors(
    image_c: torch.Tensor, text_c: torch.Tensor, q_image: torch.Tensor, q_text: torch.Tensor, bound: torch.Tensor
) -> torch.Tensor:
    """[anchors, c] bool: candidates ([anchors, c, dim] rows) the guard keeps; `bound` is ratio * positive
    [anchors]. The cross terms are computed as search.candidate_search computes them, so both paths agree."""
    caption_fits = torch.bmm(text_c, q_image.unsqueeze(2)).squeeze(2).float() >= bound.unsqueeze(1)
    image_fits = torch.bmm(image_c, q_text.unsqueeze(2)).squeeze(2).float() >= bound.unsqueeze(1)
    return ~(caption_fits | image_fits)


def drops(image_text: np.ndarray, text_image: np.ndarray, positive: np.ndarray, ratio: float) -> np.ndarray:
    """[anchors, c] bool: the candidates the guard at `ratio` drops, from cross terms already computed.

    image_text: <image_i, text_j>, text_image: <text_i, image_j> ([anchors, c]); positive: <image_i, text_i>
    ([anchors]). The test of `survivors` (negated), with the bound made in float32 as there, for callers that hold
    the cross terms rather than the rows (helip-inspect shows them)."""
    bound = (np.asarray(positive, dtype=np.float32) * np.float32(ratio))[:, None]
    return (np.asarray(image_text, dtype=np.float32) >= bound) | (np.asarray(text_image, dtype=np.float32) >= bound)


@dataclass(frozen=True)
class GuardedList:
    """A candidate list after the guard: the first k survivors of each anchor, best first, padded."""

    ids: np.ndarray  # [anchors, k] int64, -1 padding
    scores: np.ndarray  # [anchors, k] float32, -inf padding
    steps: np.ndarray  # [anchors, k] uint64, 0 padding
    dropped: np.ndarray  # [anchors] int64: candidates the guard dropped ahead of the last one returned
    short: np.ndarray  # [anchors] bool: fewer than k survivors in a list that may not hold every candidate


def keep_first(
    ids: np.ndarray, scores: np.ndarray, steps: np.ndarray, keep: np.ndarray, k: int, complete: np.ndarray
) -> GuardedList:
    """The first k kept entries of each row of a best-first candidate list ([anchors, c], -1 padding at the end).

    complete: [anchors] bool, the row held every candidate there is (the search found fewer than it asked for,
    or asked for every row), so fewer than k survivors is the answer, not a reason to search again."""
    keep = keep & (ids >= 0)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept entries first, in their order
    taken = np.take_along_axis(keep, order, axis=1)
    out_ids = np.where(taken, np.take_along_axis(ids, order, axis=1), -1)
    out_scores = np.where(taken, np.take_along_axis(scores, order, axis=1), np.float32(-np.inf)).astype(np.float32)
    out_steps = np.where(taken, np.take_along_axis(steps, order, axis=1), 0).astype(np.uint64)
    n_kept = keep.sum(axis=1)
    # Dropped ahead of the k-th survivor: its position in the list, minus the k - 1 survivors before it.
    rank = np.cumsum(keep, axis=1)
    enough = n_kept >= k
    last = np.where(enough, np.argmax(rank >= min(k, ids.shape[1]), axis=1), (ids >= 0).sum(axis=1) - 1)
    dropped = np.where(enough, last + 1 - k, (ids >= 0).sum(axis=1) - n_kept)
    return GuardedList(out_ids, out_scores, out_steps, dropped.astype(np.int64), ~enough & ~complete)
