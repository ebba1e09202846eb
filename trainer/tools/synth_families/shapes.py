"""The original family: one or two flat-coloured shapes, captioned by every attribute that was drawn.

The caption names size, texture, colour and shape of each object and, for two objects, their spatial relation, so
it determines the image up to small jitter of position and size ("a small striped red triangle left of a large
solid blue circle"). Hard variants change exactly one attribute, or swap the two objects: captions one word apart,
or with the same bag of words in a different order. Zero-shot: colour x shape of the single-object images.
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
    SHAPES,
    canvas,
    dots,
    halves,
    pick,
    shape_mask,
    stripes,
    to_image,
)
from helip.trainer.tools.synth_families.related import Scene

SIZES = ("small", "large")
TEXTURES = ("solid", "striped", "dotted")
# Object radius as a fraction of the image side (jittered by 5%); two large objects (with margins) must fit side by
# side, and the sizes must stay apart enough that "small" and "large" are never confused.
SIZE_RADIUS = {"small": 0.12, "large": 0.2}
# What a hard variant may change, in the order its random draw picks from (fixed: the set's bytes depend on it).
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES, "texture": TEXTURES}
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "an image of a {}.", "a {} shape.")


@dataclass(frozen=True)
class Obj:
    """One drawn object: its named attributes and its geometry in pixels (centre and radius)."""

    shape: str
    colour: str
    size: str
    texture: str
    cx: float = 0.0
    cy: float = 0.0
    radius: float = 0.0

    def phrase(self) -> str:
        return f"a {self.size} {self.texture} {self.colour} {self.shape}"

    def classname(self) -> str:
        return f"{self.colour} {self.shape}"


def classnames() -> list[str]:
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def _random_obj(rng: np.random.Generator) -> Obj:
    return Obj(
        shape=pick(SHAPES, rng), colour=pick(tuple(COLOURS), rng), size=pick(SIZES, rng), texture=pick(TEXTURES, rng)
    )


def single(rng: np.random.Generator) -> Scene:
    return Scene((_random_obj(rng),))


def place(scene: Scene, image_size: int, rng: np.random.Generator) -> Scene:
    """Give every object a centre and radius consistent with its size and the scene's relation."""
    s = float(image_size)
    # The main object goes into the region its relation names; the second object into the opposite half.
    regions = [(0.0, 0.0, s, s)] if len(scene.subjects) == 1 else halves(scene.relation, s)
    placed = []
    for obj, (x0, y0, x1, y1) in zip(scene.subjects, regions):
        radius = SIZE_RADIUS[obj.size] * s * rng.uniform(0.95, 1.05)
        margin = radius + 0.5
        cx = rng.uniform(x0 + margin, max(x0 + margin, x1 - margin))
        cy = rng.uniform(y0 + margin, max(y0 + margin, y1 - margin))
        placed.append(dataclasses.replace(obj, cx=cx, cy=cy, radius=radius))
    return Scene(tuple(placed), scene.relation)


def _texture_mask(obj: Obj, shape: np.ndarray, image_size: int) -> np.ndarray:
    """Pixels of the object to paint: the outline always (so the shape stays legible), the interior by texture."""
    if obj.texture == "solid":
        return shape
    interior = shape.copy()
    interior[1:, :] &= shape[:-1, :]
    interior[:-1, :] &= shape[1:, :]
    interior[:, 1:] &= shape[:, :-1]
    interior[:, :-1] &= shape[:, 1:]
    outline = shape & ~interior
    if obj.texture == "striped":
        pattern = stripes(image_size, "diagonal", period=4)  # diagonal, so stripes never look like a square's edges
    elif obj.texture == "dotted":
        pattern = dots(image_size, period=3, dot=1, phase=(2, 2))
    else:
        raise ValueError(f"unknown texture {obj.texture!r}")
    return outline | (interior & pattern)


def render(scene: Scene, image_size: int) -> Image.Image:
    pixels = canvas(image_size)
    for obj in scene.subjects:
        mask = shape_mask(obj.shape, obj.cx, obj.cy, obj.radius, image_size)
        pixels[_texture_mask(obj, mask, image_size)] = COLOURS[obj.colour]
    return to_image(pixels)


FAMILY = Family(
    name="shapes",
    classnames=tuple(classnames()),
    templates=TEMPLATES,
    min_image_size=16,  # two objects side by side
    single=single,
    pair=functools.partial(related.pair, _random_obj),
    mutate=functools.partial(related.mutate, attributes=ATTRIBUTES),
    place=place,
    render=render,
)
