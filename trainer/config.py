"""The trainer's configuration: one dataclass per component, read from YAML, then flags (`--set a.b=c` too)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from miner_service.settings import nest, overlay
from trainer.losses import LossConfig
from trainer.mining import MiningConfig
from trainer.model import ModelConfig


@dataclass
class DataConfig:
    train: str = ""  # CSV/TSV (open_clip format) or webdataset shards; empty with synth: generated
    eval_dir: str = ""  # a directory in the synth layout (zeroshot.json, retrieval.csv); empty: no eval
    img_key: str = "filepath"
    caption_key: str = "title"
    separator: str = "\t"
    synth_dir: str = ""  # generate the synthetic set here when it is missing (the one-box default)
    synth_train: int = 4000
    synth_test: int = 600
    workers: int = 2  # DataLoader worker processes per rank (0: load in the training process)
    prefetch_factor: int = 2  # batches each worker loads ahead
    augment: bool = True  # open_clip's training augmentation (off for the synthetic set: captions name positions)
    max_bad_fraction: float = 0.01  # stop the run once more than this fraction of samples was bad
    bad_min_samples: int = 1000  # ...judged only after this many samples

    def __post_init__(self):
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")


@dataclass
class OptimConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 64  # per rank, per micro-step: anchors + hard pairs
    hard_ratio: float = 0.5  # fraction of the batch given to hard pairs (0: plain CLIP batches)
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    seed: int = 0


@dataclass
class RunConfig:
    output_dir: str = "runs/demo"
    deepspeed_config: str = "configs/deepspeed/zero0.json"
    checkpoint_every: int = 100  # optimizer steps; 0: only at the end
    keep_checkpoints: int = 3  # resumable checkpoints kept, the newest (0: all); epoch_N.pt and final.pt stay
    eval_every: int = 0  # optimizer steps; 0: only at the end
    log_every: int = 10
    resume: str = ""  # "", "latest", or a checkpoint tag
    progress: bool = True
    metrics_port: int = 0  # Prometheus /metrics of rank r on metrics_port + local rank (0: off)
    metrics_host: str = "127.0.0.1"
    record_ids: bool = False  # write the sample ids each rank trained on (seen-ids-rank{r}.npy), for checks

    def __post_init__(self):
        if self.keep_checkpoints < 0:
            raise ValueError(f"run.keep_checkpoints must be >= 0, got {self.keep_checkpoints}")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def load(path: str | None, overrides: dict[str, object]) -> TrainConfig:
    """Defaults < YAML file < dotted overrides ({"optim.steps": 10, ...}; None values skipped)."""
    config = TrainConfig()
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        config = overlay(config, data, Path(path).name)
    return overlay(config, nest(overrides), "flags")


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
