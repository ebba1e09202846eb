"""Shards: the id space split over S miners, each owning the ids with shard_of(id) == its index.

`ShardedMinerClient` speaks to all of them as if they were one miner: upserts and deletes are routed by id, and a
Mine is scattered to every shard and merged. Anchors given by id are first fetched from their owners, then mined
by embedding everywhere (carrying their ids, so each shard still drops the anchor itself), which makes the merged
answer exactly what one unsharded miner over the same rows gives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from helip.miner.v1 import miner_pb2 as pb
from miner_service.client import ClientConfig, MinerClient, Neighbours, _ids

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


class ShardedMinerClient:
    """The MinerClient interface over S shard addresses (listed in shard order)."""

    def __init__(self, addresses: Sequence[str], config: ClientConfig = ClientConfig()):
        if not addresses:
            raise ValueError("ShardedMinerClient needs at least one address")
        self.clients = [MinerClient(dataclasses.replace(config, address=a)) for a in addresses]
        self._pool = ThreadPoolExecutor(max_workers=len(self.clients), thread_name_prefix="shard")

    @property
    def shard_count(self) -> int:
        return len(self.clients)

    @property
    def namespace(self) -> str:
        return self.clients[0].namespace

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self._pool.shutdown(wait=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        for client in self.clients:
            client.wait_ready(timeout_s)

    def _each(self, calls):
        """Run (client, fn) pairs concurrently; re-raise the first error."""
        futures = [self._pool.submit(fn, client) for client, fn in calls]
        return [f.result() for f in futures]

    def upsert(self, ids, image, text, step: int = 0, timeout_s: float | None = None):
        ids = _ids(ids)
        image, text = np.asarray(_host(image)), np.asarray(_host(text))
        owner = shard_of(ids, self.shard_count)
        calls = []
        for shard in np.unique(owner):
            mask = owner == shard
            calls.append((self.clients[shard], lambda c, m=mask: c.upsert(ids[m], image[m], text[m], step, timeout_s)))
        replies = self._each(calls)
        return sum(r.accepted for r in replies)

    def delete(self, ids, timeout_s: float | None = None) -> int:
        ids = _ids(ids)
        owner = shard_of(ids, self.shard_count)
        calls = [(self.clients[s], lambda c, m=(owner == s): c.delete(ids[m], timeout_s)) for s in np.unique(owner)]
        return sum(r.deleted for r in self._each(calls))

    def fetch(self, ids, timeout_s: float | None = None):
        """(found mask, image [n, dim], text [n, dim]) for ids, each asked of its owner."""
        ids = _ids(ids)
        owner = shard_of(ids, self.shard_count)
        found = np.zeros(len(ids), dtype=bool)
        image = text = None
        for shard, rows in zip(
            np.unique(owner),
            self._each(
                [(self.clients[s], lambda c, m=(owner == s): c.fetch(ids[m], timeout_s)) for s in np.unique(owner)]
            ),
        ):
            positions = np.flatnonzero(owner == shard)
            shard_found, shard_image, shard_text = rows
            if image is None:
                image = np.zeros((len(ids), shard_image.shape[1]), dtype=np.float32)
                text = np.zeros_like(image)
            found[positions] = shard_found
            image[positions[shard_found]] = shard_image
            text[positions[shard_found]] = shard_text
        return found, image, text

    def mine(
        self,
        k: int,
        anchor_ids=None,
        image=None,
        text=None,
        exclude_ids=(),
        max_similarity: float = 0.0,
        scoring: int = 1,
        strict_anchors: bool = False,
        timeout_s: float | None = None,
    ) -> Neighbours:
        unknown = np.zeros(0, dtype=np.uint64)
        if anchor_ids is not None and image is None:
            anchor_ids = _ids(anchor_ids)
            found, image, text = self.fetch(anchor_ids, timeout_s)
            unknown = anchor_ids[~found]
            if strict_anchors and len(unknown):
                from miner_service.errors import NotFound

                raise NotFound("anchor_ids", f"{len(unknown)} anchor ids are not stored, e.g. {unknown[:5].tolist()}")
            if not found.any():
                n = len(anchor_ids)
                return Neighbours(
                    np.full((n, k), -1, np.int64),
                    np.full((n, k), -np.inf, np.float32),
                    np.zeros((n, k), np.uint64),
                    self.size(),
                    unknown,
                )
            known_ids = anchor_ids[found]
            parts = self._mine_all(
                k, known_ids, image[found], text[found], exclude_ids, max_similarity, scoring, timeout_s
            )
            merged = _merge(parts, k)
            return _scatter_rows(merged, found, k, unknown)
        parts = self._mine_all(k, anchor_ids, image, text, exclude_ids, max_similarity, scoring, timeout_s)
        return _merge(parts, k)

    def _mine_all(self, k, anchor_ids, image, text, exclude_ids, max_similarity, scoring, timeout_s):
        return self._each(
            [
                (
                    c,
                    lambda c: c.mine(
                        k,
                        anchor_ids=anchor_ids,
                        image=image,
                        text=text,
                        exclude_ids=exclude_ids,
                        max_similarity=max_similarity,
                        scoring=scoring,
                        timeout_s=timeout_s,
                    ),
                )
                for c in self.clients
            ]
        )

    def size(self) -> int:
        return sum(s.size for s in self._each([(c, lambda c: c.stats()) for c in self.clients]))

    def stats(self):
        return self._each([(c, lambda c: c.stats()) for c in self.clients])

    def ensure_namespace(self, dim: int = 0, fingerprint: str = "", reset: bool = False, timeout_s=None):
        """EnsureNamespace on every shard, as one reply: rows summed; a shard whose fingerprint differs from
        `fingerprint` decides the reported one, so that the caller sees any mismatch."""
        replies = self._each(
            [(c, lambda c: c.ensure_namespace(dim, fingerprint, reset, timeout_s)) for c in self.clients]
        )
        differing = [r for r in replies if r.info.fingerprint != fingerprint]
        info = pb.NamespaceInfo()
        info.CopyFrom((differing or replies)[0].info)
        info.rows = sum(r.info.rows for r in replies)
        return pb.EnsureNamespaceReply(info=info, created=any(r.created for r in replies))

    def drop_namespace(self, timeout_s=None):
        replies = self._each([(c, lambda c: c.drop_namespace(timeout_s)) for c in self.clients])
        return pb.DropNamespaceReply(dropped_rows=sum(r.dropped_rows for r in replies))


def _host(array):
    if hasattr(array, "detach"):
        return array.detach().float().cpu().numpy()
    return array


def _merge(parts: list[Neighbours], k: int) -> Neighbours:
    """Per anchor, the best k of all shards' answers (best first, -1 / -inf padding)."""
    ids = np.concatenate([p.ids for p in parts], axis=1)
    scores = np.concatenate([p.scores for p in parts], axis=1)
    steps = np.concatenate([p.steps for p in parts], axis=1)
    scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    merged_ids, merged_scores, merged_steps = take(ids), take(scores), take(steps)
    merged_ids[np.isneginf(merged_scores)] = -1
    return Neighbours(
        merged_ids,
        merged_scores,
        merged_steps,
        sum(p.size for p in parts),
        np.concatenate([p.unknown_anchor_ids for p in parts]) if parts else np.zeros(0, np.uint64),
    )


def _scatter_rows(merged: Neighbours, found: np.ndarray, k: int, unknown: np.ndarray) -> Neighbours:
    n = len(found)
    ids = np.full((n, k), -1, np.int64)
    scores = np.full((n, k), -np.inf, np.float32)
    steps = np.zeros((n, k), np.uint64)
    ids[found], scores[found], steps[found] = merged.ids, merged.scores, merged.steps
    return Neighbours(ids, scores, steps, merged.size, unknown)
