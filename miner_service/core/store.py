"""The pair store: one row per sample id, in fixed-capacity blocks, each block behind its own readers-writer lock.

Layout. Rows live in blocks of `block_rows` slots (image and text [block_rows, dim] tensors on the block's
device, ids / steps / live flags on the host); slot s is row s % block_rows of block s // block_rows. Growing
allocates one more block, never a copy of the store (no 2x peak), and a block is also the unit of placement over
several devices (`block_device`). An id keeps its slot for as long as it is stored: an overwrite writes in place,
a delete marks the slot dead (a hole, masked in searches) and a later insert reuses it. Stable slots are what let a
search hold one block at a time: a row never moves under a reader.

Locking, and why per-block locks rather than copy-on-write blocks: an upsert touches a few hundred rows, and
copying a 64K-row block to change them would cost more than the write itself, on every write. So:
- writers (upsert, delete) serialise on one mutex among themselves and take the write lock of each block they
  change, one block at a time, last block first (against the searches' direction, so they cross a search once);
- a search takes a block's read lock only while it scores a chunk of that block, so an upsert waits for at most
  one chunk of each running Mine, never for whole Mines;
- a short directory lock guards the id -> slot map, the free slots and the block list, and is never held while
  rows are read or written;
- snapshots and index rebuilds copy block by block under each block's read lock (`copy_rows`).
A search therefore sees each block as of the moment it scored it, not one instant for the whole store; a row
written during a Mine may or may not be among its candidates. On a GPU the reads and writes of a block are kernels
on the same stream, so they run in the order the locks admitted them.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from helip.miner_service.core.errors import ResourceExhausted
from helip.miner_service.core.idmap import MISSING, IdMap
from helip.miner_service.core.rwlock import ReadWriteLock

DEFAULT_BLOCK_ROWS = 1 << 16


def block_device(index: int, devices: Sequence[torch.device]) -> torch.device:
    """The device block `index` lives on: blocks go round-robin over the devices, so a store grows evenly on all."""
    return devices[index % len(devices)]


class RowBlock:
    """Up to `capacity` rows. Readers hold `lock.read()`, writers `lock.write()`, while touching the rows.

    `labels` (int64 ids) and `live_mask` mirror `ids` and `live` on the block's device for the search; on the CPU
    they are views of the same memory.
    """

    def __init__(self, index: int, capacity: int, dim: int, device: torch.device, dtype: torch.dtype):
        self.index = index
        self.capacity = capacity
        self.first_slot = index * capacity
        self.device = device
        self.image = torch.empty((capacity, dim), dtype=dtype, device=device)
        self.text = torch.empty((capacity, dim), dtype=dtype, device=device)
        self.ids = np.zeros(capacity, dtype=np.uint64)
        self.steps = np.zeros(capacity, dtype=np.uint64)
        self.live = np.zeros(capacity, dtype=bool)
        if device.type == "cpu":
            self.labels = torch.from_numpy(self.ids.view(np.int64))
            self.live_mask = torch.from_numpy(self.live)
        else:
            self.labels = torch.zeros(capacity, dtype=torch.int64, device=device)
            self.live_mask = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.used = 0  # slots handed out so far (a high-water mark); slots at and past it are never read
        self.holes = 0  # dead slots below `used`
        self.lock = ReadWriteLock()

    def write(self, offsets: np.ndarray, image: torch.Tensor, text: torch.Tensor, ids: np.ndarray, steps) -> None:
        """Write rows at `offsets` (image/text on this block's device and dtype). Caller holds the write lock."""
        index = torch.from_numpy(offsets).to(self.device)
        # Allocated before the first row changes, so that a failed allocation leaves the block as it was.
        labels = torch.from_numpy(ids.view(np.int64)).to(self.device) if self.device.type != "cpu" else None
        if np.all(np.diff(offsets) == 1):
            first, last = int(offsets[0]), int(offsets[-1])
            # New rows land in consecutive slots: a slice copy, much cheaper than an indexed scatter.
            self.image[first : last + 1].copy_(image)
            self.text[first : last + 1].copy_(text)
        else:
            self.image[index] = image
            self.text[index] = text
        self.holes -= int(np.count_nonzero(~self.live[offsets] & (offsets < self.used)))
        self.ids[offsets] = ids
        self.steps[offsets] = steps
        self.live[offsets] = True
        if labels is not None:
            self.labels[index] = labels
            self.live_mask[index] = True
        self.used = max(self.used, int(offsets.max()) + 1)

    def kill(self, offsets: np.ndarray) -> None:
        """Mark rows dead. Caller holds the write lock."""
        self.live[offsets] = False
        self.holes += len(offsets)
        if self.device.type != "cpu":
            self.live_mask[torch.from_numpy(offsets).to(self.device)] = False


@dataclass(frozen=True)
class GatheredRows:
    """Rows gathered by slot; where `found` is False the rows are zeros (slot empty, dead or holding another id)."""

    image: torch.Tensor  # [n, dim] on the device asked for
    text: torch.Tensor
    steps: np.ndarray  # [n] uint64
    found: np.ndarray  # [n] bool


class _BlockGroups:
    """The valid entries of a slot array grouped by block: positions (into the slot array) and in-block offsets,
    sorted by block; iterating yields (block index, slice of those arrays)."""

    def __init__(self, slots: np.ndarray, block_rows: int):
        valid = np.flatnonzero(slots >= 0)
        block_of = slots[valid] // block_rows
        order = np.argsort(block_of, kind="stable")
        self.positions = valid[order]
        self.block_of = block_of[order]
        self.offsets = slots[self.positions] - self.block_of * block_rows

    def __iter__(self):
        starts = np.flatnonzero(np.diff(self.block_of, prepend=-1))
        ends = np.append(starts[1:], len(self.block_of))
        for start, end in zip(starts.tolist(), ends.tolist()):
            yield int(self.block_of[start]), slice(start, end)


class PairStore:
    """Thread-safe; see the module docstring for who locks what."""

    def __init__(
        self,
        dim: int,
        devices: Sequence[torch.device],
        dtype: torch.dtype,
        max_rows: int = 0,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        dense_id_limit: int = 1 << 28,
    ):
        assert block_rows > 0 and len(devices) > 0
        self.dim = dim
        self.devices = list(devices)
        self.dtype = dtype
        self.max_rows = max_rows
        self.block_rows = block_rows
        self._blocks: list[RowBlock] = []
        self._slots = IdMap(dense_id_limit)
        self._free_slots: list[int] = []  # dead slots, reused by the next inserts
        self._end = 0  # slots handed out ever (free ones included)
        self._size = 0
        self._directory = threading.Lock()
        self._writer = threading.Lock()

    # ---- reads ------------------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return len(self._blocks) * self.block_rows

    def blocks(self) -> list[RowBlock]:
        """The blocks as they are now (a new list; blocks are only ever appended)."""
        with self._directory:
            return list(self._blocks)

    def slots_of(self, ids: np.ndarray) -> np.ndarray:
        """Slots of `ids` (int64), -1 where not stored."""
        with self._directory:
            return self._slots.lookup(ids)

    def new_row_count(self, ids: np.ndarray) -> int:
        return int(np.count_nonzero(self.slots_of(ids) == MISSING))

    def gather(
        self, slots: np.ndarray, expected_ids: np.ndarray | None = None, device: torch.device | None = None
    ) -> GatheredRows:
        """The rows at `slots` (-1: none), one block at a time under its read lock.

        expected_ids: when given, a slot counts as found only while it still holds that id (a slot looked up
        before a concurrent delete and re-insert may hold another row by now)."""
        device = device or self.devices[0]
        n = len(slots)
        image = torch.zeros((n, self.dim), dtype=self.dtype, device=device)
        text = torch.zeros((n, self.dim), dtype=self.dtype, device=device)
        steps = np.zeros(n, dtype=np.uint64)
        found = np.zeros(n, dtype=bool)
        groups = _BlockGroups(slots, self.block_rows)
        # Positions and offsets go to each device in one copy: a copy from pageable host memory waits for the
        # device's queue to drain, which once per block made a gather on a GPU wait ~150 times at 10M rows.
        uploaded: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        for block, part in self._found(groups, expected_ids, steps, found):
            if block.device not in uploaded:
                uploaded[block.device] = (
                    torch.from_numpy(groups.offsets).to(block.device),
                    torch.from_numpy(groups.positions).to(device),
                )
            rows, out = (t[part] for t in uploaded[block.device])
            # Every row of the group is copied and the ones not found are zeroed below: choosing on the host
            # which to copy would upload a mask per block.
            image[out] = block.image[rows].to(device)
            text[out] = block.text[rows].to(device)
        if n and not found.all():
            missing = torch.from_numpy(~found).to(device).unsqueeze(1)
            image.masked_fill_(missing, 0)
            text.masked_fill_(missing, 0)
        return GatheredRows(image, text, steps, found)

    def steps_of(self, slots: np.ndarray, expected_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(steps uint64, found bool) of the rows at `slots`, as `gather` finds them, without copying rows."""
        steps = np.zeros(len(slots), dtype=np.uint64)
        found = np.zeros(len(slots), dtype=bool)
        for _ in self._found(_BlockGroups(slots, self.block_rows), expected_ids, steps, found):  # the walk fills them
            pass
        return steps, found

    def _found(self, groups: _BlockGroups, expected_ids, steps: np.ndarray, found: np.ndarray):
        """Fill `steps` and `found` block by block; after each block, yield (block, slice of the groups' arrays)
        while still holding its read lock, so that a caller copying rows sees what was found."""
        blocks = self.blocks()
        for block_index, part in groups:
            block = blocks[block_index]
            positions, offsets = groups.positions[part], groups.offsets[part]
            with block.lock.read():
                good = self._holds(block, offsets, positions, expected_ids)
                steps[positions[good]] = block.steps[offsets[good]]
                found[positions[good]] = True
                yield block, part

    @staticmethod
    def _holds(block: RowBlock, offsets: np.ndarray, positions: np.ndarray, expected_ids) -> np.ndarray:
        """Which offsets of a read-locked block hold a live row (with the expected id, when given)."""
        good = block.live[offsets] & (offsets < block.used)
        if expected_ids is not None:
            good &= block.ids[offsets] == expected_ids[positions]
        return good

    def copy_rows(self):
        """Yield (ids uint64, steps uint64, image float32 numpy, text) of the live rows, block by block.

        Each block is copied under its read lock only, so writers keep going between blocks; rows written while
        the copy runs may or may not be in it (a snapshot replays its log from the offset taken before). An id
        deleted and re-inserted into a block still to come while the copy runs is yielded twice."""
        for block in self.blocks():
            with block.lock.read():
                used = block.used
                live = block.live[:used].copy()
                mask = torch.from_numpy(live).to(block.device)
                copied = (
                    block.ids[:used][live].copy(),
                    block.steps[:used][live].copy(),
                    block.image[:used][mask].float().cpu().numpy(),
                    block.text[:used][mask].float().cpu().numpy(),
                )
            yield copied  # outside the lock: the consumer's pace must not hold writers

    def copy_all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`copy_rows` joined: (ids, steps, image float32, text) of all live rows, each id once.

        An id that `copy_rows` yielded twice keeps its later copy, the newer row (a
        restore upserts the ids in one call, which takes them to be unique)."""
        parts = list(self.copy_rows())
        if not parts:
            empty = np.zeros((0, self.dim), dtype=np.float32)
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64), empty, empty.copy()
        ids, steps, image, text = (np.concatenate(column) for column in zip(*parts))
        _, last_from_end = np.unique(ids[::-1], return_index=True)
        if len(last_from_end) < len(ids):
            last = np.sort(len(ids) - 1 - last_from_end)
            ids, steps, image, text = ids[last], steps[last], image[last], text[last]
        return ids, steps, image, text

    def step_range(self) -> tuple[int, int]:
        """(min, max) step over the stored rows; (0, 0) when empty."""
        low, high = None, 0
        for block in self.blocks():
            with block.lock.read():
                steps = block.steps[: block.used][block.live[: block.used]]
                if len(steps):
                    low = int(steps.min()) if low is None else min(low, int(steps.min()))
                    high = max(high, int(steps.max()))
        return (low or 0), high

    # ---- writes -----------------------------------------------------------------------------------------------
    def upsert(self, ids: np.ndarray, image, text, step, enforce_max_rows: bool = True) -> int:
        """Write rows (ids unique within the call, already validated; image/text numpy or torch, any device).

        Returns the number of new ids. Raises ResourceExhausted past max_rows unless `enforce_max_rows` is off
        (replaying a log whose writes were checked before they were logged)."""
        ids = np.asarray(ids, dtype=np.uint64)
        steps = np.broadcast_to(np.asarray(step, dtype=np.uint64), ids.shape)
        image, text = _as_tensor(image), _as_tensor(text)
        with self._writer:
            slots = self.slots_of(ids)
            new = slots == MISSING
            n_new = int(np.count_nonzero(new))
            if enforce_max_rows and self.max_rows and self._size + n_new > self.max_rows:
                raise ResourceExhausted(
                    "ids", f"{n_new} new rows would exceed max_rows={self.max_rows} (stored: {self._size})"
                )
            end_before = self._end
            slots[new] = self._allocate(n_new)
            blocks = self.blocks()
            block_of = slots // self.block_rows
            try:
                # Every block's rows are converted before any block is written, and outside the locks: a copy that
                # fails (a full device) leaves the blocks as they were, and readers wait for the writes only.
                converted = []
                for block_index in _against_the_scan(block_of):
                    rows = np.flatnonzero(block_of == block_index)
                    block = blocks[int(block_index)]
                    block_image = _rows_for_block(image, rows, len(ids)).to(block.device, self.dtype)
                    block_text = _rows_for_block(text, rows, len(ids)).to(block.device, self.dtype)
                    converted.append((block, rows, block_image, block_text))
            except BaseException:
                self._free_slots_given_to(slots[new], end_before)
                raise
            for block, rows, block_image, block_text in converted:
                with block.lock.write():
                    block.write(slots[rows] - block.first_slot, block_image, block_text, ids[rows], steps[rows])
            with self._directory:
                self._slots.assign(ids[new], slots[new])
                self._size += n_new
        return n_new

    def delete(self, ids: np.ndarray) -> int:
        """Remove stored ids (unknown ones are ignored). Returns how many were removed."""
        with self._writer:
            with self._directory:
                slots = np.unique(self._slots.lookup(ids))  # an id named twice is deleted once
                slots = slots[slots != MISSING]
                self._slots.remove(np.asarray(ids, dtype=np.uint64))
                self._free_slots.extend(slots.tolist())
                self._size -= len(slots)
                blocks = list(self._blocks)
            block_of = slots // self.block_rows
            for block_index in _against_the_scan(block_of):
                block = blocks[int(block_index)]
                with block.lock.write():
                    block.kill(slots[block_of == block_index] - block.first_slot)
        return len(slots)

    def _allocate(self, n: int) -> np.ndarray:
        """Slots for n new rows: dead ones first, then fresh ones, adding blocks as needed. Caller holds _writer.

        The blocks are allocated before any slot is handed out: when one cannot be (a full device), nothing is."""
        fresh = n - min(n, len(self._free_slots))  # only writers change the free slots
        needed_blocks = -(-(self._end + fresh) // self.block_rows)
        for index in range(len(self._blocks), needed_blocks):
            # Allocated outside the directory lock: a new block takes a while to allocate, readers need not wait.
            block = RowBlock(index, self.block_rows, self.dim, block_device(index, self.devices), self.dtype)
            with self._directory:
                self._blocks.append(block)
        with self._directory:
            reused = [self._free_slots.pop() for _ in range(n - fresh)]
        first, self._end = self._end, self._end + fresh
        return np.concatenate([np.asarray(reused, dtype=np.int64), np.arange(first, first + fresh, dtype=np.int64)])

    def _free_slots_given_to(self, slots: np.ndarray, end_before: int) -> None:
        """Undo the `_allocate` that handed out `slots` (none of them written); nothing was allocated since."""
        self._end = end_before
        with self._directory:
            self._free_slots.extend(slots[slots < end_before].tolist())


def _as_tensor(rows) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows
    with warnings.catch_warnings():
        # Request rows are read-only views of the message bytes; they are only read (copied into a block).
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(rows))


def _against_the_scan(block_of: np.ndarray) -> np.ndarray:
    """The blocks a write touches, last first. Searches scan first to last: a writer going the other way meets
    each running search once, where one going the same way would follow it, a chunk's wait at every block."""
    return np.unique(block_of)[::-1]


def _rows_for_block(rows: torch.Tensor, picked: np.ndarray, total: int) -> torch.Tensor:
    return rows if len(picked) == total else rows[torch.from_numpy(picked).to(rows.device)]
