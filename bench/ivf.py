"""The IVF candidate path against the exact search: Mine latency and recall at large N on the CPU.

Rows are drawn around cluster centres (real embeddings cluster, which is what an IVF exploits; i.i.d. Gaussian rows
would make any IVF look bad). Two in-process miners hold the same rows: one exact only, one that builds its IVF in
the background once it holds `--rows`; both answer the same Mines (by id, PRODUCT, k = 16).

    python -m bench.ivf [--rows 1000000] [--dim 256] [--clusters 2000] [--anchors 512] [--nprobe 32]
                        [--codecs flat fp16 sq8 pq]

With several --codecs (search.ivf.codec: how the IVF stores its copy of the rows), one IVF miner per codec is built
in turn beside the same exact miner, and each is reported: its bytes a row, build time, Mine latency and recall.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the miner runs

import argparse  # noqa: E402
import gc  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.common import report, summarize  # noqa: E402
from helip.miner_service.core.api import MineQuery  # noqa: E402
from helip.miner_service.core.config import IVF_CODECS, IvfConfig, SearchConfig  # noqa: E402
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
    parser.add_argument("--codecs", nargs="+", choices=IVF_CODECS, default=["flat"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json-out")
    args = parser.parse_args()

    exact = HardPairMiner(args.dim, SearchConfig(device="cpu", ivf=IvfConfig(min_rows=0)))
    fill(exact, args)
    rng = np.random.default_rng(1)
    anchor_sets = [rng.choice(args.rows, args.anchors, replace=False).astype(np.uint64) for _ in range(args.repeats)]
    exact_s, truths = [], []
    for anchors in tqdm(anchor_sets, desc="mine exact", leave=False):
        started = time.perf_counter()
        truths.append(exact.mine(MineQuery(args.k, anchor_ids=anchors)).neighbour_ids)
        exact_s.append(time.perf_counter() - started)
    e = summarize(exact_s)
    results = {"config": vars(args), "mine_exact": e, "codecs": {}}
    rows = [(f"Mine exact median / p99 (ms), N={args.rows:,}", f"{e['median_ms']:.0f} / {e['p99_ms']:.0f}")]
    for codec in args.codecs:
        measured = measure_codec(codec, args, anchor_sets, truths)
        measured["speedup_median"] = e["median_ms"] / measured["mine_ivf"]["median_ms"]
        results["codecs"][codec] = measured
        i = measured["mine_ivf"]
        rows += [
            (f"{codec}: bytes a row in the IVF", f"{measured['code_bytes']}"),
            (f"{codec}: Mine IVF median / p99 (ms), nprobe={args.nprobe}", f"{i['median_ms']:.0f} / {i['p99_ms']:.0f}"),
            (f"{codec}: exact / IVF, median", f"{measured['speedup_median']:.1f}x"),
            (
                f"{codec}: recall@{args.k} (mean / 10th percentile)",
                f"{measured['recall_at_k']:.3f} / {measured['recall_at_k_p10']:.3f}",
            ),
            (f"{codec}: IVF build finished after the last upsert (s)", f"{measured['ivf_build_wait_s']:.0f}"),
        ]
    if args.codecs == ["flat"]:  # the keys of the first version of this benchmark's JSON
        results.update({key: results["codecs"]["flat"][key] for key in results["codecs"]["flat"]})
    report("ivf", results, rows, args.json_out)


def fill(miner: HardPairMiner, args: argparse.Namespace) -> None:
    """The same clustered rows into every miner (seed 0)."""
    for ids, image, text in tqdm(
        clustered_pairs(np.random.default_rng(0), args.rows, args.dim, args.clusters),
        total=-(-args.rows // 65536),
        desc="rows",
        leave=False,
    ):
        miner.upsert(ids, image, text, 1)


def measure_codec(codec: str, args: argparse.Namespace, anchor_sets: list, truths: list) -> dict:
    """One IVF miner with `codec`: its build, then the same Mines as the exact miner, against its answers."""
    config = IvfConfig(min_rows=args.rows, nprobe=args.nprobe, codec=codec)
    ivf = HardPairMiner(args.dim, SearchConfig(device="cpu", ivf=config))
    fill(ivf, args)
    started = time.perf_counter()
    assert ivf.wait_for_ivf(3600), "the IVF was not built"
    build_s = time.perf_counter() - started  # the build started in the background at the last upsert
    ivf_s, recalls = [], []
    for anchors, truth in tqdm(list(zip(anchor_sets, truths)), desc=f"mine {codec}", leave=False):
        started = time.perf_counter()
        approx = ivf.mine(MineQuery(args.k, anchor_ids=anchors))
        ivf_s.append(time.perf_counter() - started)
        assert approx.used_ivf
        recalls.extend(len(set(a) & set(b)) / args.k for a, b in zip(approx.neighbour_ids, truth))
    code_bytes = ivf.ivf.current().index.code_bytes
    del ivf
    gc.collect()  # this codec's store and index go before the next codec's are built
    return {
        "code_bytes": code_bytes,
        "ivf_build_wait_s": build_s,
        "mine_ivf": summarize(ivf_s),
        "recall_at_k": float(np.mean(recalls)),
        "recall_at_k_p10": float(np.percentile(recalls, 10)),
    }


if __name__ == "__main__":
    main()
