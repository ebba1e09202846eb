"""helip-train on the DataLoader pipeline, through the CLI with real processes: a miner stopped mid-run, a
miner holding another data set's rows, resume with a fresh local miner, damaged data, and SLURM-style ranks."""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.trainer.tools.synth import SynthConfig, generate
from tests.conftest import ROOT, free_port
from tests.integration.test_train_runs import losses, run, train_command

pytestmark = pytest.mark.slow

BATCH = 16  # 8 anchors + 8 hard slots per step


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(out_dir=root, train_size=320, test_size=80, seed=0))
    return root


def _step_times(records: list[dict]) -> list[float]:
    """Wall time between consecutive steps' ends: the step plus any wait for its batch."""
    return [b["time"] - a["time"] for a, b in zip(records, records[1:])]


def test_a_stopped_miner_does_not_slow_the_steps(synth, tmp_path, miner_factory):
    miner = miner_factory("--dim", "64")
    out = tmp_path / "stop"
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
                miner.address,
                "--steps",
                "100000",
                "--checkpoint-every",
                "0",
                "--set",
                "mining.bootstrap_index=true",
                "--set",
                "mining.deadline_s=1",
                "--set",
                "mining.breaker_max_cooldown_s=3",
            ),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log_path = out / "losses.jsonl"

    def steps_done() -> int:
        return len(log_path.read_text().splitlines()) if log_path.exists() else 0

    def wait_for(n: int, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while steps_done() < n:
            assert trainer.poll() is None and time.monotonic() < deadline, trainer.stdout.read()[-4000:]
            time.sleep(0.1)

    try:
        wait_for(40)
        stopped_at = time.time()
        miner.process.send_signal(signal.SIGSTOP)
        time.sleep(20)
        miner.process.send_signal(signal.SIGCONT)
        resumed_at = time.time()
        wait_for(steps_done() + 60)
    finally:
        miner.process.send_signal(signal.SIGCONT)
        trainer.send_signal(signal.SIGTERM)
        trainer.wait(60)
    records = losses(out)
    before = [r for r in records[5:] if r["time"] < stopped_at]
    during = [r for r in records if stopped_at + 1 <= r["time"] <= resumed_at]
    after = [r for r in records if r["time"] > resumed_at]
    median_before = statistics.median(_step_times(before))
    median_during = statistics.median(_step_times(during))
    assert len(during) > 20
    assert median_during <= 1.5 * median_before, (median_before, median_during)

    def filled(records):  # an anchor whose neighbours are all in the batch already gets a random sample
        return sum(r["n_hard"] for r in records) / (len(records) * BATCH // 2)

    assert filled(before[5:]) >= 0.95
    assert sum(r["n_fallback"] for r in during) > len(during) * 4  # the stop was felt: batches fell back...
    assert filled(after[-10:]) >= 0.95  # ...and hard pairs came back after SIGCONT


def test_a_miner_holding_another_data_sets_rows(synth, tmp_path, miner_factory):
    miner = miner_factory("--dim", "64")
    # A first run leaves this set's rows (ids 0..319) in the miner; from them we make 20,000 rows of "another
    # data set" with ids 320..20319: a noisy copy of each real row (so they are offered as neighbours) and
    # random rows for the rest. Then the real rows are deleted, as if only the other set had ever been there.
    run(
        [
            sys.executable,
            "-m",
            "helip.trainer.app.cli",
            *train_command(
                synth,
                tmp_path / "first",
                "--miner",
                miner.address,
                "--steps",
                "1",
                "--checkpoint-every",
                "0",
                "--set",
                "mining.bootstrap_index=true",
                "--set",
                "mining.namespace=shared",  # both runs on purpose: the same data set, one namespace
            ),
        ]
    )
    rng = np.random.default_rng(0)
    with MinerClient(ClientConfig(address=miner.address, namespace="shared")) as client:
        found, image, text = client.fetch(np.arange(320))
        assert found.all()

        def noisy(rows, scale):
            rows = rows.astype(np.float32) + scale * rng.standard_normal(rows.shape, dtype=np.float32)
            return rows / np.linalg.norm(rows, axis=1, keepdims=True)

        foreign_image = noisy(np.tile(image, (63, 1))[:20000], 0.15)
        foreign_text = noisy(np.tile(text, (63, 1))[:20000], 0.15)
        foreign_image[320:] = noisy(np.zeros_like(foreign_image[320:]), 1.0)
        for first in range(0, 20000, 5000):
            client.upsert(
                np.arange(320 + first, 320 + first + 5000, dtype=np.uint64),
                foreign_image[first : first + 5000],
                foreign_text[first : first + 5000],
                1,
            )
        client.delete(np.arange(320, dtype=np.uint64))
        assert client.stats().size == 20000
    out = tmp_path / "second"
    run(
        [
            sys.executable,
            "-m",
            "helip.trainer.app.cli",
            *train_command(
                synth,
                out,
                "--miner",
                miner.address,
                "--steps",
                "30",
                "--checkpoint-every",
                "0",
                "--set",
                "mining.bootstrap_index=true",
                "--set",
                "mining.namespace=shared",
            ),
        ]
    )
    records = losses(out)
    assert sum(r["n_hard"] for r in records) >= 0.9 * 30 * BATCH // 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mining"]["foreign_ids"] > 0


def test_resume_has_hard_pairs_from_its_first_step(synth, tmp_path):
    out = tmp_path / "resume"
    common = ("--steps", "30", "--checkpoint-every", "20", "--set", "mining.bootstrap_index=false")
    run([sys.executable, "-m", "helip.trainer.app.cli", *train_command(synth, out, *common)])  # its own local miner
    (out / "losses.jsonl").rename(out / "first-losses.jsonl")
    # The resumed run starts a new, empty local miner: it must bootstrap before its first step.
    run([sys.executable, "-m", "helip.trainer.app.cli", *train_command(synth, out, *common, "--resume", "step_20")])
    resumed = losses(out)
    assert [r["micro_step"] for r in resumed] == list(range(20, 30))
    filled = sum(r["n_hard"] for r in resumed) / (len(resumed) * BATCH // 2)
    assert filled >= 0.9, resumed


def _damage(synth: Path, out: Path, every: int) -> Path:
    """A copy of train.csv where every `every`-th row is bad: a missing file, garbage bytes or a blank caption."""
    rows = list(csv.DictReader(open(synth / "train.csv"), delimiter="\t"))
    out.mkdir()
    for i, row in enumerate(rows):
        row["filepath"] = str(synth / row["filepath"])
        if i % every == 0:
            kind = (i // every) % 3
            if kind == 0:
                row["filepath"] = str(out / f"missing-{i}.png")
            elif kind == 1:
                (out / f"corrupt-{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
                row["filepath"] = str(out / f"corrupt-{i}.png")
            else:
                row["title"] = ""
    path = out / "damaged.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_damaged_data_is_skipped_and_counted_until_too_much_of_it(synth, tmp_path):
    damaged = _damage(synth, tmp_path / "data", every=20)  # 16 of 320 bad: 5%
    command = train_command(
        synth,
        tmp_path / "ok",
        "--train-data",
        str(damaged),
        "--steps",
        "25",
        "--checkpoint-every",
        "0",
        "--set",
        "mining.bootstrap_index=true",
        "--set",
        "data.max_bad_fraction=0.2",
        "--set",
        "data.bad_min_samples=50",
    )
    result = run([sys.executable, "-m", "helip.trainer.app.cli", *command])
    record = json.loads((tmp_path / "ok" / "rank0.json").read_text())
    assert record["bad_samples"] > 0 and set(record["bad_by_kind"]) <= {
        "missing_file",
        "unreadable_image",
        "empty_caption",
    }
    assert "skipped bad sample" in result.stderr + result.stdout
    assert sum(r["n_hard"] for r in losses(tmp_path / "ok")[5:]) > 0

    strict = train_command(
        synth,
        tmp_path / "strict",
        "--train-data",
        str(damaged),
        "--steps",
        "25",
        "--checkpoint-every",
        "0",
        "--set",
        "data.max_bad_fraction=0.01",
        "--set",
        "data.bad_min_samples=50",
        "--hard-ratio",
        "0",
    )
    failed = subprocess.run(
        [sys.executable, "-m", "helip.trainer.app.cli", *strict],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert failed.returncode != 0
    assert "data.max_bad_fraction=1.0%" in failed.stderr


def test_slurm_srun_ranks(synth, tmp_path, miner_factory):
    """Two processes with the variables srun sets (and no RANK / WORLD_SIZE): one world of two ranks."""
    miner = miner_factory("--dim", "64")
    out = tmp_path / "slurm"
    command = [
        sys.executable,
        "-m",
        "helip.trainer.app.cli",
        *train_command(synth, out, "--miner", miner.address, "--steps", "4", "--checkpoint-every", "0"),
    ]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base.update(
        OMP_NUM_THREADS="1", SLURM_NTASKS="2", SLURM_JOB_ID="777", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    ranks = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    for rank in (0, 1):
        assert "launcher slurm" in outputs[rank] and f"rank {rank} of 2" in outputs[rank]
        assert json.loads((out / f"rank{rank}.json").read_text())["mining"]["pushed_rows"] >= 4 * BATCH
