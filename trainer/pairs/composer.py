"""Batch composition: anchors plus, for each, one of its hard pairs; random samples where mining has nothing.

Pure (numpy in, numpy out). Layout follows the paper's code: anchor, its hard pair, anchor, its hard pair, ...
then the remaining anchors, so that batch size is exactly what the user set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ComposedBatch:
    ids: np.ndarray  # [batch_size] int64 sample ids, unique
    couples: np.ndarray  # [m, 2] int64 (anchor position, hard-pair position) within `ids`
    n_hard: int  # slots filled with a mined hard pair
    n_fallback: int  # slots meant for a hard pair that got a random sample instead
    n_foreign: int = 0  # neighbour ids in the answer that the data set does not hold (dropped, never used)
    n_plain: int = 0  # hard slots left to random samples on purpose (mining not started, or ramping up)

    @property
    def hard_fraction(self) -> float:
        return self.n_hard / len(self.ids) if len(self.ids) else 0.0


def compose_batch(
    anchor_ids: np.ndarray,
    neighbour_ids: np.ndarray | None,
    batch_size: int,
    n_samples: int,
    rng: np.random.Generator,
    top: int = 50,
    max_mined: int | None = None,
) -> ComposedBatch:
    """Fill `batch_size - len(anchor_ids)` slots with hard pairs of the anchors.

    neighbour_ids: [anchors, k] best first, -1 padding (the miner's answer), or None when mining gave nothing
    (not yet indexed, deadline missed, miner down): then every hard slot falls back to a random sample.
    Each anchor's hard pair is drawn uniformly from its first `top` usable neighbours (not already in the batch).
    Ids outside [0, n_samples) (rows another data set left in a shared miner) are never used, only counted.
    max_mined: at most this many hard slots take a mined pair (None: all); the others are plain random samples,
    counted as `n_plain`, not as fallbacks (the streaming mode's ramp).
    """
    anchor_ids = np.asarray(anchor_ids, dtype=np.int64)
    n_anchors = len(anchor_ids)
    n_slots = batch_size - n_anchors
    if n_slots < 0:
        raise ValueError(f"{n_anchors} anchors do not fit a batch of {batch_size}")
    if n_anchors + n_slots > n_samples:
        raise ValueError(f"a batch of {batch_size} needs more than the {n_samples} samples there are")
    n_foreign = 0
    if neighbour_ids is not None:
        neighbour_ids = np.asarray(neighbour_ids, dtype=np.int64)
        foreign = neighbour_ids >= n_samples
        n_foreign = int(foreign.sum())
        if n_foreign:
            neighbour_ids = np.where(foreign, -1, neighbour_ids)
    minable = n_slots if max_mined is None else max(0, min(n_slots, max_mined))
    taken = set(anchor_ids.tolist())
    hard_of_anchor: list[tuple[int, int, bool]] = []  # (anchor index, sample id, mined?)
    for slot in range(n_slots):
        anchor = slot % n_anchors if n_anchors else 0
        choice = -1
        if neighbour_ids is not None and n_anchors and slot < minable:
            usable = [int(i) for i in neighbour_ids[anchor] if i >= 0 and int(i) not in taken][:top]
            if usable:
                choice = usable[int(rng.integers(len(usable)))]
        mined = choice >= 0
        if not mined:
            choice = _random_unused(rng, n_samples, taken)
        taken.add(choice)
        hard_of_anchor.append((anchor, choice, mined))

    ids: list[int] = []
    couples: list[tuple[int, int]] = []
    position_of_anchor: dict[int, int] = {}
    hard_by_anchor: dict[int, list[tuple[int, bool]]] = {}
    for anchor, sample, mined in hard_of_anchor:
        hard_by_anchor.setdefault(anchor, []).append((sample, mined))
    for index, anchor_id in enumerate(anchor_ids.tolist()):
        position_of_anchor[index] = len(ids)
        ids.append(anchor_id)
        for sample, mined in hard_by_anchor.get(index, []):
            if mined:
                couples.append((position_of_anchor[index], len(ids)))
            ids.append(sample)
    if not n_anchors:  # a batch of only fallbacks (degenerate ratio); keep the contract
        ids = [sample for _, sample, _ in hard_of_anchor]
    n_hard = sum(1 for _, _, mined in hard_of_anchor if mined)
    return ComposedBatch(
        ids=np.asarray(ids, dtype=np.int64),
        couples=np.asarray(couples, dtype=np.int64).reshape(-1, 2),
        n_hard=n_hard,
        n_fallback=minable - n_hard,
        n_foreign=n_foreign,
        n_plain=n_slots - minable,
    )


def _random_unused(rng: np.random.Generator, n_samples: int, taken: set[int]) -> int:
    while True:  # batches are far smaller than data sets, so this ends after a draw or two
        candidate = int(rng.integers(n_samples))
        if candidate not in taken:
            return candidate
