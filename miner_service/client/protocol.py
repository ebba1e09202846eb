"""What every miner client is: one request type for Mine, and the `MinerApi` Protocol with one set of return types.

Three clients implement it: `MinerClient` (one miner), `ReplicatedMinerClient` (a leader and its read replicas)
and `ShardedMinerClient` (shards that split the id space). A caller never needs to know which it holds: a
replicated or sharded client answers exactly as one miner would, with the same reply messages (a sharded client
merges its shards' replies into one), as FAISS's `ClientIndex` answers like one index. Tests run one conformance
suite against all three (tests/integration/test_client_protocol.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from helip.miner.v1 import miner_pb2 as pb


def as_ids(values) -> np.ndarray:
    """Sample ids as a flat uint64 array, from a list, numpy array or torch tensor (any device)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.uint64).ravel()


@dataclass(frozen=True)
class MineQuery:
    """One Mine as a client asks it: anchors by id (`anchor_ids`), by embedding (`image` and `text`, [anchors, dim]),
    or both (anchors by embedding whose ids are known, so each is not its own neighbour). The server's validation
    is the authority; this only refuses what could not be sent at all."""

    k: int
    anchor_ids: np.ndarray | None = None  # uint64 [anchors]
    image: np.ndarray | None = None  # [anchors, dim]
    text: np.ndarray | None = None
    exclude_ids: np.ndarray | tuple = ()  # never returned (the rest of the caller's batch); uint64 after init
    max_similarity: float = 0.0  # near-duplicate cut; 0: the miner's default
    scoring: int = pb.PRODUCT  # a pb.Scoring value
    strict_anchors: bool = False  # an anchor id the miner does not hold is an error, not an empty row
    # False-negative guard (0: off): drop candidate j when <image_i, text_j> or <text_i, image_j> reaches
    # positive_ratio x <image_i, text_i>, anchor i's own pair. In (0, 1].
    positive_ratio: float = 0.0

    def __post_init__(self):
        if self.anchor_ids is not None:
            object.__setattr__(self, "anchor_ids", as_ids(self.anchor_ids))
        object.__setattr__(self, "exclude_ids", as_ids(self.exclude_ids))
        if (self.image is None) != (self.text is None):
            raise ValueError("MineQuery: image and text come together (anchors by embedding) or not at all")
        if self.anchor_ids is None and self.image is None:
            raise ValueError("MineQuery: give anchor_ids, or image and text")

    def request(self, namespace: str, encode) -> pb.MineRequest:
        """The protobuf request; `encode(array) -> pb.Tensor` puts embeddings on the wire in the client's dtype."""
        request = pb.MineRequest(
            k=self.k,
            exclude_ids=self.exclude_ids.tolist(),
            max_similarity=self.max_similarity,
            scoring=self.scoring,
            strict_anchors=self.strict_anchors,
            positive_ratio=self.positive_ratio,
            namespace=namespace,
        )
        if self.anchor_ids is not None:
            request.anchor_ids.extend(self.anchor_ids.tolist())
        if self.image is not None:
            request.image.CopyFrom(encode(self.image))
            request.text.CopyFrom(encode(self.text))
        return request


class MineCalls:
    """`mine(k, anchor_ids=..., ...)`, written once for every client: it builds the `MineQuery` and hands it to the
    client's `mine_query`."""

    def mine(
        self,
        k: int,
        anchor_ids=None,
        image=None,
        text=None,
        exclude_ids=(),
        max_similarity: float = 0.0,
        scoring: int = pb.PRODUCT,
        strict_anchors: bool = False,
        positive_ratio: float = 0.0,
        timeout_s: float | None = None,
    ):
        """The Neighbours of the anchors (see MineQuery for the arguments): `mine_query` of one MineQuery."""
        query = MineQuery(
            k, anchor_ids, image, text, exclude_ids, max_similarity, scoring, strict_anchors, positive_ratio
        )
        return self.mine_query(query, timeout_s)

    def size(self, timeout_s: float | None = None) -> int:
        """Rows stored in this client's namespace."""
        return int(self.stats(timeout_s).size)

    def fetch(self, ids, timeout_s: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found mask, image [found, dim], text [found, dim]) of the stored rows of `ids` (see `fetch_rows`)."""
        rows = self.fetch_rows(ids, timeout_s)
        return rows.found, rows.image, rows.text

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@runtime_checkable
class MinerApi(Protocol):
    """A miner as a client sees it, bound to one namespace. Every implementation returns these types."""

    @property
    def namespace(self) -> str: ...

    def wait_ready(self, timeout_s: float = 30.0) -> None: ...

    def close(self) -> None: ...

    def upsert(self, ids, image, text, step: int = 0, timeout_s: float | None = None) -> pb.UpsertReply: ...

    def upsert_stream(self, requests: Iterable[pb.UpsertRequest], timeout_s: float | None = None) -> pb.UpsertReply: ...

    def upsert_request(self, ids, image, text, step: int = 0) -> pb.UpsertRequest: ...

    def mine(self, k: int, anchor_ids=None, image=None, text=None, **options): ...  # -> Neighbours

    def mine_query(self, query: MineQuery, timeout_s: float | None = None): ...  # -> Neighbours

    def delete(self, ids, timeout_s: float | None = None) -> pb.DeleteReply: ...

    def fetch(self, ids, timeout_s: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def fetch_rows(self, ids, timeout_s: float | None = None): ...  # -> FetchedRows

    def stats(self, timeout_s: float | None = None) -> pb.StatsReply: ...

    def size(self, timeout_s: float | None = None) -> int: ...

    def ensure_namespace(
        self, dim: int = 0, fingerprint: str = "", reset: bool = False, timeout_s: float | None = None
    ) -> pb.EnsureNamespaceReply: ...

    def drop_namespace(self, timeout_s: float | None = None) -> pb.DropNamespaceReply: ...
