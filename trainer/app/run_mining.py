"""A distributed run's side of online mining: which miner, which namespace, the pusher, and when to bootstrap.

Every rank holds one `RunMining`. Decisions that must agree across ranks (the local miner's address, the namespace
claim, whether to bootstrap) are taken on global rank 0 and broadcast, so no rank mines against a different miner
or stops alone.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from pathlib import Path

import torch.distributed as dist

from helip.miner_service.service.process import MinerProcess
from helip.trainer.app.local_miner import start_local_miner
from helip.trainer.pairs.bootstrap import bootstrap_index
from helip.trainer.pairs.mining import MiningConfig
from helip.trainer.pairs.namespace import NamespaceMismatch, dataset_fingerprint, run_namespace
from helip.trainer.pairs.refusals import MinerRefused
from helip.trainer.pairs.session import MiningSession

log = logging.getLogger(__name__)


def broadcast(value, src: int = 0):
    """`value` of rank `src`, on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def refuse_local_miner_across_hosts(hosts: list[str], dim: int) -> None:
    """A local miner listens on 127.0.0.1 of one host: ranks on other hosts could not reach it."""
    distinct = sorted(set(hosts))
    if len(distinct) > 1:
        raise RuntimeError(
            f"these {len(hosts)} ranks run on {len(distinct)} hosts ({', '.join(distinct)}) and no --miner was "
            f"given; a local miner would be reachable from one host only. Start one miner for the run "
            f"(`helip-miner serve --dim {dim} --host 0.0.0.0 --port 50051`, with a token or TLS) and pass "
            f"--miner HOST:50051 to every rank."
        )


class RunMining:
    """The distributed wrapper of a MiningSession: every rank holds one, connected to the run's miner and namespace;
    `close` stops what it started (idempotent).

    config.address empty: global rank 0 starts a local miner and every rank is told its address. The namespace is
    config.namespace or the output dir's name; rank 0 starts the session (claims the namespace with the data set's
    fingerprint, checks dim and k against the miner) and every rank raises what it refused: NamespaceMismatch or
    MinerRefused.
    """

    def __init__(self, config: MiningConfig, output_dir: Path, dataset, embed_dim: int, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.dataset = dataset
        self.local_miner: MinerProcess | None = None
        self.session: MiningSession | None = None  # set below; close() may run before (a refused namespace)
        self._closed = False
        self.config = dataclasses.replace(
            config,
            address=self._address(config.address, output_dir, embed_dim),
            namespace=config.namespace or run_namespace(output_dir),
        )
        self.session = MiningSession(self.config)
        self._start(embed_dim)
        self.pusher = self.session.pusher()

    @property
    def client(self):
        return self.session.client

    def _address(self, configured: str, output_dir: Path, embed_dim: int) -> str:
        if configured:
            return configured
        hosts = [None] * self.world_size
        dist.all_gather_object(hosts, socket.gethostname())
        refuse_local_miner_across_hosts(hosts, embed_dim)
        address = None
        if self.is_main:
            self.local_miner = start_local_miner(output_dir, embed_dim)
            address = self.local_miner.address
        return broadcast(address)

    def _start(self, embed_dim: int) -> None:
        """Rank 0 starts the session; every rank raises what the miner refused, as the same error type."""
        refused = None
        if self.is_main:
            try:
                self.session.start(embed_dim, fingerprint=dataset_fingerprint(self.dataset))
            except (NamespaceMismatch, MinerRefused) as error:
                refused = (type(error).__name__, str(error))
        refused = broadcast(refused)
        if refused is not None:
            self.close()
            kind, message = refused
            raise (NamespaceMismatch if kind == "NamespaceMismatch" else MinerRefused)(message)

    def needs_bootstrap(self, start_micro: int) -> bool:
        """Fresh runs bootstrap when asked to; resumed ones whenever the miner lacks rows (a new local miner)."""
        if start_micro == 0:
            return self.config.bootstrap_index
        rows = None
        if self.is_main:
            try:
                rows = self.client.size()
            except Exception as error:  # noqa: BLE001 - an unreachable miner: training goes on without hard pairs
                log.warning("cannot read the miner's row count (%s): not bootstrapping", error)
        rows = broadcast(rows)
        if rows is None or rows >= len(self.dataset):
            return False
        log.info(
            "the miner holds %d rows for %d samples: bootstrapping before the first resumed step",
            rows,
            len(self.dataset),
        )
        return True

    def bootstrap(self, model, **options) -> None:
        """Every rank pushes its share of the data set embedded by `model`; returns once all ranks' rows are in.

        options: bootstrap_index's (batch_size, num_workers, device, dtype, step, progress)."""
        bootstrap_index(model, self.dataset, self.pusher, rank=self.rank, world_size=self.world_size, **options)
        dist.barrier()  # every rank's rows are in before anyone mines

    def close(self) -> None:
        """Stop the session (its sampler, its pusher after a little wait for queued rows, its client) and the
        local miner."""
        if self._closed:
            return
        self._closed = True
        if self.session is not None:
            self.session.close()
        if self.local_miner is not None:
            self.local_miner.stop()
