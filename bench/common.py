"""Helpers shared by the benchmarks: timing summaries, a miner subprocess, JSON + table output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

from helip.miner_service.service.process import MinerProcess, spawn_miner

ROOT = Path(__file__).resolve().parents[1]


def summarize(seconds: list[float]) -> dict:
    values = np.asarray(seconds)
    return {
        "median_ms": float(np.median(values) * 1e3),
        "p99_ms": float(np.percentile(values, 99) * 1e3),
        "mean_ms": float(values.mean() * 1e3),
        "n": int(len(values)),
    }


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def unit_pairs(rng: np.random.Generator, n: int, dim: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Correlated, L2-normalised image/text rows, generated in chunks to bound temporary memory."""
    image = np.empty((n, dim), dtype=np.float32)
    text = np.empty((n, dim), dtype=np.float32)
    for first in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - first), dim), dtype=np.float32)
        image[first : first + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
        block = block + 0.5 * rng.standard_normal(block.shape, dtype=np.float32)
        text[first : first + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return image, text


def bench_miner(*args: str) -> MinerProcess:
    """`helip-miner serve *args` in its own process on a free port, no /metrics (stop it, or use it in `with`)."""
    workdir = Path(tempfile.mkdtemp(prefix="helip-bench-miner-"))
    return spawn_miner(workdir, "--metrics-port", "-1", *args, cwd=ROOT, timeout_s=120)


def report(name: str, results: dict, rows: list[tuple[str, str]], json_out: str | None) -> None:
    """Print the results as JSON (one line, machine-readable) and as a table; optionally save the JSON."""
    payload = {"benchmark": name, "machine": machine(), **results}
    print(json.dumps(payload))
    width = max(len(label) for label, _ in rows)
    print()
    print(f"| {'metric'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for label, value in rows:
        print(f"| {label.ljust(width)} | {value} |")
    if json_out:
        Path(json_out).write_text(json.dumps(payload, indent=2))


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """--data (the generated family every run trains and evaluates on) and where and how large its set is."""
    from helip.trainer.tools.synth_families import DEFAULT_FAMILY, FAMILIES

    parser.add_argument(
        "--data",
        choices=FAMILIES,
        default=DEFAULT_FAMILY,
        help="the generated data family of every run (data.synth_family; docs/BENCHMARKS.md, Data families)",
    )
    parser.add_argument(
        "--synth-dir",
        help="the synthetic set, generated there once if missing (default: data/synth for shapes, data/synth-FAMILY "
        "for the others)",
    )
    parser.add_argument("--synth-train", type=int, default=4000)
    parser.add_argument("--synth-test", type=int, default=600)
    parser.add_argument(
        "--image-size",
        type=int,
        choices=sorted(TINY_MODELS),
        default=32,
        help="pixels a side of the generated images, and the tiny CLIP made for them (64: glyphs and objects drawn "
        "twice as large, a patch-8 ViT of 64 patches; about 2.5x the compute of a step)",
    )


def add_own_data_flags(parser: argparse.ArgumentParser) -> None:
    """A set of the user's own instead of a generated family (read by run_settings and ensure_synth)."""
    group = parser.add_argument_group(
        "your own data (instead of a generated family: --data, --synth-* and --image-size are then unused)"
    )
    group.add_argument(
        "--train-data", help="CSV/TSV of image-caption pairs (open_clip's format) or webdataset shards (data.train)"
    )
    group.add_argument("--eval-dir", help="evaluation data in the synth layout: zeroshot.json, retrieval.csv")
    group.add_argument("--retrieval-data", help="CSV/TSV of held-out pairs for retrieval R@1 (data.retrieval_data)")
    group.add_argument(
        "--zeroshot-dir",
        help="ImageFolder (a folder per class) for zero-shot top-1 (data.zeroshot_dir; class names and templates: "
        "--set data.zeroshot_classnames=F, --set data.zeroshot_templates=F)",
    )
    group.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any helip-train setting of every run (repeatable), e.g. --set data.caption_key=caption, "
        "--set model.name=ViT-B-32, --set data.augment=true; an arm's own settings (hard ratio, k, ...) win",
    )


def check_own_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Own-data flags that make sense together: R@1 is what every benchmark compares, so it needs a retrieval set."""
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
    evaluation = args.eval_dir or args.retrieval_data or args.zeroshot_dir
    if evaluation and not args.train_data:
        parser.error("--eval-dir, --retrieval-data and --zeroshot-dir evaluate your own --train-data: give it too")
    if args.train_data and not (args.eval_dir or args.retrieval_data):
        parser.error("--train-data: give --retrieval-data (or --eval-dir): R@1 is what the benchmark compares")


def own_data(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "train_data", None))


def data_settings(args: argparse.Namespace) -> dict[str, object]:
    """The data settings of every run: the generated family's (the keys earlier work dirs' digests hold), or the
    user's own set."""
    if own_data(args):
        given = {
            "data.train": args.train_data,
            "data.eval_dir": args.eval_dir,
            "data.retrieval_data": args.retrieval_data,
            "data.zeroshot_dir": args.zeroshot_dir,
        }
        # data.synth_dir emptied: the demo config's set is not what these runs train on (their config.json says so)
        settings = {"data.synth_dir": "", **{key: value for key, value in given.items() if value}}
    else:
        family = {} if args.data == "shapes" else {"data.synth_family": args.data}  # shapes' digests stay as they were
        settings = {
            **family,
            **model_settings(args),
            "data.synth_dir": synth_dir(args),
            "data.synth_train": args.synth_train,
            "data.synth_test": args.synth_test,
        }
    return settings


def given_settings(args: argparse.Namespace) -> dict[str, str]:
    """--set KEY=VALUE, as a dict (empty where the benchmark has no --set)."""
    return dict(item.partition("=")[::2] for item in getattr(args, "set", []))


# The tiny CLIP for each image size (configs/models/); 32 is the demo's.
TINY_MODELS = {32: "configs/models/helip-tiny.json", 64: "configs/models/helip-tiny-64.json"}


def model_settings(args: argparse.Namespace) -> dict[str, object]:
    """model.name where --image-size is not the demo's 32 (so that 32-px runs keep their digests)."""
    return {} if args.image_size == 32 else {"model.name": str(ROOT / TINY_MODELS[args.image_size])}


def synth_dir(args: argparse.Namespace) -> str:
    """--synth-dir, or the family's own directory: sets of two families never share one. Shapes keeps its historic
    name, so the run digests (bench.train_overhead.train_once) of earlier work dirs still match."""
    if args.synth_dir:
        return args.synth_dir
    name = "synth" if args.data == "shapes" else f"synth-{args.data}"
    return str(ROOT / "data" / (name if args.image_size == 32 else f"{name}-{args.image_size}px"))


def ensure_synth(args: argparse.Namespace) -> Path | None:
    """Generate the synthetic set once, before runs start in parallel: each run would otherwise generate it into
    the same directory at the same time (with its own seed). A directory holding another family's set is refused.
    Nothing to generate for a user's own set (None)."""
    from helip.trainer.tools.synth import SynthConfig, ensure_generated

    if own_data(args):
        return None

    config = SynthConfig(
        Path(synth_dir(args)), args.synth_train, args.synth_test, args.image_size, seed=0, family=args.data
    )
    return ensure_generated(config).root
