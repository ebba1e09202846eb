"""Request validation at the service boundary: protobuf in, checked numpy out, errors naming the field."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.core.api import MineQuery
from helip.miner_service.core.errors import InvalidArgument
from helip.miner_service.core.search import Scoring
from helip.miner_service.wire.tensors import decode

# Stored ids must fit MineReply.neighbour_ids (int64, -1 padding); other fields take any uint64.
MAX_STORED_ID = np.uint64(2**63 - 1)


@dataclass(frozen=True)
class UpsertBatch:
    ids: np.ndarray  # uint64 [n], unique
    image: np.ndarray  # [n, dim] float
    text: np.ndarray
    step: int


def _ids(values, field: str) -> np.ndarray:
    return np.array(values, dtype=np.uint64)  # a repeated uint64 field converts in one C call


def _rows(tensor: pb.Tensor, field: str, dim: int, n_rows: int | None = None) -> np.ndarray:
    rows = decode(tensor, field)
    if rows.shape[1] != dim:
        raise InvalidArgument(f"{field}.shape", f"dim is {rows.shape[1]} but this miner stores dim {dim}")
    if n_rows is not None and rows.shape[0] != n_rows:
        raise InvalidArgument(f"{field}.shape", f"has {rows.shape[0]} rows for {n_rows} ids")
    if not np.isfinite(rows).all():
        bad = int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
        raise InvalidArgument(f"{field}.data", f"row {bad} holds NaN or Inf")
    return rows


def _unique(ids: np.ndarray, field: str) -> None:
    if len(ids) < 2 or (ids[1:] > ids[:-1]).all():  # increasing ids, the usual batch, need no sort
        return
    ordered = np.sort(ids)
    if (ordered[1:] == ordered[:-1]).any():
        values, counts = np.unique(ids, return_counts=True)
        raise InvalidArgument(field, f"duplicate ids in one request, e.g. {values[counts > 1][:5].tolist()}")


def upsert_batch(request: pb.UpsertRequest, dim: int, max_rows_per_request: int) -> UpsertBatch:
    if not request.ids:
        raise InvalidArgument("ids", "empty: an upsert needs at least one id")
    if len(request.ids) > max_rows_per_request:
        raise InvalidArgument("ids", f"{len(request.ids)} rows exceed the per-request limit {max_rows_per_request}")
    if not request.HasField("image"):
        raise InvalidArgument("image", "missing")
    if not request.HasField("text"):
        raise InvalidArgument("text", "missing")
    ids = _ids(request.ids, "ids")
    _unique(ids, "ids")
    if (ids > MAX_STORED_ID).any():
        raise InvalidArgument(
            "ids", f"id {int(ids[ids > MAX_STORED_ID][0])} is above {MAX_STORED_ID}: MineReply.neighbour_ids is int64"
        )
    image = _rows(request.image, "image", dim, len(ids))
    text = _rows(request.text, "text", dim, len(ids))
    return UpsertBatch(ids, image, text, int(request.step))


def mine_query(request: pb.MineRequest, dim: int, max_k: int, max_anchors: int) -> MineQuery:
    if request.k == 0 or request.k > max_k:
        raise InvalidArgument("k", f"must be in 1..{max_k}, got {request.k}")
    if request.scoring not in (pb.SCORING_UNSPECIFIED, pb.PRODUCT, pb.SUM, pb.IMAGE, pb.TEXT):
        raise InvalidArgument("scoring", f"unknown scoring {request.scoring}")
    scoring = Scoring(request.scoring or pb.PRODUCT)
    if not np.isfinite(request.max_similarity) or request.max_similarity < 0:
        raise InvalidArgument("max_similarity", f"must be a finite value >= 0, got {request.max_similarity}")
    if not np.isfinite(request.positive_ratio) or not 0.0 <= request.positive_ratio <= 1.0:
        raise InvalidArgument("positive_ratio", f"must be in (0, 1], or 0 for no guard, got {request.positive_ratio}")
    by_embedding = request.HasField("image") or request.HasField("text")
    anchor_ids = image = text = None
    self_ids = None
    if request.anchor_ids and not by_embedding:
        anchor_ids = _ids(request.anchor_ids, "anchor_ids")
        n_anchors = len(anchor_ids)
    elif by_embedding:
        if not (request.HasField("image") and request.HasField("text")):
            raise InvalidArgument(
                "text" if request.HasField("image") else "image", "anchors by embedding need both image and text"
            )
        image = _rows(request.image, "image", dim)
        text = _rows(request.text, "text", dim, image.shape[0])
        n_anchors = len(image)
        if request.anchor_ids:  # embeddings of known ids: the ids only drop each anchor's own row
            self_ids = _ids(request.anchor_ids, "anchor_ids")
            if len(self_ids) != n_anchors:
                raise InvalidArgument("anchor_ids", f"{len(self_ids)} ids for {n_anchors} anchor embeddings")
    else:
        raise InvalidArgument("anchor_ids", "empty: give anchor_ids or anchor embeddings (image, text)")
    if n_anchors == 0:
        raise InvalidArgument("image.shape", "no anchor rows")
    if n_anchors > max_anchors:
        raise InvalidArgument(
            "anchor_ids" if anchor_ids is not None else "image.shape",
            f"{n_anchors} anchors exceed the per-request limit {max_anchors}",
        )
    return MineQuery(
        k=int(request.k),
        anchor_ids=anchor_ids,
        image=image,
        text=text,
        exclude_ids=_ids(request.exclude_ids, "exclude_ids"),
        max_similarity=float(request.max_similarity),
        scoring=scoring,
        strict_anchors=bool(request.strict_anchors),
        self_ids=self_ids,
        positive_ratio=float(request.positive_ratio),
    )


def delete_ids(request: pb.DeleteRequest) -> np.ndarray:
    if not request.ids:
        raise InvalidArgument("ids", "empty: a delete needs at least one id")
    return _ids(request.ids, "ids")


def fetch_ids(request: pb.FetchRequest, max_ids: int) -> np.ndarray:
    if not request.ids:
        raise InvalidArgument("ids", "empty: a fetch needs at least one id")
    if len(request.ids) > max_ids:
        raise InvalidArgument("ids", f"{len(request.ids)} ids exceed the per-request limit {max_ids}")
    return _ids(request.ids, "ids")
