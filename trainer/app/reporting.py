"""Where a run's scalars go (`run.report_to`): TensorBoard, Weights & Biases, both or neither.

Reporters live on the main rank only; other ranks hold none. Each takes named scalars at an optimizer step.
`add_scalar` (TensorBoard's own call) is accepted as well, so code written against a SummaryWriter keeps working.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # reporter -> the package it needs


class Reporter(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def check_reporters(names: tuple[str, ...]) -> None:
    """ValueError naming run.report_to when a reporter's package is not installed (checked before training)."""
    for name in names:
        package = PACKAGES.get(name)
        if package is None:
            raise ValueError(f"run.report_to: unknown reporter {name!r} (known: {', '.join(PACKAGES)})")
        if importlib.util.find_spec(package) is None:
            raise ValueError(
                f"run.report_to={name} needs the {package} package, which is not installed "
                f"(pip install 'helip[{name if name == 'wandb' else 'train'}]')"
            )


class TensorBoardReporter:
    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """One wandb run; `WANDB_MODE=offline` (or `wandb offline`) keeps it on disk, under `directory`/wandb."""

    def __init__(self, directory: Path, project: str, notes: str, config: dict):
        import wandb

        self.run = wandb.init(project=project, notes=notes or None, dir=str(directory), config=config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class Reporters:
    """Every configured reporter behind one Reporter (none at all is fine: nothing is reported)."""

    def __init__(self, reporters: list[Reporter]):
        self.reporters = reporters

    def log(self, scalars: dict[str, float], step: int) -> None:
        for reporter in self.reporters:
            reporter.log(scalars, step)

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.log({name: value}, step)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()
        self.reporters = []


def create_reporters(
    names: tuple[str, ...],
    output_dir: Path,
    *,
    wandb_project: str = "helip",
    wandb_notes: str = "",
    config: dict | None = None,
) -> Reporters:
    """The reporters `names` asks for: TensorBoard under `output_dir`/tensorboard, wandb under `output_dir`/wandb.
    `config` (the run's settings) is attached to the wandb run."""
    check_reporters(names)
    reporters: list[Reporter] = []
    for name in names:
        if name == "tensorboard":
            reporters.append(TensorBoardReporter(output_dir / "tensorboard"))
        elif name == "wandb":
            reporters.append(WandbReporter(output_dir, wandb_project, wandb_notes, config or {}))
    log.info("reporting to %s", ", ".join(names) or "nothing (run.report_to is empty)")
    return Reporters(reporters)
