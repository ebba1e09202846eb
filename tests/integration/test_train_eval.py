"""`helip-train` evaluating user layouts: an ImageFolder zero-shot task every epoch and a retrieval TSV at the end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from helip.trainer.pairs.data import read_csv_rows
from helip.trainer.tools.synth import SynthConfig, generate
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_short_run_evaluates_folders_every_epoch_and_everything_at_the_end(tmp_path):
    synth = generate(SynthConfig(out_dir=tmp_path / "synth", train_size=48, test_size=40, seed=2))
    names = json.loads(synth.zeroshot_json.read_text())["classnames"]
    for i, row in enumerate(read_csv_rows(synth.zeroshot_csv, ["filepath", "label"])):
        # Folder "07_red circle" sorts by class index; the names file maps each folder back to its class name.
        folder = tmp_path / "val" / f"{int(row['label']):02d}_{names[int(row['label'])]}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(synth.root / row["filepath"], folder / f"{i}.png")
    folders = sorted(p.name for p in (tmp_path / "val").iterdir())
    (tmp_path / "names.json").write_text(json.dumps({f: f.split("_", 1)[1] for f in folders}))
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na {} shape.\n")
    out = tmp_path / "run"
    # 48 samples, batch 16 with half of it hard pairs: 8 anchors a step, an epoch is 6 steps; 8 steps see one
    # epoch end mid-run (zero-shot at step 6) and the run's end (every evaluation).
    command = [
        sys.executable,
        "-m",
        "helip.trainer.app.cli",
        "--config",
        str(ROOT / "configs/demo.yaml"),
        "--train-data",
        str(synth.train_csv),
        "--eval-dir",
        str(synth.root),
        "--zeroshot-dir",
        str(tmp_path / "val"),
        "--zeroshot-classnames",
        str(tmp_path / "names.json"),
        "--zeroshot-templates",
        str(tmp_path / "templates.txt"),
        "--retrieval-data",
        str(synth.retrieval_csv),
        "--zeroshot-frequency",
        "1",
        "--output-dir",
        str(out),
        "--steps",
        "8",
        "--batch-size",
        "16",
        "--checkpoint-every",
        "0",
        "--set",
        "run.progress=false",
        "--set",
        "data.synth_dir=",
        "--set",
        "data.workers=0",
        "--set",
        "mining.bootstrap_index=false",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    assert sorted(p.name for p in (out / "eval").iterdir()) == ["final.json", "step_6.json"]
    epoch_end = json.loads((out / "eval" / "step_6.json").read_text())
    assert sorted(epoch_end) == ["zero_shot_folder/top1", "zero_shot_folder/top5"]
    final = json.loads((out / "eval" / "final.json").read_text())
    recalls = [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    assert sorted(final) == sorted(
        ["zero_shot/top1", "zero_shot/top5", "zero_shot_folder/top1", "zero_shot_folder/top5"]
        + [f"retrieval/{r}" for r in recalls]
        + [f"retrieval_csv/{r}" for r in recalls]
    )
    # The folders hold the synth task's images under the same class names and the CSV its retrieval rows: with
    # the synth templates differing, only retrieval must agree exactly.
    assert all(final[f"retrieval_csv/{r}"] == pytest.approx(final[f"retrieval/{r}"]) for r in recalls)
    assert all(0.0 <= v <= 1.0 for v in final.values())
