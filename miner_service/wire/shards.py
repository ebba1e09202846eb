"""The shard rule: which of S miners owns an id. Server (which ids it accepts) and client (where it routes) share it."""

from __future__ import annotations

import numpy as np

_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def shard_of(ids, shard_count: int) -> np.ndarray:
    """The owning shard of each id: a SplitMix64 finaliser (so that dense ids spread evenly) mod shard_count."""
    x = np.asarray(ids, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= _MIX_1
        x ^= x >> np.uint64(27)
        x *= _MIX_2
        x ^= x >> np.uint64(31)
    return (x % np.uint64(shard_count)).astype(np.int64)


def parse_shard(text: str) -> tuple[int, int]:
    """ "i/S" -> (i, S), with a message naming the flag when it is malformed."""
    index, sep, count = text.partition("/")
    try:
        index_i, count_i = int(index), int(count)
    except ValueError:
        raise ValueError(f"--shard expects i/S (e.g. 0/3), got {text!r}") from None
    if not sep or count_i < 1 or not 0 <= index_i < count_i:
        raise ValueError(f"--shard expects i/S with 0 <= i < S, got {text!r}")
    return index_i, count_i
