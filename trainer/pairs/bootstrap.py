"""The bootstrap pass: embed a rank's share of the data set with the current model and push it to the miner.

It runs through DataLoader worker processes like training does, so a large set is read as fast as training
reads it. Used before step one (`mining.bootstrap_index`) and whenever a resumed run finds the miner holding
fewer rows than the data set.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from helip.trainer.pairs.data import collate_pairs
from helip.trainer.pairs.hard_pairs import worker_options
from helip.trainer.pairs.pusher import EmbeddingPusher

log = logging.getLogger(__name__)


def encode_pairs(model, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_features, text_features) of an open_clip-style model (dict or tuple output)."""
    out = model(images, tokens)
    if isinstance(out, dict):
        return out["image_features"], out["text_features"]
    return out[0], out[1]


@torch.no_grad()
def bootstrap_index(
    model,
    dataset,
    pusher: EmbeddingPusher,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    step: int = 0,
    progress: bool = True,
) -> int:
    """Push embeddings of ids rank, rank + world_size, ... of `dataset`; returns the rows pushed."""
    from tqdm import tqdm

    started = time.perf_counter()
    ids = np.arange(rank, len(dataset), world_size)
    batches = [ids[i : i + batch_size].tolist() for i in range(0, len(ids), batch_size)]
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_pairs,
        pin_memory=torch.device(device).type == "cuda",
        **{**worker_options(num_workers), "persistent_workers": False},
    )
    was_training = model.training
    model.eval()
    pushed = 0
    try:
        for batch in tqdm(loader, desc=f"bootstrap index (rank {rank})", unit="batch", disable=not progress):
            image, text = encode_pairs(
                model, batch.images.to(device, dtype, non_blocking=True), batch.tokens.to(device, non_blocking=True)
            )
            if pusher.push(batch.ids, image, text, step, block=True, timeout_s=300):
                pushed += len(batch)
    finally:
        model.train(was_training)
    pusher.flush(300)
    log.info("rank %d pushed %d bootstrap rows in %.1f s", rank, pushed, time.perf_counter() - started)
    return pushed
