"""The examples in examples/ run as their own processes, against a real miner, on a small synthetic set."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.trainer.tools.synth import SynthConfig, generate
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

EMBED_DIM = json.loads((ROOT / "configs/models/helip-tiny.json").read_text())["embed_dim"]
TRAIN_SIZE = 200  # batches of 16 rows, half hard pairs: 8 anchors a step, so an epoch is 25 steps


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(out_dir=root, train_size=TRAIN_SIZE, test_size=16, seed=0))
    return root


def run_example(script: str, *args, expect_rc: int = 0, timeout_s: float = 180) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    output = result.stdout + result.stderr
    assert result.returncode == expect_rc, output[-8000:]
    return output


def miner_rows(address: str, namespace: str = "") -> int:
    with MinerClient(ClientConfig(address=address, namespace=namespace)) as client:
        return client.stats().size


def plain_loop_args(train_csv: Path, address: str, final: Path) -> list:
    """examples/plain_loop.py's flags for 30 steps of 16 rows on CPU against the miner at `address`."""
    return [
        "--train-data",
        train_csv,
        "--miner",
        address,
        "--steps",
        30,
        "--batch-size",
        16,
        "--workers",
        1,
        "--device",
        "cpu",
        "--output",
        final,
    ]


def check_plain_loop(output: str, address: str, final: Path, loss: str = "clip") -> None:
    """What a plain_loop.py run with `plain_loop_args` (and `--loss loss`) over TRAIN_SIZE samples must have done
    (also after a wheel install, tests/integration/test_wheel.py)."""
    fractions = [float(f) for f in re.findall(r"step \d+ loss [0-9.]+ .*?hard fraction ([0-9.]+)", output)]
    assert len(fractions) == 30, output[-4000:]
    # The miner starts empty (step 0 has no hard pair); once the first steps' embeddings are in, anchors get them.
    assert fractions[0] == 0.0
    assert sum(fractions[15:]) > 0, fractions
    assert max(fractions) <= 0.5  # --hard-ratio 0.5: at most half the rows are hard pairs
    # 25 steps of 8 anchors cover every sample once: each was pushed under its own id.
    assert miner_rows(address, "plain-loop") == TRAIN_SIZE  # the example's namespace
    assert miner_rows(address) == 0
    state = torch.load(final, map_location="cpu", weights_only=True)
    assert "logit_scale" in state and all(torch.isfinite(t).all() for t in state.values())
    assert ("logit_bias" in state) == (loss == "siglip")  # SigLIP's learned bias, as open_clip_train --siglip


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_plain_loop_trains_with_hard_pairs_and_fills_the_miner(synth, tmp_path, miner_factory, loss):
    miner = miner_factory("--dim", str(EMBED_DIM))
    final = tmp_path / "final.pt"
    args = plain_loop_args(synth / "train.csv", miner.address, final)
    guard = ["--positive-ratio", 0.95] if loss == "siglip" else []  # one run with the false-negative guard on
    output = run_example("plain_loop.py", *args, "--loss", loss, *guard)
    check_plain_loop(output, miner.address, final, loss)
    metrics = urllib.request.urlopen(miner.metrics_url, timeout=10).read().decode()
    assert ('helip_miner_guard_dropped_total{namespace="plain-loop"}' in metrics) == bool(guard)


def test_plain_loop_without_a_miner_says_how_to_start_one(synth):
    output = run_example("plain_loop.py", "--train-data", synth / "train.csv", expect_rc=2, timeout_s=60)
    assert "--miner HOST:PORT is required" in output and "helip-miner serve --dim" in output


def open_clip_train_args(train_csv: Path, address: str, logs: Path, name: str, epochs: int) -> list:
    """examples/open_clip_train_helip.py's flags: `epochs` of 16-row batches of the tiny model on CPU, no reports."""
    return [
        "--helip-miner",
        address,
        "--train-data",
        train_csv,
        "--dataset-type",
        "csv",
        "--csv-separator",
        "\t",
        "--csv-img-key",
        "filepath",
        "--csv-caption-key",
        "title",
        "--model",
        "helip-tiny",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--epochs",
        epochs,
        "--batch-size",
        16,
        "--workers",
        1,
        "--warmup",
        2,
        "--logs",
        logs,
        "--name",
        name,
        "--report-to",
        "",
        "--log-every-n-steps",
        5,
    ]


def test_open_clip_train_runs_with_the_hard_pair_plugin(synth, tmp_path, miner_factory):
    pytest.importorskip("pandas", reason="open_clip_train.data imports pandas (open_clip_torch[training])")
    miner = miner_factory("--dim", str(EMBED_DIM))
    logs = tmp_path / "logs"
    args = open_clip_train_args(synth / "train.csv", miner.address, logs, "helip", 2)
    output = run_example("open_clip_train_helip.py", *args)

    epochs = re.findall(r"helip epoch (\d+): hard fraction ([0-9.]+) over (\d+) batches", output)
    assert [(e, int(n)) for e, _, n in epochs] == [("0", 25), ("1", 25)], output[-4000:]
    assert float(epochs[0][1]) > 0 and float(epochs[1][1]) > 0, epochs
    assert "helip step 25:" in output  # epoch 1 continued the step count: set_epoch reached the sampler
    # The rows went to the run's own namespace (open_clip's --name), tagged with the data set's fingerprint.
    with MinerClient(miner.address) as client:
        spaces = {info.name: info for info in client.stats().namespaces}
    assert spaces["helip"].rows == TRAIN_SIZE, spaces
    assert spaces["helip"].fingerprint.startswith(f"samples={TRAIN_SIZE};"), spaces
    assert spaces["default"].rows == 0
    # open_clip's own loop logged helip's loss terms, and saved its checkpoints and log.
    run = logs / "helip"
    assert "Hnml_loss" in (run / "out.log").read_text()
    checkpoint = torch.load(run / "checkpoints" / "epoch_2.pt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 2 and "logit_scale" in checkpoint["state_dict"]
    assert (run / "checkpoints" / "epoch_1.pt").exists() and (run / "params.txt").exists()


def test_open_clip_train_runs_siglip_with_the_hard_pair_plugin(synth, tmp_path, miner_factory):
    pytest.importorskip("pandas", reason="open_clip_train.data imports pandas (open_clip_torch[training])")
    miner = miner_factory("--dim", str(EMBED_DIM))
    logs = tmp_path / "logs"
    args = open_clip_train_args(synth / "train.csv", miner.address, logs, "siglip", 1)
    output = run_example("open_clip_train_helip.py", *args, "--siglip", "--helip-hnml-weight", 1)

    epochs = re.findall(r"helip epoch (\d+): hard fraction ([0-9.]+) over (\d+) batches", output)
    assert [(e, int(n)) for e, _, n in epochs] == [("0", 25)] and float(epochs[0][1]) > 0, output[-4000:]
    # open_clip's loop logged the sigmoid loss and the margin term (its "Name: value (mean)"), finite
    run = logs / "siglip"
    logged = re.findall(r"(Contrastive_loss|Hnml_loss): (\S+) \((\S+)\)", (run / "out.log").read_text())
    assert {name for name, _, _ in logged} == {"Contrastive_loss", "Hnml_loss"}, logged
    assert all(math.isfinite(float(value)) for _, *values in logged for value in values), logged
    checkpoint = torch.load(run / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)
    bias = checkpoint["state_dict"]["logit_bias"]  # open_clip_train --siglip starts it at -10; it learned since
    assert math.isfinite(bias.item()) and bias.item() != -10.0
