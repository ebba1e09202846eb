"""Load: C concurrent clients upserting and mining for T seconds against one miner process.

The mix is a training job's traffic. Each client is its own process (a thread-per-client Python load generator
on a small machine would measure its own GIL, not the miner) and loops, each call picked at random:
- Upsert (1 - mine_fraction): 256 rows of dim 256, FLOAT16 on the wire, ids drawn from the preloaded ids (a
  trainer step rewrites the rows of its batch), step = the client's call count;
- Mine (mine_fraction): 128 anchors by id, k 16, PRODUCT scoring, excluding the anchors themselves (the rest of the
  batch), default near-duplicate cut;
- a deliberately invalid Mine (k = 0) at invalid_fraction, which must come back INVALID_ARGUMENT: the error path
  under load. Any other non-OK status is an error and makes the run fail.
The store is preloaded with `rows` pairs first (not timed). Reported: calls/s and p50 / p99 / p99.9 latency per
RPC, statuses by code, and the miner's resident memory (VmRSS, VmHWM from /proc) before and after the load.

    python -m bench.load [--clients 16] [--seconds 60] [--rows 50000] [--address HOST:PORT --miner-pid PID]
                         [--redis-url redis://...]  # the durable path: every write goes through the Redis log
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import shutil
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from bench.common import MinerSubprocess, report, unit_pairs

DELIBERATE = "Mine(k=0)"


@dataclass(frozen=True)
class LoadConfig:
    address: str
    seconds: float
    rows: int
    dim: int
    upsert_rows: int
    anchors: int
    k: int
    mine_fraction: float
    invalid_fraction: float
    timeout_s: float


def client_loop(index: int, config: LoadConfig, start_at: float, results) -> None:
    """One client process: wait for the common start, loop until the end, send back latencies and codes."""
    import grpc

    from helip.miner.v1 import miner_pb2 as pb
    from miner_service.client import ClientConfig, MinerClient

    client = MinerClient(
        ClientConfig(address=config.address, wire_dtype=pb.FLOAT16, retries=0, timeout_s=config.timeout_s)
    )
    client.wait_ready(60)
    rng = np.random.default_rng(1000 + index)
    image, text = unit_pairs(rng, 4 * config.upsert_rows, config.dim)  # reused: encoding, not generating, is timed
    latencies: dict[str, list[float]] = {"Upsert": [], "Mine": [], DELIBERATE: []}
    codes: Counter = Counter()
    time.sleep(max(0.0, start_at - time.time()))
    end_at = start_at + config.seconds
    calls = 0
    while time.time() < end_at:
        calls += 1
        pick = rng.random()
        if pick < config.invalid_fraction:
            rpc = DELIBERATE
            call = lambda: client.stub.Mine(pb.MineRequest(anchor_ids=[0], k=0), timeout=config.timeout_s)
        elif pick < config.invalid_fraction + config.mine_fraction:
            rpc = "Mine"
            anchors = rng.choice(config.rows, config.anchors, replace=False)
            call = lambda: client.mine(config.k, anchor_ids=anchors, exclude_ids=anchors)  # noqa: B023 (called below)
        else:
            rpc = "Upsert"
            ids = rng.choice(config.rows, config.upsert_rows, replace=False)
            first = int(rng.integers(0, 4)) * config.upsert_rows
            rows = slice(first, first + config.upsert_rows)
            call = lambda: client.upsert(ids, image[rows], text[rows], step=calls)  # noqa: B023 (called below)
        started = time.perf_counter()
        try:
            call()
            code = "OK"
        except grpc.RpcError as error:
            code = error.code().name
        latencies[rpc].append(time.perf_counter() - started)
        codes[(rpc, code)] += 1
    client.close()
    results.put((index, latencies, dict(codes)))


def memory_of(pid: int | None) -> dict | None:
    """VmRSS and VmHWM (peak) of a process, in MiB."""
    if pid is None:
        return None
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key.lower() + "_mib"] = int(rest.split()[0]) / 1024
    return values


def preload(address: str, rows: int, dim: int, batch: int = 4096) -> float:
    """Upsert rows 0..rows-1 (FLOAT16 on the wire); returns rows per second."""
    from helip.miner.v1 import miner_pb2 as pb
    from miner_service.client import ClientConfig, MinerClient

    rng = np.random.default_rng(0)
    started = time.perf_counter()
    with MinerClient(ClientConfig(address=address, wire_dtype=pb.FLOAT16, timeout_s=120)) as client:
        client.wait_ready(60)
        for first in range(0, rows, batch):
            n = min(batch, rows - first)
            image, text = unit_pairs(rng, n, dim)
            client.upsert(np.arange(first, first + n, dtype=np.uint64), image, text, step=0)
        assert client.stats().size >= rows
    return rows / (time.perf_counter() - started)


def percentiles_ms(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0}
    values = np.asarray(seconds) * 1e3
    return {
        "n": len(values),
        "p50_ms": float(np.percentile(values, 50)),
        "p99_ms": float(np.percentile(values, 99)),
        "p999_ms": float(np.percentile(values, 99.9)),
        "max_ms": float(values.max()),
    }


def run_load(config: LoadConfig, clients: int) -> tuple[dict, Counter, float]:
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited gRPC state
    results = context.Queue()
    start_at = time.time() + 5.0 + 0.25 * clients  # every client connected and waiting before the first call
    processes = [context.Process(target=client_loop, args=(i, config, start_at, results)) for i in range(clients)]
    for process in processes:
        process.start()
    latencies: dict[str, list[float]] = {}
    codes: Counter = Counter()
    for _ in processes:
        try:
            _, client_latencies, client_codes = results.get(
                timeout=start_at - time.time() + config.seconds + config.timeout_s + 60
            )
        except queue.Empty:
            raise RuntimeError("a client process did not report back") from None
        for rpc, values in client_latencies.items():
            latencies.setdefault(rpc, []).extend(values)
        codes.update(client_codes)
    for process in processes:
        process.join(30)
    return latencies, codes, config.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rows", type=int, default=50_000, help="pairs preloaded before the load starts")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--upsert-rows", type=int, default=256)
    parser.add_argument("--anchors", type=int, default=128)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--mine-fraction", type=float, default=0.5)
    parser.add_argument("--invalid-fraction", type=float, default=0.01)
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per-call deadline of the clients")
    parser.add_argument("--address", help="an already running miner (default: start one)")
    parser.add_argument("--miner-pid", type=int, help="with --address: the miner's pid, to read its memory")
    parser.add_argument("--redis-url", help="start the miner with this durable log (a key prefix of its own)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json-out")
    args = parser.parse_args()

    server = None
    key_prefix = None
    snapshot_dir = None
    if args.address:
        address, pid = args.address, args.miner_pid
    else:
        extra = ()
        if args.redis_url:
            key_prefix = f"helip-bench-load-{uuid.uuid4().hex[:8]}"
            snapshot_dir = tempfile.mkdtemp(prefix="helip-bench-load-")  # a leader with a log needs one
            extra = ("--redis-url", args.redis_url, "--key-prefix", key_prefix, "--snapshot-dir", snapshot_dir)
        server = MinerSubprocess("--dim", str(args.dim), "--device", args.device, "--log-level", "WARNING", *extra)
        address, pid = server.address, server.process.pid
    try:
        preload_rate = preload(address, args.rows, args.dim)
        memory_before = memory_of(pid)
        config = LoadConfig(
            address,
            args.seconds,
            args.rows,
            args.dim,
            args.upsert_rows,
            args.anchors,
            args.k,
            args.mine_fraction,
            args.invalid_fraction,
            args.timeout_s,
        )
        latencies, codes, seconds = run_load(config, args.clients)
        memory_after = memory_of(pid)
        alive = server is None or server.process.poll() is None
    finally:
        if server is not None:
            server.__exit__(None, None, None)
        if key_prefix:
            import redis

            client = redis.Redis.from_url(args.redis_url)
            for key in client.scan_iter(f"{key_prefix}:*"):
                client.delete(key)
            client.close()
        if snapshot_dir:
            shutil.rmtree(snapshot_dir, ignore_errors=True)

    expected = {"Upsert": "OK", "Mine": "OK", DELIBERATE: "INVALID_ARGUMENT"}
    errors = {f"{rpc} {code}": n for (rpc, code), n in codes.items() if code != expected[rpc]}
    per_rpc = {}
    for rpc in ("Upsert", "Mine", DELIBERATE):
        ok = codes.get((rpc, expected[rpc]), 0)
        per_rpc[rpc] = {"calls_per_s": ok / seconds, **percentiles_ms(latencies.get(rpc, []))}
    results = {
        "config": {**asdict(config), "clients": args.clients, "durable": bool(args.redis_url), "device": args.device},
        "preload_rows_per_s": preload_rate,
        "rpc": per_rpc,
        "codes": {f"{rpc} {code}": n for (rpc, code), n in sorted(codes.items())},
        "errors": errors,
        "upserted_rows_per_s": per_rpc["Upsert"]["calls_per_s"] * args.upsert_rows,
        "mined_anchors_per_s": per_rpc["Mine"]["calls_per_s"] * args.anchors,
        "miner_memory_before": memory_before,
        "miner_memory_after": memory_after,
        "miner_alive_after": alive,
    }
    rows = []
    for rpc, stats in per_rpc.items():
        if stats["n"]:
            rows.append((f"{rpc} calls/s", f"{stats['calls_per_s']:.2f}"))
            rows.append(
                (
                    f"{rpc} p50 / p99 / p99.9 (ms)",
                    f"{stats['p50_ms']:.1f} / {stats['p99_ms']:.1f} / {stats['p999_ms']:.1f}",
                )
            )
    rows += [
        ("rows upserted/s", f"{results['upserted_rows_per_s']:,.0f}"),
        ("anchors mined/s", f"{results['mined_anchors_per_s']:,.0f}"),
        ("statuses", ", ".join(f"{key}: {n}" for key, n in results["codes"].items())),
        ("errors (not deliberate)", str(sum(errors.values()))),
    ]
    if memory_before and memory_after:
        rows.append(
            (
                "miner RSS before / after (MiB)",
                f"{memory_before['vmrss_mib']:.0f} / {memory_after['vmrss_mib']:.0f}"
                f" (peak {memory_after['vmhwm_mib']:.0f})",
            )
        )
    report("load", results, rows, args.json_out)
    if errors or not alive:
        raise SystemExit(f"load run failed: errors {errors}, miner alive {alive}")


if __name__ == "__main__":
    main()
