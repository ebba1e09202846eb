"""The synthetic data families, by name: `family(name)` loads one, and `helip-data synth` dispatches on it.

    shapes    one or two flat shapes; captions name size, texture, colour, shape and their relation (the original)

Each family's module defines `FAMILY` (a `family.Family`). Only names live here, so that a config can validate a
family without importing numpy or PIL (helip-train's --help stays fast).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from helip.trainer.tools.synth_families.family import Family

FAMILIES = ("shapes",)
DEFAULT_FAMILY = "shapes"


def family(name: str) -> Family:
    """The family called `name`; a ValueError names the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown data family {name!r}: one of {', '.join(FAMILIES)}")
    return importlib.import_module(f"{__name__}.{name}").FAMILY


__all__ = ["DEFAULT_FAMILY", "FAMILIES", "family"]
