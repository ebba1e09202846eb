"""DeepSpeed glue: the run's DeepSpeed config, and the engine, optimizer and schedule built around the model."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from helip.trainer.app.config import TrainConfig
from helip.trainer.app.precision import apply_precision, enabled_precision
from helip.trainer.app.schedule import warmup_cosine

log = logging.getLogger(__name__)


def deepspeed_config(config: TrainConfig) -> dict:
    """The user's DeepSpeed JSON with our values filled in where it says "auto", and model.precision's bf16/fp16
    blocks (app.precision; a JSON that disagrees is a ValueError), unless the device lacks that precision."""
    from deepspeed.accelerator import get_accelerator

    source = config.run.deepspeed_config
    ds = apply_precision(json.loads(Path(source).read_text()), config.model.precision, source)
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = config.optim.batch_size
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = config.optim.grad_clip
    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]
    accelerator = get_accelerator()
    for key, supported in (("bf16", accelerator.is_bf16_supported()), ("fp16", accelerator.is_fp16_supported())):
        if ds.get(key, {}).get("enabled") and not supported:
            log.warning("model.precision is %s but %s lacks it: training in fp32", key, accelerator.device_name())
            ds[key]["enabled"] = False
    return ds


@dataclass
class EngineParts:
    engine: object  # deepspeed.DeepSpeedEngine around the model
    optimizer: object
    scheduler: torch.optim.lr_scheduler.LRScheduler
    accumulation: int  # micro-steps per optimizer step (gradient_accumulation_steps)
    input_dtype: torch.dtype  # what the engine's weights expect: bf16, fp16 or fp32


def build_engine(config: TrainConfig, model: torch.nn.Module, n_samples: int, world_size: int) -> EngineParts:
    """AdamW (no decay on gains, biases, the temperature) under warmup + cosine, wrapped by DeepSpeed.

    Resolves optim.steps from optim.epochs first (it needs the accumulation the DeepSpeed config sets).
    """
    import deepspeed

    optim = config.optim
    ds_config = deepspeed_config(config)
    accumulation = int(ds_config.get("gradient_accumulation_steps", 1))
    optim.steps = optim.steps_for(n_samples, world_size, accumulation)
    if optim.epochs:
        log.info("%d epochs of %d samples: %d optimizer steps", optim.epochs, n_samples, optim.steps)
    # Locked towers' parameters stay out of the optimizer: no updates, no weight decay, no optimizer state.
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in trainable if p.ndim < 2 or "logit_scale" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, optim.warmup_steps, optim.steps, optim.min_lr_ratio)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    precision = enabled_precision(ds_config)
    log.info("training in %s (model.precision, DeepSpeed %s)", precision, config.run.deepspeed_config)
    if engine.bfloat16_enabled():
        input_dtype = torch.bfloat16
    elif engine.fp16_enabled():
        input_dtype = torch.float16
    else:
        input_dtype = torch.float32
    return EngineParts(engine, optimizer, scheduler, accumulation, input_dtype)
