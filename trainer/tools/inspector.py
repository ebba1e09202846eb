"""`helip-inspect`: look at the hard pairs that mining finds, as an HTML page and a PNG grid.

Two sources of pairs:
- a model (and optionally a checkpoint): the data set is embedded in-process and mined with the miner's own core
  (`HardPairMiner`, product scoring, the same near-duplicate cut), no server needed. Every row's step is the
  checkpoint's "step" entry, else 0.
- a running miner (`--miner HOST:PORT`): its rows are mined by anchor id and fetched for the per-modality
  similarities; every row shows the step that wrote it.

Either way the anchors are a seeded sample of the data set's ids or an explicit list, and each pair carries its
combined score, its image and text similarities to the anchor and its step.

Each pair also carries what the miner's false-negative guard (miner_service.core.guard) looks at: its caption against
the anchor's image, <image_i, text_j>, and its image against the anchor's caption, <text_i, image_j>, and their
larger over the anchor's own pair <image_i, text_i>, its "caption fit": a Mine with `positive_ratio` at or below the
caption fit drops the pair. Pairs are always mined without the guard, so that the ones it would drop stay in view;
asked for a ratio, the inspector marks them (with the guard's own test, `guard.drops`, on the cross terms) and mines
once more with the guard for the k pairs a guarded Mine returns instead. The cross terms are computed here in float32
from the rows (the in-process embeddings, or a miner's fetched rows): at a tie within rounding (the miner sums in
another order, or stores float16), the marks and the miner's guarded answer may disagree, which is logged.

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
from dataclasses import dataclass, replace

import numpy as np

from helip.miner_service.core import guard
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
    # The guard's cross terms (None: not computed, e.g. a hand-made pair).
    image_text: float | None = None  # <image_anchor, text_pair>: the pair's caption against the anchor's image
    text_image: float | None = None  # <text_anchor, image_pair>
    caption_fit: float | None = None  # see caption_fit(); None also where the anchor's own pair scores <= 0
    guard_dropped: bool = False  # the guard at AnchorPairs.guard_ratio drops it

    @property
    def likely_false_negative(self) -> bool:
        return bool(self.flags)


@dataclass(frozen=True)
class AnchorPairs:
    anchor: ShownSample
    pairs: tuple[HardPair, ...]  # mined without the guard, best first
    stored: bool = True  # False: the anchor has no row in the index, so nothing was mined for it
    positive: float | None = None  # <image, text> of the anchor's own pair; None when not stored
    guard_ratio: float = 0.0  # the ratio of the pairs' guard marks and of `guarded`; 0: the guard was not asked
    guarded: tuple[HardPair, ...] = ()  # the k pairs a Mine with the guard at guard_ratio returns, best first


def caption_fit(image_text: float, text_image: float, positive: float) -> float | None:
    """max(<image_i, text_j>, <text_i, image_j>) / <image_i, text_i>: the guard drops the pair at every ratio up to
    this. None where the anchor's own pair scores <= 0: the guard's bound is then <= 0 whatever the ratio, and a
    quotient would read backwards."""
    if positive <= 0.0:
        return None
    return max(image_text, text_image) / positive


def guard_drops(anchor: AnchorPairs, ratio: float) -> np.ndarray:
    """[len(anchor.pairs)] bool: the shown pairs the guard at `ratio` drops, by core.guard's own test on their cross
    terms (the pairs must carry them: `assemble` fills them in)."""
    if not anchor.pairs:
        return np.zeros(0, dtype=bool)
    image_text = np.array([[pair.image_text for pair in anchor.pairs]], dtype=np.float32)
    text_image = np.array([[pair.text_image for pair in anchor.pairs]], dtype=np.float32)
    return guard.drops(image_text, text_image, np.array([anchor.positive], dtype=np.float32), ratio)[0]


@dataclass(frozen=True)
class GuardCount:
    """What the guard at `ratio` drops of the pairs shown."""

    ratio: float
    shown: int
    dropped: int
    flagged: int  # of the dropped, those also flagged as likely false negatives

    def summary(self) -> str:
        return (
            f"the guard at {self.ratio:g} drops {self.dropped} of {self.shown} shown pairs "
            f"({self.flagged} of them also flagged as likely false negatives)"
        )


def guard_counts(anchors: Sequence[AnchorPairs], ratios: Sequence[float]) -> list[GuardCount]:
    """A GuardCount per ratio over every shown pair, so that ratios can be compared on one set of pairs."""
    counts = []
    for ratio in ratios:
        dropped = flagged = 0
        for anchor in anchors:
            drops = guard_drops(anchor, ratio)
            dropped += int(drops.sum())
            flagged += sum(pair.likely_false_negative for pair, drop in zip(anchor.pairs, drops) if drop)
        counts.append(GuardCount(ratio, sum(len(anchor.pairs) for anchor in anchors), dropped, flagged))
    return counts


def guard_table(counts: Sequence[GuardCount]) -> str:
    """The counts as a small text table (for the log): ratio, pairs dropped, of which flagged."""
    lines = [f"{'ratio':>6}  {'pairs dropped':>13}  {'of which flagged':>16}"]
    lines += [f"{c.ratio:>6g}  {f'{c.dropped} of {c.shown}':>13}  {c.flagged:>16}" for c in counts]
    return "\n".join(lines)


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

    def positive(self, anchor: int) -> float:
        """<image, text> of the anchor's own pair, in float32 as the guard makes it."""
        a = self.position[anchor]
        return float(self.image[a] @ self.text[a])

    def cross_terms(self, anchor: int, other: int) -> tuple[float, float]:
        """(<image_anchor, text_other>, <text_anchor, image_other>) in float32: what the guard compares."""
        a, b = self.position[anchor], self.position[other]
        return float(self.image[a] @ self.text[b]), float(self.text[a] @ self.image[b])


@dataclass(frozen=True)
class Mined:
    """A Mine's answer ([anchors, k], best first) and the guard ratio it was asked with (0: none)."""

    ids: np.ndarray  # int64, -1 padding
    scores: np.ndarray  # float32
    steps: np.ndarray  # uint64
    positive_ratio: float = 0.0


def _hard_pairs(
    anchor_id: int, mined: Mined, row: int, rows: Rows, caption_of: Callable[[int], str], rule: FalseNegativeRule
) -> tuple[HardPair, ...]:
    """Row `row` of a Mine's answer as HardPairs with their similarities, flags and guard cross terms."""
    anchor_caption, positive = caption_of(anchor_id), rows.positive(anchor_id)
    pairs = []
    for pair_id, score, step in zip(mined.ids[row].tolist(), mined.scores[row].tolist(), mined.steps[row].tolist()):
        if pair_id < 0:
            continue
        image_sim, text_sim = rows.similarities(anchor_id, pair_id)
        image_text, text_image = rows.cross_terms(anchor_id, pair_id)
        pair_caption = caption_of(pair_id)
        flags = rule.reasons(anchor_caption, pair_caption, image_sim, text_sim)
        fit = caption_fit(image_text, text_image, positive)
        pairs.append(
            HardPair(
                pair_id, pair_caption, int(step), float(score), image_sim, text_sim, flags, image_text, text_image, fit
            )
        )
    return tuple(pairs)


def _mark_guard(
    anchor: AnchorPairs,
    guarded: Mined,
    row: int,
    rows: Rows,
    caption_of: Callable[[int], str],
    rule: FalseNegativeRule,
) -> AnchorPairs:
    """`anchor` with its pairs marked by the guard at the guarded Mine's ratio, and that Mine's pairs."""
    ratio = guarded.positive_ratio
    drops = guard_drops(anchor, ratio)
    pairs = tuple(replace(pair, guard_dropped=bool(drop)) for pair, drop in zip(anchor.pairs, drops))
    kept = _hard_pairs(anchor.anchor.id, guarded, row, rows, caption_of, rule)
    # A pair marked here that the guarded Mine still returns: a tie within rounding (the miner may store float16
    # rows), or a miner that ignores positive_ratio (older than the guard). Either way the page would mislead.
    returned = {pair.id for pair in kept}
    disagree = {pair.id: pair.caption_fit for pair in pairs if pair.guard_dropped and pair.id in returned}
    if disagree:
        log.warning(
            "anchor %d: pairs %s are marked as dropped at %g but a guarded Mine returns them "
            "(caption fits %s: a tie within rounding, or a miner without the guard)",
            anchor.anchor.id,
            sorted(disagree),
            ratio,
            [None if fit is None else round(fit, 6) for _, fit in sorted(disagree.items())],
        )
    return replace(anchor, pairs=pairs, guard_ratio=ratio, guarded=kept)


def assemble(
    anchor_ids: Sequence[int],
    mined: Mined,
    rows: Rows,
    caption_of: Callable[[int], str],
    rule: FalseNegativeRule,
    guarded: Mined | None = None,
) -> list[AnchorPairs]:
    """AnchorPairs per anchor from a Mine's answer without the guard and, where given, one with it (whose ratio
    marks the pairs); `rows` holds every anchor and pair that was returned."""
    result = []
    for row, anchor_id in enumerate(int(i) for i in anchor_ids):
        caption = caption_of(anchor_id)
        if anchor_id not in rows.position:
            ratio = guarded.positive_ratio if guarded is not None else 0.0
            result.append(AnchorPairs(ShownSample(anchor_id, caption, 0), (), stored=False, guard_ratio=ratio))
            continue
        sample = ShownSample(anchor_id, caption, int(rows.steps[rows.position[anchor_id]]))
        pairs = _hard_pairs(anchor_id, mined, row, rows, caption_of, rule)
        anchor = AnchorPairs(sample, pairs, positive=rows.positive(anchor_id))
        if guarded is not None:
            anchor = _mark_guard(anchor, guarded, row, rows, caption_of, rule)
        result.append(anchor)
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
    positive_ratio: float = 0.0,
) -> list[AnchorPairs]:
    """Mine `anchor_ids` among the rows (ids [n], image/text [n, dim] L2-normalised) with the miner's core; with a
    positive_ratio, mark the pairs the guard drops at it and mine again with it (see the module docstring)."""
    from helip.miner_service.core.api import MineQuery
    from helip.miner_service.core.config import SearchConfig
    from helip.miner_service.core.miner import HardPairMiner

    ids = np.asarray(ids, dtype=np.uint64)
    miner = HardPairMiner(image.shape[1], SearchConfig(device=device))
    if len(ids):
        miner.upsert(ids, image, text, np.uint64(step))

    def mine(ratio: float) -> Mined:
        query = MineQuery(
            k,
            anchor_ids=np.asarray(anchor_ids, dtype=np.uint64),
            max_similarity=rule.max_similarity,
            positive_ratio=ratio,
        )
        found = miner.mine(query)
        return Mined(found.neighbour_ids, found.scores, found.neighbour_steps, ratio)

    rows = Rows({int(i): n for n, i in enumerate(ids.tolist())}, image, text, np.full(len(ids), step, np.int64))
    guarded = mine(positive_ratio) if positive_ratio else None
    return assemble(anchor_ids, mine(0.0), rows, caption_of, rule, guarded)


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
    client,
    anchor_ids: Sequence[int],
    k: int,
    caption_of: Callable[[int], str],
    rule: FalseNegativeRule,
    positive_ratio: float = 0.0,
) -> list[AnchorPairs]:
    """Mine `anchor_ids` on a running miner (a MinerClient) and fetch the rows involved; with a positive_ratio, also
    a guarded Mine, the guard's cross terms computed here from the fetched rows."""
    anchors = np.asarray(anchor_ids, dtype=np.uint64)

    def mine(ratio: float) -> tuple[Mined, np.ndarray]:
        found = client.mine(k, anchor_ids=anchors, max_similarity=rule.max_similarity, positive_ratio=ratio)
        return Mined(found.ids, found.scores, found.steps, ratio), found.unknown_anchor_ids

    mined, unknown = mine(0.0)
    if len(unknown):
        log.warning("%d anchors have no row in the miner: %s", len(unknown), unknown)
    guarded = mine(positive_ratio)[0] if positive_ratio else None
    returned = [int(i) for answer in (mined, guarded) if answer is not None for i in answer.ids.ravel() if i >= 0]
    rows = fetch_rows(client, [int(i) for i in anchor_ids] + returned)
    missing = sorted(set(returned) - rows.position.keys())
    if missing:  # a row deleted between Mine and Fetch: its similarities cannot be shown
        raise RuntimeError(f"the miner no longer holds rows it just returned: {missing[:10]}")
    return assemble(anchor_ids, mined, rows, caption_of, rule, guarded)
