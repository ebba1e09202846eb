"""The bootstrap pass: embed a rank's share of the data set with the current model and push it to the miner.

It runs through DataLoader worker processes like training does, so a large set is read as fast as training
reads it. Used before step one (`mining.bootstrap_index`) and whenever a resumed run finds the miner holding
fewer rows than the data set.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

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
    on_cuda = torch.device(device).type == "cuda"
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_pairs,
        pin_memory=on_cuda,
        **{**worker_options(num_workers), "persistent_workers": False},
    )
    was_training = model.training
    model.eval()
    pushed = 0
    timing = BootstrapTiming()
    try:
        mark = time.perf_counter()
        for batch in tqdm(loader, desc=f"bootstrap index (rank {rank})", unit="batch", disable=not progress):
            timing.data_s += time.perf_counter() - mark
            mark = time.perf_counter()
            image, text = encode_pairs(
                model, batch.images.to(device, dtype, non_blocking=True), batch.tokens.to(device, non_blocking=True)
            )
            if on_cuda:
                torch.cuda.synchronize(device)  # the encode's own time, not the push's wait for it
            timing.note_encode(time.perf_counter() - mark)
            mark = time.perf_counter()
            if pusher.push(batch.ids, image, text, step, block=True, timeout_s=300):
                pushed += len(batch)
            timing.push_s += time.perf_counter() - mark
            mark = time.perf_counter()
    finally:
        model.train(was_training)
    mark = time.perf_counter()
    pusher.flush(300)
    timing.flush_s = time.perf_counter() - mark
    timing.total_s = time.perf_counter() - started
    log.info("rank %d pushed %d bootstrap rows in %s", rank, pushed, timing)
    return pushed


@dataclass
class BootstrapTiming:
    """Where a bootstrap pass's time went: waiting for the DataLoader (worker start-up included), encoding (the
    first batch apart: it pays CUDA's and the kernels' first-use costs), handing rows to the pusher, and the final
    flush (the miner acknowledging the last rows)."""

    total_s: float = 0.0
    data_s: float = 0.0
    first_encode_s: float = 0.0
    encode_s: float = 0.0
    push_s: float = 0.0
    flush_s: float = 0.0
    batches: int = 0

    def note_encode(self, seconds: float) -> None:
        if not self.batches:
            self.first_encode_s = seconds
        self.encode_s += seconds
        self.batches += 1

    def __str__(self) -> str:
        return (
            f"{self.total_s:.1f} s: waiting for data {self.data_s:.1f} s, encoding {self.encode_s:.1f} s "
            f"({self.batches} batches, the first {self.first_encode_s:.1f} s), pushing {self.push_s:.1f} s, "
            f"final flush {self.flush_s:.1f} s"
        )
