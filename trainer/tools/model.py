"""The CLIP model: built by open_clip from a model name or a JSON model config, and our checkpoints.

`pretrained` names the starting weights: a local weights file, one of open_clip's pretrained tags for the
model (e.g. "openai", "laion2b_s34b_b79k"), or "hf-hub:org/name" (that Hugging Face repository's open_clip
weights). Tags and hf-hub names are downloaded by open_clip, so they need the network the first time; a
local file never does. open_clip's BPE vocabulary ships inside the package, so the tokenizer works offline.

Checkpoint format (`save_checkpoint`), a `torch.save`d dict:
    {"state_dict": {name: tensor}, "model_name": str, "model_config": dict | None, **extra}
`model_config` is the JSON model config when the model was built from a file (so a checkpoint can be
rebuilt without the file), else None. open_clip reads the same file (`open_clip.load_checkpoint`, or
`create_model_and_transforms(model_name, pretrained=path)`): it takes "state_dict" and ignores the rest.
`load_checkpoint` also reads a plain open_clip state dict.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch

from helip.trainer.tools.model_config import HF_HUB_PREFIX, WEIGHT_SUFFIXES, ModelConfig

logger = logging.getLogger(__name__)

# Keys of our checkpoint format that `extra` must not overwrite.
CHECKPOINT_KEYS = ("state_dict", "model_name", "model_config")
# Wrappers (DDP, DeepSpeed) prefix every parameter name with this.
WRAPPER_PREFIX = "module."


def resolve_model(config: ModelConfig) -> tuple[str, dict[str, Any] | None]:
    """Return (open_clip model name, JSON model config or None), registering a JSON config with open_clip.

    Raises FileNotFoundError for a missing .json path and ValueError for an unknown name or a JSON file
    that is not an open_clip model config.
    """
    path = Path(config.name)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"ModelConfig.name: model config file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            model_config = json.load(f)
        missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in model_config]
        if missing:
            raise ValueError(f"ModelConfig.name: {path} is not an open_clip model config (no {missing})")
        registered = open_clip.get_model_config(path.stem)
        if registered != model_config:
            # open_clip keys its registry by file stem, so a file may shadow a built-in of the same name.
            if registered is not None:
                logger.warning("model config %s replaces open_clip's %r", path, path.stem)
            open_clip.add_model_config(path)
        return path.stem, model_config
    if config.name not in open_clip.list_models():
        raise ValueError(
            f"ModelConfig.name: {config.name!r} is neither a .json model config nor an open_clip model "
            f"(see open_clip.list_models())"
        )
    return config.name, None


def resolve_pretrained(config: ModelConfig, model_name: str) -> tuple[str, str] | None:
    """Say what `config.pretrained` names, without downloading: None, or (kind, value) with kind "file" (a
    local path), "tag" (an open_clip pretrained tag of `model_name`) or "hf-hub" (a Hugging Face repo id).

    Raises FileNotFoundError for a path that does not exist and ValueError for an unknown tag (listing the
    model's tags) or an hf-hub name that is not "hf-hub:org/name"; each names model.pretrained.
    """
    value = config.pretrained
    if not value:
        return None
    if value.startswith(HF_HUB_PREFIX):
        repo_id = value[len(HF_HUB_PREFIX) :]
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            raise ValueError(f"model.pretrained: expected hf-hub:org/name, got {value!r}")
        return "hf-hub", repo_id
    if Path(value).is_file():
        return "file", value
    if open_clip.is_pretrained_cfg(model_name, value):
        return "tag", value
    if "/" in value or os.sep in value or value.endswith(WEIGHT_SUFFIXES):
        raise FileNotFoundError(f"model.pretrained: weights file {value} does not exist")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    raise ValueError(
        f"model.pretrained: {value!r} is neither a file nor a pretrained tag of {model_name} "
        f"(its tags: {', '.join(tags) if tags else 'none'}; or hf-hub:org/name)"
    )


def check_model(config: ModelConfig) -> None:
    """Validate name and pretrained (files, tags) before anything is built or downloaded."""
    model_name, _ = resolve_model(config)
    resolve_pretrained(config, model_name)


# open_clip_train's --siglip starts the temperature at 10 (CLIP: 1/0.07) and adds a learned logit bias at -10.
SIGLIP_INIT = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}


def holds_logit_bias(path: str | os.PathLike[str]) -> bool:
    """Whether the weights file at `path` (ours, a plain state dict, or .safetensors) has a SigLIP logit_bias.

    Reads the names only: safetensors' header, or torch's zip archive memory-mapped (a legacy, non-zip file is
    read whole). numpy (big_vision) weights say False: open_clip's converter builds what they need itself.
    """
    suffix = Path(path).suffix
    if suffix in (".npz", ".npy"):
        return False
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return "logit_bias" in f.keys()
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # mmap needs the zip format (torch >= 1.6)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
    return isinstance(state_dict, dict) and any(
        name.removeprefix(WRAPPER_PREFIX) == "logit_bias" for name in state_dict
    )


def build_model(
    config: ModelConfig, checkpoint: str | os.PathLike[str] | None = None, *, siglip: bool = False
) -> tuple[torch.nn.Module, Callable[..., Any], Callable[..., Any], Callable[..., torch.Tensor]]:
    """Build (model, preprocess_train, preprocess_val, tokenizer), locked and checkpointed as `config` says;
    with `checkpoint`, its weights are loaded (load_checkpoint: ours, or a plain open_clip state dict).

    siglip: build the model for SigLIP's loss as open_clip_train's --siglip does (SIGLIP_INIT: a learned
        logit_bias, a smaller starting temperature). Without it, the model still gets a logit_bias when its weights
        (`checkpoint`, or a `pretrained` file) hold one, so a SigLIP run's checkpoint loads wherever it is used;
        an open_clip SigLIP architecture (ViT-B-16-SigLIP, ...) has one from its own config.
    model: open_clip CLIP whose forward(images [B,3,H,W], texts [B,L] int64) returns a dict with
        "image_features" [B,E] and "text_features" [B,E] (L2-normalised) and "logit_scale" (exp'd scalar), and
        "logit_bias" when the model has one.
    preprocess_*: PIL image -> float tensor [3,H,W] (train adds augmentation).
    tokenizer: list[str] -> int64 [N, context_length], context_length taken from the model config.
    """
    model_name, _ = resolve_model(config)
    pretrained = resolve_pretrained(config, model_name)
    weights = None
    files = [checkpoint] if checkpoint is not None else []  # the weights files this model will load
    if pretrained is not None:
        kind, weights = pretrained
        if kind == "hf-hub":
            # The repo's weights file into model.name's architecture, so our checkpoints rebuild it offline.
            weights = open_clip.pretrained.download_pretrained_from_hf(weights, cache_dir=config.cache_dir or None)
        if kind != "tag":  # a tag's architecture says itself whether it has a logit_bias
            files.append(weights)
        logger.info("starting from %s weights %s", kind, weights)
    # A learned bias in the weights needs a place in the model (open_clip would fail to load it otherwise); the
    # weights then overwrite SIGLIP_INIT's starting values.
    model_kwargs = SIGLIP_INIT if siglip or any(holds_logit_bias(f) for f in files) else {}
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        model_name,
        pretrained=weights,
        precision=config.precision,
        device=config.device,
        cache_dir=config.cache_dir or None,
        # Never fetch base tower weights (timm / Hugging Face): `pretrained` is the one source of weights.
        pretrained_image=False,
        pretrained_text=False,
        output_dict=True,
        **model_kwargs,
    )
    set_trainable(model, config)
    tokenizer = open_clip.get_tokenizer(model_name)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "built %s (%.1fM parameters, %.1fM trainable, %s on %s)",
        model_name,
        n_params / 1e6,
        n_trainable / 1e6,
        config.precision,
        config.device,
    )
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model, preprocess_train, preprocess_val, tokenizer


def set_trainable(model: torch.nn.Module, config: ModelConfig) -> None:
    """Freeze the towers `config` locks and turn on gradient checkpointing, with open_clip's own methods."""
    if config.lock_image:
        model.lock_image_tower(
            unlocked_groups=config.lock_image_unlocked_groups, freeze_bn_stats=config.lock_image_freeze_bn_stats
        )
    if config.lock_text:
        if not config.lock_text_freeze_layer_norm and type(getattr(model, "text", None)).__name__ != "HFTextEncoder":
            # Only open_clip's Hugging Face text tower can keep LayerNorms trainable; its own asserts otherwise.
            raise ValueError(
                "model.lock_text_freeze_layer_norm=false needs a Hugging Face text tower; this model's text "
                "tower always freezes its LayerNorms when locked"
            )
        model.lock_text_tower(
            unlocked_layers=config.lock_text_unlocked_layers, freeze_layer_norm=config.lock_text_freeze_layer_norm
        )
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)


# Scalar parameters that open_clip keeps 0-dimensional (the learned temperature and bias).
SCALAR_PARAMETERS = ("logit_scale", "logit_bias")


def vectorize_scalar_parameters(model: torch.nn.Module) -> list[str]:
    """Give every 0-dim parameter the shape [1], in place; returns their names.

    DeepSpeed broadcasts parameters as byte views, which a 0-dim tensor cannot give. Shape [1] broadcasts the
    same in open_clip's forward and loss; checkpoints still store these as scalars (see save_checkpoint).
    """
    names = []
    for name, param in list(model.named_parameters()):
        if param.dim() == 0:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            setattr(owner, attr, torch.nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
            names.append(name)
    return names


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DDP and DeepSpeed engines keep the real model in `.module`.
    return getattr(model, "module", model)


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load weights from `path` into `model` (unwrapped if it is a DDP/DeepSpeed wrapper), strictly.

    Accepts our format ({"state_dict": ..., ...}) or a plain open_clip state dict; a leading "module." on
    the names is dropped. Raises ValueError naming the missing, unexpected and mis-shaped keys when the
    checkpoint does not fit the model. Returns the checkpoint's other entries (model_name, model_config,
    the `extra` it was saved with; empty for a plain state dict).
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path}: expected a dict, got {type(checkpoint).__name__}")
    if isinstance(checkpoint.get("state_dict"), dict):
        state_dict = checkpoint["state_dict"]
        meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state_dict, meta = checkpoint, {}
    else:
        raise ValueError(
            f"checkpoint {path}: neither a state dict of tensors nor a dict with 'state_dict' "
            f"(keys: {sorted(checkpoint)[:10]})"
        )
    state_dict = {
        (name[len(WRAPPER_PREFIX) :] if name.startswith(WRAPPER_PREFIX) else name): tensor
        for name, tensor in state_dict.items()
    }

    target = _unwrap(model)
    expected = target.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    for name in expected.keys() & state_dict.keys():
        # A scalar saved as [] loads into a model whose scalars were vectorised to [1], and back.
        if state_dict[name].numel() == 1 and expected[name].numel() == 1:
            state_dict[name] = state_dict[name].reshape(expected[name].shape)
    mismatched = sorted(
        f"{name} {tuple(state_dict[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in expected.keys() & state_dict.keys()
        if state_dict[name].shape != expected[name].shape
    )
    if missing or unexpected or mismatched:

        def show(names: list[str]) -> str:
            return f"{len(names)} {names[:8]}{' ...' if len(names) > 8 else ''}"

        raise ValueError(
            f"checkpoint {path} does not fit the model ({meta.get('model_name', 'unknown model')}): "
            f"missing keys {show(missing)}; unexpected keys {show(unexpected)}; shape mismatches "
            f"{show(mismatched)}"
        )
    target.load_state_dict(state_dict, strict=True)
    logger.info("loaded checkpoint %s (%d tensors)", path, len(state_dict))
    return meta


def save_checkpoint(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    extra: dict[str, Any] | None = None,
    *,
    config: ModelConfig,
) -> None:
    """Write `model`'s weights in our checkpoint format (see the module docstring) to `path`, atomically.

    model: the model or its DDP/DeepSpeed wrapper (names are saved without "module.").
    extra: more entries (e.g. {"step": 100}); plain Python values and tensors only, since loading uses
        torch.load(weights_only=True). Must not use the keys "state_dict", "model_name", "model_config".
    config: the ModelConfig the model was built from; gives model_name and model_config.
    """
    extra = dict(extra or {})
    clashes = sorted(set(extra) & set(CHECKPOINT_KEYS))
    if clashes:
        raise ValueError(f"save_checkpoint: extra must not contain the reserved keys {clashes}")
    model_name, model_config = resolve_model(config)
    state_dict = {name: tensor.detach().cpu() for name, tensor in _unwrap(model).state_dict().items()}
    for name in SCALAR_PARAMETERS:  # open_clip's own layout, whatever vectorize_scalar_parameters did
        if name in state_dict and state_dict[name].numel() == 1:
            state_dict[name] = state_dict[name].reshape(())
    checkpoint = {"state_dict": state_dict, "model_name": model_name, "model_config": model_config, **extra}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a crash mid-write never leaves a truncated checkpoint under the final name.
    tmp_path = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp_path)
    os.replace(tmp_path, path)
    logger.info("saved checkpoint %s", path)
