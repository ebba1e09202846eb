"""GPU check: GPU answers equal CPU answers, then Mine latency at N = 10,000,000 on the GPU.

Meant for a machine with a CUDA device, run through bench/gpu_check.sh in well under 5 minutes:

    python -m bench.gpu_check [--rows 10000000] [--dim 256] [--anchors 512] [--k 16]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import report, summarize, unit_pairs
from miner_service.config import SearchConfig
from miner_service.core_api import MineQuery
from miner_service.miner import HardPairMiner


def compare(rows: int, dim: int, k: int) -> dict:
    image, text = unit_pairs(np.random.default_rng(0), rows, dim)
    ids = np.arange(rows, dtype=np.uint64)
    anchors = np.random.default_rng(1).choice(rows, 512, replace=False).astype(np.uint64)
    answers = {}
    for name, config in {
        "cpu": SearchConfig(device="cpu"),
        "cuda_fp32": SearchConfig(device="cuda", storage_dtype="float32"),
        "cuda_fp16": SearchConfig(device="cuda", storage_dtype="float16"),
    }.items():
        miner = HardPairMiner(dim, config)
        miner.upsert(ids, image, text, 1)
        answers[name] = miner.mine(MineQuery(k, anchor_ids=anchors))
    cpu = answers["cpu"]
    out = {}
    for name in ("cuda_fp32", "cuda_fp16"):
        got = answers[name]
        out[name] = {
            "ids_equal_fraction": float((got.neighbour_ids == cpu.neighbour_ids).mean()),
            "recall_at_k": float(
                np.mean([len(set(a) & set(b)) / k for a, b in zip(got.neighbour_ids, cpu.neighbour_ids)])
            ),
            "max_abs_score_diff": float(np.abs(got.scores - cpu.scores).max()),
        }
    return out


def latency(rows: int, dim: int, n_anchors: int, k: int, repeats: int) -> dict:
    miner = HardPairMiner(dim, SearchConfig(device="cuda"))
    generator = torch.Generator(device="cuda").manual_seed(0)
    chunk = 1 << 20
    for first in range(0, rows, chunk):  # rows made on the GPU: no 20 GB host round trip
        n = min(chunk, rows - first)
        image = torch.nn.functional.normalize(torch.randn(n, dim, device="cuda", generator=generator), dim=1)
        text = torch.nn.functional.normalize(
            image + 0.5 * torch.randn(n, dim, device="cuda", generator=generator), dim=1
        )
        miner.upsert(np.arange(first, first + n, dtype=np.uint64), image, text, 1)
    rng = np.random.default_rng(2)
    seconds = []
    for repeat in range(repeats + 3):
        anchors = rng.choice(rows, n_anchors, replace=False).astype(np.uint64)
        torch.cuda.synchronize()
        started = time.perf_counter()
        miner.mine(MineQuery(k, anchor_ids=anchors))
        if repeat >= 3:
            seconds.append(time.perf_counter() - started)
    a = torch.randn(n_anchors, dim, device="cuda", dtype=miner.dtype)
    b = torch.randn(rows, dim, device="cuda", dtype=miner.dtype)
    matmul = []
    for repeat in range(8):
        torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b.T
        torch.cuda.synchronize()
        if repeat >= 3:
            matmul.append(time.perf_counter() - started)
    return {"mine": summarize(seconds), "matmul_one_product": summarize(matmul), "dtype": str(miner.dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--compare-rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--anchors", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device")
    equal = compare(args.compare_rows, args.dim, args.k)
    timing = latency(args.rows, args.dim, args.anchors, args.k, args.repeats)
    results = {"config": vars(args), "equality": equal, "latency": timing}
    rows = [
        (
            f"{name}: ids equal / recall@k / max |score diff|",
            f"{v['ids_equal_fraction']:.4f} / {v['recall_at_k']:.4f} / {v['max_abs_score_diff']:.2e}",
        )
        for name, v in equal.items()
    ]
    rows += [
        (
            f"Mine median / p99 at N={args.rows:,} (ms)",
            f"{timing['mine']['median_ms']:.2f} / {timing['mine']['p99_ms']:.2f}",
        ),
        ("one plain product of the same shape (ms)", f"{timing['matmul_one_product']['median_ms']:.2f}"),
    ]
    report("gpu_check", results, rows, args.json_out)


if __name__ == "__main__":
    main()
