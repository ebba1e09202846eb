"""Snapshots of the pair store: rows, ids, steps and the log offset they cover, written atomically.

A snapshot is a directory `snap-<ms>-<seq>/` (ids.npy, steps.npy, image.npy, text.npy, meta.json) written under a
temporary name and renamed into place, so a crash never leaves a half snapshot under a final name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from miner_service.log import Offset

log = logging.getLogger(__name__)
PREFIX = "snap-"


@dataclass(frozen=True)
class Snapshot:
    path: Path
    offset: Offset
    ids: np.ndarray  # uint64 [n]
    steps: np.ndarray  # uint64 [n]
    image: np.ndarray  # [n, dim] float32 (memory-mapped)
    text: np.ndarray


def write(
    directory: Path, offset: Offset, ids: np.ndarray, steps: np.ndarray, image: np.ndarray, text: np.ndarray
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{offset}"
    if final.exists():
        return final  # nothing was written since: the same offset means the same rows
    started = time.perf_counter()
    tmp = directory / f".tmp-{PREFIX}{offset}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, array in (("ids", ids), ("steps", steps), ("image", image), ("text", text)):
        with open(tmp / f"{name}.npy", "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
    (tmp / "meta.json").write_text(
        json.dumps(
            {
                "offset": str(offset),
                "rows": int(len(ids)),
                "dim": int(image.shape[1]) if image.ndim == 2 else 0,
                "written_unix_s": time.time(),
            }
        )
    )
    os.replace(tmp, final)
    log.info("snapshot %s: %d rows in %.2f s", final.name, len(ids), time.perf_counter() - started)
    return final


def list_offsets(directory: Path) -> list[Offset]:
    if not directory.exists():
        return []
    return sorted(
        Offset.parse(p.name[len(PREFIX) :]) for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
    )


def load_latest(directory: Path) -> Snapshot | None:
    offsets = list_offsets(directory)
    if not offsets:
        return None
    path = directory / f"{PREFIX}{offsets[-1]}"
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ("ids", "steps", "image", "text")}
    return Snapshot(path, offsets[-1], **arrays)


def prune(directory: Path, keep: int) -> Offset | None:
    """Keep the newest `keep` snapshots; returns the offset of the oldest one kept (what the log must still cover)."""
    offsets = list_offsets(directory)
    for offset in offsets[:-keep] if keep > 0 else []:
        shutil.rmtree(directory / f"{PREFIX}{offset}", ignore_errors=True)
    kept = offsets[-keep:] if keep > 0 else offsets
    return kept[0] if kept else None
