"""The trainer's evaluations: on rank 0, into OUTPUT/eval/NAME.json and the run's reporters."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch

from helip.trainer.app.config import DataConfig

log = logging.getLogger(__name__)


class RunEvaluator:
    """Evaluates the engine's model on the run's evaluation data (loaded at the first evaluation)."""

    def __init__(self, data: DataConfig, tokenizer, preprocess, output_dir: Path, writer, device, input_dtype):
        self.data = data
        self.tokenizer, self.preprocess = tokenizer, preprocess
        self.output_dir = output_dir
        self.writer = writer
        self.device, self.input_dtype = device, input_dtype

    @functools.cached_property
    def suite(self):
        """Loaded late: data.eval_dir may be set when the synthetic set is prepared."""
        from helip.trainer.tools.eval import suite_from_data

        return suite_from_data(self.data)

    def evaluate(self, model, name: str, step: int, periodic: bool = True, zero_shot: bool = True) -> Path | None:
        """Write eval/NAME.json. `periodic`: the synth layout, the retrieval CSV (every run.eval_every steps);
        `zero_shot`: data.zeroshot_dir (every run.zeroshot_frequency epochs). None when nothing was evaluated."""
        if self.suite is None:
            return None
        from helip.trainer.tools.eval import evaluate_suite

        # Under bf16/fp16 DeepSpeed holds half-precision weights: autocast feeds them matching inputs.
        with torch.autocast(self.device.type, dtype=self.input_dtype, enabled=self.input_dtype != torch.float32):
            metrics = evaluate_suite(
                model,
                self.tokenizer,
                self.preprocess,
                self.suite,
                device=self.device,
                periodic=periodic,
                folder_zero_shot=zero_shot,
            )
        if not metrics:
            return None
        path = self.output_dir / "eval" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2))
        for key, value in metrics.items():
            self.writer.add_scalar(f"eval/{key}", value, step)
        log.info("eval %s: %s", name, ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        return path
