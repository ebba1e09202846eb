"""Mining latency and upsert throughput: over gRPC against a miner process vs the same core in-process.

Defaults are the issue's shape: N = 1,000,000 stored pairs, d = 256 per modality, 512 anchors per Mine, k = 16,
PRODUCT scoring. In-process and gRPC Mines are interleaved so that drift in the machine's speed hits both alike.
The FLOP rate of the exact search (two [anchors x d] @ [d x N] products per Mine) is compared with one plain
torch matrix product of the same shape, timed in the same run.

    python -m bench.mine [--rows 1000000] [--dim 256] [--anchors 512] [--k 16] [--repeats 20] [--positive-ratio 0.9]

--positive-ratio adds in-process Mines with the false-negative guard on, interleaved with the plain ones, and
reports their median over the plain median (the goal: at most 1.10).
"""

from __future__ import annotations

import os

# The same OpenMP policy as `helip-miner serve` (miner_service/service/cli.py), so both sides compute alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import logging
import time

import numpy as np
import torch
from tqdm import tqdm

from bench.common import bench_miner, report, summarize, unit_pairs
from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.miner_service.core.api import MineQuery
from helip.miner_service.core.config import SearchConfig
from helip.miner_service.core.miner import HardPairMiner


def upsert_all(upsert, ids, image, text, batch: int, label: str) -> float:
    """Rows per second of upserting everything in batches of `batch`."""
    started = time.perf_counter()
    for first in tqdm(range(0, len(ids), batch), desc=label, unit="batch", leave=False):
        last = first + batch
        upsert(ids[first:last], image[first:last], text[first:last], 1)
    return len(ids) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--anchors", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--upsert-batch", type=int, default=4096)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--positive-ratio", type=float, default=0.0, help="also time guarded Mines (0: not)")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rng = np.random.default_rng(0)
    image, text = unit_pairs(rng, args.rows, args.dim)
    ids = np.arange(args.rows, dtype=np.uint64)

    miner = HardPairMiner(args.dim, SearchConfig(device=args.device, ivf=SearchConfig().ivf))
    inproc_upsert = upsert_all(miner.upsert, ids, image, text, args.upsert_batch, "upsert in-process")

    with bench_miner("--dim", str(args.dim), "--device", args.device) as server:
        client = MinerClient(ClientConfig(address=server.address, wire_dtype=pb.FLOAT32, timeout_s=600))
        client.wait_ready(60)
        # fp16 on the wire first, on a prefix; the fp32 pass then writes every row exactly as in-process.
        grpc_fp16 = MinerClient(ClientConfig(address=server.address, wire_dtype=pb.FLOAT16, timeout_s=600))
        n_fp16 = min(args.rows, 262_144)
        grpc_upsert_fp16 = upsert_all(
            grpc_fp16.upsert, ids[:n_fp16], image[:n_fp16], text[:n_fp16], args.upsert_batch, "upsert gRPC fp16"
        )
        client.delete(ids[:n_fp16])  # so that the fp32 pass inserts new rows, as the in-process pass did
        grpc_upsert = upsert_all(client.upsert, ids, image, text, args.upsert_batch, "upsert gRPC fp32")
        assert client.stats().size == args.rows
        del image, text

        inproc_s, grpc_s, guard_s, guard_dropped = [], [], [], []
        for repeat in tqdm(range(args.warmup + args.repeats), desc="mine", leave=False):
            anchors = rng.choice(args.rows, size=args.anchors, replace=False).astype(np.uint64)
            started = time.perf_counter()
            local = miner.mine(MineQuery(args.k, anchor_ids=anchors))
            t_inproc = time.perf_counter() - started
            started = time.perf_counter()
            remote = client.mine(args.k, anchor_ids=anchors)
            t_grpc = time.perf_counter() - started
            if args.positive_ratio:
                started = time.perf_counter()
                guarded = miner.mine(MineQuery(args.k, anchor_ids=anchors, positive_ratio=args.positive_ratio))
                if repeat >= args.warmup:
                    guard_s.append(time.perf_counter() - started)
                    guard_dropped.append(guarded.guard_dropped / args.anchors)
            if repeat >= args.warmup:
                inproc_s.append(t_inproc)
                grpc_s.append(t_grpc)
            # Same rows and anchors in both places: same answers (the server got the rows over fp32).
            assert (local.neighbour_ids == remote.ids).mean() > 0.999
        client.close()
        grpc_fp16.close()

    # The raw baseline: one plain product of the same shape on the same device.
    device = miner.device
    a = torch.randn(args.anchors, args.dim, device=device, dtype=miner.dtype)
    b = torch.randn(args.rows, args.dim, device=device, dtype=miner.dtype)
    matmul_s = []
    for repeat in range(args.warmup + max(5, args.repeats // 2)):
        started = time.perf_counter()
        for first in range(0, args.rows, miner.block_rows):  # blocked like the search (one product is N-wide)
            (a @ b[first : first + miner.block_rows].T)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if repeat >= args.warmup:
            matmul_s.append(time.perf_counter() - started)
    del b

    inproc, remote, matmul = summarize(inproc_s), summarize(grpc_s), summarize(matmul_s)
    product_flop = 2 * args.anchors * args.dim * args.rows
    search_rate = 2 * product_flop / (inproc["median_ms"] / 1e3)
    matmul_rate = product_flop / (matmul["median_ms"] / 1e3)
    results = {
        "config": vars(args),
        "mine_inprocess": inproc,
        "mine_grpc": remote,
        "grpc_over_inprocess_median": remote["median_ms"] / inproc["median_ms"],
        "grpc_over_inprocess_p99": remote["p99_ms"] / inproc["p99_ms"],
        "upsert_rows_per_s": {"inprocess": inproc_upsert, "grpc_fp32": grpc_upsert, "grpc_fp16": grpc_upsert_fp16},
        "upsert_grpc_over_inprocess": grpc_upsert / inproc_upsert,
        "search_gflops": search_rate / 1e9,
        "matmul_gflops": matmul_rate / 1e9,
        "search_over_matmul_flop_rate": search_rate / matmul_rate,
    }
    if guard_s:
        guard = summarize(guard_s)
        results["mine_guarded"] = guard
        results["guard_over_plain_median"] = guard["median_ms"] / inproc["median_ms"]
        results["guard_dropped_per_anchor"] = float(np.mean(guard_dropped))
    rows = [
        ("Mine in-process median / p99 (ms)", f"{inproc['median_ms']:.1f} / {inproc['p99_ms']:.1f}"),
        ("Mine gRPC median / p99 (ms)", f"{remote['median_ms']:.1f} / {remote['p99_ms']:.1f}"),
        ("gRPC / in-process, median (target <= 1.10)", f"{results['grpc_over_inprocess_median']:.3f}"),
        ("gRPC / in-process, p99", f"{results['grpc_over_inprocess_p99']:.3f}"),
        ("upsert rows/s in-process", f"{inproc_upsert:,.0f}"),
        ("upsert rows/s gRPC fp32", f"{grpc_upsert:,.0f}"),
        ("upsert rows/s gRPC fp16", f"{grpc_upsert_fp16:,.0f}"),
        ("upsert gRPC fp32 / in-process (target >= 0.8)", f"{results['upsert_grpc_over_inprocess']:.3f}"),
        ("exact search GFLOP/s", f"{results['search_gflops']:.1f}"),
        ("plain matmul GFLOP/s (same shape)", f"{results['matmul_gflops']:.1f}"),
        ("search / matmul FLOP rate", f"{results['search_over_matmul_flop_rate']:.3f}"),
    ]
    if guard_s:
        rows += [
            (f"Mine with the guard at {args.positive_ratio}, median (ms)", f"{guard['median_ms']:.1f}"),
            ("guarded / plain, median (target <= 1.10)", f"{results['guard_over_plain_median']:.3f}"),
            ("candidates dropped per anchor", f"{results['guard_dropped_per_anchor']:.2f}"),
        ]
    report("mine", results, rows, args.json_out)


if __name__ == "__main__":
    main()
