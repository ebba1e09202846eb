"""The client side's mining settings (`mining.*` of helip-train; `MiningSession`'s config).

Import-light on purpose (no grpc, torch or numpy): `helip-train --help` reads these fields by importing this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.core.errors import InvalidArgument
from helip.miner_service.wire.names import validate_name
from helip.trainer.pairs.breaker import BreakerConfig


@dataclass(frozen=True)
class MiningConfig:
    """Where the miner is and how this run mines: addresses, Mine settings, the breaker, streaming, security,
    the namespace. Checked when built: a bad value raises ValueError naming `mining.<field>`."""

    address: str = ""  # host:port of the miner, or of every shard comma-separated; empty: start a local one
    followers: str = ""  # read replicas: each shard's followers, "|"-separated, shards in address order by ","
    follower_retry_s: float = 5.0  # a follower that failed is asked again after this long (reads fail over)
    strict_shards: bool = False  # a Mine that a shard cannot answer fails, instead of answering from the others
    k: int = 50  # neighbours asked per anchor; the composer draws one of them (the paper's code: top 50)
    # Batches mined ahead beyond what the DataLoader already holds (its workers x prefetch_factor batches):
    # the margin that lets an answer arrive before the DataLoader asks for its batch.
    prefetch: int = 2
    deadline_s: float = 10.0  # a Mine call slower than this is cancelled and counts as a failure (breaker)
    rpc_timeout_s: float = 30.0  # for upserts and stats
    max_in_flight: int = 4  # Mine calls out at once; more requests queue behind them
    breaker_failures: int = 3  # consecutive failed calls that open the circuit breaker
    breaker_cooldown_s: float = 2.0  # first pause before a probe call; doubles per failed probe
    breaker_max_cooldown_s: float = 30.0  # the longest pause between probes
    scoring: str = "PRODUCT"  # how two pairs are scored: PRODUCT or SUM of image and text similarity, IMAGE, TEXT
    max_similarity: float = 0.0  # 0: the miner's default near-duplicate cut
    # The false-negative guard: the miner drops a candidate whose caption fits the anchor's image (or whose image
    # fits the anchor's caption) at this fraction of the anchor's own pair or more, e.g. 0.95. 0: off.
    positive_ratio: float = 0.0
    push_queue: int = 64  # upserts waiting to be sent before new ones are dropped
    wire_dtype: str = "FLOAT16"  # dtype of the embeddings sent to the miner: FLOAT16, BFLOAT16 or FLOAT32
    # Before the first step, embed the whole training set once with the starting model and push it, so that
    # epoch one already has hard pairs (the paper's offline pass, streamed). Off: epoch one mostly falls back.
    # A resumed run bootstraps whenever the miner holds fewer rows than the data set, whatever this says.
    bootstrap_index: bool = False
    # Push each step's embeddings (online HELIP). Off with bootstrap_index on: the index stays as the starting
    # model saw the data, i.e. the paper's offline mining.
    update_index: bool = True
    # Streaming mode (no bootstrap: the index fills from the training pushes). Mining starts at start_step and
    # once the index holds start_coverage of the data set; hard pairs then ramp in over ramp_steps steps.
    start_step: int = 0  # no Mine before this global step (a warm-up for a model trained from scratch)
    start_coverage: float = 0.0  # fraction of the data set the index must hold before mining starts (0: any)
    ramp_steps: int = 0  # steps over which the mined share of hard slots grows to all of them (0: at once)
    coverage_poll_s: float = 2.0  # how often the miner's row count is polled until start_coverage is reached
    # Security towards the miner: TLS (trusting tls_ca_file, else the system roots), a client certificate for
    # mutual TLS, and a bearer token read from token_file (else $HELIP_AUTH_TOKEN).
    tls: bool = False
    tls_ca_file: str = ""  # PEM file of the CA that signed the miner's certificate; empty: the system roots
    tls_cert_file: str = ""  # PEM client certificate, for mutual TLS
    tls_key_file: str = ""  # PEM private key of tls_cert_file
    tls_server_name: str = ""  # the name the miner's certificate must carry, when not its address's host
    token_file: str = ""  # file holding the bearer token; empty: $HELIP_AUTH_TOKEN, if set
    namespace: str = ""  # miner namespace of this run's rows; empty: the run's output dir name (helip-train)
    reset_namespace: bool = False  # drop and recreate the namespace when it holds another data set's rows

    def __post_init__(self):
        if self.namespace:
            try:
                validate_name(self.namespace, "mining.namespace")
            except InvalidArgument as error:
                raise ValueError(str(error)) from None
        for name in ("k", "max_in_flight", "push_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"mining.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.positive_ratio <= 1.0:
            raise ValueError(f"mining.positive_ratio must be in (0, 1], or 0 for no guard, got {self.positive_ratio}")
        if not self.max_similarity >= 0.0 or self.max_similarity == float("inf"):  # NaN fails the first test
            raise ValueError(
                f"mining.max_similarity must be a finite value >= 0 (0: the miner's default cut, >= 1: none), "
                f"got {self.max_similarity}"
            )
        if self.prefetch < 0:
            raise ValueError(f"mining.prefetch must be >= 0, got {self.prefetch}")
        for name in ("deadline_s", "rpc_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"mining.{name} must be > 0, got {getattr(self, name)}")
        if self.scoring not in pb.Scoring.keys():
            raise ValueError(f"mining.scoring must be one of {list(pb.Scoring.keys())}, got {self.scoring!r}")
        if self.wire_dtype not in pb.DType.keys():
            raise ValueError(f"mining.wire_dtype must be one of {list(pb.DType.keys())}, got {self.wire_dtype!r}")
        if self.start_step < 0 or self.ramp_steps < 0:
            raise ValueError(
                f"mining.start_step and mining.ramp_steps must be >= 0, got {self.start_step}, {self.ramp_steps}"
            )
        if not 0.0 <= self.start_coverage <= 1.0:
            raise ValueError(f"mining.start_coverage must be in [0, 1], got {self.start_coverage}")
        if self.coverage_poll_s <= 0:
            raise ValueError(f"mining.coverage_poll_s must be > 0, got {self.coverage_poll_s}")
        if self.follower_retry_s < 0:
            raise ValueError(f"mining.follower_retry_s must be >= 0, got {self.follower_retry_s}")
        if self.followers:
            shards, groups = len(self.shard_addresses), len(self.followers.split(","))
            if not shards:
                raise ValueError("mining.followers needs mining.address (the leaders): followers take no writes")
            if groups != shards:
                raise ValueError(
                    f"mining.followers lists followers of {groups} shard(s) but mining.address has {shards}; "
                    "separate one shard's followers with '|' and shards with ','"
                )
        if self.breaker_failures < 1:
            raise ValueError(f"mining.breaker_failures must be >= 1, got {self.breaker_failures}")
        if not 0 < self.breaker_cooldown_s <= self.breaker_max_cooldown_s:
            raise ValueError(
                f"mining.breaker_cooldown_s must be in (0, mining.breaker_max_cooldown_s="
                f"{self.breaker_max_cooldown_s}], got {self.breaker_cooldown_s}"
            )

    @property
    def shard_addresses(self) -> list[str]:
        """Each shard's leader, in shard order."""
        return [a.strip() for a in self.address.split(",") if a.strip()]

    @property
    def shard_followers(self) -> list[list[str]]:
        """Each shard's follower addresses (empty lists without followers), in shard order."""
        if not self.followers:
            return [[] for _ in self.shard_addresses]
        return [[a.strip() for a in group.split("|") if a.strip()] for group in self.followers.split(",")]

    @property
    def breaker(self) -> BreakerConfig:
        return BreakerConfig(self.breaker_failures, self.breaker_cooldown_s, self.breaker_max_cooldown_s)
