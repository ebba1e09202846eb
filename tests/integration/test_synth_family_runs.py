"""helip-train on a data family other than shapes: data.synth_family generates the set, trains and evaluates on it,
and a directory that holds another family's set is refused before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helip.trainer.tools.synth_families import family
from tests.conftest import ROOT
from tests.integration.test_train_runs import run

pytestmark = pytest.mark.slow


def helip_train(*args: str) -> list[str]:
    return [sys.executable, "-m", "helip.trainer.app.cli", "--config", str(ROOT / "configs/demo.yaml"), *args]


def test_a_run_generates_trains_and_evaluates_on_the_family_it_names(tmp_path):
    data, out = tmp_path / "counts", tmp_path / "run"
    settings = {
        "data.synth_dir": data,
        "data.synth_family": "counts",
        "data.synth_train": 64,
        "data.synth_test": 32,
        "optim.warmup_steps": 1,
        "run.progress": "false",
        "run.checkpoint_every": 0,
    }
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    run(helip_train("--output-dir", str(out), "--steps", "3", "--batch-size", "16", *sets))
    task = json.loads((data / "zeroshot.json").read_text())
    assert tuple(task["classnames"]) == family("counts").classnames
    assert len((data / "train.csv").read_text().splitlines()) == 1 + 64
    metrics = json.loads((out / "eval" / "final.json").read_text())
    assert 0 <= metrics["zero_shot/top1"] <= 1 and "retrieval/image_to_text_R@1" in metrics

    # The same directory asked for as another family: exit 2 naming the settings, before any training.
    refused = subprocess.run(
        helip_train("--output-dir", str(tmp_path / "other"), *sets, "--set", "data.synth_family=words"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert refused.returncode == 2
    assert "data.synth_family" in refused.stderr and "holds the counts set, not words" in refused.stderr
    assert not (tmp_path / "other").exists()
