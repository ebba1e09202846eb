"""Sample id -> row slot, vectorised.

Training ids are data set indices, so they are mostly small and dense: those go through a direct-address table
(int32 slots, grown geometrically to the largest id seen), which answers a batch of lookups with one gather.
Ids at or above `dense_limit` (hashes, sparse keys) go through a dict; they are correct, only slower.
"""

from __future__ import annotations

import numpy as np

MISSING = -1


class IdMap:
    def __init__(self, dense_limit: int = 1 << 28):
        self.dense_limit = dense_limit
        self._table = np.full(1024, MISSING, dtype=np.int32)
        self._sparse: dict[int, int] = {}

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Slots of `ids` (uint64), MISSING (-1) where not stored. Returns int64."""
        ids = np.asarray(ids, dtype=np.uint64)
        slots = np.full(ids.shape, MISSING, dtype=np.int64)
        dense = ids < min(self.dense_limit, len(self._table))
        slots[dense] = self._table[ids[dense].astype(np.int64)]
        if self._sparse:
            for pos in np.flatnonzero(ids >= self.dense_limit):
                slots[pos] = self._sparse.get(int(ids[pos]), MISSING)
        return slots

    def assign(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Map each id to its slot (overwriting)."""
        ids = np.asarray(ids, dtype=np.uint64)
        dense = ids < self.dense_limit
        if dense.any():
            top = int(ids[dense].max())
            if top >= len(self._table):
                grown = np.full(max(top + 1, 2 * len(self._table)), MISSING, dtype=np.int32)
                grown[: len(self._table)] = self._table
                self._table = grown
            self._table[ids[dense].astype(np.int64)] = slots[dense]
        for pos in np.flatnonzero(~dense):
            self._sparse[int(ids[pos])] = int(slots[pos])

    def remove(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.uint64)
        dense = ids < min(self.dense_limit, len(self._table))
        self._table[ids[dense].astype(np.int64)] = MISSING
        for pos in np.flatnonzero(ids >= self.dense_limit):
            self._sparse.pop(int(ids[pos]), None)
