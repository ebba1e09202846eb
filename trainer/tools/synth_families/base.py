"""What the generator asks of a data family, and the one sampling loop that every family shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image


class Captioned(Protocol):
    """A family's scene: it says what it shows and, when that is one thing, its zero-shot class."""

    def caption(self) -> str: ...

    def classname(self) -> str | None:
        """The zero-shot class, or None where the scene has no single one (two subjects)."""
        ...


@dataclass(frozen=True)
class Family:
    """A data family: how its scenes are drawn, and its zero-shot task (`classnames` x `templates`).

    Scenes are sampled attributes first and geometry last (`place`), so that a hard variant (`mutate`: exactly one
    attribute changed, or two subjects swapped) is re-placed consistently with what its caption now says.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]  # each with {} where a class name goes
    min_image_size: int  # the smallest side at which the scenes still show what their captions say
    single: Callable[[np.random.Generator], Any]  # a scene of one subject: the zero-shot images
    pair: Callable[[np.random.Generator], Any]  # a scene of two subjects
    mutate: Callable[[Any, np.random.Generator], Any]  # one attribute changed: the built-in hard pairs
    place: Callable[[Any, int, np.random.Generator], Any]  # (scene, image_size, rng) -> the scene with geometry
    render: Callable[[Any, int], Image.Image]  # (placed scene, image_size) -> RGB image

    def sample_scenes(
        self,
        n: int,
        rng: np.random.Generator,
        image_size: int,
        single_fraction: float,
        hard_fraction: float,
    ) -> list[Captioned]:
        """n placed scenes; a `hard_fraction` of them are hard variants of an earlier one of the same list."""
        scenes: list[Captioned] = []
        for _ in range(n):
            if scenes and rng.random() < hard_fraction:
                base = self.mutate(scenes[int(rng.integers(len(scenes)))], rng)
            elif rng.random() < single_fraction:
                base = self.single(rng)
            else:
                base = self.pair(rng)
            scenes.append(self.place(base, image_size, rng))
        return scenes
