"""bench.scratch and bench.defaults on a user's own image-caption set (CSV in open_clip's format), not a generated
family: both train and compare, and the sweep reads back the runs that bench.scratch trained (same digests)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

# A few steps of a tiny cell: mining starts at step 2, ramps over 2 steps.
CELL = [
    "--steps", "6", "--batch-size", "16", "--warmup", "1", "--start-step", "2", "--ramp-steps", "2",
    "--start-coverage", "0.25", "--seeds", "0", "--jobs", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def own_set(tmp_path_factory) -> Path:
    """Image-caption pairs in CSV files, as a user would bring them (drawn by the synthetic generator)."""
    from helip.trainer.tools.synth import SynthConfig, ensure_generated

    root = tmp_path_factory.mktemp("own")
    return ensure_generated(SynthConfig(root / "pairs", 96, 48, 32, seed=0, family="counts")).root


def bench(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=400, cwd=ROOT)


def test_scratch_and_the_defaults_sweep_run_on_a_users_own_csv_and_share_their_runs(own_set, tmp_path):
    data = ["--train-data", str(own_set / "train.csv"), "--retrieval-data", str(own_set / "retrieval.csv")]
    scratch = bench("bench.scratch", *data, *CELL, "--work-dir", str(tmp_path / "runs" / "own"),
                    "--json-out", str(tmp_path / "scratch.json"))  # fmt: skip
    assert scratch.returncode == 0, scratch.stderr[-3000:]
    results = json.loads((tmp_path / "scratch.json").read_text())
    for arm in ("plain", "streaming"):
        r1 = results["metrics"][arm]["retrieval/image_to_text_R@1"]["mean"]
        assert 0 <= r1 <= 1  # from the retrieval CSV's own metric (retrieval_csv/...)
        # No zero-shot set was given: not measured, and said so rather than a made-up number
        assert math.isnan(results["metrics"][arm]["zero_shot/top1"]["mean"])
    plain = json.loads(next((tmp_path / "runs" / "own").glob("seed0-plain-*")).joinpath("config.json").read_text())
    assert plain["data"]["train"] == str(own_set / "train.csv") and not plain["data"]["synth_dir"]

    sweep = bench("bench.defaults", *data, *CELL, "--arms", "k=3", "--work-dir", str(tmp_path / "runs"),
                  "--json-out", str(tmp_path / "sweep.json"))  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    # plain and the defaults are bench.scratch's runs, read back; only the new arm trains
    assert "seed0-plain: read from" in sweep.stderr
    assert "seed0-streaming: read from" in sweep.stderr
    assert sweep.stderr.count(": training") == 1
    families = json.loads((tmp_path / "sweep.json").read_text())["families"]
    assert list(families) == ["own"]
    assert families["own"]["k 3"]["verdict"] in ("default holds", "arm ahead")
    assert "| own | k 3 |" in sweep.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train-data", "x.csv"], "give --retrieval-data (or --eval-dir)"),
        (["--retrieval-data", "x.csv"], "give it too"),
        (["--set", "optim.lr"], "--set 'optim.lr': expected KEY=VALUE"),
        (["--set", "mining.k=0"], "mining.k must be >= 1"),
    ],
)
def test_bad_own_data_flags_exit_2_before_any_run(args, message, tmp_path):
    refused = bench("bench.scratch", *args, "--work-dir", str(tmp_path / "w"))
    assert refused.returncode == 2, refused.stderr
    assert message in refused.stderr
    assert not (tmp_path / "w").exists()
