"""Shards: the id space split over S miners, each owning the ids with shard_of(id) == its index.

`ShardedMinerClient` speaks to all of them as if they were one miner: upserts and deletes are routed by id, and a
Mine is scattered to every shard and merged. Anchors given by id are first fetched from their owners, then mined
by embedding everywhere (carrying their ids, so each shard still drops the anchor itself), which makes the merged
answer exactly what one unsharded miner over the same rows gives.

A request that cannot be split by id (no ids, or image rows that do not match them) goes whole to shard 0, which
refuses it as one miner would; a refusal names the same field and says the same thing. A write that one shard
refuses (a NaN row, duplicate ids) leaves the other shards' rows written: writes are idempotent, so send it again
once it is fixed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.client.protocol import MineCalls, MineQuery, as_ids
from helip.miner_service.client.single import ClientConfig, FetchedRows, MinerClient, Neighbours
from helip.miner_service.core.errors import InvalidArgument
from helip.miner_service.wire.shards import shard_of
from helip.miner_service.wire.status import refused_field
from helip.miner_service.wire.tensors import decode

log = logging.getLogger(__name__)

# A shard that answers these could not serve the Mine; the other shards' answer is still exact over their rows.
SHARD_DOWN_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


class ShardedMinerClient(MineCalls):
    """The MinerClient interface over S shards, listed in shard order: addresses, or clients of the MinerClient
    interface (a ReplicatedMinerClient per shard spreads each shard's reads over its followers).

    A Mine that some shards cannot answer (UNAVAILABLE, DEADLINE_EXCEEDED, ...) returns the merged answer of the
    others, exact over their rows, with `Neighbours.missing_shards` naming the rest; anchors given by id whose
    owner is missing get an all -1 row (their embedding could not be fetched; they are not "unknown"). With
    `strict` such a Mine raises the shard's error instead. Writes, Fetch and Stats always raise.
    """

    def __init__(self, shards: Sequence, config: ClientConfig = ClientConfig(), strict: bool = False):
        if not shards:
            raise ValueError("ShardedMinerClient needs at least one shard")
        self.clients = [
            MinerClient(dataclasses.replace(config, address=s)) if isinstance(s, str) else s for s in shards
        ]
        self.strict = strict
        self._pool = ThreadPoolExecutor(max_workers=len(self.clients), thread_name_prefix="shard")

    @property
    def shard_count(self) -> int:
        """S: how many shards split the id space (shard_of(id, S) owns each id)."""
        return len(self.clients)

    @property
    def namespace(self) -> str:
        """The namespace every call names (shard 0's client's; all shards share one config)."""
        return self.clients[0].namespace

    def close(self) -> None:
        """Close every shard's client and the pool that asks them."""
        for client in self.clients:
            client.close()
        self._pool.shutdown(wait=False)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until every shard can be reached, all within `timeout_s` (grpc.FutureTimeoutError past it)."""
        deadline = time.monotonic() + timeout_s
        for client in self.clients:
            client.wait_ready(max(0.0, deadline - time.monotonic()))

    def _owners(self, ids: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """(owning shard of each id, the shards to ask). No ids: shard 0 is asked, and refuses as one miner would."""
        owner = shard_of(ids, self.shard_count)
        return owner, [int(s) for s in np.unique(owner)] if len(ids) else [0]

    def _each(self, calls):
        """Run (client, fn) pairs concurrently; re-raise the first error."""
        futures = [self._pool.submit(fn, client) for client, fn in calls]
        return [f.result() for f in futures]

    def _answers(self, shards, fn, tolerate: bool = True) -> tuple[dict, dict[int, grpc.RpcError]]:
        """fn(shard) for each of `shards`, concurrently: (answers by shard, errors by shard of the shards that could
        not answer). Raises an error that no other shard would have avoided, and any error when strict or not
        `tolerate`."""
        futures = {int(s): self._pool.submit(fn, int(s)) for s in shards}
        answers, errors = {}, {}
        for shard, future in futures.items():
            try:
                answers[shard] = future.result()
            except grpc.RpcError as error:
                if self.strict or not tolerate or error.code() not in SHARD_DOWN_CODES:
                    raise
                log.warning("shard %d could not answer (%s); answering from the others", shard, error.code().name)
                errors[shard] = error
        return answers, errors

    def upsert_request(self, ids, image, text, step: int = 0) -> pb.UpsertRequest:
        """One UpsertRequest of these rows, for `upsert_stream` (which splits it by owner)."""
        return self.clients[0].upsert_request(ids, image, text, step)

    def upsert(self, ids, image, text, step: int = 0, timeout_s: float | None = None) -> pb.UpsertReply:
        """Each id's row to its owner; one reply: rows accepted by all shards, rows stored over all shards."""
        ids = as_ids(ids)
        image, text = np.asarray(_host(image)), np.asarray(_host(text))
        if not _splittable(ids, image, text):
            return self.clients[0].upsert(ids, image, text, step, timeout_s)
        owner, shards = self._owners(ids)
        calls = [
            (self.clients[s], lambda c, m=(owner == s): c.upsert(ids[m], image[m], text[m], step, timeout_s))
            for s in shards
        ]
        replies = self._each(calls)
        size = self._size_after(replies, shards, image.shape[1], timeout_s)
        return pb.UpsertReply(accepted=sum(r.accepted for r in replies), size=size)

    def upsert_stream(self, requests: Iterable[pb.UpsertRequest], timeout_s: float | None = None) -> pb.UpsertReply:
        """Each request split by owner, one stream per shard; one reply as for `upsert`. A shard's refusal names
        the message of its own stream, not of `requests`."""
        per_shard: dict[int, list[pb.UpsertRequest]] = {}
        dim = 0
        for request in requests:
            ids = np.asarray(request.ids, dtype=np.uint64)
            try:
                image, text = decode(request.image, "image"), decode(request.text, "text")
            except InvalidArgument:  # the shard that gets it whole refuses it
                image = text = np.zeros((0, 0), np.float32)
            if not _splittable(ids, image, text):
                per_shard.setdefault(0, []).append(request)
                continue
            dim = dim or image.shape[1]
            owner, shards = self._owners(ids)
            for shard in shards:
                mask = owner == shard
                part = self.clients[shard].upsert_request(ids[mask], image[mask], text[mask], request.step)
                per_shard.setdefault(shard, []).append(part)
        shards = sorted(per_shard)
        calls = [(self.clients[s], lambda c, s=s: c.upsert_stream(per_shard[s], timeout_s)) for s in shards]
        replies = self._each(calls)
        size = self._size_after(replies, shards, dim, timeout_s)
        return pb.UpsertReply(accepted=sum(r.accepted for r in replies), size=size)

    def _size_after(self, replies, written: list[int], dim: int, timeout_s: float | None) -> int:
        """Rows stored over all shards after a write: the written shards' replies plus the others' Stats.

        A write that created the namespace created it only on the shards it reached (one row reaches one shard);
        the others get it too, empty and of the written `dim`, so that every read finds it on every shard as it
        would on one miner."""

        def rows(client) -> int:
            try:
                return client.stats(timeout_s).size
            except grpc.RpcError as error:
                if not dim or error.code() != grpc.StatusCode.NOT_FOUND or refused_field(error) != "namespace":
                    raise
                return client.ensure_namespace(dim, timeout_s=timeout_s).info.rows

        others = [c for s, c in enumerate(self.clients) if s not in written]
        return sum(r.size for r in replies) + sum(self._each([(c, rows) for c in others]))

    def delete(self, ids, timeout_s: float | None = None) -> pb.DeleteReply:
        """Each id deleted by its owner; one reply: rows deleted by all shards, rows left over all shards."""
        ids = as_ids(ids)
        owner, shards = self._owners(ids)
        calls = [(self.clients[s], lambda c, m=(owner == s): c.delete(ids[m], timeout_s)) for s in shards]
        replies = self._each(calls)
        size = self._size_after(replies, shards, 0, timeout_s)
        return pb.DeleteReply(deleted=sum(r.deleted for r in replies), size=size)

    def fetch_rows(self, ids, timeout_s: float | None = None) -> FetchedRows:
        """The stored rows of `ids`, each asked of its owner, in request order."""
        rows, _ = self._fetch(ids, timeout_s, tolerate_missing=False)
        return rows

    def _fetch(self, ids, timeout_s, tolerate_missing: bool) -> tuple[FetchedRows, dict[int, grpc.RpcError]]:
        """fetch_rows, plus the errors of the owners that could not answer (their ids count as not found)."""
        ids = as_ids(ids)
        owner, shards = self._owners(ids)
        answers, errors = self._answers(
            shards, lambda s: self.clients[s].fetch_rows(ids[owner == s], timeout_s), tolerate_missing
        )
        found = np.zeros(len(ids), dtype=bool)
        image = text = None
        steps = np.zeros(len(ids), dtype=np.uint64)
        for shard, part in answers.items():
            positions = np.flatnonzero(owner == shard)
            if image is None:
                image = np.zeros((len(ids), part.image.shape[1]), dtype=np.float32)
                text = np.zeros_like(image)
            found[positions] = part.found
            image[positions[part.found]] = part.image
            text[positions[part.found]] = part.text
            steps[positions[part.found]] = part.steps
        if image is None:
            image = text = np.zeros((0, 0), dtype=np.float32)
        else:
            image, text = image[found], text[found]
        return FetchedRows(found, ids[found], image, text, steps[found]), errors

    def mine_query(self, query: MineQuery, timeout_s: float | None = None) -> Neighbours:
        """The Mine scattered to every shard and merged: exactly one miner's answer over all shards' rows, unknown
        anchor ids and refusals included (Neighbours.missing_shards names shards that could not answer, when not
        strict)."""
        k, anchor_ids = query.k, query.anchor_ids
        if anchor_ids is None or query.image is not None or not len(anchor_ids):
            parts, errors = self._mine_all(query, timeout_s)
            return _merge(parts, k, errors)
        rows, errors = self._fetch(anchor_ids, timeout_s, tolerate_missing=True)
        if len(errors) == self.shard_count:
            raise next(iter(errors.values()))
        found = rows.found
        unreachable = np.isin(shard_of(anchor_ids, self.shard_count), list(errors))
        unknown = anchor_ids[~found & ~unreachable]
        if query.strict_anchors and len(unknown):
            # No shard holds an unknown anchor: any one refuses them (after checking k and the rest) as one miner.
            answering = next(s for s in range(self.shard_count) if s not in errors)
            self.clients[answering].mine_query(dataclasses.replace(query, anchor_ids=unknown), timeout_s)
        if not found.any():
            # Nothing to mine by embedding: the shards answer the ids themselves (padding rows, their sizes).
            parts, mine_errors = self._mine_all(dataclasses.replace(query, strict_anchors=False), timeout_s, errors)
            merged = _merge(parts, k, {**errors, **mine_errors})
            return dataclasses.replace(merged, unknown_anchor_ids=unknown)
        by_embedding = dataclasses.replace(query, anchor_ids=anchor_ids[found], image=rows.image, text=rows.text)
        parts, mine_errors = self._mine_all(by_embedding, timeout_s, failed=errors)
        return _scatter_rows(_merge(parts, k, {**errors, **mine_errors}), found, k, unknown)

    def _mine_all(
        self, query: MineQuery, timeout_s, failed=None
    ) -> tuple[dict[int, Neighbours], dict[int, grpc.RpcError]]:
        """Every shard's answer but those that just `failed` (shard -> error); raises when none answered."""
        failed = failed or {}
        shards = [s for s in range(self.shard_count) if s not in failed]
        parts, errors = self._answers(shards, lambda shard: self.clients[shard].mine_query(query, timeout_s))
        if not parts:
            raise next(iter({**failed, **errors}.values()))
        return parts, errors

    def shard_stats(self, timeout_s: float | None = None) -> list[pb.StatsReply]:
        """Each shard's own Stats, in shard order."""
        return self._each([(c, lambda c: c.stats(timeout_s)) for c in self.clients])

    def stats(self, timeout_s: float | None = None) -> pb.StatsReply:
        """Stats as one miner holding every shard's rows would answer them (per-shard detail: `shard_stats`)."""
        return merge_stats(self.shard_stats(timeout_s))

    def ensure_namespace(
        self, dim: int = 0, fingerprint: str = "", reset: bool = False, timeout_s: float | None = None
    ) -> pb.EnsureNamespaceReply:
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

    def drop_namespace(self, timeout_s: float | None = None) -> pb.DropNamespaceReply:
        """DropNamespace on every shard, as one reply: the rows dropped over all shards."""
        replies = self._each([(c, lambda c: c.drop_namespace(timeout_s)) for c in self.clients])
        return pb.DropNamespaceReply(dropped_rows=sum(r.dropped_rows for r in replies))


def merge_stats(replies: Sequence[pb.StatsReply]) -> pb.StatsReply:
    """Shards' Stats as one miner's: counts summed, limits and the search device as the shards agree (the
    tightest limit when they differ), steps spanning all, the largest lag; shard_index 0 of shard_count 1."""
    first = replies[0]
    merged = pb.StatsReply(
        size=sum(r.size for r in replies),
        dim=first.dim,
        device=first.device if all(r.device == first.device for r in replies) else "mixed",
        capacity=sum(r.capacity for r in replies),
        max_rows=sum(r.max_rows for r in replies) if all(r.max_rows for r in replies) else 0,
        ivf_ready=all(r.ivf_ready for r in replies),
        ivf_rows=sum(r.ivf_rows for r in replies),
        max_k=min(r.max_k for r in replies),
        role=first.role if all(r.role == first.role for r in replies) else "mixed",
        shard_index=0,
        shard_count=1,
        replica_lag_seconds=max(r.replica_lag_seconds for r in replies),
        namespace=first.namespace,
        total_rows=sum(r.total_rows for r in replies),
        max_total_rows=sum(r.max_total_rows for r in replies) if all(r.max_total_rows for r in replies) else 0,
    )
    stored = [r for r in replies if r.size]
    if stored:
        merged.min_step = min(r.min_step for r in stored)
        merged.max_step = max(r.max_step for r in stored)
    namespaces: dict[str, pb.NamespaceInfo] = {}
    for reply in replies:
        for info in reply.namespaces:
            seen = namespaces.setdefault(info.name, pb.NamespaceInfo(name=info.name, dim=info.dim))
            seen.rows += info.rows
            if info.fingerprint and not seen.fingerprint:
                seen.fingerprint = info.fingerprint
    merged.namespaces.extend(namespaces.values())
    return merged


def _splittable(ids: np.ndarray, image: np.ndarray, text: np.ndarray) -> bool:
    """Whether a write can be split by owner: some ids, and one image and one text row for each."""
    return bool(len(ids)) and image.ndim == text.ndim == 2 and len(image) == len(text) == len(ids)


def _host(array):
    if hasattr(array, "detach"):
        return array.detach().float().cpu().numpy()
    return array


def _merge(answers: dict[int, Neighbours], k: int, errors: dict | None = None) -> Neighbours:
    """Per anchor, the best k of the answering shards' answers (best first, -1 / -inf padding); the shards in
    `errors` are named missing."""
    parts = list(answers.values())
    missing = tuple(sorted(errors or ()))
    if not parts:  # no anchor could be asked (all unknown, or owned by missing shards)
        return Neighbours(
            np.full((0, k), -1, np.int64),
            np.full((0, k), -np.inf, np.float32),
            np.zeros((0, k), np.uint64),
            0,
            np.zeros(0, np.uint64),
            missing_shards=missing,
        )
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
        np.concatenate([p.unknown_anchor_ids for p in parts]),
        served_by_follower=any(p.served_by_follower for p in parts),
        replica_lag_seconds=max(p.replica_lag_seconds for p in parts),
        missing_shards=missing,
        guard_dropped=sum(p.guard_dropped for p in parts),
    )


def _scatter_rows(merged: Neighbours, found: np.ndarray, k: int, unknown: np.ndarray) -> Neighbours:
    n = len(found)
    ids = np.full((n, k), -1, np.int64)
    scores = np.full((n, k), -np.inf, np.float32)
    steps = np.zeros((n, k), np.uint64)
    ids[found], scores[found], steps[found] = merged.ids, merged.scores, merged.steps
    return dataclasses.replace(merged, ids=ids, scores=scores, steps=steps, unknown_anchor_ids=unknown)
