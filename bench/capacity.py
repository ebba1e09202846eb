"""Capacity: how many miner devices a training run needs, from a measured Mine throughput.

A run asks for ranks x anchors per step x steps/s anchors a second. One miner device answers A anchors a second
at the N rows it was measured with (bench/load.py's batched callers on a CPU, bench/gpu_check.py's on a GPU). A
Mine scores every stored row, so at R rows a device answers about A x N / R (compute-bound: the products grow with
the rows; on a GPU a batched pass keeps small Mines from being bound by reading the rows instead). The table is
that arithmetic, written out for the store sizes and run shapes asked for; its one measured input is A at N.

    python -m bench.capacity --from load.json            # the batched arm of bench/load.py (CPU)
    python -m bench.capacity --from gpu_check.json       # 16 batched callers in bench/gpu_check.py (GPU)
    python -m bench.capacity --anchors-per-s 60000 --at-rows 10000000 --device "one H200"
        [--rows 1000000 10000000 100000000] [--ranks 8 64] [--anchors 128] [--steps-per-s 1 4]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from bench.common import report


@dataclass(frozen=True)
class Measured:
    anchors_per_s: float  # one device, batched callers
    rows: int  # stored rows it was measured at
    device: str


def measured_from(path: Path) -> Measured:
    """The batched anchors/s of a bench/load.py or bench/gpu_check.py JSON."""
    payload = json.loads(path.read_text())
    machine = payload.get("machine", {})
    device = machine.get("gpu") or f"CPU, {machine.get('cpus', '?')} cores"
    if payload.get("benchmark") == "load" and payload.get("batching"):
        return Measured(payload["batching"]["batched"]["anchors_per_s"], payload["config"]["rows"], device)
    if payload.get("benchmark") == "gpu_check":
        return Measured(payload["latency"]["callers_batched"]["anchors_per_s"], payload["config"]["rows"], device)
    raise SystemExit(f"{path}: neither a bench/load.py run with its batching phase nor a bench/gpu_check.py run")


def devices_needed(measured: Measured, rows: int, ranks: int, anchors: int, steps_per_s: float) -> tuple[float, int]:
    """(anchors/s one device answers at `rows`, devices the run needs)."""
    per_device = measured.anchors_per_s * measured.rows / rows
    return per_device, max(1, math.ceil(ranks * anchors * steps_per_s / per_device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, help="a bench/load.py or bench/gpu_check.py JSON")
    parser.add_argument("--anchors-per-s", type=float, help="measured anchors/s of one device (without --from)")
    parser.add_argument("--at-rows", type=int, help="the stored rows it was measured at (without --from)")
    parser.add_argument("--device", default="the measured device")
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--anchors", type=int, nargs="+", default=[128], help="anchors per rank and step")
    parser.add_argument("--steps-per-s", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--json-out")
    args = parser.parse_args()
    if args.source:
        measured = measured_from(args.source)
    elif args.anchors_per_s and args.at_rows:
        measured = Measured(args.anchors_per_s, args.at_rows, args.device)
    else:
        parser.error("give --from FILE, or --anchors-per-s and --at-rows")
    if measured.anchors_per_s <= 0 or measured.rows <= 0:
        parser.error("the measured anchors/s and rows must be > 0")

    table = []
    for rows in args.rows:
        for ranks in args.ranks:
            for anchors in args.anchors:
                for steps in args.steps_per_s:
                    per_device, devices = devices_needed(measured, rows, ranks, anchors, steps)
                    table.append(
                        {
                            "rows": rows,
                            "ranks": ranks,
                            "anchors_per_step": anchors,
                            "steps_per_s": steps,
                            "asked_anchors_per_s": ranks * anchors * steps,
                            "device_anchors_per_s": per_device,
                            "devices": devices,
                        }
                    )
    results = {"measured": measured.__dict__, "table": table}
    rows_out = [
        (
            f"{line['rows']:,} rows, {line['ranks']} ranks x {line['anchors_per_step']} anchors x "
            f"{line['steps_per_s']:g} steps/s ({line['asked_anchors_per_s']:,.0f} anchors/s)",
            f"{line['devices']} ({line['device_anchors_per_s']:,.0f} anchors/s a device)",
        )
        for line in table
    ]
    rows_out.insert(
        0, ("measured", f"{measured.anchors_per_s:,.0f} anchors/s at {measured.rows:,} rows on {measured.device}")
    )
    report("capacity", results, rows_out, args.json_out)


if __name__ == "__main__":
    main()
