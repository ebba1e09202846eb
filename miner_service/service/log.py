"""The durable log: every accepted write is an entry of a Redis Stream before it is acknowledged.

An entry holds one Upsert (ids, image and text rows as raw little-endian bytes, dtype, step) or one Delete (ids).
Entry ids are Redis' "<ms>-<seq>" stream ids; `Offset` orders them. Any Redis failure surfaces as
`Unavailable`, so the caller refuses the write instead of acknowledging something that may be lost.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import redis

from helip.miner_service.core.errors import Unavailable
from helip.miner_service.wire.names import DEFAULT_NAMESPACE

log = logging.getLogger(__name__)

_DTYPES = {"f4": np.dtype("<f4"), "f2": np.dtype("<f2")}


def stream_key(key_prefix: str, namespace: str, shard_index: int = 0, shard_count: int = 1) -> str:
    """The Redis stream of one namespace's log. "default" keeps the key it had before namespaces existed, so a
    deployment's existing log stays its default namespace."""
    shard = f"shard-{shard_index}-of-{shard_count}"
    if namespace == DEFAULT_NAMESPACE:
        return f"{key_prefix}:miner:log:{shard}"
    return f"{key_prefix}:miner:ns:{namespace}:log:{shard}"


def registry_key(key_prefix: str, shard_index: int = 0, shard_count: int = 1) -> str:
    """The Redis hash of the namespace registry (name -> dim, fingerprint, generation) of one shard."""
    return f"{key_prefix}:miner:namespaces:shard-{shard_index}-of-{shard_count}"


@dataclass(frozen=True, order=True)
class Offset:
    """A stream entry id; Offset.ZERO is "before everything"."""

    ms: int
    seq: int

    @classmethod
    def parse(cls, text: str | bytes) -> Offset:
        text = text.decode() if isinstance(text, bytes) else text
        ms, _, seq = text.partition("-")
        return cls(int(ms), int(seq or 0))

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


Offset.ZERO = Offset(0, 0)


@dataclass(frozen=True)
class LogRecord:
    op: str  # "upsert" or "delete"
    ids: np.ndarray  # uint64
    image: np.ndarray | None = None  # [n, dim] float16/float32
    text: np.ndarray | None = None
    step: int = 0


def _rows_bytes(rows: np.ndarray) -> tuple[bytes, str]:
    if rows.dtype == np.float16:
        return np.ascontiguousarray(rows, dtype="<f2").tobytes(), "f2"
    return np.ascontiguousarray(rows, dtype="<f4").tobytes(), "f4"


def encode_record(record: LogRecord) -> dict[str, bytes]:
    fields = {"op": record.op.encode(), "ids": np.ascontiguousarray(record.ids, dtype="<u8").tobytes()}
    if record.op == "upsert":
        image, dtype = _rows_bytes(record.image)
        text, text_dtype = _rows_bytes(record.text.astype(record.image.dtype, copy=False))
        fields.update(
            image=image,
            text=text,
            dtype=dtype.encode(),
            dim=str(record.image.shape[1]).encode(),
            step=str(record.step).encode(),
        )
    return fields


def decode_record(fields: dict[bytes, bytes]) -> LogRecord:
    ids = np.frombuffer(fields[b"ids"], dtype="<u8")
    op = fields[b"op"].decode()
    if op == "delete":
        return LogRecord("delete", ids)
    dtype = _DTYPES[fields[b"dtype"].decode()]
    dim = int(fields[b"dim"])
    image = np.frombuffer(fields[b"image"], dtype=dtype).reshape(-1, dim)
    text = np.frombuffer(fields[b"text"], dtype=dtype).reshape(-1, dim)
    return LogRecord("upsert", ids, image, text, int(fields[b"step"]))


class RedisLog:
    def __init__(self, url: str, stream: str, timeout_s: float = 5.0):
        self.stream = stream
        # Timeouts: a Redis that stops answering must turn into UNAVAILABLE, not a hung write.
        self.redis = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=10
        )

    def append(self, record: LogRecord) -> Offset:
        try:
            return Offset.parse(self.redis.xadd(self.stream, encode_record(record)))
        except redis.RedisError as error:
            raise Unavailable(
                "redis", f"the durable log could not take the write ({error}); nothing was applied"
            ) from error

    def read_after(
        self, offset: Offset, count: int = 256, block_ms: int | None = None
    ) -> list[tuple[Offset, LogRecord]]:
        """Up to `count` entries after `offset`; with block_ms, wait that long for the first one."""
        if block_ms is None:
            entries = self.redis.xrange(self.stream, min=f"({offset}", max="+", count=count)
        else:
            reply = self.redis.xread({self.stream: str(offset)}, count=count, block=block_ms)
            entries = reply[0][1] if reply else []
        return [(Offset.parse(entry_id), decode_record(fields)) for entry_id, fields in entries]

    def replay(self, after: Offset, batch: int = 256) -> Iterator[tuple[Offset, LogRecord]]:
        while True:
            entries = self.read_after(after, batch)
            if not entries:
                return
            yield from entries
            after = entries[-1][0]

    def first_offset(self) -> Offset | None:
        entries = self.redis.xrange(self.stream, count=1)
        return Offset.parse(entries[0][0]) if entries else None

    def last_offset(self) -> Offset | None:
        entries = self.redis.xrevrange(self.stream, count=1)
        return Offset.parse(entries[0][0]) if entries else None

    def trim_before(self, offset: Offset) -> int:
        """Drop entries older than `offset` (they are covered by a snapshot). Returns how many went."""
        return int(self.redis.xtrim(self.stream, minid=str(offset), approximate=False))

    def length(self) -> int:
        return int(self.redis.xlen(self.stream))

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False
