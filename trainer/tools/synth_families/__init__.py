"""The synthetic data families, by name: `family(name)` loads one, and `helip-data synth` dispatches on it.

    shapes    one or two flat shapes; captions name size, texture, colour, shape and their relation (the original)
    counts    one or two groups of a counted number of objects ("three red circles and one blue square")
    textures  procedural patterns filling the image or two halves of it ("fine red vertical stripes above ...")
    words     three-letter words drawn in a bitmap font, on one or two lines ("cat hat")

Each family's module defines `FAMILY` (a `base.Family`); `draw` holds what they draw with, `related` the scenes
of one subject or two in a relation (shapes, textures). Only names live here, so that a config can validate a
family without importing numpy or PIL (helip-train's --help stays fast).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from helip.trainer.tools.synth_families.base import Family

FAMILIES = ("shapes", "counts", "textures", "words")
DEFAULT_FAMILY = "shapes"


def family(name: str) -> Family:
    """The family called `name`; a ValueError names the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown data family {name!r}: one of {', '.join(FAMILIES)}")
    return importlib.import_module(f"{__name__}.{name}").FAMILY


__all__ = ["DEFAULT_FAMILY", "FAMILIES", "family"]
