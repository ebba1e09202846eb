"""The one-box default: a miner process started by the trainer itself, on a free 127.0.0.1 port.

Only global rank 0 starts it; the engine hands its address to the other ranks through the process group (no
file that several nodes could race on), and refuses to start one when the ranks span several hosts, where a
127.0.0.1 miner would not be reachable: such runs pass `--miner`.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from helip.miner_service.core.config import DEVICE_DEFAULTS

log = logging.getLogger(__name__)
# Beside training on the same GPU: the small scratch a CPU miner gets, not a GPU miner's 4 GiB per Mine, which a
# full training GPU may lack.
LOCAL_SCRATCH = DEVICE_DEFAULTS["cpu"]


class LocalMiner:
    def __init__(self, run_dir: Path, dim: int, timeout_s: float = 120.0):
        self.port_file = run_dir / "local-miner.json"
        self.log_path = run_dir / "local-miner.log"
        self.port_file.unlink(missing_ok=True)
        with open(self.log_path, "w") as log_file:
            self.process = subprocess.Popen(
                [
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
                    "--dim",
                    str(dim),
                    "--port-file",
                    str(self.port_file),
                    "--mine-scratch-bytes",
                    str(LOCAL_SCRATCH["mine_scratch_bytes"]),
                    "--scratch-budget-bytes",
                    str(LOCAL_SCRATCH["scratch_budget_bytes"]),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while not (self.port_file.exists() and self.port_file.read_text()):
            if self.process.poll() is not None:
                raise RuntimeError(f"local miner exited with {self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise TimeoutError(f"local miner not up after {timeout_s} s; see {self.log_path}")
            time.sleep(0.05)
        ports = json.loads(self.port_file.read_text())
        self.address = f"127.0.0.1:{ports['port']}"
        self.metrics_port = ports.get("metrics_port")
        log.info("started a local miner at %s (metrics on :%s, log %s)", self.address, self.metrics_port, self.log_path)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
