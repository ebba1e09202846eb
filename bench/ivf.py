"""The IVF candidate path against the exact search: Mine latency and recall at large N on the CPU.

Rows are drawn around cluster centres (real embeddings cluster, which is what an IVF exploits; i.i.d. Gaussian rows
would make any IVF look bad). Two in-process miners hold the same rows: one exact only, one that builds its IVF in
the background once it holds `--rows`; both answer the same Mines (by id, PRODUCT, k = 16).

    python -m bench.ivf [--rows 1000000] [--dim 256] [--clusters 2000] [--anchors 512] [--nprobe 32]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the miner runs

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.common import report, summarize  # noqa: E402
from helip.miner_service.core.api import MineQuery  # noqa: E402
from helip.miner_service.core.config import (
    IvfConfig,  # noqa: E402
    SearchConfig,  # noqa: E402
)
from helip.miner_service.core.miner import HardPairMiner  # noqa: E402


def clustered_pairs(rng, n: int, dim: int, clusters: int, chunk: int = 65536):
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    for first in range(0, n, chunk):
        size = min(chunk, n - first)
        image = centres[rng.integers(0, clusters, size)] + 0.6 * rng.standard_normal((size, dim), dtype=np.float32)
        text = image + 0.4 * rng.standard_normal((size, dim), dtype=np.float32)
        image /= np.linalg.norm(image, axis=1, keepdims=True)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        yield np.arange(first, first + size, dtype=np.uint64), image, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--anchors", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json-out")
    args = parser.parse_args()

    exact = HardPairMiner(args.dim, SearchConfig(device="cpu", ivf=IvfConfig(min_rows=0)))
    ivf = HardPairMiner(args.dim, SearchConfig(device="cpu", ivf=IvfConfig(min_rows=args.rows, nprobe=args.nprobe)))
    for ids, image, text in tqdm(
        clustered_pairs(np.random.default_rng(0), args.rows, args.dim, args.clusters),
        total=-(-args.rows // 65536),
        desc="rows",
        leave=False,
    ):
        exact.upsert(ids, image, text, 1)
        ivf.upsert(ids, image, text, 1)
    started = time.perf_counter()
    assert ivf.wait_for_ivf(3600), "the IVF was not built"
    build_s = time.perf_counter() - started  # the build started in the background at the last upsert

    rng = np.random.default_rng(1)
    exact_s, ivf_s, recalls = [], [], []
    for _ in tqdm(range(args.repeats), desc="mine", leave=False):
        anchors = rng.choice(args.rows, args.anchors, replace=False).astype(np.uint64)
        started = time.perf_counter()
        truth = exact.mine(MineQuery(args.k, anchor_ids=anchors))
        exact_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        approx = ivf.mine(MineQuery(args.k, anchor_ids=anchors))
        ivf_s.append(time.perf_counter() - started)
        assert approx.used_ivf
        recalls.extend(len(set(a) & set(b)) / args.k for a, b in zip(approx.neighbour_ids, truth.neighbour_ids))

    e, i = summarize(exact_s), summarize(ivf_s)
    results = {
        "config": vars(args),
        "ivf_build_wait_s": build_s,
        "mine_exact": e,
        "mine_ivf": i,
        "speedup_median": e["median_ms"] / i["median_ms"],
        "recall_at_k": float(np.mean(recalls)),
        "recall_at_k_p10": float(np.percentile(recalls, 10)),
    }
    rows = [
        (f"Mine exact median / p99 (ms), N={args.rows:,}", f"{e['median_ms']:.0f} / {e['p99_ms']:.0f}"),
        (f"Mine IVF median / p99 (ms), nprobe={args.nprobe}", f"{i['median_ms']:.0f} / {i['p99_ms']:.0f}"),
        ("exact / IVF, median", f"{results['speedup_median']:.1f}x"),
        (
            f"recall@{args.k} of the IVF answers (mean / 10th percentile)",
            f"{results['recall_at_k']:.3f} / {results['recall_at_k_p10']:.3f}",
        ),
        ("IVF build finished after the last upsert (s)", f"{build_s:.0f}"),
    ]
    report("ivf", results, rows, args.json_out)


if __name__ == "__main__":
    main()
