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
    command = [sys.executable, "-m", "miner_service.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--metrics-port", "0", "--port-file", str(port_file), *args]
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env={**os.environ, **(env or {})})
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
