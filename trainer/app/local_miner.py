"""The one-box default: a miner process started by the trainer itself, on a free 127.0.0.1 port.

Only global rank 0 starts it; the engine hands its address to the other ranks through the process group (no
file that several nodes could race on), and refuses to start one when the ranks span several hosts, where a
127.0.0.1 miner would not be reachable: such runs pass `--miner`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from helip.miner_service.core.config import DEVICE_DEFAULTS
from helip.miner_service.service.process import MinerProcess, spawn_miner

log = logging.getLogger(__name__)
# Beside training on the same GPU: the small scratch a CPU miner gets, not a GPU miner's 4 GiB per Mine, which a
# full training GPU may lack.
LOCAL_SCRATCH = DEVICE_DEFAULTS["cpu"]


def start_local_miner(run_dir: Path, dim: int, timeout_s: float = 120.0) -> MinerProcess:
    """A miner for this run alone, its log in `run_dir`; the caller stops it when the run ends."""
    miner = spawn_miner(
        run_dir,
        "--dim",
        str(dim),
        "--mine-scratch-bytes",
        str(LOCAL_SCRATCH["mine_scratch_bytes"]),
        "--scratch-budget-bytes",
        str(LOCAL_SCRATCH["scratch_budget_bytes"]),
        timeout_s=timeout_s,
        name="local-miner",
    )
    log.info("started a local miner at %s (metrics on :%s, log %s)", miner.address, miner.metrics_port, miner.log_path)
    return miner
