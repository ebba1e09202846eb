"""The trainer's configuration: one dataclass per component, read from YAML, then flags (`--set a.b=c` too)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from helip.miner_service.core.settings import layered, nest
from helip.trainer.pairs.loss_config import LossConfig
from helip.trainer.pairs.mining_config import MiningConfig
from helip.trainer.pairs.sampler_config import SamplerConfig
from helip.trainer.tools.model_config import ModelConfig
from helip.trainer.tools.synth_families import FAMILIES


@dataclass
class DataConfig:
    """What the run trains and evaluates on, and how it is loaded."""

    train: str = ""  # CSV/TSV (open_clip format) or webdataset shards; empty with synth: generated
    eval_dir: str = ""  # a directory in the synth layout (zeroshot.json, retrieval.csv); empty: no eval
    zeroshot_dir: str = ""  # ImageFolder directory (a folder per class) for zero-shot; see run.zeroshot_frequency
    zeroshot_classnames: str = ""  # file (lines, JSON list or folder->name object) or "imagenet"; empty: folder names
    zeroshot_templates: str = ""  # file of templates with {} (lines or JSON list), "openai" or "simple"; empty: default
    retrieval_data: str = ""  # CSV/TSV of image-caption pairs for retrieval, read with img_key, caption_key, separator
    img_key: str = "filepath"  # CSV column of the image paths (open_clip's --csv-img-key)
    caption_key: str = "title"  # CSV column of the captions (open_clip's --csv-caption-key)
    separator: str = "\t"  # CSV field separator, one character; a literal backslash-t also means a tab
    synth_dir: str = ""  # generate the synthetic set here when it is missing (the one-box default)
    synth_train: int = 4000  # training samples generated into synth_dir
    synth_test: int = 600  # evaluation samples generated into synth_dir
    synth_seed: int = 0  # seed of the generated set; not optim.seed, so that runs of several seeds share one set
    synth_family: str = "shapes"  # what the generated set shows: shapes, counts, textures or words
    workers: int = 2  # DataLoader worker processes per rank (0: load in the training process)
    prefetch_factor: int = 2  # batches each worker loads ahead
    augment: bool = True  # open_clip's training augmentation (off for the synthetic set: captions name positions)
    max_bad_fraction: float = 0.01  # stop the run once more than this fraction of samples was bad
    bad_min_samples: int = 1000  # ...judged only after this many samples

    def __post_init__(self):
        if self.separator == "\\t":  # as typed in a shell or a single-quoted YAML string
            self.separator = "\t"
        if len(self.separator) != 1:
            raise ValueError(f"data.separator must be one character, got {self.separator!r}")
        if self.synth_family not in FAMILIES:
            raise ValueError(f"data.synth_family must be one of {', '.join(FAMILIES)}, got {self.synth_family!r}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")


@dataclass
class OptimConfig:
    """How long the run trains, on what batches, and AdamW's schedule."""

    steps: int = 200  # optimizer steps (unused when epochs is set)
    epochs: int = 0  # passes over the training set; when > 0, steps = epochs x optimizer steps per epoch
    batch_size: int = 64  # per rank, per micro-step: anchors + hard pairs
    hard_ratio: float = 0.5  # fraction of the batch given to hard pairs (0: plain CLIP batches)
    lr: float = 5e-4  # peak learning rate of AdamW, reached after warmup_steps
    weight_decay: float = 0.1  # AdamW weight decay of the weight matrices (not of gains, biases, logit_scale)
    warmup_steps: int = 20  # optimizer steps of linear warm-up before the cosine decay
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # gradient norm clipping (where the DeepSpeed config says "auto")
    seed: int = 0  # seeds the model's initialisation and the sample order (the synthetic set: data.synth_seed)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"optim.steps must be >= 1, got {self.steps}")
        if self.epochs < 0:
            raise ValueError(f"optim.epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"optim.batch_size must be >= 2, got {self.batch_size}")
        if not 0 <= self.hard_ratio < 1:
            raise ValueError(f"optim.hard_ratio must be in [0, 1), got {self.hard_ratio}")

    def steps_for(self, n_samples: int, world_size: int, accumulation: int) -> int:
        """Optimizer steps of the run: `steps`, or `epochs` passes over `n_samples` as the sampler deals them
        (every rank takes batch_size x (1 - hard_ratio) anchors per micro-step, `accumulation` micro-steps per
        optimizer step)."""
        if self.epochs == 0:
            return self.steps
        micro_per_epoch = SamplerConfig(n_samples, self.batch_size, self.hard_ratio, world_size).steps_per_epoch
        return max(1, self.epochs * micro_per_epoch // accumulation)


REPORTERS = ("tensorboard", "wandb")


@dataclass
class RunConfig:
    """Where the run writes, how often, and what it reports to."""

    output_dir: str = "runs/demo"  # where checkpoints, logs, TensorBoard scalars and eval results go
    deepspeed_config: str = "configs/deepspeed/zero0.json"  # DeepSpeed JSON; "auto" values filled from here
    checkpoint_every: int = 100  # optimizer steps; 0: only at the end
    keep_checkpoints: int = 3  # resumable checkpoints kept, the newest (0: all); epoch_N.pt and final.pt stay
    eval_every: int = 0  # optimizer steps between evals of data.eval_dir and data.retrieval_data; 0: only at the end
    zeroshot_frequency: int = 1  # epochs between zero-shot evals of data.zeroshot_dir; 0: only at the end
    log_every: int = 10  # optimizer steps per logged window (log line, TensorBoard/wandb scalars)
    resume: str = ""  # "", "latest", or a checkpoint tag
    progress: bool = True  # show a progress bar on the main rank
    metrics_port: int = 0  # Prometheus /metrics of rank r on metrics_port + local rank (0: off)
    metrics_host: str = "127.0.0.1"  # the address /metrics listens on
    record_ids: bool = False  # write the sample ids each rank trained on (seen-ids-rank{r}.npy), for checks
    report_to: str = "tensorboard"  # comma-separated: tensorboard, wandb; empty: neither
    wandb_project: str = "helip"  # the wandb project runs are logged to
    wandb_notes: str = ""  # notes attached to the wandb run

    def __post_init__(self):
        if self.log_every < 1:
            raise ValueError(f"run.log_every must be >= 1, got {self.log_every}")
        if self.zeroshot_frequency < 0:
            raise ValueError(f"run.zeroshot_frequency must be >= 0, got {self.zeroshot_frequency}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"run.keep_checkpoints must be >= 0, got {self.keep_checkpoints}")
        unknown = sorted(set(self.reporters) - set(REPORTERS))
        if unknown:
            raise ValueError(f"run.report_to: unknown {', '.join(unknown)} (known: {', '.join(REPORTERS)})")

    @property
    def reporters(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name.strip().lower() for name in self.report_to.split(",") if name.strip()))


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
    sources = []
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        sources.append((one_length(data, Path(path).name), Path(path).name))
    sources.append((one_length(nest(overrides), "flags"), "flags"))
    return layered(TrainConfig(), *sources)


def one_length(values: dict, where: str) -> dict:
    """A run's length is steps or epochs: one source giving both is a mistake, and a later source's steps
    replace an earlier one's epochs (a later source's epochs win anyway, since epochs > 0 decides)."""
    optim = values.get("optim")
    if not isinstance(optim, dict):
        return values
    given = {key.replace("-", "_") for key in optim}
    if {"steps", "epochs"} <= given:
        raise ValueError(f"{where}: optim.steps (--steps) and optim.epochs (--epochs) both given; give one")
    if "steps" in given:
        return {**values, "optim": {**optim, "epochs": 0}}
    return values


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
