"""GPU check: GPU answers equal CPU answers, then Mine latency at N = 10,000,000 on the GPU.

Meant for a machine with a CUDA device, run through bench/gpu_check.sh within 8 minutes:

    python -m bench.gpu_check [--rows 10000000] [--dim 256] [--anchors 512] [--k 16] [--variants]

Timed on the same stored rows, against one plain product of the same shape: the Mine on the torch path and with
the fused Triton kernel (search.kernel triton, core.fused; goal <= 2x the product), the guarded Mine, and 16
concurrent callers of 128 anchors each, alone and batched (core.batching; goal >= 50,000 anchors/s).
--variants adds the storage-block / segment / scratch sweep the GPU defaults were chosen from (refills the store
three times: minutes).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import torch

from bench.common import report, summarize, unit_pairs
from helip.miner_service.core import fused
from helip.miner_service.core.api import MineQuery
from helip.miner_service.core.batching import MineBatcher
from helip.miner_service.core.config import SearchConfig
from helip.miner_service.core.miner import HardPairMiner

# (rows per storage block, top-k segment columns, one Mine's scratch MiB) timed beside the defaults: what the GPU
# defaults were chosen from.
VARIANTS = [
    (1 << 16, 0, 256),
    (1 << 16, 0, 1024),
    (1 << 16, 4096, 1024),
    (1 << 18, 0, 1024),
    (1 << 18, 0, 4096),
    (1 << 20, 0, 4096),
    (1 << 20, 4096, 4096),
]


def compare(rows: int, dim: int, k: int) -> dict:
    image, text = unit_pairs(np.random.default_rng(0), rows, dim)
    ids = np.arange(rows, dtype=np.uint64)
    anchors = np.random.default_rng(1).choice(rows, 512, replace=False).astype(np.uint64)
    answers = {}
    for name, config in {
        "cpu": SearchConfig(device="cpu"),
        "cuda_fp32": SearchConfig(device="cuda", storage_dtype="float32"),
        "cuda_fp16": SearchConfig(device="cuda", storage_dtype="float16"),
        "cuda_fp16_segmented": SearchConfig(device="cuda", storage_dtype="float16", topk_segment=1024),
        "cuda_fp32_fused": SearchConfig(device="cuda", storage_dtype="float32", kernel="triton"),
        "cuda_fp16_fused": SearchConfig(device="cuda", storage_dtype="float16", kernel="triton"),
        "cuda_bf16_fused": SearchConfig(device="cuda", storage_dtype="bfloat16", kernel="triton"),
    }.items():
        try:
            miner = HardPairMiner(dim, config)
            miner.upsert(ids, image, text, 1)
            answers[name] = miner.mine(MineQuery(k, anchor_ids=anchors))
        except Exception as error:  # a failing path is reported, and the rest of the device time still measures
            answers[name] = error
    cpu = answers["cpu"]
    out = {}
    for name in [name for name in answers if name != "cpu"]:
        got = answers[name]
        if isinstance(got, Exception):
            out[name] = {"error": repr(got)}
            continue
        out[name] = {
            "ids_equal_fraction": float((got.neighbour_ids == cpu.neighbour_ids).mean()),
            "recall_at_k": float(
                np.mean([len(set(a) & set(b)) / k for a, b in zip(got.neighbour_ids, cpu.neighbour_ids)])
            ),
            "max_abs_score_diff": float(np.abs(got.scores - cpu.scores).max()),
        }
    return out


def filled(rows: int, dim: int, config: SearchConfig) -> HardPairMiner:
    """A GPU miner holding `rows` random pairs, made on the GPU: no 20 GB host round trip."""
    miner = HardPairMiner(dim, config)
    generator = torch.Generator(device="cuda").manual_seed(0)
    chunk = 1 << 20
    for first in range(0, rows, chunk):
        n = min(chunk, rows - first)
        image = torch.nn.functional.normalize(torch.randn(n, dim, device="cuda", generator=generator), dim=1)
        text = torch.nn.functional.normalize(
            image + 0.5 * torch.randn(n, dim, device="cuda", generator=generator), dim=1
        )
        miner.upsert(np.arange(first, first + n, dtype=np.uint64), image, text, 1)
    return miner


def latency(rows: int, dim: int, n_anchors: int, k: int, repeats: int, sweep: bool) -> dict:
    miner = filled(rows, dim, SearchConfig(device="cuda"))
    seconds = time_mines(miner, rows, n_anchors, k, repeats)
    guarded = time_mines(miner, rows, n_anchors, k, max(5, repeats // 3), positive_ratio=0.9)
    miner.fused = fused  # the same rows, searched by the fused kernel
    kernels = {"torch": summarize(seconds)}
    try:
        kernels["triton"] = summarize(time_mines(miner, rows, n_anchors, k, repeats))
    except Exception as error:  # reported; the callers below still measure on the torch path
        kernels["triton"] = {"error": repr(error), "median_ms": float("inf"), "p99_ms": float("inf")}
    fastest = min(kernels, key=lambda name: kernels[name]["median_ms"])
    miner.fused = fused if fastest == "triton" else None
    callers = {batched: concurrent_mines(miner, rows, CALLERS, CALLER_ANCHORS, k, batched) for batched in (False, True)}
    dtype = miner.dtype
    variants = {}
    for store_block_rows in sorted({v[0] for v in VARIANTS}) if sweep else ():
        del miner
        torch.cuda.empty_cache()
        miner = filled(rows, dim, SearchConfig(device="cuda", store_block_rows=store_block_rows))
        for _, segment, scratch_mib in (v for v in VARIANTS if v[0] == store_block_rows):
            # The same stored rows under other search settings (read by each Mine): no refill per setting.
            miner.config = replace(
                miner.config,
                topk_segment=segment,
                mine_scratch_bytes=scratch_mib << 20,
                scratch_budget_bytes=max(scratch_mib << 20, miner.config.scratch_budget_bytes),
            )
            name = f"store blocks {store_block_rows}, segment {segment}, scratch {scratch_mib} MiB"
            variants[name] = summarize(time_mines(miner, rows, n_anchors, k, max(5, repeats // 3)))
    del miner
    torch.cuda.empty_cache()
    a = torch.randn(n_anchors, dim, device="cuda", dtype=dtype)
    b = torch.randn(rows, dim, device="cuda", dtype=dtype)
    matmul = []
    for repeat in range(8):
        torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b.T
        torch.cuda.synchronize()
        if repeat >= 3:
            matmul.append(time.perf_counter() - started)
    return {
        "mine": summarize(seconds),
        "mine_fused": kernels["triton"],
        "fastest_kernel": fastest,
        "callers_unbatched": callers[False],
        "callers_batched": callers[True],
        "mine_guard_0.9": summarize(guarded),
        "variants": variants,
        "matmul_one_product": summarize(matmul),
        "dtype": str(dtype),
    }


def time_mines(
    miner: HardPairMiner, rows: int, n_anchors: int, k: int, repeats: int, positive_ratio: float = 0.0
) -> list[float]:
    """Seconds of `repeats` Mines of random stored anchors, after 3 not timed (positive_ratio: the guard)."""
    rng = np.random.default_rng(2)
    seconds = []
    for repeat in range(repeats + 3):
        anchors = rng.choice(rows, n_anchors, replace=False).astype(np.uint64)
        torch.cuda.synchronize()
        started = time.perf_counter()
        miner.mine(MineQuery(k, anchor_ids=anchors, positive_ratio=positive_ratio))  # returns host arrays: synced
        if repeat >= 3:
            seconds.append(time.perf_counter() - started)
    return seconds


CALLERS = 16
CALLER_ANCHORS = 128


def concurrent_mines(miner: HardPairMiner, rows: int, callers: int, anchors: int, k: int, batched: bool) -> dict:
    """`callers` threads mining `anchors` random stored anchors back to back for a few seconds, each Mine alone or
    through a MineBatcher: anchors answered per second and the callers' Mine latency."""
    mine = MineBatcher(miner, window_s=0.0005, max_anchors=8192).mine if batched else miner.mine
    stop_at = time.perf_counter() + 5.0
    latencies: list[float] = []

    def caller(index: int) -> int:
        rng = np.random.default_rng(100 + index)
        done = 0
        while time.perf_counter() < stop_at:
            picked = rng.choice(rows, anchors, replace=False).astype(np.uint64)
            started = time.perf_counter()
            mine(MineQuery(k, anchor_ids=picked, exclude_ids=picked))
            latencies.append(time.perf_counter() - started)
            done += anchors
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        answered = sum(pool.map(caller, range(callers)))
    return {"anchors_per_s": answered / (time.perf_counter() - started), **summarize(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--compare-rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--anchors", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--variants", action="store_true", help="also the storage / segment / scratch sweep")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device")
    equal = compare(args.compare_rows, args.dim, args.k)
    timing = latency(args.rows, args.dim, args.anchors, args.k, args.repeats, args.variants)
    product = timing["matmul_one_product"]["median_ms"]
    results = {"config": vars(args), "equality": equal, "latency": timing}
    rows = [
        (
            f"{name}: ids equal / recall@k / max |score diff|",
            v["error"]
            if "error" in v
            else f"{v['ids_equal_fraction']:.4f} / {v['recall_at_k']:.4f} / {v['max_abs_score_diff']:.2e}",
        )
        for name, v in equal.items()
    ]
    rows += [
        (
            f"Mine median / p99 at N={args.rows:,} (ms)",
            f"{timing['mine']['median_ms']:.2f} / {timing['mine']['p99_ms']:.2f}",
        ),
        (
            "Mine with the fused kernel, median / p99 (ms; goal <= 2x the product)",
            f"{timing['mine_fused']['median_ms']:.2f} / {timing['mine_fused']['p99_ms']:.2f}",
        ),
        (
            "Mine / one product: torch path, fused kernel",
            f"{timing['mine']['median_ms'] / product:.1f}x, {timing['mine_fused']['median_ms'] / product:.1f}x",
        ),
        (
            f"{CALLERS} callers x {CALLER_ANCHORS} anchors ({timing['fastest_kernel']}): anchors/s alone, batched "
            "(goal >= 50,000)",
            f"{timing['callers_unbatched']['anchors_per_s']:,.0f}, {timing['callers_batched']['anchors_per_s']:,.0f}",
        ),
        (
            "those callers' Mine p99, alone / batched (ms)",
            f"{timing['callers_unbatched']['p99_ms']:.1f} / {timing['callers_batched']['p99_ms']:.1f}",
        ),
        ("Mine with the guard at 0.9, median (ms)", f"{timing['mine_guard_0.9']['median_ms']:.2f}"),
        ("one plain product of the same shape (ms)", f"{timing['matmul_one_product']['median_ms']:.2f}"),
    ]
    rows += [
        (f"Mine median at N={args.rows:,}, {name} (ms)", f"{v['median_ms']:.2f}")
        for name, v in timing["variants"].items()
    ]
    report("gpu_check", results, rows, args.json_out)


if __name__ == "__main__":
    main()
