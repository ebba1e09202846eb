"""The three measurements behind `helip-eval`: zero-shot accuracy, retrieval recall and a linear probe's accuracy.

A model is anything with `encode_image(images [B,3,H,W]) -> [B,D]` and `encode_text(tokens [B,L]) -> [B,D]`;
embeddings are L2-normalised here, so the model need not do it. Ranks are pessimistic: a tie with the true match
counts against it, so a degenerate model (e.g. constant embeddings) scores 0, never 1. Each function puts the model
in eval mode for its duration and restores its previous mode, so evaluation mid-training is safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from helip.trainer.pairs.data import CsvPairs, Tokenize, Transform, collate
from helip.trainer.tools import probe
from helip.trainer.tools.eval_tasks import LabelledImages, ZeroShotTask, synth_task

RECALL_AT = (1, 5, 10)


def _device_of(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


@torch.no_grad()
def _encode_images(model, dataset, batch_size: int, device: torch.device) -> torch.Tensor:
    """Normalised image embeddings [N, D] on the CPU, in dataset order (a CsvPairs or a LabelledImages)."""
    if isinstance(dataset, CsvPairs):
        dataset.max_substitutes = 0  # an evaluation set must be whole: a bad sample is an error, never replaced
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
        batches = (images for _, images, _ in loader)
    else:
        batches = (images for images, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False))
    chunks = [F.normalize(model.encode_image(images.to(device)).float(), dim=-1).cpu() for images in batches]
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


def _as_task(task: str | Path | ZeroShotTask) -> ZeroShotTask:
    return task if isinstance(task, ZeroShotTask) else synth_task(task)


def _task_images(model, transform: Transform, task: ZeroShotTask, batch_size: int, device: torch.device):
    return _encode_images(model, LabelledImages(task.image_paths, task.labels, transform), batch_size, device)


def _class_embeddings(model, tokenizer: Tokenize, task: ZeroShotTask, batch_size: int, device: torch.device):
    """[C, D]: each class's mean normalised template embedding, renormalised (as CLIP does)."""
    text_emb = _encode_texts(model, tokenizer, task.prompts(), batch_size, device)
    return F.normalize(text_emb.view(len(task.classnames), len(task.templates), -1).mean(dim=1), dim=-1)


def zero_shot(
    model,
    tokenizer: Tokenize,
    transform: Transform,
    task: str | Path | ZeroShotTask,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Zero-shot top-1/top-5 accuracy. `task` is a ZeroShotTask, a zeroshot.json or the directory that holds it."""
    device, task = _device_of(device), _as_task(task)
    with _EvalMode(model):
        class_emb = _class_embeddings(model, tokenizer, task, batch_size, device)
        image_emb = _task_images(model, transform, task, batch_size, device)
    hits = _hits(image_emb @ class_emb.T, torch.tensor(task.labels), (1, 5))
    return {"top1": hits[1], "top5": hits[5]}


def linear_probe(
    model,
    transform: Transform,
    task: str | Path | ZeroShotTask,
    train_task: ZeroShotTask | None = None,
    config: probe.ProbeConfig | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Top-1 of logistic regression on frozen normalised image features: fitted on `train_task`'s images and scored
    on `task`'s, or, without `train_task`, on a seeded split of `task` (config.test_fraction held out)."""
    device, task = _device_of(device), _as_task(task)
    config = config or probe.ProbeConfig()
    labels = torch.tensor(task.labels)
    with _EvalMode(model):
        features = _task_images(model, transform, task, batch_size, device)
        if train_task is not None:
            train_features = _task_images(model, transform, train_task, batch_size, device)
            train_labels, test_features, test_labels = torch.tensor(train_task.labels), features, labels
        else:
            train_idx, test_idx = probe.split_indices(labels, config.test_fraction, config.seed)
            train_features, train_labels = features[train_idx], labels[train_idx]
            test_features, test_labels = features[test_idx], labels[test_idx]
    n_classes = len(task.classnames)
    top1 = probe.accuracy(train_features, train_labels, test_features, test_labels, n_classes, config, device)
    return {"top1": top1}


def retrieval(
    model,
    tokenizer: Tokenize,
    transform: Transform,
    csv_path: str | Path,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    img_key: str = "filepath",
    caption_key: str = "title",
    sep: str = "\t",
) -> dict[str, float]:
    """Recall@{1,5,10} both ways over a CSV of (image, caption) pairs where row i's caption is image i's only match."""
    device = _device_of(device)
    dataset = CsvPairs(csv_path, transform, tokenizer, img_key=img_key, caption_key=caption_key, sep=sep)
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
