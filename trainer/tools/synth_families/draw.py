"""Drawing shared by the synthetic families: one palette, flat shapes, periodic patterns, halves of the image.

No anti-aliasing anywhere: every pixel is the background or exactly one palette colour, so a pixel can be read back
to the word that named it (the families' consistency tests rely on it). Patterns are laid on a grid of `unit`
pixels (image_size // 32), so a larger image shows the same pattern, not a finer one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw

# Every pair of colours is far apart in RGB: a pixel can be classified back to its colour by nearest neighbour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
BACKGROUND = (25, 25, 25)
SHAPES = ("circle", "square", "triangle", "diamond")
# Where the first of two subjects is, relative to the second.
RELATIONS = ("left of", "right of", "above", "below")

T = TypeVar("T")
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


def pick(values: Sequence[T], rng: np.random.Generator) -> T:
    return values[rng.integers(len(values))]


def pick_other(values: Sequence[T], rng: np.random.Generator, *excluded: T) -> T:
    """A value of `values` that is none of `excluded`: the one-attribute change of a hard variant."""
    others = [v for v in values if v not in excluded]
    return others[rng.integers(len(others))]


def halves(relation: str, s: float) -> tuple[Box, Box]:
    """The half of an s x s image where the first subject goes, and the opposite half for the second."""
    return {
        "left of": ((0, 0, s / 2, s), (s / 2, 0, s, s)),
        "right of": ((s / 2, 0, s, s), (0, 0, s / 2, s)),
        "above": ((0, 0, s, s / 2), (0, s / 2, s, s)),
        "below": ((0, s / 2, s, s), (0, 0, s, s / 2)),
    }[relation]


def canvas(image_size: int) -> np.ndarray:
    """An [image_size, image_size, 3] uint8 array of the background colour, to paint masks into."""
    pixels = np.empty((image_size, image_size, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND
    return pixels


def to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels, "RGB")


def shape_mask(shape: str, cx: float, cy: float, r: float, image_size: int) -> np.ndarray:
    """Boolean [image_size, image_size] mask of a flat shape of radius r (pixels) centred at (cx, cy)."""
    image = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        h = r * 0.9  # close to the circle's area, yet a large square stays visibly larger than a small circle
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(image) > 0


def unit_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) coordinates of every pixel in pattern units (see the module docstring)."""
    unit = max(1, image_size // 32)
    y, x = np.mgrid[0:image_size, 0:image_size] // unit
    return y, x


def stripes(image_size: int, direction: str, period: int, phase: int = 0) -> np.ndarray:
    """Bands of period/2 units on, period/2 off, across `direction`: horizontal, vertical or diagonal (x + y)."""
    y, x = unit_grid(image_size)
    across = {"horizontal": y, "vertical": x, "diagonal": x + y}[direction]
    return ((across + phase) // (period // 2)) % 2 == 0


def checks(image_size: int, period: int, phase: tuple[int, int] = (0, 0)) -> np.ndarray:
    """A chequerboard of squares period/2 units a side."""
    y, x = unit_grid(image_size)
    half = period // 2
    return ((x + phase[0]) // half + (y + phase[1]) // half) % 2 == 0


def dots(image_size: int, period: int, dot: int, phase: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Square dots `dot` units a side, one every `period` units in x and in y."""
    y, x = unit_grid(image_size)
    return ((x + phase[0]) % period < dot) & ((y + phase[1]) % period < dot)
