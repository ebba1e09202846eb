"""A mining session: the one object a training loop holds to mine hard pairs.

    session = MiningSession(address="miner:50051", namespace="my-run").start(dim=512, dataset=dataset)
    loader = session.loader(dataset, batch_size=256, num_workers=8, steps=total_steps)  # batches of PairBatch
    for step, batch in enumerate(loader):
        ...  # forward, loss, backward, step
        session.push(batch.ids, image_features, text_features, step)  # indexed in the background
    session.close()

It is built from one `MiningConfig` (address or shards, followers, namespace, security) and owns the one client,
bound to that namespace, that its sampler and pusher share: the namespace is said once. `start` claims the
namespace on the miner with the data set's fingerprint and checks what would otherwise fail on every call later
(the dim, `k <= max_k`, the token), failing with an error that names the cause. The session holds the run's
counters and the latch of refusals: a refusal seen by a background Mine or push is raised by the next batch or
push (`check`), so a run never trains on random pairs because of a mistake.
"""

from __future__ import annotations

import dataclasses
import logging

import grpc

from helip.miner_service.client.protocol import MinerApi
from helip.trainer.pairs.mining import MiningConfig, MiningCounters, make_client
from helip.trainer.pairs.namespace import NamespaceMismatch, claim_namespace, dataset_fingerprint
from helip.trainer.pairs.refusals import MinerRefused, RefusalLatch, is_refusal, refusal

log = logging.getLogger(__name__)


class MiningSession:
    """One run's (or one rank's) link to a miner namespace: client, counters, refusals, sampler and pusher."""

    def __init__(self, config: MiningConfig | None = None, client: MinerApi | None = None, **settings):
        """config: where the miner is and how to mine. client: an already built client to use instead of one
        made from config.address (the session then takes its namespace; a config naming another is an error).
        settings: MiningConfig fields that override config's (`MiningSession(address="miner:50051", k=8)`)."""
        config = config if config is not None else MiningConfig()
        if settings:
            unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(MiningConfig)})
            if unknown:
                raise TypeError(f"MiningSession got unknown mining settings {unknown}: see MiningConfig's fields")
            config = dataclasses.replace(config, **settings)
        if client is None and not config.shard_addresses:
            raise ValueError("mining.address is empty: a session needs the miner's host:port (or shards')")
        if client is not None:
            if config.namespace and client.namespace != config.namespace:
                raise ValueError(
                    f"mining.namespace is {config.namespace!r} but the client calls {client.namespace or 'default'!r}"
                )
            config = dataclasses.replace(config, namespace=client.namespace)
        self.config = config
        self.client: MinerApi = client if client is not None else make_client(config)
        self._owns_client = client is None
        self.counters = MiningCounters()
        self.refusals = RefusalLatch()
        self.max_k: int | None = None  # the miner's, once started
        self._pusher = None
        self._samplers: list = []
        self._closed = False

    @classmethod
    def of(cls, source: MiningSession | MinerApi) -> MiningSession:
        """`source` itself when it is a session, else a session around a client (default mining settings)."""
        return source if isinstance(source, MiningSession) else cls(client=source)

    @property
    def namespace(self) -> str:
        return self.config.namespace or "default"

    # ---- start: claim and check -------------------------------------------------------------------------------
    def start(self, dim: int, dataset=None, fingerprint: str | None = None) -> MiningSession:
        """Claim the namespace for `dim`-wide rows of this data set and check the miner can serve this config.

        fingerprint: the data set's (default: `dataset_fingerprint(dataset)`; "" when neither is given).
        Raises NamespaceMismatch (another data set or dim is stored there), MinerRefused (k above the miner's
        max_k, a token or certificate refused, a bad name), or grpc.RpcError when the miner cannot be reached."""
        if fingerprint is None:
            fingerprint = dataset_fingerprint(dataset) if dataset is not None else ""
        try:
            reply = claim_namespace(self.client, self.namespace, dim, fingerprint, reset=self.config.reset_namespace)
            stats = self.client.stats()
        except grpc.RpcError as error:
            if is_refusal(error):
                raise refusal(error, f"namespace {self.namespace!r}") from None
            raise
        if reply.info.dim and reply.info.dim != dim:
            raise NamespaceMismatch(
                f"miner namespace {self.namespace!r} holds rows of dim {reply.info.dim}, this model's embeddings "
                f"have dim {dim}: give this run another mining.namespace"
            )
        self.max_k = int(stats.max_k)
        if self.max_k and self.config.k > self.max_k:
            raise MinerRefused(
                f"mining.k is {self.config.k} but the miner answers at most max_k={self.max_k} neighbours: lower "
                f"mining.k or start the miner with --max-k {self.config.k}",
                field="mining.k",
            )
        return self

    # ---- the parts a loop uses --------------------------------------------------------------------------------
    def sampler(self, n_samples: int, batch_size: int, **options):
        """A HardPairSampler mining through this session (options: HardPairSampler's keyword arguments)."""
        from helip.trainer.pairs.hard_pairs import HardPairSampler

        sampler = HardPairSampler(n_samples, batch_size, self, **options)
        self._samplers.append(sampler)
        return sampler

    def loader(self, dataset, batch_size: int, *, pin_memory: bool | None = None, **options):
        """A DataLoader of hard-pair batches over `dataset` (PairBatch, each with its layout); its sampler is
        `loader.batch_sampler`. options: HardPairSampler's keyword arguments (num_workers, steps, hard_ratio...)."""
        from helip.trainer.pairs.hard_pairs import hard_pair_loader

        return hard_pair_loader(dataset, self.sampler(len(dataset), batch_size, **options), pin_memory=pin_memory)

    def pusher(self):
        """The session's EmbeddingPusher (one per session; it sends in the background)."""
        if self._pusher is None:
            from helip.trainer.pairs.pusher import EmbeddingPusher

            self._pusher = EmbeddingPusher(self)
        return self._pusher

    def push(self, ids, image_embeddings, text_embeddings, step: int) -> None:
        """Send one step's embeddings of samples `ids` to the miner in the background (the session's pusher)."""
        self.pusher().push(ids, image_embeddings, text_embeddings, step)

    def check(self) -> None:
        """Raise the refusal a background Mine or push met, if any (MinerRefused)."""
        self.refusals.check()

    def close(self) -> None:
        """Stop the samplers' mining, send what the pusher still holds (briefly), close the client. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for sampler in self._samplers:
            sampler.close()
        if self._pusher is not None:
            self._pusher.close(timeout_s=10)
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> MiningSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
