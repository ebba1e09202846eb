"""Prometheus metrics of one miner process, on a registry of its own (no global state)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Sub-millisecond to seconds: a GPU Mine over a small store takes ~100 us, a CPU Mine over millions of rows ~1 s.
LATENCY_BUCKETS_S = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Per-namespace series: names are chosen by operators and capped (max_namespaces), never per request.
NAMESPACE_LABEL = ("namespace",)
PASS_MINES_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STALENESS_BUCKETS_STEPS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000, 10000)


@dataclass
class MinerMetrics:
    registry: CollectorRegistry
    mine_seconds: Histogram
    upsert_seconds: Histogram
    delete_seconds: Histogram
    rows: Gauge
    upserted_rows: Counter
    deleted_rows: Counter
    mined_anchors: Counter
    unknown_anchors: Counter
    requests: Counter
    neighbour_staleness: Histogram
    returned_neighbours: Counter
    guard_dropped: Counter
    pass_mines: Histogram
    ivf_rows: Gauge
    replica_lag_seconds: Gauge
    ivf_enabled: Gauge
    namespaces: Gauge

    @classmethod
    def create(cls) -> MinerMetrics:
        r = CollectorRegistry()
        return cls(
            registry=r,
            mine_seconds=Histogram(
                "helip_miner_mine_seconds",
                "Time to answer one Mine call (server side), by namespace",
                NAMESPACE_LABEL,
                buckets=LATENCY_BUCKETS_S,
                registry=r,
            ),
            upsert_seconds=Histogram(
                "helip_miner_upsert_seconds",
                "Time to apply one upsert message (Upsert, or one message of UpsertStream), by namespace",
                NAMESPACE_LABEL,
                buckets=LATENCY_BUCKETS_S,
                registry=r,
            ),
            delete_seconds=Histogram(
                "helip_miner_delete_seconds", "Time to answer one Delete call", buckets=LATENCY_BUCKETS_S, registry=r
            ),
            rows=Gauge("helip_miner_rows", "Pairs stored, by namespace", NAMESPACE_LABEL, registry=r),
            upserted_rows=Counter(
                "helip_miner_upserted_rows", "Rows written by upserts, by namespace", NAMESPACE_LABEL, registry=r
            ),
            deleted_rows=Counter("helip_miner_deleted_rows", "Rows removed by deletes", registry=r),
            mined_anchors=Counter("helip_miner_mined_anchors", "Anchors answered by Mine", registry=r),
            unknown_anchors=Counter(
                "helip_miner_unknown_anchors", "Mine anchors given by id that were not stored", registry=r
            ),
            requests=Counter(
                "helip_miner_requests", "RPCs handled, by method and status code", ["method", "code"], registry=r
            ),
            neighbour_staleness=Histogram(
                "helip_miner_neighbour_staleness_steps",
                "Mean, over the neighbours one Mine call returned, of the steps between the newest write and "
                "the neighbour's row",
                buckets=STALENESS_BUCKETS_STEPS,
                registry=r,
            ),
            returned_neighbours=Counter("helip_miner_returned_neighbours", "Neighbours returned by Mine", registry=r),
            guard_dropped=Counter(
                "helip_miner_guard_dropped",
                "Candidates the false-negative guard (MineRequest.positive_ratio) dropped ahead of the neighbours "
                "returned, by namespace",
                NAMESPACE_LABEL,
                registry=r,
            ),
            pass_mines=Histogram(
                "helip_miner_mine_pass_mines",
                "Mines answered by the pass over the rows that answered each Mine (1: alone; search.batch_mines "
                "merges concurrent Mines), by namespace",
                NAMESPACE_LABEL,
                buckets=PASS_MINES_BUCKETS,
                registry=r,
            ),
            ivf_rows=Gauge(
                "helip_miner_ivf_rows", "Rows covered by the IVF candidate index (0: exact only)", registry=r
            ),
            replica_lag_seconds=Gauge(
                "helip_miner_replica_lag_seconds",
                "A follower's lag at its last sample: age of the oldest log entry not applied yet (0: caught up, "
                "and always on a leader)",
                registry=r,
            ),
            ivf_enabled=Gauge(
                "helip_miner_ivf_enabled",
                "1 when this miner may answer from the IVF candidate index, 0 when it searches exactly (a GPU miner)",
                registry=r,
            ),
            namespaces=Gauge("helip_miner_namespaces", "Namespaces this miner holds", registry=r),
        )

    def forget_namespace(self, name: str) -> None:
        """Remove a dropped namespace's series, so that dropped names do not pile up in /metrics."""
        per_namespace = (self.mine_seconds, self.upsert_seconds, self.rows, self.upserted_rows, self.guard_dropped)
        for metric in (*per_namespace, self.pass_mines):
            try:
                metric.remove(name)
            except KeyError:
                pass
