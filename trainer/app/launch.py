"""Where this process sits among the ranks, for every launcher we support.

torchrun and the deepspeed launcher set RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT);
SLURM's `srun` sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID instead; a plain command sets nothing and is a
world of one. `dist_env` reads any of these into one DistEnv, and `export` writes it back in the torchrun form
that torch.distributed and DeepSpeed read.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" (also the deepspeed launcher), "slurm", or "single"
    master_addr: str
    master_port: int

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValueError(
                f"inconsistent ranks from the {self.launcher} launcher: rank {self.rank}, world "
                f"size {self.world_size}, local rank {self.local_rank}"
            )

    def export(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"${name}={environ[name]!r} is not an integer") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(environ: Mapping[str, str]) -> DistEnv:
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            _int(environ, "RANK"),
            _int(environ, "WORLD_SIZE"),
            _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
            "torchrun",
            environ.get("MASTER_ADDR", "127.0.0.1"),
            int(environ.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        # The rendezvous host: MASTER_ADDR when the job script sets it, else the node srun was started from.
        master = environ.get("MASTER_ADDR") or environ.get("SLURM_LAUNCH_NODE_IPADDR") or "127.0.0.1"
        # One port per job, so that two jobs sharing a node do not collide.
        port = int(
            environ.get("MASTER_PORT") or 20000 + int(re.sub(r"\D", "", environ.get("SLURM_JOB_ID", "0")) or 0) % 20000
        )
        return DistEnv(
            _int(environ, "SLURM_PROCID"),
            _int(environ, "SLURM_NTASKS"),
            _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0,
            "slurm",
            master,
            port,
        )
    return DistEnv(0, 1, 0, "single", "127.0.0.1", free_port())
