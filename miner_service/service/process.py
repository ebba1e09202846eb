"""`helip-miner serve` as a child process on free 127.0.0.1 ports: the one way helip starts a miner of its own.

helip-train's one-box default, the tests' fixtures, the benchmarks and scripts/plot_metrics.py all start their
miners here. The miner binds port 0 and writes the ports it got to a file, so no two miners race for a port, and a
miner that dies while starting is reported with its log, not as a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class MinerProcess:
    """A running `helip-miner serve` and the ports it bound; stops on `stop()` or when its `with` block ends."""

    process: subprocess.Popen
    port: int
    metrics_port: int | None  # None or -1: no /metrics endpoint
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        """Everything the miner wrote to stdout and stderr so far."""
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        """Send `sig` (SIGTERM: drain in-flight requests, snapshot if durable), kill after `timeout_s`; the exit
        code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> MinerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def spawn_miner(
    workdir: Path,
    *args: str,
    env: dict | None = None,
    cwd: Path | None = None,
    timeout_s: float = 60.0,
    name: str = "miner",
) -> MinerProcess:
    """Start `helip-miner serve --host 127.0.0.1 --port 0 --metrics-port 0 *args` and wait until it serves.

    `args` come last, so they may override the defaults (`--metrics-port -1`). The log goes to
    `workdir/<name>-<n>.log`. A miner that exits first raises RuntimeError with its log; one that is not serving
    after `timeout_s` is killed and raises TimeoutError.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = time.monotonic_ns()
    port_file = workdir / f"{name}-{stamp}.ports.json"
    log_path = workdir / f"{name}-{stamp}.log"
    command = [sys.executable, "-m", "helip.miner_service.service.cli", "serve"]
    command += ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--port-file", str(port_file), *args]
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, **(env or {})}
        )
    deadline = time.monotonic() + timeout_s
    while not (ports := read_ports(port_file)):
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise TimeoutError(f"{name} did not start in {timeout_s} s:\n{log_path.read_text()}")
        time.sleep(0.05)
    return MinerProcess(process, ports["port"], ports.get("metrics_port"), log_path)


def read_ports(port_file: Path) -> dict | None:
    """The ports the miner wrote, or None while the file is missing or half written."""
    try:
        return json.loads(port_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
