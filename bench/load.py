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

Then, unless --contention-seconds 0, writes against Mines: one writer upserting `upsert_rows` rows every
--write-interval-ms, first alone, then beside --contention-miners clients mining --contention-anchors anchors back
to back; and one client mining alone. Reported: upsert p50 / p99 alone and under Mines, Mine p50 alone and under
load, and the ratio of upsert p99 under Mines to one Mine's median alone (goal <= 0.25: a write waits for a
chunk of a Mine, not for whole Mines).

Then, unless --batching-seconds 0, Mines batched across callers (search.batch_mines): --batching-callers clients
(16) mining --anchors anchors (128) back to back, against a fresh miner without batching and one with it (the same
--rows preloaded into each, one after the other in this run). Reported per arm: anchors/s and Mine p50 / p99, and
batched over unbatched (anchors/s ratio; goal on the CPU: no loss, >= 1).

Last, unless --memory-rows 0, the pair store's memory at --memory-rows rows of --memory-dim (in a fresh process,
filled 4,096 rows at a time): steady (after the fill) and peak (during it) above the process's memory before the
store existed, and their ratio (goal peak <= 1.25x steady: growth adds a block, it never copies the store).
On the CPU this is resident memory from /proc (VmRSS, VmHWM), on a GPU the torch allocator's allocated bytes.

    python -m bench.load [--clients 16] [--seconds 60] [--rows 50000] [--address HOST:PORT --miner-pid PID]
                         [--redis-url redis://...]  # the durable path: every write goes through the Redis log
                         [--contention-seconds 20] [--contention-miners 3] [--contention-anchors 512]
                         [--batching-seconds 20] [--batching-callers 16] [--batch-window-ms 1]
                         [--memory-rows 1000000] [--memory-dim 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import queue
import shutil
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from bench.common import bench_miner, report, unit_pairs

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
    from helip.miner_service.client.single import ClientConfig, MinerClient

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
    from helip.miner_service.client.single import ClientConfig, MinerClient

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


def paced_loop(
    index: int, role: str, config: LoadConfig, anchors: int, interval_s: float, start_at: float, results
) -> None:
    """One process of the contention run: "writer" upserts every interval_s, "miner" mines back to back."""
    from helip.miner.v1 import miner_pb2 as pb
    from helip.miner_service.client.single import ClientConfig, MinerClient

    client = MinerClient(
        ClientConfig(address=config.address, wire_dtype=pb.FLOAT16, retries=0, timeout_s=config.timeout_s)
    )
    client.wait_ready(60)
    rng = np.random.default_rng(2000 + index)
    image, text = unit_pairs(rng, config.upsert_rows, config.dim)
    latencies: list[float] = []
    time.sleep(max(0.0, start_at - time.time()))
    end_at = start_at + config.seconds
    next_write = time.perf_counter()
    calls = 0
    while time.time() < end_at:
        calls += 1
        started = time.perf_counter()
        if role == "writer":
            ids = rng.choice(config.rows, config.upsert_rows, replace=False)
            client.upsert(ids, image, text, step=calls)
        else:
            picked = rng.choice(config.rows, anchors, replace=False)
            client.mine(config.k, anchor_ids=picked, exclude_ids=picked)
        latencies.append(time.perf_counter() - started)
        if role == "writer":
            next_write += interval_s
            time.sleep(max(0.0, next_write - time.perf_counter()))
    client.close()
    results.put((role, latencies))


def run_paced(config: LoadConfig, roles: list[str], anchors: int, interval_s: float) -> dict[str, list[float]]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + 5.0 + 0.25 * len(roles)
    processes = [
        context.Process(target=paced_loop, args=(i, role, config, anchors, interval_s, start_at, results))
        for i, role in enumerate(roles)
    ]
    for process in processes:
        process.start()
    latencies: dict[str, list[float]] = {}
    for _ in processes:
        role, values = results.get(timeout=start_at - time.time() + config.seconds + config.timeout_s + 60)
        latencies.setdefault(role, []).extend(values)
    for process in processes:
        process.join(30)
    return latencies


def contention(config: LoadConfig, miners: int, anchors: int, interval_s: float) -> dict:
    """Upserts alone, upserts beside `miners` clients mining, and one client mining alone."""
    alone = run_paced(config, ["writer"], anchors, interval_s)
    loaded = run_paced(config, ["writer"] + ["miner"] * miners, anchors, interval_s)
    mine_alone = run_paced(config, ["miner"], anchors, interval_s)
    upsert_alone = percentiles_ms(alone["writer"])
    upsert_loaded = percentiles_ms(loaded["writer"])
    mine_alone_ms = percentiles_ms(mine_alone["miner"])
    return {
        "miners": miners,
        "anchors": anchors,
        "write_interval_ms": interval_s * 1e3,
        "upsert_alone": upsert_alone,
        "upsert_under_mines": upsert_loaded,
        "mine_alone": mine_alone_ms,
        "mine_under_load": percentiles_ms(loaded.get("miner", [])),
        "upsert_p99_under_mines_over_mine_p50": upsert_loaded["p99_ms"] / mine_alone_ms["p50_ms"],
    }


def batching(args, config: LoadConfig) -> dict:
    """Mine-only callers against a miner without batching, then one with it: anchors/s and latency per arm."""
    arms = {"unbatched": (), "batched": ("--batch-mines", "true", "--batch-window-ms", str(args.batch_window_ms))}
    measured = {}
    for arm, flags in arms.items():
        server = bench_miner("--dim", str(args.dim), "--device", args.device, "--log-level", "WARNING", *flags)
        try:
            preload(server.address, args.rows, args.dim)
            paced = dataclasses.replace(config, address=server.address, seconds=args.batching_seconds)
            mines = run_paced(paced, ["miner"] * args.batching_callers, args.anchors, 0.0)["miner"]
        finally:
            server.stop()
        measured[arm] = {"anchors_per_s": len(mines) * args.anchors / args.batching_seconds, **percentiles_ms(mines)}
    unbatched, batched = measured["unbatched"], measured["batched"]
    return {
        "callers": args.batching_callers,
        "anchors": args.anchors,
        "window_ms": args.batch_window_ms,
        **measured,
        "anchors_per_s_batched_over_unbatched": batched["anchors_per_s"] / unbatched["anchors_per_s"],
        "p99_batched_over_unbatched": batched["p99_ms"] / unbatched["p99_ms"],
    }


def store_memory_worker(rows: int, dim: int, device: str, results) -> None:
    """In a fresh process: fill a miner core with `rows` rows and report its memory, steady and peak."""
    import torch

    from helip.miner_service.core.config import SearchConfig
    from helip.miner_service.core.miner import HardPairMiner

    miner = HardPairMiner(dim, SearchConfig(device=device))
    on_gpu = miner.device.type == "cuda"
    rng = np.random.default_rng(0)
    batch = 4096
    image, text = unit_pairs(rng, batch, dim)  # reused: the fill measures the store, not the generator
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = memory_of(os.getpid())["vmrss_mib"] * 2**20
    started = time.perf_counter()
    for first in range(0, rows, batch):
        n = min(batch, rows - first)
        miner.upsert(np.arange(first, first + n, dtype=np.uint64), image[:n], text[:n], 1)
    seconds = time.perf_counter() - started
    if on_gpu:
        torch.cuda.synchronize()
        steady, peak = torch.cuda.memory_allocated() - base, torch.cuda.max_memory_allocated() - base
    else:
        memory = memory_of(os.getpid())
        steady, peak = memory["vmrss_mib"] * 2**20 - base, memory["vmhwm_mib"] * 2**20 - base
    row_bytes = 2 * dim * miner.dtype.itemsize
    results.put(
        {
            "rows": rows,
            "dim": dim,
            "device": str(miner.device),
            "measured_by": "torch.cuda allocated bytes" if on_gpu else "process RSS from /proc (VmRSS, VmHWM)",
            "rows_bytes_mib": rows * row_bytes / 2**20,
            "steady_mib": steady / 2**20,
            "peak_mib": peak / 2**20,
            "peak_over_steady": peak / steady if steady > 0 else None,
            "capacity_rows": miner.store.capacity,
            "fill_rows_per_s": rows / seconds,
        }
    )


def store_memory(rows: int, dim: int, device: str) -> dict:
    context = multiprocessing.get_context("spawn")  # a fresh process: its peak is the store's alone
    results = context.Queue()
    process = context.Process(target=store_memory_worker, args=(rows, dim, device, results))
    process.start()
    measured = results.get(timeout=3600)
    process.join(60)
    return measured


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
    parser.add_argument("--contention-seconds", type=float, default=20.0, help="per phase; 0: skip")
    parser.add_argument("--contention-miners", type=int, default=3)
    parser.add_argument("--contention-anchors", type=int, default=512)
    parser.add_argument("--write-interval-ms", type=float, default=50.0)
    parser.add_argument("--batching-seconds", type=float, default=20.0, help="per arm; 0: skip")
    parser.add_argument("--batching-callers", type=int, default=16)
    parser.add_argument("--batch-window-ms", type=float, default=1.0, help="the batched arm's search.batch_window_ms")
    parser.add_argument("--memory-rows", type=int, default=1_000_000, help="rows of the memory check; 0: skip")
    parser.add_argument("--memory-dim", type=int, default=128)
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
        server = bench_miner("--dim", str(args.dim), "--device", args.device, "--log-level", "WARNING", *extra)
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
        latencies, codes, seconds = run_load(config, args.clients) if args.seconds > 0 else ({}, Counter(), 1.0)
        memory_after = memory_of(pid)
        contended = None
        if args.contention_seconds > 0:
            paced = dataclasses.replace(config, seconds=args.contention_seconds)
            contended = contention(paced, args.contention_miners, args.contention_anchors, args.write_interval_ms / 1e3)
        alive = server is None or server.process.poll() is None
        batched = batching(args, config) if args.batching_seconds > 0 else None
    finally:
        if server is not None:
            server.stop()
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
        "contention": contended,
        "batching": batched,
        "store_memory": store_memory(args.memory_rows, args.memory_dim, args.device) if args.memory_rows else None,
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
    if contended:
        alone, loaded = contended["upsert_alone"], contended["upsert_under_mines"]
        rows += [
            (
                "upsert p50 / p99 alone (ms)",
                f"{alone['p50_ms']:.1f} / {alone['p99_ms']:.1f}",
            ),
            (
                f"upsert p50 / p99 beside {contended['miners']} Mine clients (ms)",
                f"{loaded['p50_ms']:.1f} / {loaded['p99_ms']:.1f}",
            ),
            (
                f"Mine p50 alone / under load ({contended['anchors']} anchors, ms)",
                f"{contended['mine_alone']['p50_ms']:.1f} / {contended['mine_under_load'].get('p50_ms', 0):.1f}",
            ),
            (
                "upsert p99 under Mines / Mine p50 (goal <= 0.25)",
                f"{contended['upsert_p99_under_mines_over_mine_p50']:.3f}",
            ),
        ]
    if batched:
        for arm in ("unbatched", "batched"):
            figures = batched[arm]
            rows.append(
                (
                    f"{batched['callers']} callers x {batched['anchors']} anchors, {arm}: anchors/s, p50 / p99 (ms)",
                    f"{figures['anchors_per_s']:,.0f}, {figures['p50_ms']:.1f} / {figures['p99_ms']:.1f}",
                )
            )
        rows.append(
            (
                "batched / unbatched: anchors/s, p99",
                f"{batched['anchors_per_s_batched_over_unbatched']:.2f}, {batched['p99_batched_over_unbatched']:.2f}",
            )
        )
    memory = results["store_memory"]
    if memory:
        rows += [
            (
                f"store memory at {memory['rows']:,} rows, d={memory['dim']} (MiB)",
                f"steady {memory['steady_mib']:.0f}, peak {memory['peak_mib']:.0f} (rows alone "
                f"{memory['rows_bytes_mib']:.0f}; {memory['measured_by']})",
            ),
            ("store peak / steady (goal <= 1.25)", f"{memory['peak_over_steady']:.2f}"),
        ]
    report("load", results, rows, args.json_out)
    if errors or not alive:
        raise SystemExit(f"load run failed: errors {errors}, miner alive {alive}")


if __name__ == "__main__":
    main()
