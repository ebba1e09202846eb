"""examples/hf_trainer.py (helip.HardPairTrainer, a transformers.Trainer) as real processes against a real miner:
tiny random CLIPModel and SiglipModel, DataLoader workers, gradient accumulation, a checkpoint and a resume from it,
one process and two under torchrun; and the README's commands as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.trainer.tools.synth import SynthConfig, generate
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers", reason="the hf extra: pip install 'helip[hf]'")

EMBED_DIM = 32  # examples/hf_trainer.py's tiny models
TRAIN_SIZE = 96  # micro-batches of 16 rows, half hard pairs: 8 anchors each, so an epoch is 12 (6 per rank of 2)
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(out_dir=root, train_size=TRAIN_SIZE, test_size=16, seed=0))
    return root


def run(argv: list, timeout_s: float = 240, cwd: Path = ROOT) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(list(map(str, argv)), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{shlex.join(map(str, argv))} exited {result.returncode}:\n{output[-8000:]}"
    return output


def example(*args, ranks: int = 1) -> list:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return [*launcher, ROOT / "examples" / "hf_trainer.py", *args]


def flags(synth: Path, address: str, *extra) -> list:
    """The example's flags for micro-batches of 16 rows with 2 DataLoader workers over `synth`, and `extra`."""
    return ["--train-data", synth / "train.csv", "--miner", address, "--batch-size", 16, "--workers", 2, *extra]


def summaries(output: str) -> dict[int, dict]:
    """{rank: the example's closing `helip summary` (HardPairTrainer.summary(), rank, global_step)}."""
    found = [json.loads(line) for line in re.findall(r"helip summary (\{.*\})", output)]
    return {summary["rank"]: summary for summary in found}


def train_logs(checkpoint: Path) -> list[dict]:
    """The Trainer's per-step log entries saved with a checkpoint (logging_steps=1: one per optimizer step)."""
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "loss" in entry]


def miner_rows(address: str, namespace: str) -> int:
    with MinerClient(ClientConfig(address=address, namespace=namespace)) as client:
        return client.stats().size


@pytest.mark.parametrize("model", ["clip", "siglip"])
def test_trains_with_hard_pairs_saves_and_resumes_where_it_stopped(model, synth, tmp_path, miner_factory):
    miner = miner_factory("--dim", str(EMBED_DIM))
    # 24 micro-batches of 16 rows: two epochs of anchors; a checkpoint halfway. No near-duplicate cut: after 12
    # steps the tiny random vision tower's embeddings all sit within 0.98 of each other (measured: 99% of pairs
    # above 0.987), so the resumed run, mining rows its first run pushed last, would have every candidate cut.
    common = flags(
        synth,
        miner.address,
        "--model",
        model,
        "--grad-accum",
        2,
        "--max-steps",
        12,
        "--save-steps",
        6,
        "--max-similarity",
        1,
    )
    first = tmp_path / "first"
    summary = summaries(run(example(*common, "--output-dir", first)))[0]
    assert summary["global_step"] == 12 and summary["batches"] == 24
    assert summary["pushed_rows"] == 24 * 16 and summary["mine_calls"] == 24
    # The miner starts empty; by the second epoch of anchors their rows are in, and hard pairs fill the batches.
    assert summary["hard"] > 0 and summary["mine_failures"] == 0, summary
    logs = train_logs(first / "checkpoint-12")
    assert [entry["step"] for entry in logs] == list(range(1, 13))
    assert [entry["helip/batch_step"] for entry in logs] == [2 * step - 1 for step in range(1, 13)]
    assert logs[0]["helip/hard_fraction"] == 0.0 and sum(entry["helip/hard_fraction"] for entry in logs[6:]) > 0
    assert miner_rows(miner.address, "hf-trainer") == TRAIN_SIZE  # epoch one's anchors are every sample

    # Resume from step 6 (into another output dir): the sampler starts at micro-batch 12, composes and mines only the
    # 12 micro-batches left, and the Trainer's own skip drops nothing real.
    resumed = tmp_path / "resumed"
    output = run(example(*common, "--output-dir", resumed, "--resume", first / "checkpoint-6"))
    assert "resumed at optimizer step 6: the hard-pair sampler starts at its step 12" in output
    summary = summaries(output)[0]
    assert summary["global_step"] == 12 and summary["batches"] == 12 and summary["mine_calls"] == 12, summary
    assert summary["hard"] > 0 and summary["mine_empty"] == 0, summary
    logs = train_logs(resumed / "checkpoint-12")
    assert [entry["step"] for entry in logs] == list(range(1, 13))  # 1..6 from the checkpoint, 7..12 trained now
    assert [entry["helip/batch_step"] for entry in logs[6:]] == [2 * step - 1 for step in range(7, 13)]
    # What the example saved loads back the Hugging Face way, offline.
    model_class = transformers.CLIPModel if model == "clip" else transformers.SiglipModel
    assert model_class.from_pretrained(resumed).logit_scale.isfinite()
    assert transformers.AutoProcessor.from_pretrained(resumed).tokenizer.model_max_length > 0


def test_two_ranks_under_torchrun_train_and_resume_mid_epoch(synth, tmp_path, miner_factory):
    miner = miner_factory("--dim", str(EMBED_DIM))
    # Epochs, not steps: 6 micro-batches an epoch per rank, accumulated by 4, so each epoch ends on a short step
    # (4 + 2) and the checkpoint of step 3 lies inside epoch two.
    common = flags(
        synth, miner.address, "--namespace", "two-ranks", "--grad-accum", 4, "--epochs", 2, "--save-steps", 3
    )
    first = tmp_path / "first"
    done = summaries(run(example(*common, "--output-dir", first, ranks=2)))
    assert sorted(done) == [0, 1]
    for summary in done.values():
        assert summary["global_step"] == 4 and summary["batches"] == 12 and summary["pushed_rows"] == 12 * 16
        assert summary["hard"] > 0, summary  # each rank mines for its own anchors, from rows both ranks pushed
    assert miner_rows(miner.address, "two-ranks") == TRAIN_SIZE

    output = run(example(*common, "--output-dir", tmp_path / "resumed", "--resume", first / "checkpoint-3", ranks=2))
    assert output.count("resumed at optimizer step 3: the hard-pair sampler starts at its step 10") == 2
    resumed = summaries(output)
    assert sorted(resumed) == [0, 1]
    for summary in resumed.values():  # the short last step of epoch two only: micro-batches 10 and 11
        assert summary["global_step"] == 4 and summary["batches"] == 2 and summary["last_step"] == 11, summary


def readme_commands(page: Path = README) -> list[list[str]]:
    """The shell commands between a page's `hf-trainer commands: begin/end` markers, continuations joined."""
    text = page.read_text()
    marks = r"<!-- hf-trainer commands: begin -->\s*```bash\n(.*?)```\s*<!-- hf-trainer commands: end -->"
    block = re.search(marks, text, re.S)
    assert block, "README.md lost its Hugging Face Trainer commands block"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line.split(" #")[0]) for line in joined.splitlines() if line.strip()]


def test_the_readme_commands_run_as_written(tmp_path, miner_factory):
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the README's relative paths, from a user's checkout
    commands = readme_commands()
    assert readme_commands(ROOT / "docs" / "FROM_OPEN_CLIP.md") == commands, "the two pages show different commands"
    assert [argv[0] for argv in commands] == ["helip-data", "helip-miner", "python", "torchrun"]
    address = written = None
    for program, *rest in commands:
        if program == "helip-miner":  # started the fixture's way: on a free port, stopped after the test
            assert rest[0] == "serve" and rest[-1] == "&" and "--port" in rest
            port = rest.index("--port")
            address, written = miner_factory(*rest[1:port], *rest[port + 2 : -1]).address, f"127.0.0.1:{rest[port + 1]}"
            continue
        rest = [address if arg == written else arg for arg in rest]
        launcher = {"python": [sys.executable], "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
        run([*launcher.get(program, [Path(sys.executable).parent / program]), *rest], cwd=tmp_path)
    for run_dir, model_class in [("hf-clip", transformers.CLIPModel), ("hf-siglip", transformers.SiglipModel)]:
        assert model_class.from_pretrained(tmp_path / "runs" / run_dir).logit_scale.isfinite()
    assert miner_rows(address, "hf-trainer") > 0 and miner_rows(address, "hf-siglip") > 0
