"""Is the margin loss worth its knobs? A sweep of λ and the margin for both HNML forms, online HELIP vs plain.

Every cell is `bench.quality` with variants plain + online over the same seeds and the same starting checkpoints
(trained once, in the first cell, then reused with --start-dir), so cells differ only in λ, the margin and the
form. λ = 0 is the hard-pair batches alone: the baseline that tells whether the loss adds anything. The table gives,
per cell, online - plain in points (paired by seed) for zero-shot and R@1 both ways.

    python -m bench.sweep [--seeds 0 1 2] [--steps 200] [--weights 0 0.5 1 2] [--margins 0.1 0.2 0.4]
                          [--forms pair paper] [--jobs 3] [--json-out F]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, report
from bench.quality import METRICS


def run_cell(args, work: Path, start_dir: Path | None, weight: float, margin: float, form: str) -> dict:
    out = work / f"cell-{form}-w{weight:g}-m{margin:g}.json"
    command = [
        sys.executable,
        "-m",
        "bench.quality",
        "--variants",
        "plain",
        "online",
        "--seeds",
        *map(str, args.seeds),
        "--steps",
        str(args.steps),
        "--hnml-weight",
        str(weight),
        "--margin",
        str(margin),
        "--hnml-form",
        form,
        "--jobs",
        str(args.jobs),
        "--work-dir",
        str(work),  # one dir for every cell: identical runs (plain, per seed) are trained once and read after
        "--json-out",
        str(out),
    ]
    if start_dir is not None:
        command += ["--start-dir", str(start_dir)]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0], help="λ values")
    parser.add_argument("--margins", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    parser.add_argument("--forms", nargs="+", choices=("pair", "paper"), default=["pair", "paper"])
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument(
        "--work-dir", help="keep the runs here (default: a temporary directory); a sweep run again there resumes"
    )
    parser.add_argument("--json-out")
    args = parser.parse_args()

    started = time.perf_counter()
    temporary = None if args.work_dir else tempfile.TemporaryDirectory(prefix="helip-sweep-")
    work = Path(args.work_dir or temporary.name)
    work.mkdir(parents=True, exist_ok=True)
    # λ = 0 makes the margin and the form irrelevant: one cell stands for all of them.
    cells = [(0.0, args.margins[0], args.forms[0])] if 0.0 in args.weights else []
    cells += [(w, m, f) for f, w, m in itertools.product(args.forms, [w for w in args.weights if w > 0], args.margins)]
    # Starting checkpoints already in the work dir (an interrupted sweep run again) are reused too.
    start_dir = work if all((work / f"seed{seed}" / "final.pt").exists() for seed in args.seeds) else None
    results = []
    for weight, margin, form in cells:
        print(f"λ {weight:g}, margin {margin:g}, form {form}", file=sys.stderr, flush=True)
        cell = run_cell(args, work, start_dir, weight, margin, form)
        start_dir = work  # the first cell trained the starting checkpoints there: every later cell reuses them
        deltas = {key: cell["delta_vs_plain"]["online"][key] for key in METRICS}
        results.append({"hnml_weight": weight, "margin": margin, "form": form, "delta_vs_plain": deltas})
    if temporary is not None:
        temporary.cleanup()

    rows = [
        (
            f"{r['form'] if r['hnml_weight'] else 'any'}, λ {r['hnml_weight']:g}, margin "
            f"{r['margin'] if r['hnml_weight'] else '-'}: online - plain, " + " / ".join(METRICS.values()),
            " / ".join(
                f"{100 * r['delta_vs_plain'][k]['mean']:+.1f} ± {100 * r['delta_vs_plain'][k]['std']:.1f}"
                for k in METRICS
            ),
        )
        for r in results
    ]
    rows.append(("seeds x steps", f"{len(args.seeds)} x {args.steps}"))
    rows.append(("total wall time (min)", f"{(time.perf_counter() - started) / 60:.1f}"))
    report("sweep", {"config": vars(args), "cells": results}, rows, args.json_out)


if __name__ == "__main__":
    main()
