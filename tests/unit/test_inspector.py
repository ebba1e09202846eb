"""helip-inspect: the false-negative rule, mining with the core, the guard's marks, the page's structure, the grid's
size, CLI errors."""

from __future__ import annotations

import base64
import io
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helip.trainer.tools.inspector import (
    AnchorPairs,
    FalseNegativeRule,
    GuardCount,
    HardPair,
    Mined,
    Rows,
    ShownSample,
    assemble,
    caption_fit,
    caption_similarity,
    guard_counts,
    guard_table,
    mine_embeddings,
)
from helip.trainer.tools.inspector_page import FLAG_COLOUR, GUARD_COLOUR, GridLayout, render_grid, render_html

# ---------------------------------------------------------------------------------------------------------------
# The false-negative rule

TWO_OBJECTS = "a small solid red circle left of a large striped blue square"


def test_captions_equal_after_normalising_are_the_same():
    assert caption_similarity("A red  circle.", "a red circle") == 1.0
    assert FalseNegativeRule().reasons("A Red circle!", "a red circle", 0.1, 0.1) == ("same caption",)


def test_a_one_word_change_in_a_short_caption_is_a_hard_negative_not_a_false_one():
    changed = TWO_OBJECTS.replace("red", "green")
    assert 0.9 < caption_similarity(TWO_OBJECTS, changed) < 0.95
    assert FalseNegativeRule().reasons(TWO_OBJECTS, changed, 0.5, 0.5) == ()


def test_swapped_objects_are_not_flagged():
    swapped = "a large striped blue square left of a small solid red circle"
    assert FalseNegativeRule().reasons(TWO_OBJECTS, swapped, 0.5, 0.5) == ()


def test_a_one_word_change_in_a_long_caption_is_flagged():
    long = " ".join(f"word{i}" for i in range(40))
    reworded = long.replace("word7", "other")
    reasons = FalseNegativeRule().reasons(long, reworded, 0.1, 0.1)
    assert len(reasons) == 1 and reasons[0].startswith("captions 0.97")


@pytest.mark.parametrize(
    ("image_sim", "text_sim", "flagged"),
    [(0.97, 0.1, True), (0.1, 0.965, True), (0.959, 0.959, False), (0.5, 0.5, False)],
)
def test_similarity_near_the_cut_is_flagged(image_sim, text_sim, flagged):
    rule = FalseNegativeRule(max_similarity=0.98, cut_margin=0.02)
    assert bool(rule.reasons("a cat", "a dog", image_sim, text_sim)) is flagged


def test_with_the_cut_off_the_margin_counts_from_one():
    rule = FalseNegativeRule(max_similarity=1.5, cut_margin=0.02)
    assert rule.near_cut == pytest.approx(0.98)
    assert rule.reasons("a cat", "a dog", 0.985, 0.0)
    assert not rule.reasons("a cat", "a dog", 0.975, 0.0)


@pytest.mark.parametrize(
    ("field", "value"), [("caption_similarity", 0.0), ("caption_similarity", 1.5), ("max_similarity", 0.0),
                         ("cut_margin", -0.1)]
)  # fmt: skip
def test_rule_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"FalseNegativeRule.{field}"):
        FalseNegativeRule(**{field: value})


# ---------------------------------------------------------------------------------------------------------------
# Mining hand-made embeddings with the miner's core


def _unit(cos: float) -> list[float]:
    """A unit vector whose cosine with [1, 0, 0] is `cos`."""
    return [cos, math.sqrt(1 - cos * cos), 0.0]


def test_mine_embeddings_scores_filters_and_steps():
    image_cos = [1.0, 0.9, 0.99, 0.8, 0.0]
    text_cos = [1.0, 0.9, 0.5, 0.8, 0.9]
    image = np.array([_unit(c) for c in image_cos], dtype=np.float32)
    text = np.array([_unit(c) for c in text_cos], dtype=np.float32)
    ids = np.array([10, 11, 12, 13, 14])
    captions = {10: "anchor", 11: "anchor.", 12: "near-duplicate image", 13: "other", 14: "far", 99: "not stored"}
    rule = FalseNegativeRule(max_similarity=0.98)

    anchors = mine_embeddings(image, text, ids, [10, 99], 2, captions.__getitem__, rule, step=7)

    first, unknown = anchors
    assert first.anchor == ShownSample(10, "anchor", 7) and first.stored
    # 12's image similarity 0.99 is above the cut; 11 (0.81) ranks before 13 (0.64).
    assert [p.id for p in first.pairs] == [11, 13]
    assert [p.score for p in first.pairs] == pytest.approx([0.81, 0.64], abs=1e-5)
    assert [(p.image_sim, p.text_sim) for p in first.pairs] == [
        pytest.approx((0.9, 0.9), abs=1e-5),
        pytest.approx((0.8, 0.8), abs=1e-5),
    ]
    assert all(p.step == 7 for p in first.pairs)
    assert first.pairs[0].flags == ("same caption",) and not first.pairs[1].likely_false_negative
    assert not unknown.stored and unknown.pairs == () and unknown.anchor.caption == "not stored"


# ---------------------------------------------------------------------------------------------------------------
# The false-negative guard's marks: core.guard's test on the pairs' cross terms, mined without the guard

# 2-D rows whose products are exact in float32 (halves to sixteenths), so ties at the ratio are real ties. Anchor 1's
# own pair scores 1; at ratio 0.5 the guard's bound is exactly 0.5. Pairs by falling product score:
GUARD_ROWS = {
    1: ((1, 0), (1, 0), "a red circle"),
    6: ((0.75, 0), (0.75, 0), "a big red disc"),  # both cross terms 0.75: dropped
    7: ((0.4375, 0), (0.4375, 0), "a red dot"),  # 0.4375, a hair under the bound: kept
    5: ((0.375, 0.25), (0.375, 0.25), "A red circle."),  # flagged (same caption), 0.375: kept
    2: ((0.25, 1), (0.5, 0.5), "a red circle!"),  # <image_1, text_2> = 0.5, a tie: dropped, and flagged
    3: ((0.25, 0.5), (0.375, 0.5), "a pink ring"),  # 0.375 and 0.25: kept
    4: ((0.5, 0.5), (0.125, 1), "a red square"),  # <text_1, image_4> = 0.5, the mirror tie: dropped
    9: ((0.125, 0), (0.125, 0), "a blue circle"),
    8: ((0, 0.5), (0, 0.5), "a green square"),
}
GUARD_CAPTIONS = {i: caption for i, (_, _, caption) in GUARD_ROWS.items()}


def _guard_rows() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.array(sorted(GUARD_ROWS))
    image = np.array([GUARD_ROWS[i][0] for i in ids], dtype=np.float32)
    text = np.array([GUARD_ROWS[i][1] for i in ids], dtype=np.float32)
    return ids, image, text


def _guard_inspected(ratio: float = 0.5, k: int = 6) -> list[AnchorPairs]:
    ids, image, text = _guard_rows()
    rule = FalseNegativeRule(max_similarity=1.5)  # no near-duplicate cut: the guard alone decides
    return mine_embeddings(image, text, ids, [1], k, GUARD_CAPTIONS.__getitem__, rule, positive_ratio=ratio)


def _numpy_guard(anchor_id: int, pair_ids: list[int], ratio: float) -> tuple[list[bool], list[float]]:
    """The guard's test and the caption fit, written out in float64 from the rows."""
    image_a, text_a = (np.array(v, dtype=np.float64) for v in GUARD_ROWS[anchor_id][:2])
    positive = image_a @ text_a
    drops, fits = [], []
    for j in pair_ids:
        image_j, text_j = (np.array(v, dtype=np.float64) for v in GUARD_ROWS[j][:2])
        image_text, text_image = image_a @ text_j, text_a @ image_j
        drops.append(bool(image_text >= ratio * positive or text_image >= ratio * positive))
        fits.append(max(image_text, text_image) / positive)
    return drops, fits


def test_guard_marks_match_numpy_with_ties_dropped():
    (anchor,) = _guard_inspected()

    shown = [pair.id for pair in anchor.pairs]
    assert shown == [6, 7, 5, 2, 3, 4]  # mined without the guard: the pairs it drops are still there
    drops, fits = _numpy_guard(1, shown, 0.5)
    assert [pair.guard_dropped for pair in anchor.pairs] == drops == [True, False, False, True, False, True]
    assert [pair.caption_fit for pair in anchor.pairs] == pytest.approx(fits) == [0.75, 0.4375, 0.375, 0.5, 0.375, 0.5]
    assert anchor.positive == 1.0 and anchor.guard_ratio == 0.5
    both = [pair.id for pair in anchor.pairs if pair.guard_dropped and pair.likely_false_negative]
    assert both == [2]  # the tie, whose caption is also the anchor's
    # What a guarded Mine returns: the survivors in score order, 9 and 8 from beyond the shown six.
    assert [pair.id for pair in anchor.guarded] == [7, 5, 3, 9, 8]
    assert all(pair.caption_fit < 0.5 for pair in anchor.guarded)


def test_guard_counts_compare_ratios_on_the_same_pairs():
    anchors = _guard_inspected()
    shown = [pair.id for pair in anchors[0].pairs]
    counts = guard_counts(anchors, [0.8, 0.5, 0.4, 0.375])
    flagged = {5, 2}
    for count in counts:
        drops, _ = _numpy_guard(1, shown, count.ratio)
        dropped = {j for j, drop in zip(shown, drops) if drop}
        assert count == GuardCount(count.ratio, 6, len(dropped), len(dropped & flagged))
    assert [(c.dropped, c.flagged) for c in counts] == [(0, 0), (3, 1), (4, 1), (6, 2)]
    assert counts[1].summary() == (
        "the guard at 0.5 drops 3 of 6 shown pairs (1 of them also flagged as likely false negatives)"
    )
    table = guard_table(counts).splitlines()
    assert len(table) == 5 and table[2].split() == ["0.5", "3", "of", "6", "1"]


def test_an_anchor_whose_own_pair_scores_below_zero_has_no_caption_fit():
    assert caption_fit(0.3, 0.2, -0.5) is None and caption_fit(0.3, 0.6, 0.75) == pytest.approx(0.8)
    rows = Rows(
        {1: 0, 2: 1},
        np.array([[1, 0], [-1, 0]], dtype=np.float32),
        np.array([[-0.5, 0], [-1, 0]], dtype=np.float32),
        np.zeros(2, np.int64),
    )
    mined = Mined(np.array([[2]]), np.array([[0.5]], np.float32), np.zeros((1, 1), np.uint64))
    guarded = Mined(np.array([[-1]]), np.array([[-np.inf]], np.float32), np.zeros((1, 1), np.uint64), 0.5)
    (anchor,) = assemble([1], mined, rows, str, FalseNegativeRule(), guarded)
    # <text_1, image_2> = 0.5 reaches 0.5 x -0.5: dropped, as core.guard's test says, with no fit to show.
    assert anchor.pairs[0].caption_fit is None and anchor.pairs[0].guard_dropped


def test_a_marked_pair_that_a_guarded_mine_returns_is_logged(caplog):
    ids, image, text = _guard_rows()
    rows = Rows({int(i): n for n, i in enumerate(ids)}, image, text, np.zeros(len(ids), np.int64))
    mined = Mined(np.array([[6, 7]]), np.array([[0.56, 0.19]], np.float32), np.zeros((1, 2), np.uint64))
    # A miner that ignores positive_ratio (older than the guard) answers the unguarded list again.
    guarded = Mined(mined.ids, mined.scores, mined.steps, 0.5)
    with caplog.at_level("WARNING", logger="helip.trainer.tools.inspector"):
        (anchor,) = assemble([1], mined, rows, GUARD_CAPTIONS.__getitem__, FalseNegativeRule(), guarded)
    assert anchor.pairs[0].guard_dropped and [p.id for p in anchor.guarded] == [6, 7]
    assert "pairs [6] are marked as dropped at 0.5 but a guarded Mine returns them" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# The page and the grid from hand-made anchors


def _pair(pair_id: int, flagged: bool = False, caption: str | None = None) -> HardPair:
    flags = ("same caption",) if flagged else ()
    return HardPair(pair_id, caption or f"caption {pair_id}", 3, 0.5, 0.8, 0.625, flags)


ANCHORS = [
    AnchorPairs(ShownSample(1, "first <b>bold</b> & co", 0), (_pair(10), _pair(11, flagged=True))),
    AnchorPairs(ShownSample(2, "second", 0), (_pair(20), _pair(21))),
    AnchorPairs(ShownSample(3, "third", 0), (_pair(30, flagged=True), _pair(31, caption="<script>x</script>"))),
]


def _image_of(sample_id: int) -> Image.Image:
    return Image.new("RGB", (16, 8), (sample_id * 7 % 256, 40, 200))


class _PageReader(HTMLParser):
    """Sections with their pairs (data attributes and classes), images, the guard's summary, table and guarded
    lists, and every tag seen."""

    def __init__(self):
        super().__init__()
        self.sections: list[dict] = []
        self.images: list[str] = []
        self.tags: list[str] = []
        self.summary: dict | None = None
        self.ratio_rows: list[tuple[str, str, str]] = []
        self.guarded: list[dict] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        classes = (attrs.get("class") or "").split()
        if tag == "section" and "anchor" in classes:
            self.sections.append({"id": attrs["data-id"], "pairs": []})
        elif tag == "li" and "pair" in classes:
            flags = {"flagged": "false-negative" in classes, "guard-drop": "guard-drop" in classes}
            self.sections[-1]["pairs"].append({**attrs, **flags})
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "p" and "guard-summary" in classes:
            self.summary = {name: value for name, value in attrs.items() if name.startswith("data-")}
        elif tag == "tr" and "data-ratio" in attrs:
            self.ratio_rows.append((attrs["data-ratio"], attrs["data-dropped"], attrs["data-flagged"]))
        elif tag == "div" and "guarded" in classes:
            self.guarded.append({"data-ratio": attrs["data-ratio"], "data-ids": attrs["data-ids"], "extra": []})
        elif tag == "li" and "guarded-pair" in classes:
            self.guarded[-1]["extra"].append(attrs["data-id"])


def test_page_has_a_section_per_anchor_with_its_pairs_and_flags():
    page = render_html(ANCHORS, _image_of, thumb_px=24)
    reader = _PageReader()
    reader.feed(page)

    assert [s["id"] for s in reader.sections] == ["1", "2", "3"]
    assert [len(s["pairs"]) for s in reader.sections] == [2, 2, 2]
    flagged = [[p["flagged"] for p in s["pairs"]] for s in reader.sections]
    assert flagged == [[False, True], [False, False], [True, False]]
    first = reader.sections[0]["pairs"][0]
    assert (first["data-id"], first["data-rank"], first["data-step"]) == ("10", "1", "3")
    assert float(first["data-image-sim"]) == pytest.approx(0.8) and float(first["data-score"]) == pytest.approx(0.5)
    # Captions are escaped: no element comes out of them, and the text survives.
    assert "b" not in reader.tags and "script" not in reader.tags
    assert "first &lt;b&gt;bold&lt;/b&gt; &amp; co" in page
    # One inline PNG per shown sample, thumbnail-sized.
    assert len(reader.images) == 3 + 6
    header, payload = reader.images[0].split(",", 1)
    assert header == "data:image/png;base64"
    assert Image.open(io.BytesIO(base64.b64decode(payload))).size == (24, 24)


def test_page_marks_an_anchor_without_a_row():
    page = render_html([AnchorPairs(ShownSample(5, "gone", 0), (), stored=False)], _image_of)
    reader = _PageReader()
    reader.feed(page)
    assert reader.sections == [{"id": "5", "pairs": []}]
    assert "not in the index" in page


def test_grid_is_rows_by_one_plus_k_cells_with_flagged_frames():
    layout = GridLayout(thumb_px=20, padding_px=4, text_lines=2, line_px=10)
    grid = render_grid(ANCHORS, _image_of, k=3, layout=layout)

    assert grid.size == layout.size(3, 4) == (4 * 28, 3 * (28 + 20))
    # Row 0, column 2 holds the flagged pair 11: its frame (just outside the thumbnail) is red.
    x, y = 2 * layout.cell_width + layout.padding_px - 1, layout.padding_px + 5
    assert grid.getpixel((x, y)) == FLAG_COLOUR
    # Column 3 is empty on every row (2 pairs per anchor): plain background.
    empty = grid.crop((3 * layout.cell_width, 0, 4 * layout.cell_width, grid.height))
    assert empty.getcolors() == [(empty.width * empty.height, (255, 255, 255))]


def _guard_page_reader(anchors, **options) -> tuple[_PageReader, str]:
    page = render_html(anchors, _image_of, thumb_px=16, **options)
    reader = _PageReader()
    reader.feed(page)
    return reader, page


def test_page_marks_what_the_guard_drops_beside_the_flags():
    anchors = _guard_inspected()
    reader, page = _guard_page_reader(anchors, compare_ratios=[0.8, 0.5, 0.3])

    pairs = reader.sections[0]["pairs"]
    assert [p["data-guard-drop"] for p in pairs] == ["true", "false", "false", "true", "false", "true"]
    assert [float(p["data-caption-fit"]) for p in pairs] == pytest.approx([0.75, 0.4375, 0.375, 0.5, 0.375, 0.5])
    assert [(p["guard-drop"], p["flagged"]) for p in pairs][3] == (True, True)  # the tie: both marks
    assert float(pairs[0]["data-image-text"]) == float(pairs[0]["data-text-image"]) == 0.75
    assert reader.summary == {"data-ratio": "0.5", "data-shown": "6", "data-dropped": "3", "data-flagged": "1"}
    assert "the guard at 0.5 drops 3 of 6 shown pairs (1 of them also flagged as likely false negatives)" in page
    assert "guard at 0.5 drops: caption fit 0.750" in page
    # The table: the anchors' own ratio first, then the others asked (0.5 once).
    assert reader.ratio_rows == [("0.5", "3", "1"), ("0.8", "0", "0"), ("0.3", "6", "2")]
    assert reader.guarded == [{"data-ratio": "0.5", "data-ids": "7,5,3,9,8", "extra": ["9", "8"]}]
    assert "returns 5 pairs: #2, #3, #5 above, and 2 from further down" in page


def test_page_without_a_guard_ratio_has_no_guard_marks():
    reader, page = _guard_page_reader(_guard_inspected(ratio=0.0))
    pairs = reader.sections[0]["pairs"]
    assert all("data-guard-drop" not in p and not p["guard-drop"] for p in pairs)
    assert float(pairs[0]["data-caption-fit"]) == 0.75  # the fit is known without a ratio
    assert reader.summary is None and reader.guarded == [] and reader.ratio_rows == []


def test_grid_frames_guard_drops_in_dashed_orange_outside_the_flag_frame():
    layout = GridLayout(thumb_px=20, padding_px=6, text_lines=3, line_px=10)
    grid = render_grid(_guard_inspected(), _image_of, k=6, layout=layout)

    assert grid.size == layout.size(1, 7)
    # Column 4 holds pair 2, dropped and flagged: the dashed frame in the outer padding, the red one inside it.
    x = 4 * layout.cell_width
    assert grid.getpixel((x, 0)) == GUARD_COLOUR and grid.getpixel((x + 4, 0)) == (255, 255, 255)  # a dash's gap
    assert grid.getpixel((x + layout.padding_px - 1, layout.padding_px + 5)) == FLAG_COLOUR
    # Column 2 holds pair 7, kept: no frame at all.
    assert grid.getpixel((2 * layout.cell_width, 0)) == (255, 255, 255)

    # Every pair has a caption-fit line (the last): orange where the guard drops it (pair 6), grey where not (7).
    def fit_line_is_orange(column: int) -> bool:
        top = 2 * layout.padding_px + layout.thumb_px + 2 * layout.line_px
        line = grid.crop((column * layout.cell_width, top, (column + 1) * layout.cell_width, layout.cell_height))
        # Anti-aliased glyphs: the orange shows as reds well above blues.
        return any(r - b > 100 for _, (r, g, b) in line.getcolors(4096))

    assert fit_line_is_orange(1) and not fit_line_is_orange(2)


def test_grid_rejects_k_below_one():
    with pytest.raises(ValueError, match="k must be >= 1"):
        render_grid(ANCHORS, _image_of, k=0)


# ---------------------------------------------------------------------------------------------------------------
# The CLI's flag errors (exit 2, naming the flag) on a small hand-made data set


@pytest.fixture
def tiny_csv(tmp_path) -> Path:
    rows = ["filepath\ttitle"]
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png\tsample {i}")
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--ids", "1,7"], "--ids"),
        (["--ids", "1,x"], "--ids"),
        (["--anchors", "9"], "--anchors"),
        (["--k", "0"], "--k"),
        (["--caption-similarity", "2"], "--caption-similarity"),
        (["--checkpoint", "c.pt", "--miner", "127.0.0.1:1"], "--miner"),
        (["--miner", "127.0.0.1:1", "--ids", "4"], "--ids"),
        (["--device", "gpu0"], "--device"),
        (["--positive-ratio", "0"], "--positive-ratio"),
        (["--positive-ratio", "0.9", "1.5"], "--positive-ratio"),
        (["--positive-ratio", "nan"], "--positive-ratio"),
        (["--positive-ratio", "high"], "--positive-ratio"),
    ],
)
def test_cli_flag_errors_exit_2_naming_the_flag(tiny_csv, tmp_path, capsys, flags, named):
    from helip.trainer.tools.inspector_cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(tiny_csv), "--out", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_cli_names_a_missing_data_set(tmp_path, capsys):
    from helip.trainer.tools.inspector_cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(tmp_path / "nowhere.csv")])
    assert exit_info.value.code == 2 and "--data" in capsys.readouterr().err


def test_pairs_json_round_trips(tmp_path):
    # The CLI writes dataclasses.asdict of each AnchorPairs; the test pins the keys tools rely on.
    import dataclasses

    record = json.loads(json.dumps(dataclasses.asdict(ANCHORS[0])))
    assert set(record) == {"anchor", "pairs", "stored", "positive", "guard_ratio", "guarded"}
    assert set(record["pairs"][0]) == {
        *("id", "caption", "step", "score", "image_sim", "text_sim", "flags"),
        *("image_text", "text_image", "caption_fit", "guard_dropped"),
    }


def test_anchor_draw_is_seeded_and_distinct():
    from helip.trainer.tools.inspector_cli import pick_anchors

    drawn = pick_anchors(50, 10, seed=3)
    assert drawn == pick_anchors(50, 10, seed=3) != pick_anchors(50, 10, seed=4)
    assert drawn == sorted(set(drawn)) and len(drawn) == 10 and 0 <= drawn[0] and drawn[-1] < 50


def test_an_unreadable_image_shows_as_a_grey_square(tiny_csv):
    from helip.trainer.pairs.data import CsvPairs
    from helip.trainer.tools.inspector_cli import PLACEHOLDER_GREY, image_of

    (tiny_csv.parent / "2.png").write_bytes(b"not a png")
    load = image_of(CsvPairs(tiny_csv, None, None), thumb_px=12)
    assert load(1).getpixel((0, 0)) == (60, 0, 0)
    assert load(2).size == (12, 12) and load(2).getcolors() == [(144, PLACEHOLDER_GREY)]
