"""docs/FROM_OPEN_CLIP.md's commands run as written: the migration page's examples cannot rot."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

PAGE = ROOT / "docs" / "FROM_OPEN_CLIP.md"


def page_commands() -> list[list[str]]:
    """The shell commands between the page's `commands: begin/end` markers, continuation lines joined."""
    text = PAGE.read_text()
    block = re.search(r"<!-- commands: begin -->\s*```bash\n(.*?)```\s*<!-- commands: end -->", text, re.S)
    assert block, "docs/FROM_OPEN_CLIP.md lost its commands block"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip()]


def resolve(argv: list[str]) -> list[str]:
    """The page's programs from this environment: console scripts next to this Python, `python` as this Python."""
    program, *rest = argv
    if program == "python":
        return [sys.executable, *rest]
    script = Path(sys.executable).parent / program
    assert script.exists(), f"the page runs {program}, which this install does not provide"
    return [str(script), *rest]


def test_the_pages_commands_run_as_written(tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the page's relative paths, from a user's checkout
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    commands = page_commands()
    assert [argv[0] for argv in commands] == ["helip-data", "helip-train", "helip-eval", "python"]
    for argv in commands:
        result = subprocess.run(resolve(argv), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{shlex.join(argv)} exited {result.returncode}:\n{result.stderr[-3000:]}"
        if argv[0] == "helip-eval":
            metrics = json.loads(result.stdout)
            assert 0.0 <= metrics["zero_shot/top1"] <= 1.0 and "retrieval/image_to_text_R@1" in metrics
    run = tmp_path / "runs" / "from-open-clip"
    assert {"final.pt", "epoch_1.pt", "epoch_2.pt"} <= {p.name for p in run.iterdir()}
    # --keep-checkpoints 1: one resumable checkpoint left.
    assert len([p for p in (run / "checkpoints").iterdir() if p.is_dir()]) == 1


def test_the_flag_table_names_only_flags_helip_train_accepts():
    help_text = subprocess.run(
        [sys.executable, "-m", "helip.trainer.app.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    table = PAGE.read_text().split("## Flag by flag", 1)[1].split("## Try it here", 1)[0]
    helip_cells = [line.split("|")[2] for line in table.splitlines() if line.startswith("| `--")]
    flags = {flag for cell in helip_cells for flag in re.findall(r"`(--[a-z][a-z0-9.\-_]*)", cell)}
    flags.discard("--mining.*")
    assert flags, "no helip flags found in the table"
    missing = sorted(flag for flag in flags if flag.rstrip("*") not in help_text)
    assert not missing, f"the page names flags helip-train --help does not list: {missing}"


def siglip_commands(page: Path) -> list[list[str]]:
    """The shell commands between a page's `siglip commands: begin/end` markers, continuation lines joined."""
    marks = r"<!-- siglip commands: begin -->\s*```bash\n(.*?)```\s*<!-- siglip commands: end -->"
    block = re.search(marks, page.read_text(), re.S)
    assert block, f"{page.name} lost its SigLIP commands block"
    return [shlex.split(line) for line in block.group(1).replace("\\\n", " ").splitlines() if line.strip()]


def test_the_siglip_commands_run_as_written(tmp_path):
    commands = siglip_commands(PAGE)
    assert siglip_commands(ROOT / "README.md") == commands, "README.md and docs/FROM_OPEN_CLIP.md differ"
    assert [argv[0] for argv in commands] == ["helip-data", "helip-train", "helip-eval"]
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for argv in commands:
        result = subprocess.run(resolve(argv), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{shlex.join(argv)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    metrics = json.loads(result.stdout)  # helip-eval's, on the SigLIP model it rebuilt from the checkpoint
    assert 0.0 <= metrics["zero_shot/top1"] <= 1.0
    saved = torch.load(tmp_path / "runs" / "siglip" / "final.pt", map_location="cpu", weights_only=True)
    bias = saved["state_dict"]["logit_bias"]  # SigLIP's learned bias, saved with the weights
    assert bias.numel() == 1 and torch.isfinite(bias).all()
