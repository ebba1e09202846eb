"""The Redis log stays bounded: a leader needs a snapshot directory, and each snapshot trims the log below the
oldest snapshot kept. Against the machine's real Redis, under a key prefix of the test's own."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import redis

from helip.miner_service.core.config import SearchConfig
from helip.miner_service.core.miner import HardPairMiner
from helip.miner_service.service.config import DurabilityConfig
from helip.miner_service.service.durable import DurableMiner
from tests.conftest import ROOT
from tests.reference import random_pairs

DIM = 8


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "helip.miner_service.service.cli", "serve", "--dim", str(DIM), "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_a_leader_with_a_log_and_no_snapshot_dir_exits_2_naming_the_flag(redis_url, key_prefix):
    result = serve("--redis-url", redis_url, "--key-prefix", key_prefix)
    assert result.returncode == 2
    assert "--snapshot-dir" in result.stderr and "grows without bound" in result.stderr


def test_the_miner_logs_its_redis_url_with_the_password_masked():
    """A follower (no snapshot dir needed) of a Redis that is not there: it logs the URL, then fails to start."""
    result = serve("--follow", "--redis-url", "redis://helip:hunter2-not-logged@127.0.0.1:1/0")
    assert result.returncode != 0
    assert "redis://helip:***@127.0.0.1:1/0" in result.stderr
    assert "hunter2-not-logged" not in result.stderr + result.stdout


def test_each_snapshot_trims_the_log_below_the_oldest_snapshot_kept(redis_url, key_prefix, tmp_path):
    config = DurabilityConfig(
        redis_url=redis_url, key_prefix=key_prefix, snapshot_dir=str(tmp_path / "snapshots"), keep_snapshots=2
    )
    durable = DurableMiner(HardPairMiner(DIM, SearchConfig(device="cpu")), config)
    durable.recover()
    stream = redis.Redis.from_url(redis_url)
    rng = np.random.default_rng(0)

    def write(batches: int) -> None:
        for _ in range(batches):
            ids = rng.choice(1000, 16, replace=False).astype(np.uint64)
            image, text = random_pairs(rng, 16, DIM)
            durable.upsert(ids, image, text, 1)

    lengths = []
    for batches in (50, 30, 20, 10):
        write(batches)
        assert stream.xlen(config.stream) >= batches  # nothing trimmed between snapshots
        durable.snapshot_now()
        lengths.append(stream.xlen(config.stream))
    # The log keeps what the older of the two kept snapshots does not cover: the writes since it, plus the entry
    # at its offset (trimming keeps ids >= that offset).
    assert lengths == [1, 30 + 1, 20 + 1, 10 + 1]
    assert len(list((tmp_path / "snapshots").glob("snap-*"))) == 2

    # What the trimmed log and the snapshots hold together is every row: a new miner restores the same store.
    restored = DurableMiner(HardPairMiner(DIM, SearchConfig(device="cpu")), config)
    restored.recover()
    assert restored.size == durable.size
    ids = np.arange(1000, dtype=np.uint64)
    for restored_part, written_part in zip(restored.fetch(ids), durable.fetch(ids)):
        np.testing.assert_array_equal(restored_part, written_part)
    stream.close()
