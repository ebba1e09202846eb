"""Zero-shot classification and image<->text retrieval for CLIP-style models (`helip-eval`).

A model is anything with `encode_image(images [B,3,H,W]) -> [B,D]` and `encode_text(tokens [B,L]) -> [B,D]`;
embeddings are L2-normalised here, so the model need not do it. Ranks are pessimistic: a tie with the true match
counts against it, so a degenerate model (e.g. constant embeddings) scores 0, never 1.

Task layout (written by trainer.synth): DIR/zeroshot.json = {"classnames": [...], "templates": ["... {} ..."],
"samples": CSV name relative to the json, "label_key": column with the class index (default "label")} and
DIR/retrieval.csv with one image and one caption per row (captions should be unique).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from trainer.data import CsvPairs, Tokenize, Transform, collate, read_csv_rows

log = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)


def _device_of(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


@torch.no_grad()
def _encode_images(model, dataset: CsvPairs, batch_size: int, device: torch.device) -> torch.Tensor:
    """Normalised image embeddings [N, D] on the CPU, in row order."""
    dataset.max_substitutes = 0  # an evaluation set must be whole: a bad sample is an error, never replaced
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    chunks = [F.normalize(model.encode_image(images.to(device)).float(), dim=-1).cpu() for _, images, _ in loader]
    return torch.cat(chunks)


@torch.no_grad()
def _encode_texts(model, tokenizer: Tokenize, texts: Sequence[str], batch_size: int, device: torch.device):
    """Normalised text embeddings [N, D] on the CPU, in order."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start : start + batch_size])).to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(chunks)


def _hits(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of rows whose target column ranks within the top k, for each k; ties count against the target."""
    true = scores.gather(1, targets[:, None])
    # Rank = how many other columns score at least as high as the true one.
    rank = (scores >= true).sum(dim=1) - 1
    return {k: (rank < k).float().mean().item() for k in ks}


class _EvalMode:
    """Put a model in eval mode for a block and restore its previous mode, so evaluation mid-training is safe."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = getattr(self.model, "training", False)
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def load_zero_shot_task(task: str | Path) -> tuple[list[str], list[str], Path, str]:
    """(classnames, templates, samples CSV path, label column) from a task json or a directory holding zeroshot.json."""
    path = Path(task)
    if path.is_dir():
        path = path / "zeroshot.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    for field in ("classnames", "templates", "samples"):
        if field not in spec:
            raise ValueError(f"{path}: zero-shot task lacks the field {field!r}")
    if not spec["classnames"] or not spec["templates"]:
        raise ValueError(f"{path}: 'classnames' and 'templates' must be non-empty")
    bad = [t for t in spec["templates"] if "{}" not in t]
    if bad:
        raise ValueError(f"{path}: templates must contain '{{}}' for the class name: {bad}")
    return spec["classnames"], spec["templates"], path.parent / spec["samples"], spec.get("label_key", "label")


def zero_shot(
    model,
    tokenizer: Tokenize,
    transform: Transform,
    task: str | Path,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Zero-shot top-1/top-5 accuracy. A class's embedding is the mean of its normalised template embeddings,
    renormalised (as CLIP does). `task` is a zeroshot.json or the directory that holds it."""
    device = _device_of(device)
    classnames, templates, samples_csv, label_key = load_zero_shot_task(task)
    labels = torch.tensor([int(row[label_key]) for row in read_csv_rows(samples_csv, [label_key])])
    if labels.numel() == 0:
        raise ValueError(f"{samples_csv}: no zero-shot samples")
    if labels.min() < 0 or labels.max() >= len(classnames):
        raise ValueError(f"{samples_csv}: column {label_key!r} must index the {len(classnames)} classnames")
    with _EvalMode(model):
        prompts = [template.format(name) for name in classnames for template in templates]
        text_emb = _encode_texts(model, tokenizer, prompts, batch_size, device)
        class_emb = F.normalize(text_emb.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)
        dataset = CsvPairs(samples_csv, transform, tokenizer)
        image_emb = _encode_images(model, dataset, batch_size, device)
    hits = _hits(image_emb @ class_emb.T, labels, (1, 5))
    return {"top1": hits[1], "top5": hits[5]}


def retrieval(
    model,
    tokenizer: Tokenize,
    transform: Transform,
    csv_path: str | Path,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Recall@{1,5,10} both ways over a CSV of (image, caption) pairs where row i's caption is image i's only match."""
    device = _device_of(device)
    dataset = CsvPairs(csv_path, transform, tokenizer)
    if len(dataset) == 0:
        raise ValueError(f"{csv_path}: no retrieval pairs")
    with _EvalMode(model):
        image_emb = _encode_images(model, dataset, batch_size, device)
        text_emb = _encode_texts(model, tokenizer, [c for _, c in dataset.pairs], batch_size, device)
    scores = image_emb @ text_emb.T
    targets = torch.arange(len(dataset))
    i2t = _hits(scores, targets, RECALL_AT)
    t2i = _hits(scores.T.contiguous(), targets, RECALL_AT)
    return {
        **{f"image_to_text_R@{k}": v for k, v in i2t.items()},
        **{f"text_to_image_R@{k}": v for k, v in t2i.items()},
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
    data_dir = Path(data_dir)
    metrics = {}
    for name, value in zero_shot(model, tokenizer, transform, data_dir, batch_size, device).items():
        metrics[f"zero_shot/{name}"] = value
    for name, value in retrieval(model, tokenizer, transform, data_dir / "retrieval.csv", batch_size, device).items():
        metrics[f"retrieval/{name}"] = value
    return metrics


def build_model(model: str, checkpoint: str | Path | None, device: str | torch.device = "cpu"):
    """(model, eval transform, tokenizer): trainer.model's model, loaded from `checkpoint` when given."""
    from trainer import model as models  # heavy import (open_clip), only for the CLI path

    clip, _, preprocess, tokenizer = models.build_model(models.ModelConfig(name=model, device=str(device)))
    if checkpoint is not None:
        models.load_checkpoint(clip, checkpoint)
    return clip, preprocess, tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="helip-eval", description="zero-shot and retrieval metrics as JSON")
    parser.add_argument("--model", required=True, help="open_clip model name, or a model config .json")
    parser.add_argument("--checkpoint", help="state dict file; without it the model is randomly initialised")
    parser.add_argument("--data", required=True, type=Path, help="directory written by `helip-data synth`")
    parser.add_argument("--out", type=Path, help="also write the metrics JSON here")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1:
        parser.error(f"argument --batch-size: must be >= 1, got {args.batch_size}")
    if not (args.data / "zeroshot.json").is_file():
        parser.error(f"argument --data: {args.data} has no zeroshot.json (run `helip-data synth --out DIR`)")
    model, transform, tokenizer = build_model(args.model, args.checkpoint, args.device)
    metrics = evaluate(model, tokenizer, transform, args.data, args.batch_size, args.device)
    text = json.dumps(metrics, indent=2, sort_keys=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
