"""`helip-eval`: zero-shot accuracy, image<->text retrieval recall and a linear probe of a CLIP model, as JSON.

The measurements live in tools.eval_metrics, the data sources in tools.eval_tasks: the synth layout
(DIR/zeroshot.json + DIR/retrieval.csv, written by tools.synth), an ImageFolder directory with class names and
templates for zero-shot and the linear probe, and a CSV/TSV of image-caption pairs in the training data's format
for retrieval. Metric keys name their source: "zero_shot/…" and "retrieval/…" (synth layout), "zero_shot_folder/…"
(ImageFolder), "retrieval_csv/…" (CSV), "linear_probe/top1".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from helip.trainer.pairs.data import Tokenize, Transform
from helip.trainer.tools import probe
from helip.trainer.tools.eval_metrics import linear_probe, retrieval, zero_shot
from helip.trainer.tools.eval_tasks import EvalDataError, EvalSuite, load_suite, load_zero_shot_task

log = logging.getLogger(__name__)

__all__ = ["EvalSuite", "evaluate", "evaluate_suite", "linear_probe", "load_zero_shot_task", "retrieval", "zero_shot"]
# EvalDataError.field -> the helip-eval flag that supplied it
FLAG_OF = {
    "synth_dir": "--data",
    "zeroshot_dir": "--zeroshot-dir",
    "classnames": "--classnames",
    "templates": "--templates",
    "retrieval_data": "--retrieval-data",
    "probe": "--linear-probe",
    "probe_train_dir": "--probe-train-dir",
}
# EvalDataError.field -> the trainer's config key that supplied it
CONFIG_KEY_OF = {
    "synth_dir": "data.eval_dir",
    "zeroshot_dir": "data.zeroshot_dir",
    "classnames": "data.zeroshot_classnames",
    "templates": "data.zeroshot_templates",
    "retrieval_data": "data.retrieval_data",
}


def evaluate(
    model,
    tokenizer: Tokenize,
    transform: Transform,
    data_dir: str | Path,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Both evaluations on the synth layout; flat keys "zero_shot/top1", "retrieval/image_to_text_R@1", ..."""
    return evaluate_suite(model, tokenizer, transform, EvalSuite(synth_dir=Path(data_dir)), batch_size, device)


def evaluate_suite(
    model,
    tokenizer: Tokenize,
    transform: Transform,
    suite: EvalSuite,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    *,
    periodic: bool = True,
    folder_zero_shot: bool = True,
) -> dict[str, float]:
    """Flat metrics of every part of `suite`. `periodic` runs the synth layout, the retrieval CSV and the probe;
    `folder_zero_shot` runs the ImageFolder zero-shot task (the trainer schedules the two separately)."""
    metrics: dict[str, float] = {}

    def add(prefix: str, values: dict[str, float]) -> None:
        metrics.update({f"{prefix}/{name}": value for name, value in values.items()})

    if periodic and suite.synth_dir is not None:
        add("zero_shot", zero_shot(model, tokenizer, transform, suite.synth_dir, batch_size, device))
        add("retrieval", retrieval(model, tokenizer, transform, suite.synth_dir / "retrieval.csv", batch_size, device))
    if folder_zero_shot and suite.zero_shot_task is not None:
        add("zero_shot_folder", zero_shot(model, tokenizer, transform, suite.zero_shot_task, batch_size, device))
    if periodic and suite.retrieval_csv is not None:
        r = suite.retrieval_csv
        add(
            "retrieval_csv",
            retrieval(model, tokenizer, transform, r.path, batch_size, device, r.img_key, r.caption_key, r.sep),
        )
    if periodic and suite.probe is not None:
        task = suite.zero_shot_task or suite.synth_dir
        add(
            "linear_probe",
            linear_probe(model, transform, task, suite.probe_train_task, suite.probe, batch_size, device),
        )
    return metrics


def suite_from_data(data) -> EvalSuite | None:
    """The trainer's evaluation data from its DataConfig, loaded and checked (so a run can fail before its first
    step, not at its end); None when no source is set. A ValueError names the data.* key at fault."""
    sources = (data.eval_dir, data.zeroshot_dir, data.zeroshot_classnames, data.zeroshot_templates, data.retrieval_data)
    if not any(sources):
        return None
    try:
        return load_suite(*sources, img_key=data.img_key, caption_key=data.caption_key, sep=data.separator)
    except EvalDataError as error:
        raise ValueError(f"{CONFIG_KEY_OF.get(error.field, error.field)}: {error.detail}") from None


def check_data_sources(data) -> None:
    """What `helip-train` checks before starting: suite_from_data, except for a synth layout the run will generate."""
    if data.eval_dir and data.synth_dir and Path(data.eval_dir) == Path(data.synth_dir):
        data = dataclasses.replace(data, eval_dir="")
    suite_from_data(data)


def load_model(model: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu"):
    """(model, eval transform, tokenizer) of the model name or config file, with `checkpoint`'s weights if given."""
    from helip.trainer.tools import model as models  # heavy import (open_clip), only for the CLI path

    clip, _, preprocess, tokenizer = models.build_model(models.ModelConfig(name=model, device=str(device)), checkpoint)
    return clip, preprocess, tokenizer


def _separator(text: str) -> str:
    return {"\\t": "\t", "tab": "\t"}.get(text, text)  # a shell passes '\t' as two characters


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="helip-eval", description="zero-shot, retrieval and linear-probe metrics of a CLIP model, as JSON"
    )
    parser.add_argument("--model", required=True, help="open_clip model name, or a model config .json")
    parser.add_argument("--checkpoint", help="state dict file; without it the model is randomly initialised")
    parser.add_argument("--data", type=Path, help="a directory in the synth layout (`helip-data synth`)")
    parser.add_argument("--zeroshot-dir", type=Path, help="an ImageFolder directory (one folder per class)")
    parser.add_argument(
        "--classnames",
        default="",
        help="class names for --zeroshot-dir's sorted folders: a file (one per line, a JSON list, or a JSON object "
        "folder -> name) or 'imagenet' (open_clip's); default: the folder names",
    )
    parser.add_argument(
        "--templates",
        default="",
        help="prompt templates with {} for the class name: a file (one per line or a JSON list), 'openai' or "
        "'simple' (open_clip's ImageNet sets); default: 'openai' with imagenet class names, else 'a photo of a {}.'",
    )
    parser.add_argument("--retrieval-data", type=Path, help="CSV/TSV of image-caption pairs, one true caption each")
    parser.add_argument("--img-key", default="filepath", help="--retrieval-data's image path column")
    parser.add_argument("--caption-key", default="title", help="--retrieval-data's caption column")
    parser.add_argument("--separator", type=_separator, default="\t", help="--retrieval-data's separator ('\\t')")
    parser.add_argument(
        "--linear-probe", action="store_true", help="also fit a logistic-regression probe on frozen image features"
    )
    parser.add_argument("--probe-train-dir", type=Path, help="ImageFolder to fit the probe on (else split the set)")
    parser.add_argument(
        "--probe-test-fraction",
        type=float,
        default=probe.ProbeConfig.test_fraction,
        help="share of the set the probe is scored on, without --probe-train-dir",
    )
    parser.add_argument("--probe-seed", type=int, default=probe.ProbeConfig.seed, help="seed of that split")
    parser.add_argument(
        "--probe-weight-decay",
        type=float,
        default=probe.ProbeConfig.weight_decay,
        help="L2 penalty on the probe's weights",
    )
    parser.add_argument("--out", type=Path, help="also write the metrics JSON here")
    parser.add_argument("--batch-size", type=int, default=64, help="images or texts per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def _suite_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> EvalSuite:
    probe_config = None
    if args.linear_probe:
        try:
            probe_config = probe.ProbeConfig(
                args.probe_weight_decay, test_fraction=args.probe_test_fraction, seed=args.probe_seed
            )
        except ValueError as error:
            flag = "--probe-test-fraction" if "test_fraction" in str(error) else "--probe-weight-decay"
            parser.error(f"argument {flag}: {error}")
    try:
        return load_suite(
            args.data or "",
            args.zeroshot_dir or "",
            args.classnames,
            args.templates,
            args.retrieval_data or "",
            args.img_key,
            args.caption_key,
            args.separator,
            probe_config,
            args.probe_train_dir or "",
        )
    except EvalDataError as error:
        parser.error(f"argument {FLAG_OF.get(error.field, error.field)}: {error.detail}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1:
        parser.error(f"argument --batch-size: must be >= 1, got {args.batch_size}")
    suite = _suite_from_args(args, parser)
    model, transform, tokenizer = load_model(args.model, args.checkpoint, args.device)
    metrics = evaluate_suite(model, tokenizer, transform, suite, args.batch_size, args.device)
    text = json.dumps(metrics, indent=2, sort_keys=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
