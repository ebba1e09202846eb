"""helip-inspect: the false-negative rule, mining with the core, the page's structure, the grid's size, CLI errors."""

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
    HardPair,
    ShownSample,
    caption_similarity,
    mine_embeddings,
)
from helip.trainer.tools.inspector_page import FLAG_COLOUR, GridLayout, render_grid, render_html

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
    """Sections with their pairs (data attributes and classes), images, and every tag seen."""

    def __init__(self):
        super().__init__()
        self.sections: list[dict] = []
        self.images: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        classes = (attrs.get("class") or "").split()
        if tag == "section" and "anchor" in classes:
            self.sections.append({"id": attrs["data-id"], "pairs": []})
        elif tag == "li" and "pair" in classes:
            self.sections[-1]["pairs"].append({**attrs, "flagged": "false-negative" in classes})
        elif tag == "img":
            self.images.append(attrs["src"])


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
    assert set(record) == {"anchor", "pairs", "stored"}
    assert set(record["pairs"][0]) == {"id", "caption", "step", "score", "image_sim", "text_sim", "flags"}


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
