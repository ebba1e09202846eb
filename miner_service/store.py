"""The pair store: one dense row per sample id, overwritten in place.

Rows live in two [capacity, dim] torch tensors (image, text) on the search device, so a search is a plain matrix
product over the first `size` rows. Deleting swaps the last row into the hole, which keeps the rows dense.
Not thread-safe: `HardPairMiner` owns the lock.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from miner_service.errors import ResourceExhausted
from miner_service.idmap import MISSING, IdMap


@dataclass(frozen=True)
class RowsView:
    """The stored rows at one moment; valid only while the caller holds the miner's read lock."""

    image: torch.Tensor  # [size, dim]
    text: torch.Tensor  # [size, dim]
    ids: np.ndarray  # [size] uint64, ids[slot]
    steps: np.ndarray  # [size] uint64, step each row was written at


class PairStore:
    def __init__(
        self,
        dim: int,
        device: torch.device,
        dtype: torch.dtype,
        max_rows: int = 0,
        initial_capacity: int = 4096,
        dense_id_limit: int = 1 << 28,
    ):
        self.dim = dim
        self.device = device
        self.dtype = dtype
        self.max_rows = max_rows
        self.size = 0
        capacity = max(1, min(initial_capacity, max_rows) if max_rows else initial_capacity)
        self._image = torch.empty((capacity, dim), dtype=dtype, device=device)
        self._text = torch.empty((capacity, dim), dtype=dtype, device=device)
        self._ids = np.zeros(capacity, dtype=np.uint64)
        self._steps = np.zeros(capacity, dtype=np.uint64)
        self._slots = IdMap(dense_id_limit)

    @property
    def capacity(self) -> int:
        return len(self._ids)

    def view(self) -> RowsView:
        n = self.size
        return RowsView(self._image[:n], self._text[:n], self._ids[:n], self._steps[:n])

    def slots_of(self, ids: np.ndarray) -> np.ndarray:
        """Slots of `ids`, -1 where not stored."""
        return self._slots.lookup(ids)

    def new_row_count(self, ids: np.ndarray) -> int:
        return int(np.count_nonzero(self._slots.lookup(ids) == MISSING))

    def upsert(self, ids: np.ndarray, image, text, step) -> int:
        """Write rows (ids unique within the call, already validated; image/text numpy or torch, any device).

        Returns the number of new ids."""
        slots = self._slots.lookup(ids)
        new = slots == MISSING
        n_new = int(np.count_nonzero(new))
        if self.max_rows and self.size + n_new > self.max_rows:
            raise ResourceExhausted(
                "ids", f"{n_new} new rows would exceed max_rows={self.max_rows} (stored: {self.size})"
            )
        self._reserve(self.size + n_new)
        slots[new] = np.arange(self.size, self.size + n_new)
        self.size += n_new
        self._slots.assign(ids[new], slots[new])
        index = torch.from_numpy(slots).to(self.device)
        self._image[index] = _as_tensor(image).to(self.device, self.dtype)
        self._text[index] = _as_tensor(text).to(self.device, self.dtype)
        self._ids[slots] = ids
        self._steps[slots] = step
        return n_new

    def delete(self, ids: np.ndarray) -> int:
        """Remove stored ids (unknown ones are ignored). Returns how many were removed."""
        removed = 0
        # A set: an id named twice must not delete twice (the second pass would hit the row moved into its slot).
        for slot in sorted({int(s) for s in self._slots.lookup(ids) if s != MISSING}, reverse=True):
            # Descending slots: moving the last row never moves a row that is still to be deleted below it.
            last = self.size - 1
            gone_id = self._ids[slot : slot + 1].copy()
            if slot != last:
                self._image[slot] = self._image[last]
                self._text[slot] = self._text[last]
                self._ids[slot] = self._ids[last]
                self._steps[slot] = self._steps[last]
                self._slots.assign(self._ids[slot : slot + 1], np.array([slot]))
            self._slots.remove(gone_id)
            self.size -= 1
            removed += 1
        return removed

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        if self.max_rows:
            capacity = min(capacity, self.max_rows)
        for name in ("_image", "_text"):
            old = getattr(self, name)
            grown = torch.empty((capacity, self.dim), dtype=self.dtype, device=self.device)
            grown[: self.size] = old[: self.size]
            setattr(self, name, grown)
        for name in ("_ids", "_steps"):
            old = getattr(self, name)
            grown = np.zeros(capacity, dtype=np.uint64)
            grown[: self.size] = old[: self.size]
            setattr(self, name, grown)


def _as_tensor(rows) -> torch.Tensor:
    return rows if isinstance(rows, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(rows))
