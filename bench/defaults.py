"""Does every default hold on every data family? One setting at a time around the from-scratch defaults.

Each arm is bench.scratch's streaming cell with the defaults of configs/scratch.yaml (hard pairs from the 10
nearest, no Mine before step 100, a 50-step ramp, hard ratio 0.5, the false-negative guard off) and one setting
changed. Every family trains plain, the defaults and each arm over the same seeds at the same compute (600 steps
of 64 from random init). A run is bench.scratch's run with the same settings, digest and all: a family's work dir
that `bench.scratch --work-dir DIR/FAMILY` filled is read back here, and the other way round.

The runs of every family go into one pool of --jobs, arm by arm (plain and the defaults first), so that the cores
stay busy across arms and an interrupted sweep keeps its finished runs: run it again and only the missing ones
train.

Reported per family: each arm minus plain and minus the defaults (paired by seed), with the seeds ahead of the
defaults on R@1 (the mean of both directions). Then, per arm, where the default holds: it holds on a family unless
the arm is ahead of it on the mean R@1 delta *and* on most seeds.

    python -m bench.defaults [--data counts textures] [--seeds 0 1 2 3 4] [--jobs 2]
                             [--arms k=50 start_step=0 ramp_steps=0 hard_ratio=0.75 positive_ratio=0.9]
                             [--work-dir DIR] [--json-out F] [bench.scratch's flags for the base cell]
    python -m bench.defaults --summarize F.json

On a set of your own (bench.scratch's --train-data, --retrieval-data, ...: see its --help), the sweep has one cell,
labelled "own", in DIR/own: does each default hold on *your* data?
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import check_own_data, ensure_synth, own_data, report
from bench.quality import GUARD, METRICS, guard_drops, mean_std
from bench.scratch import hard_share, run_of, scratch_parser, threads_per_run
from bench.train_overhead import check_run, train_once
from helip.trainer.tools.synth_families import FAMILIES

# The settings an arm may change: bench.scratch's flag (as an attribute) and its type. positive_ratio is the guard,
# which bench.scratch runs as a guarded streaming arm rather than through a flag of the cell.
KNOBS: dict[str, type] = {
    "k": int,
    "start_step": int,
    "ramp_steps": int,
    "start_coverage": float,
    "hard_ratio": float,
    "positive_ratio": float,
}
DEFAULT_FAMILIES = ("counts", "textures")  # shapes' cells are in docs/BENCHMARKS.md already
DEFAULT_ARMS = ("k=50", "start_step=0", "ramp_steps=0", "hard_ratio=0.75", "positive_ratio=0.9")
# Flags of bench.scratch that this sweep sets itself, per family and arm.
OWN_FLAGS = ("--data", "--seeds", "--jobs", "--variants", "--positive-ratio", "--work-dir", "--json-out")
R1 = [key for key in METRICS if "R@1" in key]


@dataclass(frozen=True)
class Arm:
    """One setting of the defaults changed (knob None: plain or the defaults themselves)."""

    label: str
    knob: str | None = None
    value: float | int | None = None

    def run(self, base: argparse.Namespace, seed: int) -> dict[str, object]:
        """The settings of this arm's run for `seed` on the family of `base` (bench.scratch's, digest for digest)."""
        if self.label == "plain":
            return run_of(base, seed, "plain")
        if self.knob == "positive_ratio":
            return run_of(base, seed, f"streaming{GUARD}{self.value:g}")
        args = copy.copy(base)
        if self.knob is not None:
            setattr(args, self.knob, self.value)
        return run_of(args, seed, "streaming")


def parse_arm(text: str) -> Arm:
    """'k=50' -> Arm('k 50', 'k', 50); a ValueError that names what is wrong otherwise."""
    knob, sep, value = text.partition("=")
    if not sep or knob not in KNOBS:
        raise ValueError(f"{text!r}: want KNOB=VALUE with KNOB one of {', '.join(KNOBS)}")
    try:
        parsed = KNOBS[knob](value)
    except ValueError:
        raise ValueError(f"{text!r}: {knob} takes a {KNOBS[knob].__name__}, got {value!r}") from None
    if knob == "positive_ratio" and not 0 < parsed <= 1:  # 0 is the guard off: the defaults themselves
        raise ValueError(f"{text!r}: the guard's ratio must be in (0, 1]")
    return Arm(f"{knob} {parsed:g}", knob, parsed)


def seeds_ahead(deltas: dict[str, np.ndarray]) -> int:
    """Seeds whose mean R@1 delta over both directions is above 0."""
    return int(np.sum(np.mean([deltas[key] for key in R1], axis=0) > 0))


def verdict(deltas: dict[str, np.ndarray]) -> str:
    """Whether the default holds against an arm on one family (the arm minus the defaults, paired by seed)."""
    mean_r1 = float(np.mean([deltas[key] for key in R1]))
    n_seeds = len(deltas[R1[0]])
    arm_ahead = mean_r1 > 0 and seeds_ahead(deltas) > n_seeds / 2
    return "arm ahead" if arm_ahead else "default holds"


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        nargs="+",
        choices=FAMILIES,
        help=f"the generated families to sweep (default: {' '.join(DEFAULT_FAMILIES)}); with --train-data, the "
        "user's own set is the one cell (labelled 'own')",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), help="KNOB=VALUE, one setting changed")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, each with cpus/jobs torch threads")
    parser.add_argument("--work-dir", help="keep the runs in DIR/FAMILY (default: a temporary directory)")
    parser.add_argument("--json-out")
    parser.add_argument("--summarize", metavar="JSON", help="print the tables of an earlier run's --json-out, and stop")
    args, cell_flags = parser.parse_known_args(argv)
    if args.summarize:
        return args, cell_flags
    try:
        args.arms = [parse_arm(text) for text in args.arms]
    except ValueError as error:
        parser.error(f"--arms: {error}")
    for flag in cell_flags:
        if flag.split("=")[0] in OWN_FLAGS:
            parser.error(f"{flag}: bench.defaults sets it itself (see --help)")
    # The base cell per family, checked by bench.scratch's own parser (exits 2 on a bad flag).
    base = scratch_parser().parse_args([*cell_flags, "--jobs", str(args.jobs)])
    if own_data(base):
        if args.data:
            parser.error("--data: a sweep of your own --train-data has one cell, no families")
        check_own_data(parser, base)
        args.data, args.cells = ["own"], {"own": base}
    else:
        args.data = args.data or list(DEFAULT_FAMILIES)
        args.cells = {
            family: scratch_parser().parse_args([*cell_flags, "--data", family, "--jobs", str(args.jobs)])
            for family in args.data
        }
    for family, cell in args.cells.items():
        try:  # plain and the defaults: what the base cell's flags (--set among them) make of them
            for arm in (Arm("plain"), Arm("defaults")):
                check_run(arm.run(cell, 0))
        except ValueError as error:
            parser.error(f"the base cell on {family}: {error}")
    try:
        check_arms(args.arms, args.cells)
    except ValueError as error:
        parser.error(f"--arms: {error}")
    return args, cell_flags


def check_arms(arms: list[Arm], cells: dict[str, argparse.Namespace]) -> None:
    """Every arm's runs pass the trainer's own config checks, and differ from the defaults' and from each other's:
    a bad value fails here, before an hour of training, and no two jobs of the pool train into one directory."""
    for family, cell in cells.items():
        seen = {json_key(Arm("defaults").run(cell, 0)): "the defaults"}
        for arm in arms:
            settings = arm.run(cell, 0)
            try:
                check_run(settings)
            except ValueError as error:
                raise ValueError(f"{arm.label} on {family}: {error}") from None
            key = json_key(settings)
            if key in seen:
                raise ValueError(f"{arm.label} is the same run as {seen[key]} on {family}")
            seen[key] = arm.label


def json_key(settings: dict[str, object]) -> str:
    return json.dumps({key: str(value) for key, value in sorted(settings.items())})


def main(argv: list[str] | None = None) -> None:
    args, cell_flags = parse(argv)
    if args.summarize:
        payload = json.loads(Path(args.summarize).read_text())
        print("\n".join(f"| {label} | {value} |" for label, value in summary_rows(payload)))
        print("\n".join(["", *table(payload)]))
        return
    started = time.perf_counter()
    arms = [Arm("plain"), Arm("defaults"), *args.arms]
    temporary = None if args.work_dir else tempfile.TemporaryDirectory(prefix="helip-defaults-")
    root = Path(args.work_dir or temporary.name)
    for cell in args.cells.values():
        ensure_synth(cell)
    # Arm-major: plain and the defaults of every family first, so an interrupted sweep holds whole arms.
    jobs = [(arm, family, seed) for arm in arms for family in args.data for seed in args.seeds]
    threads = threads_per_run(args.jobs)

    def one(job: tuple[Arm, str, int]):
        arm, family, seed = job
        settings = arm.run(args.cells[family], seed)
        variant = "plain" if arm.label == "plain" else "streaming"
        return train_once(root / family, f"seed{seed}-{variant}", settings, threads=threads)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = dict(zip(jobs, pool.map(one, jobs)))
    if temporary is not None:
        temporary.cleanup()

    def per_seed(arm: Arm, family: str) -> dict[str, list[float]]:
        return {key: [runs[(arm, family, seed)].metrics[key] for seed in args.seeds] for key in METRICS}

    values = {family: {arm.label: per_seed(arm, family) for arm in arms} for family in args.data}
    results = {family: compare(by_arm) for family, by_arm in values.items()}
    for family, by_arm in results.items():  # what the batches held: an arm is only what it says if its slots filled
        for arm in arms:
            family_runs = [runs[(arm, family, seed)] for seed in args.seeds]
            by_arm[arm.label]["batches"] = {
                "hard_slots_filled": float(np.mean([hard_share(run) for run in family_runs])),
                "guard_dropped_per_hard_pair": float(np.mean([guard_drops(run) for run in family_runs])),
            }
    cell = next(iter(args.cells.values()))
    wall = time.perf_counter() - started
    config = {
        "data": args.data,
        "seeds": args.seeds,
        "arms": [arm.label for arm in args.arms],
        "cell_flags": cell_flags,
        "steps": cell.steps,
        "lr": cell.lr,
        "jobs": args.jobs,
    }
    payload = {"config": config, "families": results, "total_wall_s": wall}
    report("defaults", payload, summary_rows(payload), args.json_out)
    print("\n".join(["", *table(payload)]))


def compare(values: dict[str, dict[str, list[float]]]) -> dict[str, dict]:
    """One family's arms (values[arm][metric] per seed; "plain" and "defaults" among them): each arm's mean ± std,
    its deltas against plain and against the defaults paired by seed, seeds ahead, and the verdict on the default."""
    results = {}
    for label, by_key in values.items():
        entry: dict[str, object] = {"metrics": {key: mean_std(v) for key, v in by_key.items()}}
        for baseline in ("plain", "defaults"):
            if label in ("plain", baseline):
                continue
            deltas = {key: np.subtract(by_key[key], values[baseline][key]) for key in METRICS}
            entry[f"minus_{baseline}"] = {key: mean_std(d.tolist()) for key, d in deltas.items()}
            entry[f"seeds_ahead_of_{baseline}"] = seeds_ahead(deltas)
            if baseline == "defaults":
                entry["verdict"] = verdict(deltas)
        results[label] = entry
    return results


def summary_rows(payload: dict) -> list[tuple[str, str]]:
    """The verdicts, knob by knob over the families, and how the sweep ran."""
    config, families = payload["config"], payload["families"]
    rows = []
    for label in config["arms"]:
        held = [family for family in config["data"] if families[family][label]["verdict"] == "default holds"]
        text = "holds on every family" if len(held) == len(families) else f"holds on {', '.join(held) or 'none'}"
        rows.append((f"the default against {label}", text))
    n_seeds = len(config["seeds"])
    rows.append(("seeds x steps / lr / jobs", f"{n_seeds} x {config['steps']} / {config['lr']:g} / {config['jobs']}"))
    rows.append(("total wall time (min)", f"{payload['total_wall_s'] / 60:.1f}"))
    return rows


def table(payload: dict) -> list[str]:
    """A markdown table of every family's arms: metrics (%), deltas (points), seeds ahead, R@1 delta per seed."""
    n_seeds = len(payload["config"]["seeds"])
    lines = [
        "| family | arm | zero-shot | R@1 i→t | R@1 t→i | − plain: zero-shot / R@1 i→t / R@1 t→i "
        "| − defaults: zero-shot / R@1 i→t / R@1 t→i | seeds ahead of the defaults | R@1 − defaults per seed "
        "| the default | hard slots filled / guard drops per hard pair |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family, arms in payload["families"].items():
        for label, entry in arms.items():
            cells = [family, label]
            metrics = entry["metrics"]
            cells += [f"{100 * metrics[k]['mean']:.1f} ± {100 * metrics[k]['std']:.1f}" for k in METRICS]
            for baseline in ("plain", "defaults"):
                deltas = entry.get(f"minus_{baseline}")
                cells.append(" / ".join(f"{100 * deltas[k]['mean']:+.1f}" for k in METRICS) if deltas else "")
            against = entry.get("minus_defaults")
            cells.append(f"{entry['seeds_ahead_of_defaults']} of {n_seeds}" if against else "")
            per_seed = (
                " ".join(f"{100 * np.mean([against[k]['values'][i] for k in R1]):+.1f}" for i in range(n_seeds))
                if against
                else ""
            )
            batches = entry.get("batches") if label != "plain" else None  # absent from sweeps saved before it was
            filled = (
                f"{batches['hard_slots_filled']:.2f} / {batches['guard_dropped_per_hard_pair']:.1f}" if batches else ""
            )
            cells += [per_seed, entry.get("verdict", ""), filled]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
