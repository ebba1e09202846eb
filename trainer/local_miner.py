"""The one-box default: a miner process started by the trainer itself, on a free 127.0.0.1 port.

Local rank 0 starts it and writes its address to a file in the run directory; the other local ranks wait for
that file, so every rank of the node talks to the same miner.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


class LocalMiner:
    def __init__(self, run_dir: Path, dim: int, local_rank: int, timeout_s: float = 120.0):
        self.process: subprocess.Popen | None = None
        self.port_file = run_dir / "local-miner.json"
        self.log_path = run_dir / "local-miner.log"
        if local_rank == 0:
            self.port_file.unlink(missing_ok=True)
            log_file = open(self.log_path, "w")
            self.process = subprocess.Popen(
                [sys.executable, "-m", "miner_service.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                 "--metrics-port", "0", "--dim", str(dim), "--port-file", str(self.port_file)],
                stdout=log_file, stderr=subprocess.STDOUT)
            log_file.close()
        deadline = time.monotonic() + timeout_s
        while not (self.port_file.exists() and self.port_file.read_text()):
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"local miner exited with {self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"local miner not up after {timeout_s} s; see {self.log_path}")
            time.sleep(0.05)
        ports = json.loads(self.port_file.read_text())
        self.address = f"127.0.0.1:{ports['port']}"
        self.metrics_port = ports.get("metrics_port")
        if self.process is not None:
            log.info("started a local miner at %s (metrics on :%s, log %s)", self.address, self.metrics_port,
                     self.log_path)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
