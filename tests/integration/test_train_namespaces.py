"""A training run claims its namespace on a shared miner: another data set's namespace is refused through the
CLI with both fingerprints named, `mining.reset_namespace=true` proceeds, and other namespaces stay untouched."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.trainer.pairs.data import read_pairs
from helip.trainer.pairs.namespace import dataset_fingerprint
from helip.trainer.tools.synth import SynthConfig, generate
from tests.conftest import ROOT
from tests.integration.test_train_runs import train_command

pytestmark = pytest.mark.slow
DIM = 64  # the demo model's embedding dim


class Captions:
    """What dataset_fingerprint needs of a data set: its length and captions (no images decoded)."""

    def __init__(self, csv_path):
        self.pairs = read_pairs(csv_path)

    def __len__(self):
        return len(self.pairs)

    def caption(self, i):
        return self.pairs[i][1]


def helip_train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "helip.trainer.app.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


@pytest.mark.timeout(1500)  # two trainer starts; each imports DeepSpeed, minutes on a loaded 2-core box
def test_a_namespace_of_another_data_set_is_refused_and_reset_proceeds(tmp_path, miner_factory):
    synth = tmp_path / "synth"
    generate(SynthConfig(out_dir=synth, train_size=96, test_size=32, seed=0))
    miner = miner_factory("--dim", str(DIM))
    planted = MinerClient(ClientConfig(address=miner.address, wire_dtype=pb.FLOAT32, namespace="shared"))
    planted.wait_ready(30)
    other_fingerprint = "samples=5;captions=0123456789abcdef"
    assert planted.ensure_namespace(dim=DIM, fingerprint=other_fingerprint).created
    rows = np.eye(DIM, dtype=np.float32)[:5]
    planted.upsert(np.arange(5), rows, rows, 1)
    bystander = MinerClient(ClientConfig(address=miner.address, wire_dtype=pb.FLOAT32, namespace="bystander"))
    bystander.upsert(np.arange(3), rows[:3], rows[:3], 1)

    ours = dataset_fingerprint(Captions(synth / "train.csv"))
    common = [
        *train_command(synth, tmp_path / "run", "--steps", "2", "--miner", miner.address),
        "--set",
        "mining.namespace=shared",
        "--set",
        "data.workers=0",
        "--set",
        "run.checkpoint_every=0",
    ]
    refused = helip_train(*common)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert other_fingerprint in refused.stderr and ours in refused.stderr, refused.stderr[-3000:]
    assert "mining.reset_namespace=true" in refused.stderr and "mining.namespace" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert planted.stats().size == 5  # refused before any write

    done = helip_train(*common, "--set", "mining.reset_namespace=true")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    stats = planted.stats()
    listed = {n.name: n for n in stats.namespaces}
    assert listed["shared"].fingerprint == ours and listed["shared"].dim == DIM
    assert listed["bystander"].rows == 3 and listed["bystander"].fingerprint == ""
    found, image, _ = planted.fetch(np.arange(5))  # the planted rows went with the reset
    assert not found.any() or not np.allclose(image, rows[found])
    planted.close()
    bystander.close()
