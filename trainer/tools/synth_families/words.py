"""Rendered words: one or two three-letter words in PIL's bitmap font, on one line each ("cat hat").

The caption is the words drawn, top line first, so the images differ only in which letters they show (and where):
reading is what this family asks, the hardest of the families for a patch-8 ViT. The font is PIL's built-in bitmap
font (6 x 11 pixels a character, no anti-aliasing), legible at 32 px; a larger image draws it scaled by whole
pixels. The vocabulary is a chain of words one letter apart, so a hard variant (one word changed for a neighbour
in the vocabulary) differs from its source in a single glyph; two words may also swap lines. Zero-shot: the word of
the one-word images.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from helip.trainer.tools.synth_families.base import Family
from helip.trainer.tools.synth_families.draw import COLOURS, canvas, pick, pick_other, to_image

# Every word has at least two neighbours one letter apart, so a word of a two-word scene can always change for one
# that is not the other word.
VOCAB = (
    "cat", "car", "bar", "bat", "hat", "ham", "jam", "jar", "tar", "tap", "top", "toy",
    "boy", "box", "fox", "fog", "dog", "dig", "big", "bag", "rag", "rat", "mat", "map",
)  # fmt: skip
INK = "white"
CHAR_WIDTH, LINE_HEIGHT = 6, 11  # the bitmap font's cell, in pattern units
TEMPLATES = ("the word {}.", "a sign that says {}.", "text that reads {}.", "{}.")


def neighbours(word: str) -> list[str]:
    """The words of VOCAB one letter away from `word`."""
    return [v for v in VOCAB if len(v) == len(word) and sum(a != b for a, b in zip(v, word)) == 1]


@dataclass(frozen=True)
class Scene:
    """`words[i]` is drawn with its top-left corner at `origins[i]` (pattern units), set by `place`."""

    words: tuple[str, ...]
    origins: tuple[tuple[int, int], ...] = ()

    def caption(self) -> str:
        return " ".join(self.words)

    def classname(self) -> str | None:
        return self.words[0] if len(self.words) == 1 else None


def single(rng: np.random.Generator) -> Scene:
    return Scene((pick(VOCAB, rng),))


def pair(rng: np.random.Generator) -> Scene:
    first = pick(VOCAB, rng)
    return Scene((first, pick_other(VOCAB, rng, first)))


def mutate(scene: Scene, rng: np.random.Generator) -> Scene:
    """One word changed for a neighbour one letter away, or (two words) the lines swapped."""
    words = list(scene.words)
    if len(words) == 2 and pick(("word", "swap"), rng) == "swap":
        return Scene((words[1], words[0]))
    index = int(rng.integers(len(words)))
    words[index] = pick_other(neighbours(words[index]), rng, *words)
    return Scene(tuple(words))


def _unit(image_size: int) -> int:
    return max(1, image_size // 32)


def place(scene: Scene, image_size: int, rng: np.random.Generator) -> Scene:
    """One word anywhere it fits; two words one in each half, the first on top."""
    side = image_size // _unit(image_size)
    bands = [(0, side)] if len(scene.words) == 1 else [(0, side // 2), (side // 2, side)]
    origins = []
    for word, (top, bottom) in zip(scene.words, bands):
        x = int(rng.integers(side - CHAR_WIDTH * len(word) + 1))
        y = int(rng.integers(top, bottom - LINE_HEIGHT + 1))
        origins.append((x, y))
    return dataclasses.replace(scene, origins=tuple(origins))


@cache
def _font() -> ImageFont.ImageFont:
    # The bitmap font Pillow carries inside itself: the same glyphs on every machine, with or without FreeType.
    return ImageFont.load_default_imagefont()


def ink_mask(scene: Scene, image_size: int) -> np.ndarray:
    """Boolean [image_size, image_size] mask of the glyphs' pixels."""
    unit = _unit(image_size)
    side = image_size // unit
    glyphs = Image.new("1", (side, side), 0)
    draw = ImageDraw.Draw(glyphs)
    for word, origin in zip(scene.words, scene.origins):
        draw.text(origin, word, font=_font(), fill=1)
    scaled = np.asarray(glyphs, dtype=bool).repeat(unit, axis=0).repeat(unit, axis=1)
    mask = np.zeros((image_size, image_size), dtype=bool)
    mask[: side * unit, : side * unit] = scaled
    return mask


def render(scene: Scene, image_size: int) -> Image.Image:
    pixels = canvas(image_size)
    pixels[ink_mask(scene, image_size)] = COLOURS[INK]
    return to_image(pixels)


FAMILY = Family(
    name="words",
    classnames=VOCAB,
    templates=TEMPLATES,
    min_image_size=2 * LINE_HEIGHT + 2,  # two lines, one in each half
    single=single,
    pair=pair,
    mutate=mutate,
    place=place,
    render=render,
)
