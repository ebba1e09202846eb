"""Render docs/img/metrics.png: the dashboard's main miner panels, from a real miner under a scripted load.

Starts `helip-miner serve` on free 127.0.0.1 ports, grows its store in phases while a client mines and overwrites
rows as training would, scrapes /metrics every second, and plots what the Grafana dashboard shows (quantiles
from the histogram buckets over a sliding window, as histogram_quantile does).

    .venv/bin/pip install matplotlib   # only this script needs it
    .venv/bin/python scripts/plot_metrics.py [--out docs/img/metrics.png] [--seconds 90]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helip.miner_service.service.process import spawn_miner  # noqa: E402


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def buckets(sample: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = sorted((float(dict(labels)["le"]), value) for (n, labels), value in sample.items() if n == f"{name}_bucket")
    return np.array([le for le, _ in pairs]), np.array([count for _, count in pairs])


def quantile(q: float, bounds: np.ndarray, counts: np.ndarray) -> float:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket that holds the q-th observation."""
    total = counts[-1]
    if total <= 0:
        return float("nan")
    rank = q * total
    i = int(np.searchsorted(counts, rank))
    if i >= len(bounds) - 1:  # in the +Inf bucket: the largest finite bound
        return float(bounds[-2])
    lower, below = (0.0, 0.0) if i == 0 else (bounds[i - 1], counts[i - 1])
    return float(lower + (bounds[i] - lower) * (rank - below) / max(counts[i] - below, 1e-12))


def drive(address: str, dim: int, phases: list[int], seconds: float, stop: threading.Event) -> None:
    """Grow the store to each phase's row count in turn, mining and overwriting rows all along."""
    from helip.miner.v1 import miner_pb2 as pb
    from helip.miner_service.client.single import ClientConfig, MinerClient

    client = MinerClient(ClientConfig(address=address, wire_dtype=pb.FLOAT32, timeout_s=60))
    rng = np.random.default_rng(0)
    stored, step, start = 0, 0, time.monotonic()
    for phase, target_rows in enumerate(phases):
        phase_end = start + seconds * (phase + 1) / len(phases)
        while stored < target_rows:  # fill in chunks, with Mine calls between them
            ids = np.arange(stored, min(stored + 4096, target_rows))
            emb = rng.normal(size=(2, len(ids), dim)).astype(np.float32)
            client.upsert(ids, emb[0], emb[1], step=step)
            stored = int(ids[-1]) + 1
            client.mine(k=50, anchor_ids=rng.choice(stored, size=64, replace=False))
        while time.monotonic() < phase_end and not stop.is_set():
            step += 1
            client.mine(k=50, anchor_ids=rng.choice(stored, size=64, replace=False))
            ids = rng.choice(stored, size=256, replace=False)
            emb = rng.normal(size=(2, len(ids), dim)).astype(np.float32)
            client.upsert(ids, emb[0], emb[1], step=step)
            time.sleep(0.01)
    client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "metrics.png"))
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--phases", default="20000,100000,250000", help="rows stored in each phase")
    parser.add_argument("--window-s", type=float, default=10.0, help="the rate() window of the quantiles")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as workdir:
        miner = spawn_miner(Path(workdir), "--dim", str(args.dim), "--log-level", "WARNING", cwd=ROOT)
        stop = threading.Event()
        load = threading.Thread(
            target=drive,
            args=(miner.address, args.dim, [int(p) for p in args.phases.split(",")], args.seconds, stop),
        )
        samples: list[tuple[float, dict]] = []
        try:
            start = time.monotonic()
            load.start()
            while load.is_alive() and time.monotonic() - start < args.seconds + 120:
                samples.append((time.monotonic() - start, scrape(miner.metrics_url)))
                time.sleep(1.0)
        finally:
            stop.set()
            load.join(60)
            miner.stop()

    t = np.array([s[0] for s in samples])
    window = max(1, int(round(args.window_s)))

    def over_window(name):
        out = {q: [] for q in (0.5, 0.9, 0.99)}
        for i in range(len(samples)):
            j = max(0, i - window)
            bounds, now = buckets(samples[i][1], name)
            _, before = buckets(samples[j][1], name)
            for q in out:
                out[q].append(quantile(q, bounds, now - before) if i > j else float("nan"))
        return out

    def value(name):
        return np.array([sum(v for (n, _), v in s.items() if n == name) for _, s in samples])

    def rate(name):
        values = value(name)
        return np.array(
            [
                (values[i] - values[max(0, i - window)]) / max(t[i] - t[max(0, i - window)], 1e-9) if i else np.nan
                for i in range(len(values))
            ]
        )

    mine = over_window("helip_miner_mine_seconds")
    staleness = over_window("helip_miner_neighbour_staleness_steps")
    fig, axes = plt.subplots(2, 2, figsize=(13, 7.5), constrained_layout=True)
    fig.suptitle(f"helip miner under a growing store (dim {args.dim}, CPU): the dashboard's miner panels")
    ax = axes[0, 0]
    for q, style in ((0.5, "-"), (0.9, "--"), (0.99, ":")):
        ax.plot(t, np.array(mine[q]) * 1e3, style, label=f"p{int(q * 100)}")
    ax.axhline(250, color="red", linewidth=1, label="p99 objective (250 ms)")
    ax.set(title=f"Mine latency (histogram_quantile over {window}s)", ylabel="ms", xlabel="s", yscale="log")
    ax.legend(loc="upper left")
    ax = axes[0, 1]
    ax.plot(t, value("helip_miner_rows"), label="rows stored")
    ax.plot(t, value("helip_miner_ivf_rows"), label="IVF rows")
    ax.set(title="Rows stored", ylabel="rows", xlabel="s")
    ax.legend(loc="upper left")
    ax = axes[1, 0]
    ax.plot(t, rate("helip_miner_upserted_rows_total"), label="upserted rows/s")
    ax.plot(t, rate("helip_miner_mined_anchors_total"), label="mined anchors/s")
    ax.set(title="Ingest and mining rate", ylabel="per second", xlabel="s", yscale="log")
    ax.legend(loc="upper right")
    ax = axes[1, 1]
    ax.plot(t, staleness[0.5], label="p50")
    ax.plot(t, staleness[0.9], "--", label="p90")
    ax.set(title="Neighbour staleness", ylabel="steps", xlabel="s")
    ax.legend(loc="upper left")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out} from {len(samples)} scrapes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
