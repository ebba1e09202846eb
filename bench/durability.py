"""The durable log's cost and the durable miner's recovery, against the machine's real Redis.

- upsert rows/s over gRPC into a miner without a log vs one with the Redis log (ratio; same rows, same batches)
- restart time at N rows: from a shutdown snapshot (+ empty log tail), and from the log alone (full replay)
- follower lag: time from a leader's acknowledgement until a follower serves the same log offset

    python -m bench.durability [--rows 1000000] [--dim 256] [--batch 4096] [--redis-url redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import redis
from tqdm import tqdm

from bench.common import bench_miner, report, summarize, unit_pairs
from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.miner_service.service.process import MinerProcess


def connect(server: MinerProcess) -> MinerClient:
    client = MinerClient(ClientConfig(address=server.address, wire_dtype=pb.FLOAT16, timeout_s=600))
    client.wait_ready(120)
    return client


def upsert_rate(client: MinerClient, ids, image, text, batch: int, label: str) -> float:
    started = time.perf_counter()
    for first in tqdm(range(0, len(ids), batch), desc=label, leave=False):
        client.upsert(ids[first : first + batch], image[first : first + batch], text[first : first + batch], 1)
    return len(ids) / (time.perf_counter() - started)


def timed_start(*args: str) -> tuple[MinerProcess, float]:
    started = time.perf_counter()
    server = bench_miner(*args)
    connect(server).stats()
    return server, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--lag-rounds", type=int, default=200)
    parser.add_argument("--json-out")
    args = parser.parse_args()

    prefix = f"helip-bench-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="helip-durability-"))
    image, text = unit_pairs(np.random.default_rng(0), args.rows, args.dim)
    image, text = image.astype(np.float16), text.astype(np.float16)  # what trainers send
    ids = np.arange(args.rows, dtype=np.uint64)
    base = ("--dim", str(args.dim))
    durable = (*base, "--redis-url", args.redis_url, "--key-prefix", prefix)
    # A leader with a log needs a snapshot dir (the log is trimmed below snapshots); interval 0: only on SIGTERM.
    snapshots = ("--snapshot-dir", str(workdir / "snapshots"), "--snapshot-interval-s", "0")
    try:
        # Throughput: interleave halves so that drift hits both alike.
        half = args.rows // 2
        throughput_snapshots = ("--snapshot-dir", str(workdir / "throughput"), "--snapshot-interval-s", "0")
        with bench_miner(*base) as plain, bench_miner(*durable, *throughput_snapshots) as logged:
            plain_client, logged_client = connect(plain), connect(logged)
            rates = {"memory": [], "redis_log": []}
            for part in (slice(0, half), slice(half, args.rows)):
                rates["memory"].append(
                    upsert_rate(plain_client, ids[part], image[part], text[part], args.batch, "upsert, no log")
                )
                rates["redis_log"].append(
                    upsert_rate(logged_client, ids[part], image[part], text[part], args.batch, "upsert, Redis log")
                )
            plain_rate, logged_rate = np.mean(rates["memory"]), np.mean(rates["redis_log"])
            stream_bytes = redis.Redis.from_url(args.redis_url).memory_usage(f"{prefix}:miner:log:shard-0-of-1") or 0
            logged.process.kill()  # no final snapshot, so the log keeps every entry for the replay below
            logged.process.wait()
        # Recovery from the log alone (no snapshot yet): full replay of N rows.
        server, replay_s = timed_start(*durable, *snapshots)
        assert connect(server).stats().size == args.rows
        # Recovery from a snapshot: the leader takes one on SIGTERM, then restarts from it.
        started = time.perf_counter()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(600)
        snapshot_write_s = time.perf_counter() - started
        server.stop()
        server, snapshot_restart_s = timed_start(*durable, *snapshots)
        leader_client = connect(server)
        assert leader_client.stats().size == args.rows
        # Follower lag on small writes (one trainer step's worth: 256 rows).
        with bench_miner(*durable, "--follow") as follower:
            follower_client = connect(follower)
            lags = []
            rng = np.random.default_rng(1)
            for _ in range(args.lag_rounds):
                chosen = rng.choice(args.rows, 256, replace=False).astype(np.uint64)
                leader_client.upsert(chosen, image[chosen.astype(np.int64)], text[chosen.astype(np.int64)], 2)
                acked = time.perf_counter()
                want = leader_client.stats().log_offset
                while follower_client.stats().log_offset != want:
                    time.sleep(0.0005)
                lags.append(time.perf_counter() - acked)
        server.stop()
    finally:
        client = redis.Redis.from_url(args.redis_url)
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
        shutil.rmtree(workdir, ignore_errors=True)

    lag = summarize(lags)
    results = {
        "config": vars(args),
        "upsert_rows_per_s": {"memory_only": plain_rate, "redis_log": logged_rate},
        "log_over_memory": logged_rate / plain_rate,
        "redis_stream_bytes": stream_bytes,
        "restart_s": {"log_replay_only": replay_s, "from_snapshot": snapshot_restart_s},
        "snapshot_write_on_sigterm_s": snapshot_write_s,
        "follower_lag": lag,
    }
    rows = [
        ("upsert rows/s, memory only (fp16 wire)", f"{plain_rate:,.0f}"),
        ("upsert rows/s, Redis log", f"{logged_rate:,.0f}"),
        ("log / memory", f"{logged_rate / plain_rate:.3f}"),
        ("Redis stream size (MiB)", f"{stream_bytes / 2**20:,.0f}"),
        (f"restart at {args.rows:,} rows, log replay only (s)", f"{replay_s:.1f}"),
        (f"restart at {args.rows:,} rows, from snapshot (s)", f"{snapshot_restart_s:.1f}"),
        ("snapshot written on SIGTERM (s)", f"{snapshot_write_s:.1f}"),
        ("follower lag median / p99 (ms)", f"{lag['median_ms']:.2f} / {lag['p99_ms']:.2f}"),
    ]
    report("durability", results, rows, args.json_out)


if __name__ == "__main__":
    main()
