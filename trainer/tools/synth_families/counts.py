"""Counting: one or two groups of a counted number of identical objects ("three red circles and one blue square").

Every object of a group has the group's colour and shape and one size, so the images differ in how many, what
colour and which shape. Objects sit in distinct cells of a 3 x 3 grid with a gap around each, so every object is a
blob of its own (the consistency test counts them); two groups never share a colour, so a pixel's colour says
which group it belongs to. Hard variants change one group's count, colour or shape. Zero-shot: count x shape of the
one-group images ("three circles", whatever the colour): counting is what this family asks beyond shapes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from PIL import Image

from helip.trainer.tools.synth_families.base import Family
from helip.trainer.tools.synth_families.draw import COLOURS, SHAPES, canvas, pick, pick_other, shape_mask, to_image

NUMBERS = ("one", "two", "three", "four")
GRID = 3  # cells a side: two groups of at most four objects fit in nine cells
# Object radius as a fraction of the image side: shapes stay tellable apart at 32 px, and a cell (a third of the
# side) still leaves a background gap between neighbours after the jitter.
RADIUS = 0.1
JITTER = 0.03  # of the image side, either way: the same caption never gives quite the same image
TEMPLATES = ("a photo of {}.", "a drawing of {}.", "an image of {}.", "{}.")


def counted(count: int, noun: str) -> str:
    return f"{NUMBERS[count - 1]} {noun}{'s' if count > 1 else ''}"


@dataclass(frozen=True)
class Group:
    """`count` objects of one colour and shape; `centres` (pixels, one per object) are set by `place`."""

    count: int
    colour: str
    shape: str
    centres: tuple[tuple[float, float], ...] = ()

    def phrase(self) -> str:
        return counted(self.count, f"{self.colour} {self.shape}")


@dataclass(frozen=True)
class Scene:
    groups: tuple[Group, ...]
    radius: float = 0.0  # pixels, every object

    def caption(self) -> str:
        return " and ".join(group.phrase() for group in self.groups)

    def classname(self) -> str | None:
        if len(self.groups) != 1:
            return None
        return counted(self.groups[0].count, self.groups[0].shape)


def classnames() -> list[str]:
    return [counted(count, shape) for count in range(1, len(NUMBERS) + 1) for shape in SHAPES]


def _random_group(rng: np.random.Generator, *taken_colours: str) -> Group:
    count = int(rng.integers(1, len(NUMBERS) + 1))
    return Group(count, pick_other(tuple(COLOURS), rng, *taken_colours), pick(SHAPES, rng))


def single(rng: np.random.Generator) -> Scene:
    return Scene((_random_group(rng),))


def pair(rng: np.random.Generator) -> Scene:
    first = _random_group(rng)
    return Scene((first, _random_group(rng, first.colour)))


def mutate(scene: Scene, rng: np.random.Generator) -> Scene:
    """Change one group's count, colour (to one no group has) or shape."""
    groups = list(scene.groups)
    index = int(rng.integers(len(groups)))
    group = groups[index]
    what = pick(("count", "colour", "shape"), rng)
    if what == "count":
        changed = pick_other(range(1, len(NUMBERS) + 1), rng, group.count)
    elif what == "colour":
        changed = pick_other(tuple(COLOURS), rng, *(g.colour for g in groups))
    else:
        changed = pick_other(SHAPES, rng, group.shape)
    groups[index] = dataclasses.replace(group, **{what: changed})
    return Scene(tuple(groups))


def place(scene: Scene, image_size: int, rng: np.random.Generator) -> Scene:
    """Every object into a cell of its own, jittered about the cell's centre; groups take cells in order."""
    s = float(image_size)
    cell = s / GRID
    cells = iter(rng.permutation(GRID * GRID).tolist())
    placed = []
    for group in scene.groups:
        centres = []
        for _ in range(group.count):
            row, column = divmod(next(cells), GRID)
            dx, dy = rng.uniform(-JITTER * s, JITTER * s, size=2)
            centres.append(((column + 0.5) * cell + dx, (row + 0.5) * cell + dy))
        placed.append(dataclasses.replace(group, centres=tuple(centres)))
    return Scene(tuple(placed), radius=RADIUS * s)


def render(scene: Scene, image_size: int) -> Image.Image:
    pixels = canvas(image_size)
    for group in scene.groups:
        for cx, cy in group.centres:
            pixels[shape_mask(group.shape, cx, cy, scene.radius, image_size)] = COLOURS[group.colour]
    return to_image(pixels)


FAMILY = Family(
    name="counts",
    classnames=tuple(classnames()),
    templates=TEMPLATES,
    min_image_size=32,  # below it neighbours touch, and shapes shrink to blobs that no longer show which
    single=single,
    pair=pair,
    mutate=mutate,
    place=place,
    render=render,
)
