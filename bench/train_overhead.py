"""Training step time with online mining vs mining off: is the miner hidden behind the step?

Same model, batch size and data; the two modes differ only in mining. "Off" is plain CLIP (hard_ratio 0, λ 0: no
miner process at all, the raw baseline); "on" is online HELIP (hard_ratio 0.5, index bootstrapped and updated every
step, its own local miner). A step's time is the wall time between the end of one step and the end of the next, as
`losses.jsonl` stamps them: it holds waiting for the DataLoader's batch as well as the step itself (batches are
composed by HardPairSampler and loaded by `data.workers` worker processes; mining never blocks either).
The first `--warmup` steps of each run are skipped. With `--repeats 2` the runs go off, on, on, off (ABBA), so a
drift in the machine's speed hits both modes alike.

    python -m bench.train_overhead [--steps 150] [--warmup 20] [--repeats 2] [--batch-size 64] [--json-out F]
                                   [--model ViT-B-32 --train-csv DIR/train.csv --workers 16]

By default the tiny CLIP on the generated 32-px set (configs/demo.yaml). --model and --train-csv make it a real
model on a real-sized set (bench/gpu_check.sh: ViT-B/32 from random init on generated 224-px JPEGs, `helip-data
synth --image-size 224 --format jpg`), with no evaluation. Where `nvidia-smi` is on the PATH, the GPU's busy
fraction (utilization.gpu, sampled every 200 ms while each run trains) is reported per mode.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import ROOT, report

MINING_OFF = {"optim.hard_ratio": 0, "loss.hnml_weight": 0}
MINING_ON = {
    "optim.hard_ratio": 0.5,
    "loss.hnml_weight": 1.0,
    "mining.bootstrap_index": "true",
    "mining.update_index": "true",
}


@dataclass
class TrainRun:
    """What one `helip-train` process left in its output directory."""

    output_dir: Path
    steps: list[dict]  # losses.jsonl, one record per step
    metrics: dict[str, float]  # eval/final.json ({} without an eval set)
    summary: dict
    wall_s: float


DEMO_CONFIG = ROOT / "configs" / "demo.yaml"  # the base config of every benchmark run (their settings on top)


def train(
    output_dir: Path,
    settings: dict[str, object],
    config: Path = DEMO_CONFIG,
    threads: int | None = None,
) -> TrainRun:
    """Run `helip-train` in a fresh process (the trainer sets up torch.distributed) and read what it wrote.

    settings: dotted config keys ({"optim.steps": 100, ...}), passed as `--set key=value`.
    threads: OMP_NUM_THREADS of the process (None: torch's default), for runs that share the machine.
    """
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    output_dir.mkdir(parents=True, exist_ok=False)  # losses.jsonl is appended to: never reuse a directory
    command = [
        sys.executable,
        "-m",
        "helip.trainer.app.cli",
        "--config",
        str(config),
        "--output-dir",
        str(output_dir),
        "--log-level",
        "WARNING",
        "--set",
        "run.progress=false",
    ]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    log_path = output_dir / "train.log"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    wall_s = time.perf_counter() - started
    if code != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"helip-train exited with {code} ({' '.join(command)}):\n{tail}")
    (output_dir / "wall_s").write_text(f"{wall_s}\n")
    return read_run(output_dir)


def check_run(settings: dict[str, object]) -> None:
    """ValueError naming the setting when `train` with these settings would fail helip-train's config checks."""
    from helip.trainer.app import config as train_config

    train_config.load(str(DEMO_CONFIG), {key: str(value) for key, value in settings.items()})


def train_once(work: Path, name: str, settings: dict[str, object], threads: int | None = None) -> TrainRun:
    """`train` into work/<name>-<digest of the settings>, or read the run already finished there: benchmarks that
    share a work dir (the cells of a sweep) share their identical runs, and a digest never mixes settings."""
    text = json.dumps({key: str(value) for key, value in sorted(settings.items())})
    output_dir = work / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
    if (output_dir / "summary.json").exists():
        print(f"{name}: read from {output_dir}", file=sys.stderr, flush=True)
        return read_run(output_dir)
    if output_dir.exists():  # an interrupted run: start it again
        shutil.rmtree(output_dir)
    print(f"{name}: training", file=sys.stderr, flush=True)
    return train(output_dir, settings, threads=threads)


# The evaluation names each metric by its source (helip.trainer.tools.eval): the synth layout's "zero_shot/…" and
# "retrieval/…", which the benchmarks compare, or a user's own ImageFolder and retrieval CSV.
OWN_SOURCES = {"zero_shot_folder/": "zero_shot/", "retrieval_csv/": "retrieval/"}
CANONICAL = ("zero_shot/top1", "retrieval/image_to_text_R@1", "retrieval/text_to_image_R@1")


def canonical_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A run's metrics with the synth layout's keys filled from the user's own sources where the layout was not
    evaluated, and NaN for a benchmark metric nothing measured (zero-shot, where no zero-shot set was given)."""
    filled = dict(metrics)
    for source, canonical in OWN_SOURCES.items():
        for key, value in metrics.items():
            if key.startswith(source):
                filled.setdefault(canonical + key[len(source) :], value)
    return {**{key: float("nan") for key in CANONICAL}, **filled}


def read_run(output_dir: Path) -> TrainRun:
    """The TrainRun of a finished `train` in output_dir (its summary.json is written last)."""
    steps = [json.loads(line) for line in (output_dir / "losses.jsonl").read_text().splitlines() if line]
    eval_json = output_dir / "eval" / "final.json"
    metrics = canonical_metrics(json.loads(eval_json.read_text())) if eval_json.exists() else {}
    summary = json.loads((output_dir / "summary.json").read_text())
    wall = output_dir / "wall_s"
    return TrainRun(output_dir, steps, metrics, summary, float(wall.read_text()) if wall.exists() else float("nan"))


def step_times(run: TrainRun, warmup: int) -> np.ndarray:
    """Seconds per step after the first `warmup` steps (differences of the steps' end times)."""
    ends = np.array([record["time"] for record in run.steps])
    return np.diff(ends)[max(0, warmup - 1) :]


def step_window(run: TrainRun, warmup: int) -> tuple[float, float]:
    """(start, end) wall-clock time of the measured steps (after the first `warmup`)."""
    ends = [record["time"] for record in run.steps]
    return ends[max(0, warmup - 1)], ends[-1]


class GpuBusy:
    """Samples the GPU's utilization (nvidia-smi, every 200 ms) while a run trains; nothing where there is none."""

    def __enter__(self) -> GpuBusy:
        self.samples: list[tuple[float, float]] = []
        self.process = None
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE,
                text=True,
            )
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            first = line.split(",")[0].strip()
            if first.isdigit():
                self.samples.append((time.time(), float(first)))

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.reader.join(5)

    def samples_between(self, start: float, end: float) -> list[float]:
        return [value for at, value in self.samples if start <= at <= end]


def summarize_steps(seconds: np.ndarray) -> dict:
    return {
        "median_s": float(np.median(seconds)),
        "p90_s": float(np.percentile(seconds, 90)),
        "mean_s": float(seconds.mean()),
        "n": int(len(seconds)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="steps skipped at the start of each run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode, in ABBA order")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prefetch", type=int, default=2, help="mining.prefetch: batches mined ahead")
    parser.add_argument("--synth-dir", default=str(ROOT / "data" / "synth"))
    parser.add_argument("--work-dir", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--model", help="model.name: an open_clip model (ViT-B-32) or a JSON config (default: tiny)")
    parser.add_argument("--train-csv", help="data.train: train on this CSV instead of the generated set (no eval)")
    parser.add_argument("--workers", type=int, help="data.workers: DataLoader worker processes per rank")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    if args.steps - args.warmup < 2:
        parser.error("--steps must exceed --warmup by at least 2")

    common = {
        "optim.steps": args.steps,
        "optim.batch_size": args.batch_size,
        "optim.seed": 0,
        "data.synth_dir": args.synth_dir,
        "mining.prefetch": args.prefetch,
        "run.checkpoint_every": 0,
        "run.eval_every": 0,
    }
    if args.model:
        common["model.name"] = args.model
    if args.train_csv:
        common.update({"data.train": args.train_csv, "data.synth_dir": "", "data.eval_dir": ""})
    if args.workers is not None:
        common["data.workers"] = args.workers
    temporary = None if args.work_dir else tempfile.TemporaryDirectory(prefix="helip-overhead-")
    work = Path(args.work_dir or temporary.name)
    order = []
    for repeat in range(args.repeats):
        order += [("off", "on"), ("on", "off")][repeat % 2]
    runs: dict[str, list[TrainRun]] = {"off": [], "on": []}
    busy: dict[str, list[float]] = {"off": [], "on": []}
    for index, mode in enumerate(order):
        settings = {**common, **(MINING_ON if mode == "on" else MINING_OFF)}
        print(f"run {index + 1}/{len(order)}: mining {mode}", file=sys.stderr, flush=True)
        with GpuBusy() as gpu:
            runs[mode].append(train(work / f"{index}-{mode}", settings))
        busy[mode] += gpu.samples_between(*step_window(runs[mode][-1], args.warmup))
    if temporary is not None:
        temporary.cleanup()

    times = {
        mode: np.concatenate([step_times(run, args.warmup) for run in mode_runs]) for mode, mode_runs in runs.items()
    }
    off, on = summarize_steps(times["off"]), summarize_steps(times["on"])
    measured = [record for run in runs["on"] for record in run.steps[args.warmup :]]
    hard = sum(record["n_hard"] for record in measured)
    slots = hard + sum(record["n_fallback"] for record in measured)
    everything = [record for run in runs["on"] for record in run.steps]
    hard_all = sum(record["n_hard"] for record in everything)
    slots_all = hard_all + sum(record["n_fallback"] for record in everything)
    mining = [run.summary["mining"] for run in runs["on"]]
    calls = sum(m["mine_calls"] for m in mining)
    data_wait = {
        mode: float(np.median([r["data_wait_s"] for run in mode_runs for r in run.steps[args.warmup :]]))
        for mode, mode_runs in runs.items()
    }
    results = {
        "config": vars(args),
        "order": list(order),
        "mining_off": off,
        "mining_on": on,
        "on_over_off_median": on["median_s"] / off["median_s"],
        "on_over_off_p90": on["p90_s"] / off["p90_s"],
        "hard_slots_filled": hard / max(1, slots),
        "hard_slots_filled_all_steps": hard_all / max(1, slots_all),
        "mine_calls": calls,
        "mine_late": sum(m["mine_late"] for m in mining),
        "mine_failures": sum(m["mine_failures"] for m in mining),
        "mine_skipped": sum(m["mine_skipped"] for m in mining),
        "data_wait_median_ms": {mode: 1e3 * value for mode, value in data_wait.items()},
        "dropped_pushes": sum(m["dropped_pushes"] for m in mining),
        "run_wall_s": {mode: [run.wall_s for run in mode_runs] for mode, mode_runs in runs.items()},
        "gpu_busy_fraction": {mode: float(np.mean(v)) / 100 if v else None for mode, v in busy.items()},
    }
    rows = [
        ("step time, mining off: median / p90 (s)", f"{off['median_s']:.3f} / {off['p90_s']:.3f}"),
        ("step time, online mining: median / p90 (s)", f"{on['median_s']:.3f} / {on['p90_s']:.3f}"),
        ("on / off, median (target <= 1.05)", f"{results['on_over_off_median']:.3f}"),
        ("on / off, p90", f"{results['on_over_off_p90']:.3f}"),
        ("steps measured per mode", f"{off['n']} / {on['n']}"),
        (
            "hard slots filled (measured steps / all)",
            f"{results['hard_slots_filled']:.3f} / {results['hard_slots_filled_all_steps']:.3f}",
        ),
        ("Mine calls late / failed", f"{results['mine_late']} / {results['mine_failures']} of {calls}"),
        (
            "step's wait for its batch, median off / on (ms)",
            f"{results['data_wait_median_ms']['off']:.2f} / {results['data_wait_median_ms']['on']:.2f}",
        ),
        ("pushes dropped", f"{results['dropped_pushes']}"),
    ]
    if results["gpu_busy_fraction"]["off"] is not None:
        fractions = results["gpu_busy_fraction"]
        rows.append(("GPU busy while stepping, off / on", f"{fractions['off']:.2f} / {fractions['on']:.2f}"))
    report("train_overhead", results, rows, args.json_out)


if __name__ == "__main__":
    main()
