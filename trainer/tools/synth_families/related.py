"""Scenes of one subject, or of two in a spatial relation: the caption grammar, the zero-shot class and the hard
variants that shapes (flat objects) and textures (patterns in halves) share.

A subject is a frozen dataclass with `phrase()` (its words in a caption) and `classname()` (its zero-shot class).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from helip.trainer.tools.synth_families.draw import RELATIONS, pick, pick_other


@dataclass(frozen=True)
class Scene:
    """`subjects[0]` is the main subject; for two, `relation` says where subjects[0] is relative to subjects[1]."""

    subjects: tuple[Any, ...]
    relation: str | None = None

    def caption(self) -> str:
        if len(self.subjects) == 1:
            return self.subjects[0].phrase()
        first, second = self.subjects
        return f"{first.phrase()} {self.relation} {second.phrase()}"

    def classname(self) -> str | None:
        return self.subjects[0].classname() if len(self.subjects) == 1 else None


def pair(subject: Callable[[np.random.Generator], Any], rng: np.random.Generator) -> Scene:
    """Two random subjects in a random relation."""
    return Scene((subject(rng), subject(rng)), pick(RELATIONS, rng))


def mutate(scene: Scene, rng: np.random.Generator, attributes: Mapping[str, Sequence]) -> Scene:
    """Change exactly one named attribute of one subject (`attributes`: its name -> the values it takes), or, for
    two subjects, the relation or the mention order."""
    subjects = list(scene.subjects)
    what = pick([*attributes] + (["relation", "swap"] if len(subjects) == 2 else []), rng)
    if what == "relation":
        return Scene(tuple(subjects), pick_other(RELATIONS, rng, scene.relation))
    if what == "swap":
        # Same words, different meaning: "A left of B" vs "B left of A".
        return Scene((subjects[1], subjects[0]), scene.relation)
    index = int(rng.integers(len(subjects)))
    changed = pick_other(attributes[what], rng, getattr(subjects[index], what))
    subjects[index] = dataclasses.replace(subjects[index], **{what: changed})
    return Scene(tuple(subjects), scene.relation)
