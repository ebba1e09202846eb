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

from helip.miner_service.service.log import Offset
from helip.miner_service.wire.names import DEFAULT_NAMESPACE

log = logging.getLogger(__name__)
PREFIX = "snap-"
NAMESPACES_DIR = "namespaces"
GENERATION_FILE = "GENERATION"


def namespace_dir(root: Path, namespace: str) -> Path:
    """Where one namespace's snapshots live: the default namespace in `root` itself (where they were before
    namespaces existed), any other in `root/namespaces/<name>`."""
    return root if namespace == DEFAULT_NAMESPACE else root / NAMESPACES_DIR / namespace


def remove_all(directory: Path) -> int:
    """Remove every snapshot (and the generation marker) in `directory`; returns how many snapshots went."""
    offsets = list_offsets(directory)
    for offset in offsets:
        shutil.rmtree(directory / f"{PREFIX}{offset}", ignore_errors=True)
    (directory / GENERATION_FILE).unlink(missing_ok=True)
    return len(offsets)


def read_generation(directory: Path) -> str:
    """The generation `directory`'s snapshots belong to ("" when unmarked)."""
    marker = directory / GENERATION_FILE
    return marker.read_text().strip() if marker.exists() else ""


def claim_generation(directory: Path, generation: str) -> bool:
    """Mark `directory` as holding snapshots of `generation` of its namespace. Snapshots of another generation
    (the namespace was dropped and created again meanwhile) are removed first: they would bring back rows that
    were dropped. Returns whether any were removed. A directory without a marker is kept (written before
    namespaces had generations)."""
    if not generation:
        return False  # not known yet (a follower before the leader registered the namespace)
    marker = directory / GENERATION_FILE
    removed = False
    if marker.exists() and marker.read_text().strip() != generation:
        log.info("snapshots in %s belong to an earlier generation of their namespace: removed", directory)
        removed = remove_all(directory) > 0
    directory.mkdir(parents=True, exist_ok=True)
    marker.write_text(generation)
    return removed


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
