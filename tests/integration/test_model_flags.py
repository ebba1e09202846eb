"""Model flags through `helip-train`: a locked tower, gradient checkpointing, the checkpoints a run leaves (the
newest N resumable ones, epoch_N.pt, final.pt that open_clip itself loads) and resuming from them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from helip.trainer.tools.eval import main as eval_main
from helip.trainer.tools.model import ModelConfig, build_model, load_checkpoint, save_checkpoint
from helip.trainer.tools.synth import SynthConfig, generate
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

TINY = ROOT / "configs" / "models" / "helip-tiny.json"
# 32 samples in plain batches of 16: an epoch is two steps.
TRAIN_SIZE, BATCH = 32, 16


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(out_dir=root, train_size=TRAIN_SIZE, test_size=40, retrieval_size=40, seed=0))
    return root


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory) -> Path:
    """A tiny model's random weights, the runs' --pretrained: the start the locked tower must keep."""
    torch.manual_seed(123)
    config = ModelConfig(name=str(TINY))
    model, _, _, _ = build_model(config)
    path = tmp_path_factory.mktemp("start") / "start.pt"
    save_checkpoint(model, path, config=config)
    return path


def train(synth: Path, out: Path, start: Path, *extra: str) -> list[dict]:
    """Run helip-train without a miner (plain batches) and return its per-step loss records."""
    command = [
        sys.executable,
        "-m",
        "helip.trainer.app.cli",
        "--config",
        str(ROOT / "configs/demo.yaml"),
        "--train-data",
        str(synth / "train.csv"),
        "--output-dir",
        str(out),
        "--pretrained",
        str(start),
        "--batch-size",
        str(BATCH),
        "--hard-ratio",
        "0",
        "--hnml-weight",
        "0",
        "--set",
        "data.synth_dir=",
        "--set",
        "data.workers=0",
        "--set",
        "run.progress=false",
        "--set",
        "run.log_every=1",
        "--set",
        "optim.warmup_steps=1",
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def locked_run(synth, start_weights, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("locked")
    records = train(
        synth,
        out,
        start_weights,
        "--lock-image",
        "--steps",
        "5",
        "--checkpoint-every",
        "2",
        "--keep-checkpoints",
        "2",
    )
    return out, records


def test_locked_image_tower_is_bit_identical_and_the_text_tower_trained(locked_run, start_weights):
    out, records = locked_run
    assert [r["micro_step"] for r in records] == [0, 1, 2, 3, 4]
    start, final = weights(start_weights), weights(out / "final.pt")
    assert start.keys() == final.keys()
    image = [name for name in start if name.startswith("visual.")]
    text = [name for name in start if not name.startswith("visual.") and name != "logit_scale"]
    assert image and text
    for name in image:
        assert torch.equal(final[name], start[name]), name
    changed = [name for name in text if not torch.equal(final[name], start[name])]
    assert len(changed) == len(text), sorted(set(text) - set(changed))


def test_only_the_newest_resumable_checkpoints_remain_beside_epoch_and_final_weights(locked_run):
    out, _ = locked_run
    # Saved at steps 2, 4 and 5 (the end); step_2 went when step_5 came.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_4", "step_5"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_5"
    assert sorted(p.name for p in out.glob("*.pt")) == ["epoch_1.pt", "epoch_2.pt", "final.pt"]
    epoch_2 = torch.load(out / "epoch_2.pt", map_location="cpu", weights_only=True)
    assert epoch_2["epoch"] == 2 and epoch_2["step"] == 4
    final = torch.load(out / "final.pt", map_location="cpu", weights_only=True)
    assert final["step"] == 5 and "epoch" not in final


def test_open_clip_loads_the_exported_weights_itself(locked_run):
    out, _ = locked_run
    open_clip.add_model_config(TINY)
    final = weights(out / "final.pt")
    assert final["logit_scale"].dim() == 0  # open_clip's own layout, whatever DeepSpeed needed
    model, _, _ = open_clip.create_model_and_transforms(TINY.stem, pretrained=str(out / "final.pt"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, final[name]), name

    open_clip.load_checkpoint(model, str(out / "epoch_1.pt"))
    epoch_1 = weights(out / "epoch_1.pt")
    assert any(not torch.equal(epoch_1[name], final[name]) for name in final)  # a different file was read
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, epoch_1[name]), name

    ours, _, _, _ = build_model(ModelConfig(name=str(TINY)))
    assert load_checkpoint(ours, out / "final.pt")["step"] == 5


def test_helip_eval_reads_the_final_weights(locked_run, synth, tmp_path):
    out, _ = locked_run
    metrics_path = tmp_path / "eval.json"
    args = ["--model", str(TINY), "--checkpoint", str(out / "final.pt"), "--data", str(synth)]
    assert eval_main([*args, "--out", str(metrics_path), "--device", "cpu"]) == 0
    assert 0 <= json.loads(metrics_path.read_text())["zero_shot/top1"] <= 1


def test_resume_latest_with_grad_checkpointing_repeats_the_lost_step(locked_run, synth, start_weights, tmp_path):
    """A run that stopped right after saving step 4 resumes from `latest` there; with gradient checkpointing on,
    step 5 gives the loss the uninterrupted run without it gave."""
    out, plain = locked_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "step_5")
    (resumed / "checkpoints" / "latest").write_text("step_4")
    records = train(
        synth,
        resumed,
        start_weights,
        "--lock-image",
        "--grad-checkpointing",
        "--steps",
        "5",
        "--checkpoint-every",
        "2",
        "--keep-checkpoints",
        "2",
        "--resume",
        "latest",
    )
    assert [r["micro_step"] for r in records] == [4]
    assert records[0]["total"] == pytest.approx(plain[4]["total"], rel=1e-5)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["latest", "step_4", "step_5"]
    start, final = weights(start_weights), weights(resumed / "final.pt")
    assert all(torch.equal(final[name], start[name]) for name in start if name.startswith("visual."))
