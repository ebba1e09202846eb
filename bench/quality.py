"""Does HELIP help? Plain CLIP vs online, offline and streaming HELIP, continued from the same checkpoint.

On the synthetic set, per seed: train a tiny CLIP from scratch for S steps (plain CLIP: the starting checkpoint),
then continue S more steps from it three ways, each with a fresh learning-rate schedule at a smaller learning rate
(the paper continues an already trained model at a small learning rate):

    plain    hard_ratio 0, λ 0                                         the raw baseline
    online   hard_ratio R, λ > 0, index bootstrapped, updated every step  (ours)
    offline  hard_ratio R, λ > 0, index bootstrapped, never updated       (the paper: mined once, with the start)
    streaming hard_ratio R, λ > 0, no bootstrap: the index fills from the training pushes; mining starts once it
             holds --start-coverage of the data set, then ramps in over --ramp-steps

Compute is counted in sample-passes: a training step costs 2 x batch (a forward and a backward pass per sample),
and the bootstrap pass of online and offline HELIP costs one forward pass per training sample. With
--equal-compute, the variants without that pass (plain, streaming) train ceil(N / (2 x batch)) more steps, so every
variant spends the same compute; without it, every variant trains the same number of steps.

and evaluate zero-shot top-1 and retrieval R@1 (image->text, text->image) on the synthetic test set. Reported as
mean ± std over the seeds, and deltas against plain paired by seed (same start, same anchor order).

    python -m bench.quality [--steps 200] [--seeds 0 1 2] [--lr 2e-4] [--margin 0.2] [--hnml-weight 1.0]
                            [--hard-ratio 0.5] [--hnml-form pair] [--equal-compute] [--loss clip|siglip]
                            [--data shapes|counts|textures|words] [--json-out F]

--loss siglip trains every run, the starting checkpoints too, with SigLIP's sigmoid loss (loss.kind siglip).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import add_data_flags, data_settings, ensure_synth, given_settings, report
from bench.train_overhead import TrainRun, train, train_once

METRICS = {
    "zero_shot/top1": "zero-shot top-1",
    "retrieval/image_to_text_R@1": "R@1 image->text",
    "retrieval/text_to_image_R@1": "R@1 text->image",
}
VARIANTS = ("plain", "online", "offline", "streaming")
BOOTSTRAPPED = ("online", "offline")  # variants that pay a forward pass over the training set before step one


GUARD = " guard "  # "<arm> guard <ratio>": the arm with the false-negative guard (mining.positive_ratio) at a ratio


def add_guard_flag(parser: argparse.ArgumentParser, arm: str) -> None:
    parser.add_argument(
        "--positive-ratio",
        type=float,
        nargs="+",
        default=[],
        help=f"add a {arm} arm with the false-negative guard at each ratio (mining.positive_ratio), reported "
        f"against plain and against {arm} with the guard off",
    )


def guard_arms(parser: argparse.ArgumentParser, args: argparse.Namespace, arm: str) -> list[str]:
    """The guarded arms --positive-ratio asks for (checked: each ratio in (0, 1], and `arm` among the variants)."""
    if any(not 0 < r <= 1 for r in args.positive_ratio):
        parser.error(f"--positive-ratio: each ratio must be in (0, 1], got {args.positive_ratio}")
    if args.positive_ratio and arm not in args.variants:
        parser.error(f"--positive-ratio adds guarded {arm} arms: --variants must include {arm}, their baseline")
    return [f"{arm}{GUARD}{r:g}" for r in args.positive_ratio]


def split_guard(variant: str) -> tuple[str, dict[str, object]]:
    """(the arm a variant guards, the guard's setting): ("online", {}) or ("online", {"mining.positive_ratio": 0.9}).
    Only guarded runs carry the key, so the digests of earlier runs stay as they were."""
    arm, _, ratio = variant.partition(GUARD)
    return arm, ({"mining.positive_ratio": float(ratio)} if ratio else {})


def guard_drops(run: TrainRun) -> float:
    """Candidates the guard dropped per hard pair the run trained on (0 without the guard)."""
    hard = sum(r["n_hard"] for r in run.steps)
    return run.summary.get("mining", {}).get("guard_dropped", 0) / hard if hard else 0.0


def paired_deltas(values: dict[str, dict[str, list[float]]], variants: list[str]) -> dict[str, dict]:
    """Each arm minus plain, and each guarded arm minus the same arm without the guard, paired by seed."""
    deltas = {}
    for variant in variants:
        arm, guard = split_guard(variant)
        pairs = [("plain", f"{variant} - plain")] if variant != "plain" else []
        pairs += [(arm, f"{variant} - guard off")] if guard else []
        for baseline, name in pairs:
            deltas[name] = {key: np.subtract(values[variant][key], values[baseline][key]) for key in METRICS}
    return deltas


def variant_settings(variant: str, args: argparse.Namespace) -> dict[str, object]:
    variant, guard = split_guard(variant)
    return {**arm_settings(variant, args), **guard}


def arm_settings(variant: str, args: argparse.Namespace) -> dict[str, object]:
    if variant == "plain":
        return {"optim.hard_ratio": 0, "loss.hnml_weight": 0}
    helip = {
        "optim.hard_ratio": args.hard_ratio,
        "loss.hnml_weight": args.hnml_weight,
        "loss.margin": args.margin,
        "loss.hnml_form": args.hnml_form,
        "mining.k": args.k,
    }
    if variant == "streaming":
        return {
            **helip,
            "mining.bootstrap_index": "false",
            "mining.update_index": "true",
            "mining.start_coverage": args.start_coverage,
            "mining.ramp_steps": args.ramp_steps,
        }
    return {
        **helip,
        "mining.bootstrap_index": "true",
        "mining.update_index": "true" if variant == "online" else "false",
    }


def add_loss_flag(parser: argparse.ArgumentParser) -> None:
    """--loss, read by run_settings."""
    parser.add_argument(
        "--loss",
        choices=("clip", "siglip"),
        default="clip",
        help="the contrastive loss of every run (loss.kind): CLIP's softmax or SigLIP's sigmoid",
    )


def run_settings(args: argparse.Namespace) -> dict[str, object]:
    """The settings every run of a quality benchmark shares: the synthetic set, batch, steps, loss, no mid-run saves."""
    # Only SigLIP runs carry loss.kind, so the CLIP runs' digests (train_once) stay as they were.
    loss = {} if args.loss == "clip" else {"loss.kind": args.loss}
    return {
        **loss,
        **data_settings(args),
        "optim.batch_size": args.batch_size,
        "optim.steps": args.steps,
        "run.checkpoint_every": 0,
        "run.eval_every": 0,
        **given_settings(args),  # --set wins over the benchmark's own settings; an arm's come later and win over it
    }


def extra_steps(variant: str, args: argparse.Namespace) -> int:
    """Steps a variant without the bootstrap pass gets on top of --steps to match the others' compute."""
    if not args.equal_compute or split_guard(variant)[0] in BOOTSTRAPPED:
        return 0
    return -(-args.synth_train // (2 * args.batch_size))


def sample_passes(variant: str, steps: int, args: argparse.Namespace) -> int:
    """Forward + backward sample-passes of a continuation: its steps, plus the bootstrap pass where there is one."""
    return 2 * args.batch_size * steps + (args.synth_train if split_guard(variant)[0] in BOOTSTRAPPED else 0)


def diagnostics(run: TrainRun) -> dict[str, float]:
    """Means over the run's steps of what the loss saw: hard slots filled, HNML, contrastive."""
    steps = run.steps
    slots = sum(r["n_hard"] + r["n_fallback"] for r in steps)
    tail = steps[-max(1, len(steps) // 5) :]  # the last fifth: what the loss looks like once training settled
    return {
        "hard_fraction": sum(r["n_hard"] for r in steps) / slots if slots else 0.0,
        "hnml_mean": float(np.mean([r["hnml"] for r in steps])),
        "hnml_last_fifth": float(np.mean([r["hnml"] for r in tail])),
        "contrastive_last_fifth": float(np.mean([r["contrastive"] for r in tail])),
        "guard_dropped_per_hard_pair": guard_drops(run),
        "wall_s": run.wall_s,
    }


def mean_std(values: list[float]) -> dict:
    array = np.asarray(values, dtype=float)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "values": [float(v) for v in array],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="S: steps from scratch, and steps of each continuation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--scratch-lr", type=float, default=1e-3)
    parser.add_argument("--scratch-warmup", type=int, default=15)
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate of the continuations")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up steps of the continuations")
    parser.add_argument("--hard-ratio", type=float, default=0.5)
    parser.add_argument("--hnml-weight", type=float, default=1.0, help="λ")
    parser.add_argument("--margin", type=float, default=0.2)
    parser.add_argument("--hnml-form", choices=("pair", "paper"), default="pair")
    parser.add_argument("--k", type=int, default=50, help="hard pairs are drawn from each anchor's top k")
    parser.add_argument("--start-coverage", type=float, default=0.5, help="streaming: index coverage to start at")
    parser.add_argument("--ramp-steps", type=int, default=20, help="streaming: steps over which hard pairs ramp in")
    parser.add_argument(
        "--equal-compute",
        action="store_true",
        help="give plain and streaming the steps that the bootstrap pass costs the others (sample-passes)",
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    add_guard_flag(parser, "online")
    add_loss_flag(parser)
    add_data_flags(parser)
    parser.add_argument("--start-dir", help="reuse starting checkpoints START_DIR/seed{N}/final.pt from an earlier run")
    parser.add_argument("--work-dir", help="keep the runs here (default: a temporary directory)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=3,
        help="seeds trained in parallel, each with cpus/jobs torch threads (for a shared machine)",
    )
    parser.add_argument("--json-out")
    parser.add_argument("--summarize", metavar="JSON", help="print the table of an earlier run's --json-out, and stop")
    args = parser.parse_args()
    if args.summarize:
        results = json.loads(Path(args.summarize).read_text())
        report("quality", results, table_rows(results), None)
        return
    if "plain" not in args.variants:
        parser.error("--variants must include plain: it is the baseline of the deltas")
    args.variants += guard_arms(parser, args, "online")

    started = time.perf_counter()
    temporary = None if args.work_dir else tempfile.TemporaryDirectory(prefix="helip-quality-")
    work = Path(args.work_dir or temporary.name)
    data = run_settings(args)
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    ensure_synth(args)

    def one_seed(seed: int) -> tuple[dict | None, dict[str, TrainRun]]:
        """The starting checkpoint's metrics (None when reused) and the continuations of one seed."""
        if args.start_dir:
            start_checkpoint, start_metrics = Path(args.start_dir) / f"seed{seed}" / "final.pt", None
        else:
            print(f"seed {seed}: from scratch", file=sys.stderr, flush=True)
            start = train(
                work / f"seed{seed}",
                {
                    **data,
                    "optim.seed": seed,
                    "optim.lr": args.scratch_lr,
                    "optim.warmup_steps": args.scratch_warmup,
                    "optim.hard_ratio": 0,
                    "loss.hnml_weight": 0,
                },
                threads=threads,
            )
            start_checkpoint, start_metrics = start.output_dir / "final.pt", start.metrics
        runs = {}
        for variant in args.variants:
            runs[variant] = train_once(
                work,
                f"seed{seed}-{variant}",
                {
                    **data,
                    "optim.seed": seed,
                    "optim.lr": args.lr,
                    "optim.warmup_steps": args.warmup,
                    "model.pretrained": start_checkpoint,
                    "optim.steps": args.steps + extra_steps(variant, args),
                    **variant_settings(variant, args),
                },
                threads=threads,
            )
        return start_metrics, runs

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        per_seed = list(pool.map(one_seed, args.seeds))
    if temporary is not None:
        temporary.cleanup()

    metrics: dict[str, dict[str, list[float]]] = {
        name: {key: [] for key in METRICS} for name in ("start", *args.variants)
    }
    diags: dict[str, list[dict]] = {name: [] for name in args.variants}
    for start_metrics, runs in per_seed:  # in seed order
        for key in METRICS:
            if start_metrics is not None:
                metrics["start"][key].append(start_metrics[key])
            for variant, run in runs.items():
                metrics[variant][key].append(run.metrics[key])
        for variant, run in runs.items():
            diags[variant].append(diagnostics(run))

    summary = {
        name: {key: mean_std(values) for key, values in by_key.items() if values} for name, by_key in metrics.items()
    }
    deltas = {
        name: {key: mean_std(d.tolist()) for key, d in by_key.items()}
        for name, by_key in paired_deltas(metrics, args.variants).items()
    }
    diag_means = {
        variant: {name: float(np.mean([d[name] for d in runs])) for name in runs[0]} for variant, runs in diags.items()
    }
    compute = {
        variant: sample_passes(variant, args.steps + extra_steps(variant, args), args) for variant in args.variants
    }
    results = {
        "config": vars(args),
        "sample_passes": compute,
        "metrics": summary,
        "delta_vs_plain": deltas,
        "diagnostics": diag_means,
        "total_wall_s": time.perf_counter() - started,
    }

    report("quality", results, table_rows(results), args.json_out)


def r1_per_seed(delta: dict) -> list[float]:
    """A paired delta's R@1 per seed, the mean of both directions (points)."""
    r1 = [key for key in METRICS if "R@1" in key]
    return [100 * float(np.mean([delta[key]["values"][i] for key in r1])) for i in range(len(delta[r1[0]]["values"]))]


def table_rows(results: dict) -> list[tuple[str, str]]:
    """The report's table, from the results alone (so that `--summarize F.json` prints it again)."""
    config, summary, deltas, diag_means = (
        results["config"],
        results["metrics"],
        results["delta_vs_plain"],
        results["diagnostics"],
    )

    def cell(stats: dict) -> str:
        return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"

    rows = []
    for name in summary:
        if summary[name]:
            rows.append(
                (
                    f"{name}: " + " / ".join(METRICS.values()) + " (%)",
                    " / ".join(cell(summary[name][key]) for key in METRICS),
                )
            )
    for name, by_key in deltas.items():
        rows.append(
            (
                f"{name} (points, paired by seed)",
                " / ".join(f"{100 * by_key[key]['mean']:+.1f} ± {100 * by_key[key]['std']:.1f}" for key in METRICS),
            )
        )
        per_seed = r1_per_seed(by_key)
        rows.append((f"{name}: R@1 per seed (mean of both ways)", " ".join(f"{d:+.1f}" for d in per_seed)))
        rows.append((f"{name}: seeds ahead on R@1", f"{sum(d > 0 for d in per_seed)} of {len(per_seed)}"))
    for variant, d in diag_means.items():
        if variant != "plain":
            rows.append(
                (
                    f"{variant}: hard slots filled / HNML (mean, last fifth)",
                    f"{d['hard_fraction']:.2f} / {d['hnml_mean']:.3f}, {d['hnml_last_fifth']:.3f}",
                )
            )
        if split_guard(variant)[1]:
            rows.append((f"{variant}: candidates dropped per hard pair", f"{d['guard_dropped_per_hard_pair']:.2f}"))
    compute = results["sample_passes"]
    rows.append(
        (
            "sample-passes per continuation: " + " / ".join(compute),
            " / ".join(f"{passes:,}" for passes in compute.values()),
        )
    )
    rows.append(
        (
            "seeds x steps (S) / continuation lr / loss / jobs",
            f"{len(config['seeds'])} x {config['steps']} / {config['lr']:g} / {config['loss']} / {config['jobs']}",
        )
    )
    rows.append(("total wall time (min)", f"{results['total_wall_s'] / 60:.1f}"))
    return rows


if __name__ == "__main__":
    main()
