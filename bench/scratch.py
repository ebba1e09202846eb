"""Pretraining from scratch: plain CLIP vs streaming HELIP (online hard pairs after a warm-up), same compute.

Offline mining cannot serve this case: its one pass would mine with a random model. Streaming HELIP needs no pass
at all: the index fills from the embeddings that training computes anyway, mining starts at `--start-step` once
the index holds `--start-coverage` of the data set, and hard pairs ramp in over `--ramp-steps`. Both arms train
the same tiny CLIP from the same random init (per seed) for S steps of the same batch size, so their compute is
equal: 2 x batch sample-passes (forward + backward) per step, and no pre-pass. Evaluated on the synthetic test
set: zero-shot top-1 and retrieval R@1 both ways; mean ± std over seeds, deltas paired by seed, and how many
seeds are ahead.

    python -m bench.scratch [--steps 600] [--seeds 0 1 2 3 4] [--start-step 100] [--start-coverage 0.5]
                            [--ramp-steps 50] [--hard-ratio 0.5] [--hnml-weight 0] [--k 10] [--jobs 2]
                            [--loss clip|siglip] [--data shapes|counts|textures|words]
                            [--scoring PRODUCT|SUM|IMAGE|TEXT] [--positive-ratio 0.95 0.9 0.8]
                            [--work-dir DIR] [--json-out F]

--positive-ratio adds one streaming arm per ratio with the false-negative guard on (mining.positive_ratio),
reported against plain and against streaming with the guard off (paired by seed), with the candidates it dropped.

On a set of your own instead of a generated family: --train-data (CSV/TSV in open_clip's format, or webdataset
shards) and --retrieval-data (held-out pairs: R@1 both ways), optionally --zeroshot-dir (an ImageFolder; without
one, zero-shot is reported as nan) or --eval-dir (the synth layout), and --set KEY=VALUE for any other helip-train
setting of every run (column names, the model, augmentation):

    python -m bench.scratch --train-data train.csv --retrieval-data val.csv --set data.caption_key=caption
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import add_data_flags, add_own_data_flags, check_own_data, ensure_synth, report
from bench.quality import (
    METRICS,
    add_guard_flag,
    add_loss_flag,
    guard_arms,
    guard_drops,
    mean_std,
    paired_deltas,
    run_settings,
    split_guard,
)
from bench.train_overhead import TrainRun, check_run, train_once

VARIANTS = ("plain", "streaming")


def variant_settings(variant: str, args: argparse.Namespace) -> dict[str, object]:
    variant, guard = split_guard(variant)
    if variant == "plain":
        return {"optim.hard_ratio": 0, "loss.hnml_weight": 0, "mining.bootstrap_index": "false"}
    scoring = {} if args.scoring == "PRODUCT" else {"mining.scoring": args.scoring}  # run digests stay as they were
    return {
        **scoring,
        **guard,
        "optim.hard_ratio": args.hard_ratio,
        "loss.hnml_weight": args.hnml_weight,
        "loss.margin": args.margin,
        "mining.bootstrap_index": "false",
        "mining.update_index": "true",
        "mining.start_step": args.start_step,
        "mining.start_coverage": args.start_coverage,
        "mining.ramp_steps": args.ramp_steps,
        "mining.k": args.k,
    }


def run_of(args: argparse.Namespace, seed: int, variant: str) -> dict[str, object]:
    """Every setting of one run of the cell: shared by the arms, then the seed's, then the arm's own. Another
    benchmark that builds its runs here (bench.defaults) gets the same digests, so the two share their runs."""
    common = {**run_settings(args), "optim.lr": args.lr, "optim.warmup_steps": args.warmup}
    return {**common, "optim.seed": seed, **variant_settings(variant, args)}


def threads_per_run(jobs: int) -> int | None:
    """Torch threads of each of `jobs` runs in parallel (None: one run alone takes torch's default)."""
    return max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None


def sample_passes(run: TrainRun, batch_size: int) -> int:
    """Forward + backward sample-passes of a run: 2 per sample per step (no pre-pass in either arm)."""
    return 2 * batch_size * len(run.steps)


def hard_share(run: TrainRun) -> float:
    slots = sum(r["n_hard"] + r["n_fallback"] for r in run.steps)
    return sum(r["n_hard"] for r in run.steps) / slots if slots else 0.0


def scratch_parser() -> argparse.ArgumentParser:
    """The cell's flags (bench.defaults parses its base cell with them too)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--hard-ratio", type=float, default=0.5)
    parser.add_argument("--hnml-weight", type=float, default=0.0, help="λ")
    parser.add_argument("--margin", type=float, default=0.2)
    parser.add_argument("--start-step", type=int, default=100, help="no mining before this step (warm-up)")
    parser.add_argument("--start-coverage", type=float, default=0.5)
    parser.add_argument("--ramp-steps", type=int, default=50)
    parser.add_argument("--k", type=int, default=10, help="hard pairs are drawn from each anchor's top k")
    parser.add_argument(
        "--scoring",
        choices=("PRODUCT", "SUM", "IMAGE", "TEXT"),
        default="PRODUCT",
        help="how the miner scores a stored pair against an anchor (mining.scoring)",
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    add_loss_flag(parser)  # every arm trains with this loss (loss.kind)
    add_guard_flag(parser, "streaming")
    add_data_flags(parser)
    add_own_data_flags(parser)
    parser.add_argument(
        "--work-dir",
        help="keep the runs here (default: a temporary directory); a run already there with the same settings is "
        "read, not run again (so cells of a sweep share their plain runs)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, each with cpus/jobs torch threads")
    parser.add_argument("--json-out")
    return parser


def main() -> None:
    parser = scratch_parser()
    args = parser.parse_args()
    if "plain" not in args.variants:
        parser.error("--variants must include plain: it is the baseline of the deltas")
    check_own_data(parser, args)
    args.variants += guard_arms(parser, args, "streaming")
    try:  # every arm's settings pass the trainer's own checks before the first run starts
        for variant in args.variants:
            check_run(run_of(args, args.seeds[0], variant))
    except ValueError as error:
        parser.error(str(error))

    started = time.perf_counter()
    temporary = None if args.work_dir else tempfile.TemporaryDirectory(prefix="helip-scratch-")
    work = Path(args.work_dir or temporary.name)
    threads = threads_per_run(args.jobs)
    ensure_synth(args)
    jobs = [(seed, variant) for seed in args.seeds for variant in args.variants]

    def one(job: tuple[int, str]) -> TrainRun:
        seed, variant = job
        return train_once(work, f"seed{seed}-{variant}", run_of(args, seed, variant), threads=threads)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = dict(zip(jobs, pool.map(one, jobs)))
    if temporary is not None:
        temporary.cleanup()

    values = {v: {key: [runs[(s, v)].metrics[key] for s in args.seeds] for key in METRICS} for v in args.variants}
    summary = {v: {key: mean_std(vals) for key, vals in by_key.items()} for v, by_key in values.items()}
    deltas, ahead = {}, {}
    for name, per_key in paired_deltas(values, args.variants).items():
        deltas[name] = {key: mean_std(d.tolist()) for key, d in per_key.items()}
        # A seed is ahead when its mean R@1 over both directions beats the baseline's.
        r1 = [key for key in METRICS if "R@1" in key]
        ahead[name] = int(sum(np.mean([per_key[key][i] for key in r1]) > 0 for i in range(len(args.seeds))))
    compute = {
        v: float(np.mean([sample_passes(runs[(s, v)], args.batch_size) for s in args.seeds])) for v in args.variants
    }
    shares = {v: float(np.mean([hard_share(runs[(s, v)]) for s in args.seeds])) for v in args.variants}
    dropped = {v: float(np.mean([guard_drops(runs[(s, v)]) for s in args.seeds])) for v in args.variants}
    results = {
        "config": vars(args),
        "metrics": summary,
        "delta_vs_plain": deltas,
        "seeds_ahead_r1": ahead,
        "sample_passes": compute,
        "hard_share": shares,
        "guard_dropped_per_hard_pair": dropped,
        "total_wall_s": time.perf_counter() - started,
    }

    rows = []
    for variant, by_key in summary.items():
        cells = " / ".join(f"{100 * by_key[k]['mean']:.1f} ± {100 * by_key[k]['std']:.1f}" for k in METRICS)
        rows.append((f"{variant}: " + " / ".join(METRICS.values()) + " (%)", cells))
    for variant, by_key in deltas.items():
        rows.append(
            (
                f"{variant} (points, paired by seed)",
                " / ".join(f"{100 * by_key[k]['mean']:+.1f} ± {100 * by_key[k]['std']:.1f}" for k in METRICS),
            )
        )
        per_seed = " ".join(
            f"{100 * np.mean([by_key[k]['values'][i] for k in METRICS if 'R@1' in k]):+.1f}"
            for i in range(len(args.seeds))
        )
        rows.append((f"{variant}: R@1 delta per seed (mean of both ways)", per_seed))
        rows.append((f"{variant}: seeds ahead on R@1", f"{ahead[variant]} of {len(args.seeds)}"))
    rows.append(
        ("sample-passes per run: " + " / ".join(args.variants), " / ".join(f"{compute[v]:,.0f}" for v in compute))
    )
    rows.append(("hard slots filled (mean over the run)", " / ".join(f"{shares[v]:.2f}" for v in shares)))
    if args.positive_ratio:
        rows.append(
            ("guard: candidates dropped per hard pair trained on", " / ".join(f"{dropped[v]:.2f}" for v in dropped))
        )
    rows.append(
        (
            "seeds x steps / lr / loss / jobs",
            f"{len(args.seeds)} x {args.steps} / {args.lr:g} / {args.loss} / {args.jobs}",
        )
    )
    rows.append(("total wall time (min)", f"{results['total_wall_s'] / 60:.1f}"))
    report("scratch", results, rows, args.json_out)


if __name__ == "__main__":
    main()
