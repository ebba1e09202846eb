"""helip-train's flags in real runs: --epochs through the CLI, --report-to wandb offline, losses averaged over ranks."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helip.trainer.tools.synth import SynthConfig, generate
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def test_epochs_train_that_many_passes_and_report_to_tensorboard_and_wandb(tmp_path):
    pytest.importorskip("wandb")
    generate(SynthConfig(out_dir=tmp_path / "synth", train_size=48, test_size=16, seed=0))
    out = tmp_path / "run"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",  # no account, no network
        **{name: str(tmp_path / "wandb-home" / name) for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")},
        "WANDB_DATA_DIR": str(tmp_path / "wandb-home" / "data"),
    }
    command = [
        *(sys.executable, "-m", "helip.trainer.app.cli", "--config", str(ROOT / "configs/demo.yaml")),
        *("--train-data", str(tmp_path / "synth" / "train.csv"), "--set", "data.synth_dir="),
        *("--output-dir", str(out), "--run.progress", "false", "--checkpoint-every", "0"),
        *("--hard-ratio", "0", "--hnml-weight", "0", "--batch-size", "8", "--workers", "0"),
        *("--epochs", "2", "--log-every-n-steps", "4", "--report-to", "tensorboard,wandb"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    # 48 samples, 8 anchors a step on one rank: 6 steps an epoch (the YAML's optim.steps gives way to --epochs).
    records = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["micro_step"] for r in records] == list(range(12))
    assert json.loads((out / "summary.json").read_text())["steps"] == 12
    window_means = [sum(r["total"] for r in records[i : i + 4]) / 4 for i in (0, 4, 8)]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss/total")]
    assert [step for step, _ in logged] == [4, 8, 12]
    assert [value for _, value in logged] == pytest.approx(window_means, rel=1e-6)

    # The offline run's log holds each history row's values as JSON text: the same window means are in it.
    (run_log,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(run_log).read_bytes()
    assert b"loss/total" in data and b"perf/samples_per_s" in data
    for mean in window_means:
        assert json.dumps(mean).encode() in data, mean


class RecordingReporter:
    """Where rank 0's windows land in this test: a JSON file the test reads back."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.rows.append({"step": step, **scalars})

    def close(self) -> None:
        self.path.write_text(json.dumps(self.rows))


def per_rank_losses(rank: int, micro: int) -> dict[str, float]:
    return {"total": 1.0 + rank + 0.25 * micro, "contrastive": 2.0 * rank + micro, "hnml": 0.5 * rank}


def log_two_ranks(rank: int, world_size: int, port: int, out: str) -> None:
    from helip.trainer.app.metrics import TrainerMetrics
    from helip.trainer.app.runlog import RunLog
    from helip.trainer.pairs.hard_pairs import BatchLayout
    from helip.trainer.pairs.mining import MiningCounters

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        reporter = RecordingReporter(Path(out) / "windows.json") if rank == 0 else None
        runlog = RunLog(
            Path(out), rank, world_size, TrainerMetrics.create(rank), MiningCounters(), 2, 1, reporter, device="cpu"
        )
        layout = BatchLayout(step=0, couples=torch.zeros(0, 2, dtype=torch.int64), n_hard=0, n_fallback=0, n_slots=4)
        for micro in range(5):
            runlog.step(micro, per_rank_losses(rank, micro), layout, 0.01, 0.0, 1e-3, last=micro == 4)
        runlog.close()
        if reporter is not None:
            reporter.close()
    finally:
        dist.destroy_process_group()


def test_logged_losses_are_the_mean_over_ranks_and_window(tmp_path):
    world_size = 2
    mp.spawn(log_two_ranks, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    windows = json.loads((tmp_path / "windows.json").read_text())
    assert [w["step"] for w in windows] == [2, 4, 5]  # every 2 steps, and the last one
    for window, micros in zip(windows, ([0, 1], [2, 3], [4])):
        for name in ("total", "contrastive", "hnml"):
            values = [per_rank_losses(rank, m)[name] for rank in range(world_size) for m in micros]
            assert window[f"loss/{name}"] == pytest.approx(sum(values) / len(values)), (name, window)
    # losses.jsonl keeps the main rank's own per-step values.
    first = json.loads((tmp_path / "losses.jsonl").read_text().splitlines()[0])
    assert first["total"] == per_rank_losses(0, 0)["total"]
