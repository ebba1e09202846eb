"""The loss settings (`loss.*` of helip-train): HelipLoss's config.

Import-light on purpose (no torch or open_clip): `helip-train --help` reads these fields by importing this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

HnmlForm = Literal["pair", "paper"]
HNML_FORMS: tuple[str, ...] = ("pair", "paper")
LossKind = Literal["clip", "siglip"]
LOSS_KINDS: tuple[str, ...] = ("clip", "siglip")
# open_clip's SigLipLoss: how other ranks' text features reach this rank's images (the same loss by any of them).
SIGLIP_DIST_IMPLS: tuple[str, ...] = ("bidir", "shift", "reduce", "gather")


@dataclass
class LossConfig:
    """Loss hyper-parameters.

    margin: hinge margin m on cosine similarities. Not given by the paper for the "pair" form (0.2 is the
        usual choice for cosine hinge losses, e.g. VSE++); the paper's Eq. 6 ("paper" form) uses 0.
    hnml_weight: λ, the weight of HNML in the total; 0 (the default) turns HELIP's loss off (bit-exact CLIP loss;
        HNML is still computed and logged). A sweep of λ in {0, 1, 2}, margins 0.1 / 0.2 / 0.4 and both forms found
        no setting that beats λ = 0 (docs/BENCHMARKS.md, "The margin loss on evidence"): the gain of HELIP there
        came from the hard-pair batches alone.
    hnml_form: "pair" or "paper", see the module docstring.
    local_loss, gather_with_grad: passed to open_clip's ClipLoss (how features are gathered across ranks); SigLipLoss
        has no use for them: it passes text features between ranks as `dist_impl` says.
    """

    kind: LossKind = "clip"  # clip (open_clip's ClipLoss) or siglip (its SigLipLoss, with the model's logit_bias)
    margin: float = 0.2
    hnml_weight: float = 0.0
    hnml_form: HnmlForm = "pair"
    local_loss: bool = False
    gather_with_grad: bool = True
    dist_impl: str = "bidir"  # siglip: how text features pass between ranks (open_clip's bidir, shift, reduce, gather)

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"loss.kind must be one of {', '.join(LOSS_KINDS)}, got {self.kind!r}")
        if self.margin < 0:
            raise ValueError(f"LossConfig.margin must be >= 0, got {self.margin}")
        if self.hnml_weight < 0:
            raise ValueError(f"LossConfig.hnml_weight must be >= 0, got {self.hnml_weight}")
        if self.hnml_form not in HNML_FORMS:
            raise ValueError(f"LossConfig.hnml_form must be one of {HNML_FORMS}, got {self.hnml_form!r}")
        if self.dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"loss.dist_impl must be one of {', '.join(SIGLIP_DIST_IMPLS)}, got {self.dist_impl!r}")
