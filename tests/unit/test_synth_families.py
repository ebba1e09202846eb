"""The data families beside shapes (counts, textures, words): the layout helip reads, captions that match the
pixels, determinism, every zero-shot class drawn, and hard variants one attribute apart. Shapes: test_synth.py."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helip.trainer.app.config import DataConfig
from helip.trainer.pairs.data import read_pairs
from helip.trainer.tools import synth
from helip.trainer.tools.eval_tasks import load_suite, synth_task
from helip.trainer.tools.synth import SynthConfig, check_family, ensure_generated, generate, set_family
from helip.trainer.tools.synth_families import FAMILIES, counts, family, textures, words
from helip.trainer.tools.synth_families.draw import BACKGROUND, COLOURS

NEW = ("counts", "textures", "words")
PALETTE = np.array([*COLOURS.values(), BACKGROUND], dtype=np.int32)
NAMES = [*COLOURS, "background"]


def colour_map(image: Image.Image) -> np.ndarray:
    """Per pixel, the index into NAMES of its exact palette colour; fails if any pixel is off the palette."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    match = (pixels[:, :, None, :] == PALETTE[None, None]).all(-1)
    assert match.any(-1).all(), "pixels outside the palette"
    return match.argmax(-1)


def scenes(name: str, n: int = 400, seed: int = 0, image_size: int = 32) -> list:
    return family(name).sample_scenes(n, np.random.default_rng(seed), image_size, 0.4, 0.3)


@pytest.fixture(scope="module", params=NEW)
def small_set(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, generate(SynthConfig(root, train_size=40, test_size=20, seed=1, family=request.param))


# ---------------------------------------------------------------------------------------------------------------
# What every family owes the generator and helip's readers.


def test_registry_names_every_family_module():
    assert FAMILIES[0] == "shapes"  # the default, and the original set
    for name in FAMILIES:
        assert family(name).name == name
        kind = family(name)
        assert len(set(kind.classnames)) == len(kind.classnames)
        assert kind.templates and all("{}" in t for t in kind.templates)
    with pytest.raises(ValueError, match="nope"):
        family("nope")


def test_layout_is_what_helips_readers_accept(small_set):
    name, paths = small_set
    pairs = read_pairs(paths.train_csv)
    assert len(pairs) == 40 and len(read_pairs(paths.test_csv)) == 20
    for image_path, caption in pairs + read_pairs(paths.test_csv):
        with Image.open(image_path) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
        colour_map(Image.open(image_path))
        assert caption and "\t" not in caption
    task = synth_task(paths.root)
    assert task.classnames == family(name).classnames and task.labels
    titles = dict(read_pairs(paths.test_csv))
    for image_path, label in zip(task.image_paths, task.labels):  # "three circles" names "three red circles"
        assert set(task.classnames[label].split()) <= set(titles[image_path].split())
    suite = load_suite(synth_dir=paths.root, retrieval_data=paths.retrieval_csv)
    assert suite.synth_dir == paths.root and suite.retrieval_csv is not None
    retrieval = [caption for _, caption in read_pairs(paths.retrieval_csv)]
    assert len(retrieval) == len(set(retrieval)) > 0
    assert set_family(paths.root) == name


def test_same_seed_same_bytes_other_seed_other_set(tmp_path):
    for name in NEW:
        a, b, c = (
            generate(SynthConfig(tmp_path / f"{name}-{run}", train_size=12, test_size=6, seed=seed, family=name))
            for run, seed in (("a", 5), ("b", 5), ("c", 6))
        )
        files = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
        assert len(files) == 12 + 6 + 5
        for relative in files:
            assert (a.root / relative).read_bytes() == (b.root / relative).read_bytes(), (name, relative)
        assert a.train_csv.read_bytes() != c.train_csv.read_bytes(), name


@pytest.mark.parametrize("name", FAMILIES)
def test_every_zero_shot_class_is_drawn(name):
    drawn = Counter(scene.classname() for scene in scenes(name, n=1500))
    assert set(family(name).classnames) <= set(drawn), set(family(name).classnames) - set(drawn)
    assert drawn[None] > 300  # and the two-subject scenes, which have no class


def attributes(name: str, scene) -> tuple[tuple, str | None]:
    """What a scene's caption names: each subject's attributes in mention order, and the relation (no geometry)."""
    if name == "counts":
        return tuple((g.count, g.colour, g.shape) for g in scene.groups), None
    if name == "textures":
        return tuple((t.pattern, t.colour, t.scale) for t in scene.subjects), scene.relation
    return tuple((w,) for w in scene.words), None


def attributes_apart(name: str, a, b) -> int | None:
    """How many named attributes differ between two scenes of as many subjects (None: a different number)."""
    (subjects_a, relation_a), (subjects_b, relation_b) = attributes(name, a), attributes(name, b)
    if len(subjects_a) != len(subjects_b):
        return None
    differing = sum(x != y for s, t in zip(subjects_a, subjects_b) for x, y in zip(s, t))
    return differing + (relation_a != relation_b)


def swapped(name: str, a, b) -> bool:
    (subjects_a, relation_a), (subjects_b, relation_b) = attributes(name, a), attributes(name, b)
    reversed_b = subjects_b[::-1]
    return len(subjects_a) == 2 and subjects_a != subjects_b and subjects_a == reversed_b and relation_a == relation_b


@pytest.mark.parametrize("name", NEW)
def test_hard_variants_are_one_attribute_apart(name):
    """Every variant changes one named attribute (a word: for a neighbour one letter apart) or swaps two subjects,
    and the sampled sets hold such pairs: near-copies for the miner to find."""
    kind, rng = family(name), np.random.default_rng(3)
    kinds = Counter()
    for scene in scenes(name, n=300):
        variant = kind.mutate(scene, rng)
        assert variant.caption() != scene.caption()
        if swapped(name, scene, variant):
            kinds["swap"] += 1
            continue
        assert attributes_apart(name, scene, variant) == 1, (scene.caption(), variant.caption())
        kinds["one"] += 1
        if name == "words":
            ((old, new),) = [(a, b) for a, b in zip(scene.words, variant.words) if a != b]
            assert new in words.neighbours(old)
    assert kinds["one"] > 200 and (kinds["swap"] > 10 or name == "counts")  # "A and B" reads as "B and A"
    sampled = scenes(name, n=200)
    near_copies = sum(attributes_apart(name, a, b) == 1 for a, b in itertools.combinations(sampled, 2))
    assert near_copies >= 50, near_copies


def test_config_and_cli_name_the_family(tmp_path, capsys):
    with pytest.raises(ValueError, match="family"):
        SynthConfig(tmp_path, family="nope")
    with pytest.raises(ValueError, match="image_size"):
        SynthConfig(tmp_path, image_size=16, family="words")
    with pytest.raises(ValueError, match="data.synth_family"):
        DataConfig(synth_family="nope")
    argv = ["synth", "--out", str(tmp_path / "t"), "--train", "4", "--test", "3", "--family", "textures"]
    assert synth.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["train_csv"]
    assert set_family(tmp_path / "t") == "textures"
    for argv, flag in (
        (["synth", "--out", "x", "--family", "nope"], "--family"),
        (["synth", "--out", "x", "--family", "counts", "--image-size", "24"], "--image-size"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            synth.main(argv)
        assert exit_info.value.code == 2
        assert flag in capsys.readouterr().err


def test_a_directory_of_another_family_is_refused_not_reused(tmp_path):
    paths = ensure_generated(SynthConfig(tmp_path, train_size=3, test_size=2, family="words"))
    written = paths.train_csv.stat().st_mtime_ns
    assert ensure_generated(SynthConfig(tmp_path, train_size=3, test_size=2, family="words")) == paths
    assert paths.train_csv.stat().st_mtime_ns == written  # there already: not generated again
    with pytest.raises(ValueError, match="holds the words set, not counts"):
        ensure_generated(SynthConfig(tmp_path, family="counts"))
    check_family(tmp_path / "elsewhere", "counts")  # nothing there: nothing to refuse


# ---------------------------------------------------------------------------------------------------------------
# Captions against pixels, family by family.


def blobs(mask: np.ndarray) -> int:
    """Connected components of a boolean mask, 8-connected (so objects that touch at a corner count as one)."""
    seen = np.zeros_like(mask)
    found = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        found += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for dy, dx in itertools.product((-1, 0, 1), repeat=2):
                ny, nx = y + dy, x + dx
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return found


@pytest.mark.parametrize("image_size", [32, 64])
def test_counts_the_named_number_of_blobs_of_each_named_colour(image_size):
    for scene in scenes("counts", n=150, seed=image_size, image_size=image_size):
        pixels = colour_map(counts.render(scene, image_size))
        assert {NAMES[i] for i in np.unique(pixels)} - {"background"} == {g.colour for g in scene.groups}
        for group in scene.groups:
            assert blobs(pixels == NAMES.index(group.colour)) == group.count, scene.caption()


def test_counts_captions_read_as_counted_phrases():
    scene = counts.Scene((counts.Group(3, "red", "circle"), counts.Group(1, "blue", "square")))
    assert scene.caption() == "three red circles and one blue square" and scene.classname() is None
    assert counts.Scene((counts.Group(2, "green", "diamond"),)).classname() == "two diamonds"


def pattern_of(mask: np.ndarray) -> tuple[str, str]:
    """(pattern, scale) read back from a one-texture mask: which shifts leave it alone and which invert it."""
    height, width = mask.shape

    def compare(dy: int, dx: int) -> np.ndarray:
        return mask[dy:, dx:] == mask[: height - dy, : width - dx]

    def same(dy: int, dx: int) -> bool:
        return bool(compare(dy, dx).all())

    def inverted(dy: int, dx: int) -> bool:
        return not compare(dy, dx).any()

    along_antidiagonals = bool((mask[1:, :-1] == mask[:-1, 1:]).all())  # constant wherever x + y is
    for scale, half in (("fine", 2), ("coarse", 4)):  # half a period, in pixels at 32 px
        if same(0, 1) and inverted(half, 0):
            return "horizontal stripes", scale
        if same(1, 0) and inverted(0, half):
            return "vertical stripes", scale
        if along_antidiagonals and inverted(0, half):
            return "diagonal stripes", scale
        if inverted(0, half) and inverted(half, 0):
            return "checks", scale
        if same(2 * half, 0) and same(0, 2 * half) and not same(half, 0):
            return "dots", scale
    cells = mask.reshape(height // 2, 2, width // 2, 2)
    return "noise", "coarse" if (cells == cells[:, :1, :, :1]).all() else "fine"


def test_textures_show_the_named_pattern_scale_and_colour():
    seen = set()
    for scene in scenes("textures", n=300):
        pixels = colour_map(textures.render(scene, 32))
        if len(scene.subjects) == 1:
            (texture,) = scene.subjects
            assert {NAMES[i] for i in np.unique(pixels)} <= {texture.colour, "background"}
            assert pattern_of(pixels == NAMES.index(texture.colour)) == (texture.pattern, texture.scale), scene
            seen.add(texture.pattern)
        else:
            halves = {"left of": (pixels[:, :16], pixels[:, 16:]), "above": (pixels[:16], pixels[16:])}
            halves["right of"], halves["below"] = halves["left of"][::-1], halves["above"][::-1]
            for texture, half in zip(scene.subjects, halves[scene.relation]):
                assert {NAMES[i] for i in np.unique(half)} <= {texture.colour, "background"}, scene.caption()
                assert (half == NAMES.index(texture.colour)).any(), scene.caption()
    assert seen == set(textures.PATTERNS)


def test_words_are_drawn_in_ink_one_per_line_and_tell_apart():
    for scene in scenes("words", n=100):
        pixels = colour_map(words.render(scene, 32))
        ink = pixels == NAMES.index(words.INK)
        assert set(np.unique(pixels)) == {NAMES.index(words.INK), NAMES.index("background")}
        if len(scene.words) == 2:  # first word on top
            assert ink[:16].any() and ink[16:].any(), scene.caption()
    at = ((4, 10),)
    images = {w: np.asarray(words.render(words.Scene((w,), at), 32)) for w in words.VOCAB}
    for a, b in itertools.combinations(words.VOCAB, 2):
        differs = (images[a] != images[b]).any(-1)
        assert differs.any(), (a, b)  # every word looks different from every other
        if b in words.neighbours(a):
            # one letter apart: the pixels that differ lie in that letter's 6-pixel cell, give or take the column a
            # glyph shares with its neighbour (the font's glyphs touch: "a" has a tail)
            (letter,) = [i for i in range(3) if a[i] != b[i]]
            columns = np.nonzero(differs.any(0))[0]
            cell = 4 + words.CHAR_WIDTH * letter
            assert cell - 1 <= columns.min() and columns.max() <= cell + words.CHAR_WIDTH, (a, b)
    assert all(len(words.neighbours(w)) >= 2 for w in words.VOCAB)


def test_words_scale_by_whole_pixels_at_larger_sizes():
    scene = words.place(words.Scene(("fox", "box")), 64, np.random.default_rng(0))
    small = np.asarray(words.render(scene, 32))
    large = np.asarray(words.render(scene, 64))
    assert (large[::2, ::2] == small).all()


def test_images_of_a_caption_vary_but_not_their_caption():
    for name in NEW:
        kind = family(name)
        base = kind.single(np.random.default_rng(0))
        placed = [kind.place(base, 32, np.random.default_rng(seed)) for seed in range(6)]
        assert len({scene.caption() for scene in placed}) == 1
        assert len({kind.render(scene, 32).tobytes() for scene in placed}) > 1, name


def test_generated_files_are_the_rendered_scenes(small_set):
    """What generate writes is what the family renders: the PNG is lossless and no pixel is lost on the way."""
    name, paths = small_set
    first = read_pairs(paths.train_csv)[0][0]
    kind = family(name)
    scene = kind.sample_scenes(1, np.random.default_rng([1, 0]), 32, 0.4, 0.3)[0]
    assert Path(first).name == "train_000000.png"
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(kind.render(scene, 32)))
