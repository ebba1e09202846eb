"""The model settings (`model.*` of helip-train): which CLIP to build, from which weights, what trains.

Import-light on purpose (no torch or open_clip): `helip-train --help` reads these fields by importing this module.
"""

from __future__ import annotations

from dataclasses import dataclass

# Precisions a run trains in; DeepSpeed gets the same one (helip.trainer.app.precision).
PRECISIONS = ("fp32", "bf16", "fp16")
HF_HUB_PREFIX = "hf-hub:"
# What a `pretrained` value that is meant as a file looks like, so a typo reads as a missing file, not a tag.
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")


@dataclass
class ModelConfig:
    """Which CLIP to build, from which weights, and which of its parts train."""

    name: str = "configs/models/helip-tiny.json"  # open_clip model name (ViT-B-32, ...) or a JSON model config
    pretrained: str | None = None  # starting weights: a local file, an open_clip tag (openai) or hf-hub:org/name
    cache_dir: str = ""  # where tags and hf-hub weights download to (empty: open_clip's / Hugging Face's default)
    precision: str = "fp32"  # fp32, bf16 or fp16; also sets the DeepSpeed JSON's bf16/fp16 blocks
    device: str = "cpu"  # where the model is placed (the trainer sets its rank's device)
    lock_image: bool = False  # freeze the image tower (LiT)
    lock_image_unlocked_groups: int = 0  # with lock_image: leave its last N layer groups trainable
    lock_image_freeze_bn_stats: bool = False  # with lock_image: freeze BatchNorm statistics of locked layers
    lock_text: bool = False  # freeze the text tower
    lock_text_unlocked_layers: int = 0  # with lock_text: leave its last N layer groups trainable
    lock_text_freeze_layer_norm: bool = True  # with lock_text: freeze LayerNorms too (open_clip's own tower: true)
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, more compute

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"model.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if self.lock_image_unlocked_groups and not self.lock_image:
            raise ValueError("model.lock_image_unlocked_groups is set but model.lock_image is not")
        if self.lock_text_unlocked_layers and not self.lock_text:
            raise ValueError("model.lock_text_unlocked_layers is set but model.lock_text is not")
        if self.pretrained == "":
            self.pretrained = None
