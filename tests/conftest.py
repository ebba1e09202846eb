"""Shared fixtures: real miner processes on free 127.0.0.1 ports."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Triton's interpreter runs the fused Mine kernel on CPU tensors (tests/unit/test_fused_kernel.py). It is chosen when
# triton is imported, and deepspeed and open_clip import triton while test modules are collected, so it is set here,
# before any of them. A machine with a CUDA device compiles the kernel instead (tests/gpu).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from helip.miner_service.service.process import MinerProcess, spawn_miner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def start_miner(workdir: Path, *args: str, env: dict | None = None, timeout_s: float = 60.0) -> MinerProcess:
    """Start `helip-miner serve` as its own process on free ports and wait until it serves."""
    return spawn_miner(workdir, *args, env=env, timeout_s=timeout_s, cwd=ROOT)


@pytest.fixture
def miner_factory(tmp_path):
    started: list[MinerProcess] = []

    def factory(*args: str, **kwargs) -> MinerProcess:
        miner = start_miner(tmp_path / "miner", *args, **kwargs)
        started.append(miner)
        return miner

    yield factory
    for miner in started:
        miner.stop(signal.SIGKILL if miner.process.poll() is None else signal.SIGTERM, timeout_s=5)


@pytest.fixture(scope="module")
def shared_miner(tmp_path_factory):
    """One miner (dim 16) for a module's read-mostly tests; tests that need a clean store start their own."""
    miner = start_miner(tmp_path_factory.mktemp("shared-miner"), "--dim", "16", "--max-k", "64")
    yield miner
    miner.stop()


@pytest.fixture
def redis_url() -> str:
    """The real Redis of this machine (REDIS_URL, default 127.0.0.1:6379); tests use a key prefix of their own."""
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def key_prefix(redis_url):
    import uuid

    import redis

    prefix = f"helip-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PrivateRedis:
    port: int
    directory: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        # AOF with fsync on every write: a Redis restart keeps every entry it confirmed.
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.5).ping():
                    return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of the test's own on a free port, which the test may stop and start."""
    server = PrivateRedis(free_port(), tmp_path / "redis")
    server.directory.mkdir()
    server.start()
    yield server
    server.stop()
