"""Textures: procedural patterns filling the image, or its two halves ("fine red vertical stripes above coarse blue
checks").

A texture is a pattern (stripes three ways, checks, dots, noise) at a scale (fine: a period of 4 pattern units,
coarse: 8) in one palette colour on the background, at a random phase, so that one caption gives many images. What
a model must see is local and periodic, unlike the objects of shapes and counts: at the tiny CLIP's 8-pixel patches
a fine stripe is two bands a patch. Two textures split the image in halves, the first where the relation names.
Hard variants change one texture's pattern, colour or scale, the relation, or swap the two. Zero-shot: colour x
pattern of the one-texture images ("red vertical stripes", whatever the scale).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from helip.trainer.tools.synth_families import related
from helip.trainer.tools.synth_families.base import Family
from helip.trainer.tools.synth_families.draw import (
    COLOURS,
    canvas,
    checks,
    dots,
    halves,
    pick,
    stripes,
    to_image,
    unit_grid,
)
from helip.trainer.tools.synth_families.related import Scene

PATTERNS = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checks", "dots", "noise")
SCALES = ("fine", "coarse")
PERIOD = {"fine": 4, "coarse": 8}  # pattern units (draw.unit_grid)
ATTRIBUTES = {"pattern": PATTERNS, "colour": tuple(COLOURS), "scale": SCALES}  # what a hard variant may change
TEMPLATES = ("a photo of {}.", "a pattern of {}.", "a texture of {}.", "{}.")


@dataclass(frozen=True)
class Texture:
    """A named texture; `phase` (units) and `seed` (of the noise) are set by `place`."""

    pattern: str
    colour: str
    scale: str
    phase: tuple[int, int] = (0, 0)
    seed: int = 0

    def phrase(self) -> str:
        return f"{self.scale} {self.colour} {self.pattern}"

    def classname(self) -> str:
        return f"{self.colour} {self.pattern}"

    def mask(self, image_size: int) -> np.ndarray:
        period = PERIOD[self.scale]
        if self.pattern.endswith(" stripes"):
            return stripes(image_size, self.pattern.split()[0], period, self.phase[0])
        if self.pattern == "checks":
            return checks(image_size, period, self.phase)
        if self.pattern == "dots":
            return dots(image_size, period, dot=period // 4, phase=self.phase)
        if self.pattern == "noise":  # half the cells on; a cell is as wide as a dot
            y, x = unit_grid(image_size)
            cell = period // 4
            cells = np.random.default_rng(self.seed).random((y.max() // cell + 1, x.max() // cell + 1)) < 0.5
            return cells[y // cell, x // cell]
        raise ValueError(f"unknown pattern {self.pattern!r}")


def classnames() -> list[str]:
    return [f"{colour} {pattern}" for colour in COLOURS for pattern in PATTERNS]


def _random_texture(rng: np.random.Generator) -> Texture:
    return Texture(pattern=pick(PATTERNS, rng), colour=pick(tuple(COLOURS), rng), scale=pick(SCALES, rng))


def single(rng: np.random.Generator) -> Scene:
    return Scene((_random_texture(rng),))


def place(scene: Scene, image_size: int, rng: np.random.Generator) -> Scene:
    """A random phase for every texture (and a noise seed): the geometry of a texture is where its period starts."""
    placed = tuple(
        dataclasses.replace(
            texture,
            phase=tuple(int(p) for p in rng.integers(PERIOD[texture.scale], size=2)),
            seed=int(rng.integers(2**31)),
        )
        for texture in scene.subjects
    )
    return Scene(placed, scene.relation)


def render(scene: Scene, image_size: int) -> Image.Image:
    pixels = canvas(image_size)
    s = float(image_size)
    regions = [(0, 0, s, s)] if len(scene.subjects) == 1 else halves(scene.relation, s)
    for texture, (x0, y0, x1, y1) in zip(scene.subjects, regions):
        region = np.zeros((image_size, image_size), dtype=bool)
        region[int(y0) : int(y1), int(x0) : int(x1)] = True
        pixels[region & texture.mask(image_size)] = COLOURS[texture.colour]
    return to_image(pixels)


FAMILY = Family(
    name="textures",
    classnames=tuple(classnames()),
    templates=TEMPLATES,
    min_image_size=16,  # a half then still holds a coarse period
    single=single,
    pair=functools.partial(related.pair, _random_texture),
    mutate=functools.partial(related.mutate, attributes=ATTRIBUTES),
    place=place,
    render=render,
)
