"""`helip-inspect`: look at the hard pairs that mining finds, as an HTML page and a PNG grid.

Two sources of pairs:
- a model (and optionally a checkpoint): the data set is embedded in-process and mined with the miner's own core
  (`HardPairMiner`, product scoring, the same near-duplicate cut), no server needed. Every row's step is the
  checkpoint's "step" entry, else 0.
- a running miner (`--miner HOST:PORT`): its rows are mined by anchor id and fetched for the per-modality
  similarities; every row shows the step that wrote it.

Either way the anchors are a seeded sample of the data set's ids or an explicit list, and each pair carries its
combined score, its image and text similarities to the anchor and its step.

Likely false negatives (a pair that probably shows the same thing as its anchor) are flagged by a deliberately
simple rule, `FalseNegativeRule`:
- the captions are the same after normalising (lower case, punctuation dropped, whitespace collapsed), or their
  word sequences are at least `caption_similarity` alike (difflib's ratio over words: 2 * matching words / total
  words). The default 0.95 flags rewordings of long captions but not a one-word change in a short caption, which
  is the very kind of hard negative mining is after (e.g. "a red circle" vs "a blue circle");
- or the image or the text similarity is within `cut_margin` of the near-duplicate cut `max_similarity` (pairs
  above the cut are never returned, so these are the near-duplicates that just escaped it).
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from helip.miner_service.core.config import DEFAULT_MAX_SIMILARITY

log = logging.getLogger(__name__)

_NON_WORD = re.compile(r"[^\w\s]+")


def caption_words(caption: str) -> list[str]:
    """The words of a caption after normalising: lower case, punctuation dropped, split on whitespace."""
    return _NON_WORD.sub(" ", caption.lower()).split()


def caption_similarity(first: str, second: str) -> float:
    """1.0 for captions equal after normalising, else difflib's ratio over their word sequences (0..1)."""
    a, b = caption_words(first), caption_words(second)
    if a == b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


@dataclass(frozen=True)
class FalseNegativeRule:
    """When a mined pair is marked as a likely false negative (see the module docstring)."""

    caption_similarity: float = 0.95
    max_similarity: float = DEFAULT_MAX_SIMILARITY  # the mining near-duplicate cut; >= 1 switches it off
    cut_margin: float = 0.02

    def __post_init__(self):
        if not 0.0 < self.caption_similarity <= 1.0:
            raise ValueError(f"FalseNegativeRule.caption_similarity must be in (0, 1], got {self.caption_similarity}")
        if not 0.0 < self.max_similarity:
            raise ValueError(f"FalseNegativeRule.max_similarity must be > 0, got {self.max_similarity}")
        if not 0.0 <= self.cut_margin < 1.0:
            raise ValueError(f"FalseNegativeRule.cut_margin must be in [0, 1), got {self.cut_margin}")

    @property
    def near_cut(self) -> float:
        """Image or text similarity from which a pair counts as a near-duplicate."""
        return min(self.max_similarity, 1.0) - self.cut_margin

    def reasons(self, anchor_caption: str, pair_caption: str, image_sim: float, text_sim: float) -> tuple[str, ...]:
        """Why the pair is a likely false negative; empty when it is not."""
        found = []
        similarity = caption_similarity(anchor_caption, pair_caption)
        if similarity == 1.0:
            found.append("same caption")
        elif similarity >= self.caption_similarity:
            found.append(f"captions {similarity:.2f} alike")
        for name, value in (("image", image_sim), ("text", text_sim)):
            if value >= self.near_cut:
                found.append(f"{name} similarity {value:.3f} near the cut {min(self.max_similarity, 1.0):.2f}")
        return tuple(found)

    def describe(self) -> str:
        return (
            f"captions equal after normalising or >= {self.caption_similarity:.2f} alike word by word, "
            f"or an image/text similarity >= {self.near_cut:.3f} (within {self.cut_margin:.3f} of the "
            f"near-duplicate cut {self.max_similarity:.2f})"
        )


@dataclass(frozen=True)
class ShownSample:
    id: int
    caption: str
    step: int  # the step that wrote the sample's row into the index


@dataclass(frozen=True)
class HardPair:
    id: int
    caption: str
    step: int
    score: float  # the mining score (product of the two similarities unless the miner scores otherwise)
    image_sim: float
    text_sim: float
    flags: tuple[str, ...] = ()  # reasons it is a likely false negative; empty: not flagged

    @property
    def likely_false_negative(self) -> bool:
        return bool(self.flags)


@dataclass(frozen=True)
class AnchorPairs:
    anchor: ShownSample
    pairs: tuple[HardPair, ...]
    stored: bool = True  # False: the anchor has no row in the index, so nothing was mined for it


# ---------------------------------------------------------------------------------------------------------------
# Gathering pairs: neighbours from the miner core or a miner, turned into AnchorPairs.


@dataclass(frozen=True)
class Rows:
    """Embedding rows by id: `position[id]` is the row of id in image/text ([n, dim] float32, L2-normalised)."""

    position: dict[int, int]
    image: np.ndarray
    text: np.ndarray
    steps: np.ndarray  # [n] int64

    def similarities(self, first: int, second: int) -> tuple[float, float]:
        a, b = self.position[first], self.position[second]
        return float(self.image[a] @ self.image[b]), float(self.text[a] @ self.text[b])


def assemble(
    anchor_ids: Sequence[int],
    neighbour_ids: np.ndarray,
    scores: np.ndarray,
    neighbour_steps: np.ndarray,
    rows: Rows,
    caption_of: Callable[[int], str],
    rule: FalseNegativeRule,
) -> list[AnchorPairs]:
    """AnchorPairs per anchor from a Mine answer ([anchors, k] ids with -1 padding, scores, steps)."""
    result = []
    for anchor_id, ids, row_scores, steps in zip(anchor_ids, neighbour_ids, scores, neighbour_steps):
        anchor_id = int(anchor_id)
        caption = caption_of(anchor_id)
        stored = anchor_id in rows.position
        step = int(rows.steps[rows.position[anchor_id]]) if stored else 0
        pairs = []
        for pair_id, score, pair_step in zip(ids.tolist(), row_scores.tolist(), steps.tolist()):
            if pair_id < 0:
                continue
            image_sim, text_sim = rows.similarities(anchor_id, pair_id)
            pair_caption = caption_of(pair_id)
            flags = rule.reasons(caption, pair_caption, image_sim, text_sim)
            pairs.append(HardPair(pair_id, pair_caption, int(pair_step), float(score), image_sim, text_sim, flags))
        result.append(AnchorPairs(ShownSample(anchor_id, caption, step), tuple(pairs), stored))
    return result


def mine_embeddings(
    image: np.ndarray,
    text: np.ndarray,
    ids: np.ndarray,
    anchor_ids: Sequence[int],
    k: int,
    caption_of: Callable[[int], str],
    rule: FalseNegativeRule = FalseNegativeRule(),
    step: int = 0,
    device: str = "cpu",
) -> list[AnchorPairs]:
    """Mine `anchor_ids` among the rows (ids [n], image/text [n, dim] L2-normalised) with the miner's core."""
    from helip.miner_service.core.api import MineQuery
    from helip.miner_service.core.config import SearchConfig
    from helip.miner_service.core.miner import HardPairMiner

    ids = np.asarray(ids, dtype=np.uint64)
    miner = HardPairMiner(image.shape[1], SearchConfig(device=device))
    if len(ids):
        miner.upsert(ids, image, text, np.uint64(step))
    query = MineQuery(k, anchor_ids=np.asarray(anchor_ids, dtype=np.uint64), max_similarity=rule.max_similarity)
    found = miner.mine(query)
    rows = Rows({int(i): n for n, i in enumerate(ids.tolist())}, image, text, np.full(len(ids), step, np.int64))
    return assemble(anchor_ids, found.neighbour_ids, found.scores, found.neighbour_steps, rows, caption_of, rule)


def fetch_rows(client, ids: Sequence[int]) -> Rows:
    """The stored rows of `ids` from a miner (one Fetch: embeddings and the step of each row)."""
    fetched = client.fetch_rows(np.unique(np.asarray(ids, dtype=np.uint64)))
    if not len(fetched.ids):
        return Rows({}, np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), np.zeros(0, np.int64))
    return Rows(
        {int(sample_id): n for n, sample_id in enumerate(fetched.ids)},
        fetched.image.astype(np.float32),
        fetched.text.astype(np.float32),
        fetched.steps.astype(np.int64),
    )


def mine_miner(
    client, anchor_ids: Sequence[int], k: int, caption_of: Callable[[int], str], rule: FalseNegativeRule
) -> list[AnchorPairs]:
    """Mine `anchor_ids` on a running miner (a MinerClient) and fetch the rows involved."""
    found = client.mine(k, anchor_ids=np.asarray(anchor_ids, dtype=np.uint64), max_similarity=rule.max_similarity)
    if len(found.unknown_anchor_ids):
        log.warning("%d anchors have no row in the miner: %s", len(found.unknown_anchor_ids), found.unknown_anchor_ids)
    wanted = [int(i) for i in anchor_ids] + [int(i) for i in found.ids.ravel() if i >= 0]
    rows = fetch_rows(client, wanted)
    missing = sorted(set(int(i) for i in found.ids.ravel() if i >= 0) - rows.position.keys())
    if missing:  # a row deleted between Mine and Fetch: its similarities cannot be shown
        raise RuntimeError(f"the miner no longer holds rows it just returned: {missing[:10]}")
    return assemble(anchor_ids, found.ids, found.scores, found.steps, rows, caption_of, rule)
