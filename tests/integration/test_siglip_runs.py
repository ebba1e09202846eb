"""helip-train with SigLIP's loss (`--siglip`, open_clip_train's switch) as real processes: one rank with its local
miner and the margin loss on, two ranks under torchrun, where SigLipLoss passes text features between the ranks."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.integration import test_train_runs
from tests.integration.test_train_runs import losses, run, train_command

pytestmark = pytest.mark.slow
synth = test_train_runs.synth  # the fixture: its 320 generated samples, once for this module


def check_siglip_run(out: Path, steps: int) -> list[dict]:
    """The run logged `steps` finite losses and its final checkpoint holds the logit_bias it learned."""
    records = losses(out)
    assert [r["micro_step"] for r in records] == list(range(steps))
    assert all(math.isfinite(r[name]) for r in records for name in ("total", "contrastive", "hnml")), records
    state = torch.load(out / "final.pt", map_location="cpu", weights_only=True)["state_dict"]
    bias = state["logit_bias"]
    assert bias.dim() == 0  # open_clip's own layout, as logit_scale
    assert math.isfinite(bias.item()) and bias.item() != -10.0  # started at open_clip_train's -10, then learned
    assert state["logit_scale"].item() != pytest.approx(math.log(1 / 0.07))  # SigLIP's start (log 10), not CLIP's
    assert json.loads((out / "eval" / "final.json").read_text())  # the SigLIP model evaluates
    return records


def test_one_rank_with_the_margin_loss(synth, tmp_path):
    out = tmp_path / "one"
    extra = ["--siglip", "--steps", "8", "--hnml-weight", "1", "--checkpoint-every", "0"]
    # Bootstrapped (a forward pass over the set before step one), so the batches hold hard pairs from the start
    # and the margin term has couples to act on.
    extra += ["--set", "mining.bootstrap_index=true"]
    run([sys.executable, "-m", "helip.trainer.app.cli", *train_command(synth, out, *extra)])
    records = check_siglip_run(out, 8)
    assert sum(r["n_hard"] for r in records) > 0
    assert any(r["total"] != r["contrastive"] for r in records)  # λ = 1: the margin term is in the total
    assert json.loads((out / "config.json").read_text())["loss"]["kind"] == "siglip"


def test_two_ranks_under_torchrun(synth, tmp_path, miner_factory):
    miner = miner_factory("--dim", "64")
    out = tmp_path / "two"
    extra = ["--siglip", "--miner", miner.address, "--steps", "6", "--checkpoint-every", "0"]
    extra += ["--set", "mining.namespace=siglip-two-ranks"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run([*command, "-m", "helip.trainer.app.cli", *train_command(synth, out, *extra)])
    check_siglip_run(out, 6)
    for rank in range(2):
        assert json.loads((out / f"rank{rank}.json").read_text())["mining"]["pushed_rows"] >= 6 * 16
