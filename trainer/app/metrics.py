"""The trainer's Prometheus metrics, one endpoint per rank (port = run.metrics_port + local rank)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STEP_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WAIT_BUCKETS_S = (1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class TrainerMetrics:
    registry: CollectorRegistry
    step_seconds: Histogram
    data_wait_seconds: Histogram
    fallbacks: Counter
    hard_pairs: Counter
    samples: Counter
    hard_pair_fraction: Gauge
    pushed_rows: Counter
    dropped_pushes: Counter
    mine_failures: Counter
    foreign_ids: Counter
    follower_mines: Counter
    degraded_mines: Counter
    guard_dropped: Counter
    empty_mines: Counter
    replica_lag_max_seconds: Gauge
    bad_samples: Counter  # labelled by kind; use .labels(rank, kind)

    BAD_SAMPLE_KINDS = ("missing_file", "unreadable_image", "unreadable_caption", "empty_caption")

    @classmethod
    def create(cls, rank: int) -> TrainerMetrics:
        r = CollectorRegistry()
        labels = {"labelnames": ["rank"], "registry": r}

        def one(metric):
            return metric.labels(str(rank))

        bad_samples = Counter(
            "helip_trainer_bad_samples", "Bad samples skipped, by kind", labelnames=["rank", "kind"], registry=r
        )
        for kind in cls.BAD_SAMPLE_KINDS:  # exported at 0 from the start, so rate() and alerts see them
            bad_samples.labels(str(rank), kind)
        return cls(
            registry=r,
            step_seconds=one(
                Histogram(
                    "helip_trainer_step_seconds",
                    "Forward, backward and optimizer step",
                    buckets=STEP_BUCKETS_S,
                    **labels,
                )
            ),
            data_wait_seconds=one(
                Histogram(
                    "helip_trainer_data_wait_seconds",
                    "Time a step waited for the DataLoader's next batch (never for mining)",
                    buckets=WAIT_BUCKETS_S,
                    **labels,
                )
            ),
            fallbacks=one(Counter("helip_trainer_fallbacks", "Hard-pair slots filled with a random sample", **labels)),
            hard_pairs=one(Counter("helip_trainer_hard_pairs", "Hard-pair slots filled with a mined pair", **labels)),
            samples=one(Counter("helip_trainer_samples", "Samples trained on", **labels)),
            hard_pair_fraction=one(
                Gauge(
                    "helip_trainer_hard_pair_fraction", "Fraction of the last batch that was mined hard pairs", **labels
                )
            ),
            pushed_rows=one(Counter("helip_trainer_pushed_rows", "Embedding rows pushed to the miner", **labels)),
            dropped_pushes=one(
                Counter(
                    "helip_trainer_dropped_pushes",
                    "Embedding batches dropped (push queue full, or miner breaker open)",
                    **labels,
                )
            ),
            mine_failures=one(
                Counter(
                    "helip_trainer_mine_failures",
                    "Mine answers missing when their batch was composed (failed, late or skipped)",
                    **labels,
                )
            ),
            foreign_ids=one(
                Counter("helip_trainer_foreign_ids", "Neighbour ids the data set does not hold, dropped", **labels)
            ),
            follower_mines=one(
                Counter("helip_trainer_follower_mines", "Mine answers that came from a read-only follower", **labels)
            ),
            degraded_mines=one(
                Counter(
                    "helip_trainer_degraded_mines",
                    "Sharded Mine answers that lacked some shards (answered from the others)",
                    **labels,
                )
            ),
            guard_dropped=one(
                Counter(
                    "helip_trainer_guard_dropped",
                    "Mined candidates the false-negative guard (mining.positive_ratio) dropped",
                    **labels,
                )
            ),
            empty_mines=one(
                Counter(
                    "helip_trainer_empty_mines",
                    "Mine answers with no neighbour for any anchor (few rows, all over the near-duplicate cut, or "
                    "all guarded): their batches fall back",
                    **labels,
                )
            ),
            replica_lag_max_seconds=one(
                Gauge(
                    "helip_trainer_replica_lag_max_seconds",
                    "The most a follower that answered a Mine was behind its leader, since the start",
                    **labels,
                )
            ),
            bad_samples=bad_samples,
        )

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port
