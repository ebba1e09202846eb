"""Shared fixtures: real miner processes on free 127.0.0.1 ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class MinerProcess:
    process: subprocess.Popen
    port: int
    metrics_port: int | None
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_miner(workdir: Path, *args: str, env: dict | None = None, timeout_s: float = 60.0) -> MinerProcess:
    """Start `helip-miner serve` as its own process on free ports and wait until it serves."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"ports-{time.monotonic_ns()}.json"
    log_path = workdir / f"miner-{time.monotonic_ns()}.log"
    command = [
        sys.executable,
        "-m",
        "helip.miner_service.service.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--port-file",
        str(port_file),
        *args,
    ]
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        )
    deadline = time.monotonic() + timeout_s
    while not port_file.exists() or not port_file.read_text():
        if process.poll() is not None:
            raise RuntimeError(f"miner exited with {process.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"miner did not start in {timeout_s} s:\n{log_path.read_text()}")
        time.sleep(0.05)
    ports = json.loads(port_file.read_text())
    return MinerProcess(process, ports["port"], ports["metrics_port"], log_path)


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
