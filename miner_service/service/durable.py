"""DurableMiner: the core behind a write-ahead log (Redis Stream) and snapshots, as leader or follower.

Leader: a write is validated, appended to the log (Redis confirms), then applied, all under one lock so the
rows always equal "snapshot + log replayed in order". Follower: never takes writes; a thread tails the log and
applies what the leader appended. Both restore on start from the newest snapshot, then replay the log after it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import numpy as np

from helip.miner_service.core.api import Cancelled, MineQuery, MineResult, MinerStats
from helip.miner_service.core.errors import FailedPrecondition, ResourceExhausted
from helip.miner_service.core.miner import HardPairMiner
from helip.miner_service.service import snapshot
from helip.miner_service.service.config import DurabilityConfig
from helip.miner_service.service.lag import ReplicaLag, follower_lag
from helip.miner_service.service.log import LogRecord, Offset, RedisLog

log = logging.getLogger(__name__)


class DurableMiner:
    def __init__(self, core: HardPairMiner, config: DurabilityConfig):
        self.core = core
        self.config = config
        self.log = RedisLog(config.redis_url, config.stream)
        self.snapshot_dir = Path(config.snapshot_dir) if config.snapshot_dir else None
        self.applied = Offset.ZERO
        self._write_lock = threading.Lock()  # log order == apply order
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.replayed_entries = 0

    # ---- the read side is the core's (MinerCore) -------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.core.dim

    @property
    def size(self) -> int:
        return self.core.size

    @property
    def device(self):
        return self.core.device

    def check_capacity(self, ids: np.ndarray) -> int:
        return self.core.check_capacity(ids)

    def mine(self, query: MineQuery, cancelled: Cancelled | None = None) -> MineResult:
        return self.core.mine(query, cancelled)

    def mine_many(self, queries: list[MineQuery], cancelled: Cancelled | None = None) -> list[MineResult | Exception]:
        return self.core.mine_many(queries, cancelled)

    def fetch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.core.fetch(ids)

    def stats(self) -> MinerStats:
        role = "follower" if self.config.follow else "leader"
        return dataclasses.replace(self.core.stats(), role=role, log_offset=str(self.applied))

    # ---- recovery -------------------------------------------------------------------------------------------
    def recover(self) -> None:
        started = time.perf_counter()
        snap = snapshot.load_latest(self.snapshot_dir) if self.snapshot_dir else None
        if snap is not None:
            for first in range(0, len(snap.ids), 65536):
                last = first + 65536
                self.core.upsert(
                    np.asarray(snap.ids[first:last]),
                    np.asarray(snap.image[first:last]),
                    np.asarray(snap.text[first:last]),
                    np.asarray(snap.steps[first:last]),
                    enforce_max_rows=False,  # a snapshot copied while writes ran may hold a few rows too many
                )
            self.applied = snap.offset
        oldest = self.log.first_offset()
        if oldest is not None and oldest > self.applied and self.applied != Offset.ZERO and snap is not None:
            # Entries between the snapshot and the oldest kept entry were trimmed: only a newer snapshot (which
            # another process may have written) has them. Say so rather than serve silently with holes.
            log.warning("log starts at %s, after snapshot %s: entries in between were trimmed", oldest, snap.offset)
        self.replayed_entries = self._catch_up()
        log.info(
            "recovered %d rows (snapshot %s + %d log entries) in %.2f s",
            self.core.size,
            snap.offset if snap else "none",
            self.replayed_entries,
            time.perf_counter() - started,
        )

    def _apply(self, offset: Offset, record: LogRecord) -> None:
        if record.op == "upsert":
            # Checked against max_rows by the leader before it was logged; a replay applies what was logged.
            self.core.upsert(record.ids, record.image, record.text, record.step, enforce_max_rows=False)
        else:
            self.core.delete(record.ids)
        self.applied = offset

    def _catch_up(self) -> int:
        count = 0
        for offset, record in self.log.replay(self.applied):
            self._apply(offset, record)
            count += 1
        return count

    # ---- writes (leader) ------------------------------------------------------------------------------------
    def _refuse_on_follower(self) -> None:
        if self.config.follow:
            raise FailedPrecondition("", "this miner is a read-only follower; send writes to the leader")

    def upsert(self, ids: np.ndarray, image: np.ndarray, text: np.ndarray, step: int) -> tuple[int, int]:
        self._refuse_on_follower()
        with self._write_lock:
            max_rows = self.core.max_rows
            if max_rows and self.core.size + self.core.check_capacity(ids) > max_rows:
                # Refused before logging: a write in the log is a write that replays.
                raise ResourceExhausted("ids", f"new rows would exceed max_rows={max_rows} (stored: {self.core.size})")
            offset = self.log.append(LogRecord("upsert", ids, image, text, step))
            result = self.core.upsert(ids, image, text, step)
            self.applied = offset
            return result

    def delete(self, ids: np.ndarray) -> tuple[int, int]:
        self._refuse_on_follower()
        with self._write_lock:
            offset = self.log.append(LogRecord("delete", ids))
            result = self.core.delete(ids)
            self.applied = offset
            return result

    # ---- lag (follower) -------------------------------------------------------------------------------------
    def lag(self) -> ReplicaLag:
        """How far this miner is behind its log (one Redis round trip; a leader is never behind)."""
        if not self.config.follow:
            return ReplicaLag()
        return follower_lag(self.log.redis, self.log.stream, self.applied)

    # ---- snapshots ------------------------------------------------------------------------------------------
    def snapshot_now(self) -> Path | None:
        if self.snapshot_dir is None:
            return None
        with self._write_lock:  # every write up to this offset is applied, none is half applied
            offset = self.applied
        # Copied block by block while writes go on: the copy holds every row as of `offset` or newer. Replaying the
        # log from `offset` rewrites each newer row (log records are whole rows), so restore + replay is exact.
        ids, steps, image, text = self.core.copy_rows()
        path = snapshot.write(self.snapshot_dir, offset, ids, steps, image, text)
        oldest_kept = snapshot.prune(self.snapshot_dir, self.config.keep_snapshots)
        if oldest_kept is not None and not self.config.follow:
            try:
                trimmed = self.log.trim_before(oldest_kept)
                if trimmed:
                    log.info("trimmed %d log entries below %s", trimmed, oldest_kept)
            except Exception as error:  # trimming is housekeeping; the next snapshot retries it
                log.warning("could not trim the log: %s", error)
        return path

    # ---- background work ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.snapshot_dir is not None and self.config.snapshot_interval_s > 0:
            self._spawn(self._snapshot_loop, "snapshots")
        if self.config.follow:
            self._spawn(self._follow_loop, "follow")

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _snapshot_loop(self) -> None:
        while not self._stop.wait(self.config.snapshot_interval_s):
            try:
                self.snapshot_now()
            except Exception:
                log.exception("scheduled snapshot failed; the next one retries")

    def _follow_loop(self) -> None:
        while not self._stop.is_set():
            try:
                entries = self.log.read_after(self.applied, 256, block_ms=self.config.follow_poll_ms)
                for offset, record in entries:
                    self._apply(offset, record)
            except Exception as error:  # Redis away: keep serving what we have, retry
                log.warning("follower could not read the log (%s); retrying", error)
                self._stop.wait(1.0)

    def stop(self) -> None:
        """Stop background work and write a final snapshot (leader and follower alike)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        try:
            self.snapshot_now()
        except Exception:
            log.exception("final snapshot failed")
