"""A run's checkpoints: DeepSpeed's resumable ones, the newest few kept, and weights open_clip loads directly.

    OUTPUT/checkpoints/step_N/, OUTPUT/checkpoints/latest   DeepSpeed's (weights, optimizer, scheduler): --resume
    OUTPUT/epoch_N.pt                                       weights at the end of epoch N (1-based)
    OUTPUT/final.pt                                         weights at the end of the run

The .pt files are helip.trainer.tools.model's checkpoint format, which `open_clip.load_checkpoint(model, path)` and
`open_clip.create_model_and_transforms(model_name, pretrained=path)` read as they are (after
`open_clip.add_model_config` for a model built from a JSON config), as do `tools.model.load_checkpoint` and
`helip-eval --checkpoint`. Resumable checkpoints past the newest `keep` are deleted after each save.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from helip.trainer.tools.model import ModelConfig, save_checkpoint

log = logging.getLogger(__name__)

# Tags the trainer gives DeepSpeed's checkpoints; other directories (a user's own tags) are never pruned.
RESUMABLE_TAG = re.compile(r"step_(\d+)")
LATEST_FILE = "latest"  # DeepSpeed's record of the newest tag


def resumable_checkpoints(directory: str | Path) -> list[Path]:
    """The step_N directories under `directory`, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in directory.iterdir()
        if path.is_dir() and (match := RESUMABLE_TAG.fullmatch(path.name))
    ]
    return [path for _, path in sorted(found)]


def prune_resumable(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step_N directories (keep 0: delete none); returns what was deleted.

    The tag DeepSpeed's `latest` file names is never deleted, whatever its step.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    if keep == 0:
        return []
    directory = Path(directory)
    latest_file = directory / LATEST_FILE
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    deleted = []
    for path in resumable_checkpoints(directory)[:-keep]:
        if path.name == latest:
            continue
        shutil.rmtree(path)
        deleted.append(path)
    if deleted:
        log.info("removed old checkpoints %s (keeping the newest %d)", ", ".join(p.name for p in deleted), keep)
    return deleted


class Checkpointer:
    """Saves, prunes, exports and resumes one DeepSpeed engine's checkpoints (every rank holds one).

    engine: the DeepSpeed engine. output_dir: the run's directory. model_config: what the model was built from
    (recorded in the exports). keep: resumable checkpoints kept (0: all). accumulation: micro-steps per optimizer
    step (tags count optimizer steps). is_main: this rank writes the exports and prunes (one shared file system).
    """

    def __init__(
        self,
        engine: Any,
        output_dir: str | Path,
        model_config: ModelConfig,
        *,
        keep: int,
        accumulation: int,
        is_main: bool,
    ):
        if keep < 0:
            raise ValueError(f"run.keep_checkpoints must be >= 0, got {keep}")
        self.engine = engine
        self.output_dir = Path(output_dir)
        self.directory = self.output_dir / "checkpoints"
        self.model_config = model_config
        self.keep = keep
        self.accumulation = accumulation
        self.is_main = is_main

    def save(self, micro: int) -> None:
        """DeepSpeed's resumable checkpoint after `micro` micro-steps (every rank calls this), then pruning."""
        tag = f"step_{micro // self.accumulation}"
        self.engine.save_checkpoint(str(self.directory), tag=tag, client_state={"micro_step": micro})
        dist.barrier()  # every rank's shard is written before an old directory goes
        if self.is_main:
            prune_resumable(self.directory, self.keep)

    def resume(self, resume: str) -> int:
        """Load the checkpoint `resume` names ("latest" or a tag); returns the micro-step to go on from.

        "latest" with no checkpoint yet starts from 0; a missing tag is a FileNotFoundError.
        """
        if not resume:
            return 0
        if resume == "latest" and not (self.directory / LATEST_FILE).exists():
            log.info("no checkpoint in %s yet: starting from step 0", self.directory)
            return 0
        path, client_state = self.engine.load_checkpoint(
            str(self.directory), tag=None if resume == "latest" else resume
        )
        if path is None:
            raise FileNotFoundError(f"--resume {resume}: no checkpoint in {self.directory}")
        micro = int(client_state["micro_step"])
        log.info("resumed from %s at step %d", path, micro // self.accumulation)
        return micro

    def export(self, name: str, **extra: Any) -> Path | None:
        """Write OUTPUT/{name}.pt (weights only, open_clip-loadable) on the main rank; its path there, else None.

        extra: plain values stored beside the weights (e.g. step=100, epoch=2).
        """
        if not self.is_main:
            return None
        path = self.output_dir / f"{name}.pt"
        save_checkpoint(self.engine.module, path, extra, config=self.model_config)
        return path
