"""The synthetic set: deterministic, captions that match the pixels, the documented layout, built-in hard pairs."""

from __future__ import annotations

import csv
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helip.trainer.tools import synth
from helip.trainer.tools.synth import BACKGROUND, COLOURS, Obj, Scene, SynthConfig, generate, render

PHRASE = r"a (small|large) (solid|striped|dotted) (\w+) (\w+)"
CAPTION = re.compile(rf"^{PHRASE}(?: (left of|right of|above|below) {PHRASE})?$")
PALETTE = np.array(list(COLOURS.values()) + [BACKGROUND], dtype=np.int32)
NAMES = list(COLOURS) + ["background"]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _colour_map(path: Path) -> np.ndarray:
    """Per pixel, the index into NAMES of the exact palette colour; fails if any pixel is off-palette."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)
    match = (pixels[:, :, None, :] == PALETTE[None, None]).all(-1)
    assert match.any(-1).all(), f"{path} has pixels outside the palette"
    return match.argmax(-1)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return generate(SynthConfig(tmp_path_factory.mktemp("synth"), train_size=120, test_size=80, seed=3))


def test_same_seed_same_bytes_other_seed_other_set(tmp_path):
    a = generate(SynthConfig(tmp_path / "a", train_size=20, test_size=10, seed=7))
    b = generate(SynthConfig(tmp_path / "b", train_size=20, test_size=10, seed=7))
    c = generate(SynthConfig(tmp_path / "c", train_size=20, test_size=10, seed=8))
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    assert len(files) == 20 + 10 + 5  # images + train, test, retrieval, zeroshot csv + zeroshot.json
    for relative in files:
        assert (a.root / relative).read_bytes() == (b.root / relative).read_bytes(), relative
    assert a.train_csv.read_bytes() != c.train_csv.read_bytes()


def test_csv_layout_relative_paths(small_set):
    for csv_path, n in ((small_set.train_csv, 120), (small_set.test_csv, 80)):
        header = csv_path.read_text(encoding="utf-8").splitlines()[0]
        assert header == "filepath\ttitle"
        rows = _rows(csv_path)
        assert len(rows) == n
        for row in rows:
            assert not Path(row["filepath"]).is_absolute()
            assert (csv_path.parent / row["filepath"]).is_file()
            assert CAPTION.match(row["title"]), row["title"]


def test_captions_match_pixels(small_set):
    """Every named colour is drawn, nothing else is; sizes and relations hold where they are measurable."""
    checked_relations = 0
    for row in _rows(small_set.train_csv) + _rows(small_set.test_csv):
        m = CAPTION.match(row["title"])
        objects = [m.groups()[0:4]] + ([m.groups()[5:9]] if m.group(5) else [])
        colour_map = _colour_map(small_set.root / row["filepath"])
        drawn = {NAMES[i] for i in np.unique(colour_map)} - {"background"}
        assert drawn == {obj[2] for obj in objects}, row["title"]
        if len(objects) == 1:
            ys, xs = np.nonzero(colour_map == NAMES.index(objects[0][2]))
            extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
            assert (extent >= 11) == (objects[0][0] == "large"), (row["title"], extent)
        elif objects[0][2] != objects[1][2]:
            (ya, xa), (yb, xb) = (np.mean(np.nonzero(colour_map == NAMES.index(obj[2])), axis=1) for obj in objects)
            expected = {"left of": xa < xb, "right of": xa > xb, "above": ya < yb, "below": ya > yb}
            assert expected[m.group(5)], row["title"]
            checked_relations += 1
    assert checked_relations > 20


def test_render_textures_and_colour():
    def red_pixels(texture: str) -> int:
        scene = Scene((Obj("square", "red", "large", texture, cx=16, cy=16, radius=8),))
        pixels = np.asarray(render(scene, 32))
        assert tuple(pixels[0, 0]) == BACKGROUND
        return int((pixels == COLOURS["red"]).all(-1).sum())

    assert red_pixels("solid") > red_pixels("striped") > red_pixels("dotted") > 0


def test_zeroshot_task_layout(small_set):
    task = json.loads(small_set.zeroshot_json.read_text())
    assert set(task) == {"classnames", "templates", "samples", "label_key"}
    assert len(task["classnames"]) == len(COLOURS) * len(synth.SHAPES)
    assert all("{}" in t for t in task["templates"])
    rows = _rows(small_set.root / task["samples"])
    test_rows = {r["filepath"]: r["title"] for r in _rows(small_set.test_csv)}
    assert rows
    for row in rows:
        assert test_rows[row["filepath"]] == row["title"]
        colour, shape = task["classnames"][int(row[task["label_key"]])].split()
        assert row["title"].endswith(f" {colour} {shape}") and " of " not in row["title"]
        assert " above " not in row["title"] and " below " not in row["title"]


def test_retrieval_subset_has_unique_captions(small_set):
    rows = _rows(small_set.retrieval_csv)
    test_rows = {r["filepath"]: r["title"] for r in _rows(small_set.test_csv)}
    titles = [r["title"] for r in rows]
    assert len(set(titles)) == len(titles) > 40
    assert all(test_rows[r["filepath"]] == r["title"] for r in rows)


def test_set_contains_one_attribute_hard_pairs(small_set):
    captions = sorted({r["title"] for r in _rows(small_set.train_csv)})
    one_word_apart = swapped = 0
    for a, b in itertools.combinations(captions, 2):
        wa, wb = a.split(), b.split()
        if len(wa) == len(wb) and sum(x != y for x, y in zip(wa, wb)) == 1:
            one_word_apart += 1
        if sorted(wa) == sorted(wb):
            swapped += 1
    assert one_word_apart >= 10
    assert swapped >= 1


def test_cli_generates(tmp_path, capsys):
    assert synth.main(["synth", "--out", str(tmp_path), "--train", "5", "--test", "4", "--seed", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert Path(printed["train_csv"]).is_file()
    assert len(_rows(tmp_path / "train.csv")) == 5


def test_jpeg_sets_hold_the_same_scenes_as_jpeg_files(tmp_path):
    png = generate(SynthConfig(tmp_path / "png", 6, 2, image_size=64, seed=3))
    jpg = generate(SynthConfig(tmp_path / "jpg", 6, 2, image_size=64, seed=3, image_format="jpg"))
    png_rows, jpg_rows = _rows(png.train_csv), _rows(jpg.train_csv)
    assert [r["title"] for r in jpg_rows] == [r["title"] for r in png_rows]  # the same captions, in order
    for png_path, jpg_path in zip((r["filepath"] for r in png_rows), (r["filepath"] for r in jpg_rows)):
        assert jpg_path.endswith(".jpg")
        with Image.open(jpg.root / jpg_path) as image:
            assert image.format == "JPEG" and image.size == (64, 64)
            lossy = np.asarray(image.convert("RGB"), dtype=np.float32)
        exact = np.asarray(Image.open(png.root / png_path).convert("RGB"), dtype=np.float32)
        assert np.abs(lossy - exact).mean() < 8  # the same picture, up to JPEG's loss
    with pytest.raises(ValueError, match="image_format"):
        SynthConfig(tmp_path, image_format="webp")


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["synth", "--out", "x", "--format", "gif"], "--format"),
        (["synth", "--out", "x", "--train", "0"], "--train"),
        (["synth", "--out", "x", "--test", "many"], "--test"),
        (["synth", "--out", "x", "--image-size", "8"], "--image-size"),
        (["synth", "--train", "3"], "--out"),
        (["wds", "--csv", "a.csv", "--out", "x", "--shard-size", "-1"], "--shard-size"),
    ],
)
def test_cli_bad_flags_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        synth.main(argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err
