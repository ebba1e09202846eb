"""Whole training runs as real processes: one rank, two ranks with torchrun, save and resume, CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.trainer.tools.synth import SynthConfig, generate
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(out_dir=root, train_size=320, test_size=80, seed=0))
    return root


def train_command(synth: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs/demo.yaml"),
        "--train-data",
        str(synth / "train.csv"),
        "--eval-dir",
        str(synth),
        "--output-dir",
        str(out),
        "--batch-size",
        "16",
        "--set",
        "run.progress=false",
        "--set",
        "data.synth_dir=",
        "--set",
        "run.log_every=5",
        "--set",
        "mining.bootstrap_index=false",
        *extra,
    ]


def run(command: list[str], timeout_s: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


def test_two_ranks_push_and_receive_hard_pairs(synth, tmp_path, miner_factory):
    miner = miner_factory("--dim", "64")
    out = tmp_path / "ddp"
    # 320 samples, 2 ranks x 8 anchors: an epoch is 20 steps; from epoch two on every anchor is indexed.
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "helip.trainer.app.cli",
            *train_command(
                synth,
                out,
                "--miner",
                miner.address,
                "--steps",
                "28",
                "--set",
                "run.record_ids=true",
                "--set",
                "mining.namespace=two-ranks",
                "--checkpoint-every",
                "0",
            ),
        ]
    )
    seen = set()
    for rank in range(2):
        record = json.loads((out / f"rank{rank}.json").read_text())
        assert record["mining"]["pushed_rows"] >= 28 * 16  # every rank pushed every step
        assert record["hard"] > 0, record  # and got hard pairs back
        seen |= set(np.load(out / f"seen-ids-rank{rank}.npy").tolist())
    with MinerClient(ClientConfig(address=miner.address, namespace="two-ranks")) as client:
        assert client.stats().size == len(seen)
    assert (out / "final.pt").exists() and json.loads((out / "eval" / "final.json").read_text())


def test_resume_continues_at_the_same_step_with_the_same_loss(synth, tmp_path):
    first = tmp_path / "first"
    # Mining off: the answers of a miner (and so the batches) depend on its state, a run without one does not.
    plain = [
        "--hard-ratio",
        "0",
        "--hnml-weight",
        "0",
        "--steps",
        "6",
        "--checkpoint-every",
        "3",
        "--set",
        "optim.warmup_steps=2",
    ]
    run([sys.executable, "-m", "helip.trainer.app.cli", *train_command(synth, first, *plain)])
    uninterrupted = losses(first)
    assert [r["micro_step"] for r in uninterrupted] == list(range(6))

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(first / "checkpoints", resumed / "checkpoints")
    run([sys.executable, "-m", "helip.trainer.app.cli", *train_command(synth, resumed, *plain, "--resume", "step_3")])
    again = losses(resumed)
    assert [r["micro_step"] for r in again] == [3, 4, 5]
    for a, b in zip(uninterrupted[3:], again):
        assert b["total"] == pytest.approx(a["total"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(
    "args, field",
    [
        (["--steps", "many"], "optim.steps"),
        (["--set", "optim.nosuch=1"], "nosuch"),
        (["--set", "optim.hard_ratio=1.5"], "hard_ratio"),
        (["--set", "novalue"], "KEY=VALUE"),
        (["--set", "run.progress=ture"], "run.progress: expected a boolean"),
    ],
)
def test_cli_rejects_bad_settings_with_exit_2(args, field):
    result = subprocess.run(
        [sys.executable, "-m", "helip.trainer.app.cli", "--config", str(ROOT / "configs/demo.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert field in result.stderr


def test_training_survives_a_miner_restart(synth, tmp_path, miner_factory, redis_url, key_prefix):
    port = free_port()
    snapshots = str(tmp_path / "snapshots")
    args = ("--dim", "64", "--port", str(port), "--redis-url", redis_url, "--key-prefix", key_prefix)
    args += ("--snapshot-dir", snapshots)
    miner = miner_factory(*args)
    out = tmp_path / "restart"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "helip.trainer.app.cli",
            *train_command(
                synth,
                out,
                "--miner",
                f"127.0.0.1:{port}",
                "--steps",
                "150",
                "--checkpoint-every",
                "0",
                "--set",
                "mining.bootstrap_index=true",
                "--set",
                "mining.deadline_s=0.5",
            ),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log_path = out / "losses.jsonl"
    deadline = time.monotonic() + 300
    while not (log_path.exists() and len(log_path.read_text().splitlines()) >= 20):
        assert trainer.poll() is None and time.monotonic() < deadline, trainer.stdout.read()[-4000:]
        time.sleep(0.1)
    miner.process.send_signal(signal.SIGKILL)
    miner.process.wait()
    killed_at = len(log_path.read_text().splitlines())
    time.sleep(2.0)
    miner_factory(*args)  # same port, same log: it comes back with every acknowledged row
    output, _ = trainer.communicate(timeout=600)
    assert trainer.returncode == 0, output[-4000:]
    records = losses(out)
    assert len(records) == 150
    before, after = records[:killed_at], records[killed_at:]
    # Bootstrapped: hard pairs from the start (an anchor whose neighbours are all in the batch already gets a
    # random sample, hence not exactly every slot).
    assert sum(r["n_hard"] for r in before[2:]) >= 0.95 * 8 * len(before[2:])
    assert sum(r["n_fallback"] for r in after) > 0  # the outage was felt and counted...
    assert after[-1]["n_hard"] == 8 and after[-1]["n_fallback"] == 0  # ...and hard pairs came back
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mining"]["mine_failures"] + summary["mining"]["mine_late"] > 0


def test_zero2_bf16_with_gradient_accumulation(synth, tmp_path):
    """ZeRO stage 2 in bf16 (the CPU accelerator has it) with two micro-batches per optimizer step."""
    config = json.loads((ROOT / "configs/deepspeed/zero2.json").read_text())
    config["gradient_accumulation_steps"] = 2
    (tmp_path / "ds.json").write_text(json.dumps(config))
    out = tmp_path / "zero2"
    run(
        [
            sys.executable,
            "-m",
            "helip.trainer.app.cli",
            *train_command(
                synth,
                out,
                "--steps",
                "3",
                "--checkpoint-every",
                "0",
                "--deepspeed-config",
                str(tmp_path / "ds.json"),
                "--set",
                "model.precision=bf16",
            ),
        ]
    )
    assert [r["micro_step"] for r in losses(out)] == list(range(6))
    assert json.loads((out / "eval" / "final.json").read_text())["zero_shot/top1"] >= 0
    assert (out / "checkpoints" / "step_3").is_dir()
