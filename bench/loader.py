"""Data-loader throughput: the hard-pair loader (HardPairSampler + real miner) vs a plain shuffling DataLoader.

Both loaders read the same 224x224 JPEGs (the synthetic set, upscaled; cached under .bench/loader-data-N) through
the same CsvPairs dataset with ViT-B/32's eval preprocess and tokenizer (no weights), with the same worker count,
batch size, prefetch_factor 2 and forkserver workers: only the batch sampler differs. The hard-pair loop calls
`batch.layout` per batch, as a training loop does; its miner is a `helip-miner serve` process holding
random unit embeddings (dim 512) for every id. Nothing consumes the batches (no model): the loader runs flat out.
After `--warmup` batches (worker start-up), `--batches` batches are timed; per worker count the runs go baseline,
hard, hard, baseline (--repeats 2), so drift hits both alike. Reported per worker count: samples/s of each and
hard/baseline (goal >= 0.9); CPU ms per sample (psutil: main process + workers; the miner apart); the workers a
GPU step of `--gpu-step-s` at `--gpu-batch` samples would need; the mining counters and hard slots filled; and
the CPU other processes took meanwhile (on a shared machine that, not the sampler, can decide the ratio).
The main process runs torch on one thread: it only composes batches; the workers (one thread each) do the rest.

    python -m bench.loader [--samples 4096] [--batch-size 256] [--workers 1,2] [--batches 32] [--warmup 4]
                           [--repeats 2] [--json-out F]
"""

from __future__ import annotations

import argparse
import csv
import gc
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

from bench.common import ROOT, bench_miner, report, unit_pairs
from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.miner_service.service.process import MinerProcess
from helip.trainer.pairs.data import CsvPairs, collate_pairs, read_pairs
from helip.trainer.pairs.hard_pairs import WORKER_START_METHOD
from helip.trainer.pairs.session import MiningSession
from helip.trainer.tools.synth import SynthConfig, generate

log = logging.getLogger("bench.loader")
DIM = 512  # ViT-B/32's embedding width


def prepare_data(n: int, side: int = 224) -> Path:
    """The cached JPEG set of n samples (built once): synthetic scenes upscaled to side x side, quality 90."""
    out = ROOT / ".bench" / f"loader-data-{n}"
    csv_path = out / "pairs.csv"
    if csv_path.exists():  # written last, so its presence means the set is complete
        return csv_path
    # Drawn at 64 px, not synth's 32: upscaled 7x the shapes' edges would be mere blocks. The JPEGs (~4 KB) are
    # still flatter than photos (15-25 KB at 224 px), so their decode is somewhat cheaper than real data's.
    synth = generate(SynthConfig(out_dir=out / "synth", train_size=n, test_size=1, image_size=64, retrieval_size=1))
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (png, caption) in enumerate(tqdm(read_pairs(synth.train_csv), desc="jpeg", unit="img", leave=False)):
        relative = f"images/{i:06d}.jpg"
        with Image.open(png) as image:
            image.convert("RGB").resize((side, side), Image.BICUBIC).save(out / relative, quality=90)
        rows.append([relative, caption])
    partial = csv_path.with_suffix(".partial")
    with partial.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerows([["filepath", "title"], *rows])
    partial.rename(csv_path)
    shutil.rmtree(out / "synth")
    return csv_path


def fill_miner(address: str, n: int) -> None:
    """Upsert L2-normalised random fp16 embeddings for ids 0..n-1, 4096 rows per call."""
    image, text = unit_pairs(np.random.default_rng(0), n, DIM)
    with MinerClient(ClientConfig(address=address, wire_dtype=pb.FLOAT16, timeout_s=120)) as client:
        client.wait_ready(60)
        ids = np.arange(n, dtype=np.uint64)
        for first in range(0, n, 4096):
            last = first + 4096
            client.upsert(
                ids[first:last], image[first:last].astype(np.float16), text[first:last].astype(np.float16), step=1
            )


def cpu_seconds(miner_pid: int) -> tuple[dict[int, float], float, float]:
    """CPU seconds (user + system) so far: per pid of this process and its descendants (forkserver, workers) except
    the miner; the miner's; and the whole machine's busy time (to tell what other processes took meanwhile)."""
    me = psutil.Process()
    ours, miner = {}, 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            cpu = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        if process.pid == miner_pid:
            miner = cpu.user + cpu.system
        else:
            ours[process.pid] = cpu.user + cpu.system
    machine = psutil.cpu_times()
    busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq + machine.steal
    return ours, miner, busy


@dataclass
class Run:
    kind: str  # baseline | hard
    workers: int
    samples: int = 0
    seconds: float = 0.0
    cpu_main_s: float = 0.0
    cpu_workers_s: float = 0.0  # forkserver + workers (the forkserver itself idles)
    cpu_miner_s: float = 0.0
    cpu_other_s: float = 0.0  # other processes on the machine (a busy machine slows the loader down)
    n_hard: int = 0
    hard_slots: int = 0
    counters: dict = field(default_factory=dict)


def run_loader(kind: str, dataset: CsvPairs, workers: int, args: argparse.Namespace, miner: MinerProcess) -> Run:
    total = args.warmup + args.batches
    size = args.batch_size
    session = sampler = None
    if kind == "baseline":
        # shuffle=True's RandomSampler, drawn over several passes in one iterator: the hard-pair sampler crosses
        # epochs without restarting its iterator too, so neither pays an epoch-start pipeline bubble.
        shuffle = RandomSampler(dataset, num_samples=total * size, generator=torch.Generator().manual_seed(0))
        loader = DataLoader(
            dataset,
            batch_size=size,
            sampler=shuffle,
            num_workers=workers,
            collate_fn=collate_pairs,
            persistent_workers=True,
            prefetch_factor=2,
            multiprocessing_context=WORKER_START_METHOD,
            drop_last=True,
        )
    else:
        session = MiningSession(address=miner.address, k=50)
        loader = session.loader(
            dataset, size, hard_ratio=0.5, num_workers=workers, prefetch_factor=2, steps=total, pin_memory=False
        )
        sampler = loader.batch_sampler
    run = Run(kind, workers)
    iterator = iter(loader)
    try:
        for index in tqdm(range(total), desc=f"{kind} W={workers}", unit="batch", leave=False):
            if index == args.warmup:  # clocks start once the workers are up and the pipeline is full
                started, before = time.perf_counter(), cpu_seconds(miner.process.pid)
            batch = next(iterator)
            if sampler is not None:
                layout = batch.layout
                if index >= args.warmup:
                    run.n_hard += layout.n_hard
                    run.hard_slots += layout.n_hard + layout.n_fallback
            if index >= args.warmup:
                run.samples += len(batch)
        run.seconds = time.perf_counter() - started
        after = cpu_seconds(miner.process.pid)
        deltas = {pid: cpu - before[0].get(pid, 0.0) for pid, cpu in after[0].items()}
        run.cpu_main_s = deltas.pop(psutil.Process().pid)
        run.cpu_workers_s = sum(deltas.values())
        run.cpu_miner_s = after[1] - before[1]
        run.cpu_other_s = after[2] - before[2] - run.cpu_main_s - run.cpu_workers_s - run.cpu_miner_s
        if sampler is not None:
            run.counters = session.counters.snapshot()
    finally:
        if session is not None:
            session.close()
        # Persistent workers live as long as the loader's iterator; dropping both shuts them down.
        del iterator, loader
        gc.collect()
    log.info("%s W=%d: %.0f samples/s", kind, workers, run.samples / run.seconds)
    if run.cpu_other_s > 0.25 * run.seconds:  # throughput then measures the other load as much as the loader
        log.warning(
            "other processes used %.2f cores during this run: its samples/s understate the loader; "
            "compare CPU ms/sample instead, or rerun on an idle machine",
            run.cpu_other_s / run.seconds,
        )
    return run


def summarize_runs(runs: list[Run], target_rate: float) -> dict:
    samples, seconds = sum(r.samples for r in runs), sum(r.seconds for r in runs)
    workers = runs[0].workers
    rate = samples / seconds
    per_worker = rate / workers
    cpu_ms = 1e3 * sum(r.cpu_main_s + r.cpu_workers_s for r in runs) / samples
    worker_cpu_ms = 1e3 * sum(r.cpu_workers_s for r in runs) / samples
    counters = {
        name: sum(r.counters.get(name, 0) for r in runs) for name in ("mine_calls", "mine_late", "mine_failures")
    }
    per_run = [r.samples / r.seconds for r in runs]
    return {
        "samples_per_s": rate,
        "samples_per_s_runs": per_run,
        "spread": (max(per_run) - min(per_run)) / rate,  # between identical runs: the noise the ratio carries
        "samples_per_s_per_worker": per_worker,
        "cpu_ms_per_sample": cpu_ms,  # main process + workers, measured
        "cpu_ms_per_sample_workers": worker_cpu_ms,
        "cpu_ms_per_sample_main": cpu_ms - worker_cpu_ms,
        "cpu_ms_per_sample_estimate": 1e3 * workers * seconds / samples,  # workers busy all the time
        "miner_cpu_ms_per_sample": 1e3 * sum(r.cpu_miner_s for r in runs) / samples,
        "other_processes_cores": sum(r.cpu_other_s for r in runs) / seconds,  # load we did not cause
        "workers_for_target": math.ceil(target_rate / per_worker),  # from this run's per-worker throughput
        "workers_for_target_by_cpu": math.ceil(target_rate * worker_cpu_ms / 1e3),  # one core per worker
        "hard_slots_filled": sum(r.n_hard for r in runs) / max(1, sum(r.hard_slots for r in runs)),
        **counters,
        "samples": samples,
        "seconds": seconds,
        "runs": len(runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4096, help="JPEGs in the data set")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", default="1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--batches", type=int, default=32, help="timed batches per run (32 x 256: two passes)")
    parser.add_argument("--warmup", type=int, default=4, help="batches before the clock starts (worker start-up)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per loader and worker count, ABBA order")
    parser.add_argument("--gpu-step-s", type=float, default=0.06, help="GPU step time the loader must keep up with")
    parser.add_argument("--gpu-batch", type=int, default=256, help="batch size of that GPU step")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    if args.batches < 1 or args.warmup < 1 or args.repeats < 1:
        parser.error("--batches, --warmup and --repeats must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # the main process only composes batches: leave the cores to workers and miner
    worker_counts = [int(w) for w in args.workers.split(",")]
    target_rate = args.gpu_batch / args.gpu_step_s

    csv_path = prepare_data(args.samples)
    transform = open_clip.image_transform(
        224, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD
    )
    dataset = CsvPairs(csv_path, transform, open_clip.get_tokenizer("ViT-B-32"))
    order = []
    for repeat in range(args.repeats):
        order += [("baseline", "hard"), ("hard", "baseline")][repeat % 2]

    summary: dict[str, dict] = {}
    with bench_miner("--dim", str(DIM)) as miner:
        fill_miner(miner.address, len(dataset))
        for workers in worker_counts:
            runs = [run_loader(kind, dataset, workers, args, miner) for kind in order]
            base = summarize_runs([r for r in runs if r.kind == "baseline"], target_rate)
            hard = summarize_runs([r for r in runs if r.kind == "hard"], target_rate)
            ratio = hard["samples_per_s"] / base["samples_per_s"]
            noise = max(base["spread"], hard["spread"])
            verdict = ("met" if ratio >= 0.9 else "MISSED") + (", within noise" if abs(ratio - 0.9) < noise else "")
            summary[str(workers)] = {
                "baseline": base,
                "hard": hard,
                "hard_over_baseline": ratio,
                "goal_met": ratio >= 0.9,
                "verdict": verdict,
            }

    results = {
        "config": vars(args),
        "order": order,
        "data": str(csv_path),
        "target_samples_per_s": target_rate,
        "workers": summary,
    }
    rows = []
    for workers, s in summary.items():
        base, hard = s["baseline"], s["hard"]

        def both(key: str, spec: str) -> str:  # "baseline / hard"
            return f"{base[key]:{spec}} / {hard[key]:{spec}}"  # noqa: B023 (used in this iteration)

        step = f"{args.gpu_step_s} s/{args.gpu_batch}"
        rows += [
            (f"W={workers}: samples/s, baseline / hard-pair", both("samples_per_s", ".0f")),
            (f"W={workers}: hard / baseline (goal >= 0.9)", f"{s['hard_over_baseline']:.3f} ({s['verdict']})"),
            (
                f"W={workers}: samples/s per run, baseline / hard",
                " / ".join(" ".join(f"{x:.0f}" for x in side["samples_per_s_runs"]) for side in (base, hard)),
            ),
            (f"W={workers}: CPU ms/sample, main+workers, baseline / hard", both("cpu_ms_per_sample", ".2f")),
            (f"W={workers}: CPU ms/sample in main, baseline / hard", both("cpu_ms_per_sample_main", ".2f")),
            (f"W={workers}: W x wall ms/sample, baseline / hard", both("cpu_ms_per_sample_estimate", ".2f")),
            (f"W={workers}: miner CPU ms/sample (hard)", f"{hard['miner_cpu_ms_per_sample']:.3f}"),
            (f"W={workers}: workers for {step}, by rate: baseline / hard", both("workers_for_target", "d")),
            (f"W={workers}: workers for {step}, by CPU: baseline / hard", both("workers_for_target_by_cpu", "d")),
            (f"W={workers}: other processes' CPU (cores), baseline / hard", both("other_processes_cores", ".2f")),
            (f"W={workers}: hard slots filled", f"{hard['hard_slots_filled']:.3f}"),
            (
                f"W={workers}: Mine calls / late / failed",
                f"{hard['mine_calls']} / {hard['mine_late']} / {hard['mine_failures']}",
            ),
        ]
    report("loader", results, rows, args.json_out)


if __name__ == "__main__":
    main()
