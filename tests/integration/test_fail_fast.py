"""Mistakes that no retry can fix stop `helip-train` at once, naming the cause: a mining.k above the miner's max_k,
a wrong token, a namespace of another dim. Each run exits 1 before its first step, without a traceback, and the
miner stores nothing from it. (Outages are the other kind: tests/integration/test_fault_drills.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.trainer.tools.synth import SynthConfig, generate
from tests.conftest import ROOT
from tests.integration.test_train_runs import train_command

pytestmark = pytest.mark.slow
DIM = 64  # the demo model's embedding dim
TOKEN = "the-right-token"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(out_dir=root, train_size=64, test_size=16, seed=0))
    return root


def helip_train(synth, out, miner_address: str, *settings: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "helip.trainer.app.cli"]
    command += train_command(synth, out, "--steps", "50", "--miner", miner_address, "--set", "data.workers=0")
    for setting in settings:
        command += ["--set", setting]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HELIP_AUTH_TOKEN", None)
    # How soon is a benchmark's business (a refusal is one Stats call after start-up); the timeout only catches a hang.
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def assert_refused_before_training(result: subprocess.CompletedProcess, *named: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    for text in named:
        assert text in output, (text, output[-4000:])
    assert "Traceback" not in output, output[-4000:]
    assert " step 1 " not in output and "random pairs" not in output, output[-4000:]


def test_k_above_the_miners_max_k_stops_the_run(synth, tmp_path, miner_factory):
    miner = miner_factory("--dim", str(DIM), "--max-k", "32")
    result = helip_train(synth, tmp_path / "run", miner.address, "mining.k=50")
    assert_refused_before_training(result, "mining.k is 50", "max_k=32", "--max-k 50")


def test_a_wrong_token_stops_the_run(synth, tmp_path, miner_factory):
    miner = miner_factory("--dim", str(DIM), env={"HELIP_AUTH_TOKEN": TOKEN})
    token_file = tmp_path / "token"
    token_file.write_text("not-the-token\n")
    result = helip_train(synth, tmp_path / "run", miner.address, f"mining.token_file={token_file}")
    assert_refused_before_training(result, "UNAUTHENTICATED", "mining.token_file")
    with MinerClient(ClientConfig(address=miner.address, token=TOKEN)) as client:
        assert client.stats().size == 0


def test_a_namespace_of_another_dim_stops_the_run(synth, tmp_path, miner_factory):
    miner = miner_factory("--dim", str(DIM))
    planted = MinerClient(ClientConfig(address=miner.address, wire_dtype=pb.FLOAT32, namespace="narrow"))
    planted.wait_ready(30)
    rows = np.eye(32, dtype=np.float32)[:4]
    planted.upsert(np.arange(4), rows, rows, 1)  # creates "narrow" with dim 32 and no fingerprint
    result = helip_train(synth, tmp_path / "run", miner.address, "mining.namespace=narrow")
    assert_refused_before_training(result, "'narrow'", "holds dim 32", "have dim 64", "mining.namespace")
    assert planted.stats().size == 4
    planted.close()
