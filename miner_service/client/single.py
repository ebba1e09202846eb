"""MinerClient: the Python client of the miner (numpy or torch in, numpy out).

Embeddings travel as FLOAT32 unless `wire_dtype` says otherwise; the trainer sends FLOAT16 (its embeddings are
fp16 already and half the bytes cross the wire). Retries: reads (Mine, Stats)
retry on UNAVAILABLE; Upsert and Delete are idempotent (an upsert overwrites with the same value), so they retry
too; UpsertStream does not (the server may have applied a prefix).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
import numpy as np

from helip.miner.v1 import miner_pb2 as pb
from helip.miner.v1 import miner_pb2_grpc as pb_grpc
from helip.miner_service.client.protocol import MineCalls, MineQuery, as_ids
from helip.miner_service.wire.security import channel_credentials, load_token
from helip.miner_service.wire.tensors import decode, encode, encode_field

log = logging.getLogger(__name__)

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Field order of UpsertRequest on the wire: ids (1), image (2), text (3), step (4), namespace (20).
_UPSERT_IMAGE_FIELD = pb.UpsertRequest.DESCRIPTOR.fields_by_name["image"].number
_UPSERT_TEXT_FIELD = pb.UpsertRequest.DESCRIPTOR.fields_by_name["text"].number


@dataclass(frozen=True)
class ClientConfig:
    address: str = "127.0.0.1:50051"
    timeout_s: float = 30.0
    retries: int = 2
    retry_backoff_s: float = 0.05
    wire_dtype: int = pb.FLOAT32
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # gRPC's default reconnect backoff grows to 2 minutes; a trainer wants a restarted miner back in seconds.
    max_reconnect_backoff_ms: int = 1000
    tls: bool = False  # connect with TLS (trusting tls_ca_file, else the system roots)
    tls_ca_file: str = ""
    tls_cert_file: str = ""  # client certificate and key, for mutual TLS
    tls_key_file: str = ""
    tls_server_name: str = ""  # expected name in the server's certificate, when it differs from the address
    token: str = field(default="", repr=False)  # bearer token sent on every call
    service_config: str = ""  # gRPC service config (JSON) of the channel: load balancing, health checking
    namespace: str = ""  # the namespace every call names; empty: the miner's "default"

    @classmethod
    def with_token_from(cls, token_file: str = "", **kwargs) -> ClientConfig:
        """A config whose token comes from `token_file`, else $HELIP_AUTH_TOKEN (never from a literal flag)."""
        return cls(token=load_token(token_file) or "", **kwargs)


@dataclass(frozen=True)
class FetchedRows:
    """A Fetch's answer: the rows found, in request order."""

    found: np.ndarray  # [requested] bool: which requested ids are stored
    ids: np.ndarray  # [found] uint64
    image: np.ndarray  # [found, dim]
    text: np.ndarray
    steps: np.ndarray  # [found] uint64: the step that wrote each row


@dataclass(frozen=True)
class Neighbours:
    """A Mine's answer, aligned with the anchors asked (one row each, best first)."""

    ids: np.ndarray  # [anchors, k] int64, -1 padding
    scores: np.ndarray  # [anchors, k] float32
    steps: np.ndarray  # [anchors, k] uint64
    size: int
    unknown_anchor_ids: np.ndarray
    served_by_follower: bool = False  # a read-only follower answered (a sharded Mine: at least one shard's)
    replica_lag_seconds: float = 0.0  # how far behind the leader the answering follower was (sharded: the most)
    # Shards (by index) that could not answer a sharded Mine: the answer covers only the others' rows.
    missing_shards: tuple[int, ...] = ()
    # Candidates the false-negative guard dropped ahead of the neighbours returned (a sharded Mine: the shards'
    # counts summed, each ahead of its own neighbours).
    guard_dropped: int = 0


class MinerClient(MineCalls):
    """One miner, bound to `config.namespace`: the `MinerApi` over one gRPC channel.

    Calls raise grpc.RpcError with the server's status code; reads and idempotent writes retry UNAVAILABLE
    `config.retries` times. The channel reconnects by itself after a miner restart (backoff capped at
    `config.max_reconnect_backoff_ms`). Thread-safe: a channel serves concurrent calls.
    """

    def __init__(self, config: ClientConfig | str = ClientConfig()):
        if isinstance(config, str):
            config = ClientConfig(address=config)
        self.config = config
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", min(200, config.max_reconnect_backoff_ms)),
            ("grpc.min_reconnect_backoff_ms", min(200, config.max_reconnect_backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", config.max_reconnect_backoff_ms),
        ]
        if config.service_config:
            options.append(("grpc.service_config", config.service_config))
        if config.tls or config.tls_ca_file or config.tls_cert_file:
            if config.tls_server_name:
                options.append(("grpc.ssl_target_name_override", config.tls_server_name))
            credentials = channel_credentials(config.tls_ca_file, config.tls_cert_file, config.tls_key_file)
            self.channel = grpc.secure_channel(config.address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(config.address, options=options)
        self._metadata = (("authorization", f"Bearer {config.token}"),) if config.token else None
        self.stub = pb_grpc.MinerStub(self.channel)
        # Upsert sends bytes that upsert_request_bytes built (the same message, without protobuf's copies).
        self._upsert_bytes = self.channel.unary_unary(
            f"/{pb.DESCRIPTOR.services_by_name['Miner'].full_name}/Upsert",
            request_serializer=None,
            response_deserializer=pb.UpsertReply.FromString,
        )

    @property
    def namespace(self) -> str:
        """The namespace every call names ("" for the miner's "default")."""
        return self.config.namespace

    def close(self) -> None:
        """Close the channel; calls in flight fail with CANCELLED."""
        self.channel.close()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the channel connects; grpc.FutureTimeoutError after `timeout_s`."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)

    def _invoke(self, rpc, request, timeout_s: float | None, retry: bool):
        attempts = 1 + (self.config.retries if retry else 0)
        for attempt in range(attempts):
            try:
                return rpc(request, timeout=timeout_s or self.config.timeout_s, metadata=self._metadata)
            except grpc.RpcError as error:
                if attempt + 1 == attempts or error.code() not in _RETRYABLE:
                    raise
                time.sleep(self.config.retry_backoff_s * (2**attempt))
                log.debug("retrying after %s", error.code().name)

    def upsert_request(self, ids, image, text, step: int = 0) -> pb.UpsertRequest:
        """One UpsertRequest of these rows (embeddings in `config.wire_dtype`), for `upsert_stream`."""
        dtype = self.config.wire_dtype
        return pb.UpsertRequest(
            ids=as_ids(ids).tolist(),
            image=encode(image, dtype),
            text=encode(text, dtype),
            step=int(step),
            namespace=self.config.namespace,
        )

    def upsert_request_bytes(self, ids, image, text, step: int = 0) -> bytes:
        """upsert_request(...).SerializeToString(), built with one copy of the embeddings instead of four."""
        dtype = self.config.wire_dtype
        return b"".join(
            [
                pb.UpsertRequest(ids=as_ids(ids).tolist()).SerializeToString(),
                *encode_field(_UPSERT_IMAGE_FIELD, image, dtype),
                *encode_field(_UPSERT_TEXT_FIELD, text, dtype),
                pb.UpsertRequest(step=int(step), namespace=self.config.namespace).SerializeToString(),
            ]
        )

    def upsert(self, ids, image, text, step: int = 0, timeout_s: float | None = None) -> pb.UpsertReply:
        """Write the rows (new ids added, known ones overwritten); the reply: rows accepted, rows stored after."""
        request = self.upsert_request_bytes(ids, image, text, step)
        return self._invoke(self._upsert_bytes, request, timeout_s, retry=True)

    def upsert_stream(self, requests: Iterable[pb.UpsertRequest], timeout_s: float | None = None) -> pb.UpsertReply:
        """Send the requests on one stream; one reply for them all. Not retried: a refusal of message i leaves the
        messages before it applied (the refusal says how many rows)."""
        return self._invoke(self.stub.UpsertStream, iter(requests), timeout_s, retry=False)

    def mine_query(self, query: MineQuery, timeout_s: float | None = None) -> Neighbours:
        """The hard neighbours of the query's anchors: one row of k a anchor, -1 padding; an anchor id not stored
        gets a padding row and is listed in `unknown_anchor_ids` (NOT_FOUND instead with strict_anchors)."""
        request = query.request(self.config.namespace, lambda rows: encode(rows, self.config.wire_dtype))
        return decode_neighbours(self._invoke(self.stub.Mine, request, timeout_s, retry=True))

    def delete(self, ids, timeout_s: float | None = None) -> pb.DeleteReply:
        """Delete the stored ones of `ids` (others are ignored); the reply: rows deleted, rows left."""
        return self._invoke(
            self.stub.Delete,
            pb.DeleteRequest(ids=as_ids(ids).tolist(), namespace=self.config.namespace),
            timeout_s,
            retry=True,
        )

    def fetch_rows(self, ids, timeout_s: float | None = None) -> FetchedRows:
        """The stored rows of `ids`, in request order, with the step that wrote each; ids not stored are left out
        (`found` says which)."""
        ids = as_ids(ids)
        reply = self._invoke(
            self.stub.Fetch, pb.FetchRequest(ids=ids.tolist(), namespace=self.config.namespace), timeout_s, retry=True
        )
        found_ids = np.array(reply.found_ids, dtype=np.uint64)
        return FetchedRows(
            np.isin(ids, found_ids),
            found_ids,
            decode(reply.image, "image"),
            decode(reply.text, "text"),
            np.array(reply.steps, dtype=np.uint64),
        )

    def stats(self, timeout_s: float | None = None) -> pb.StatsReply:
        """The miner's Stats of this namespace (rows, dim, steps, limits, role) and a line for every namespace."""
        return self._invoke(self.stub.Stats, pb.StatsRequest(namespace=self.config.namespace), timeout_s, retry=True)

    def ensure_namespace(
        self, dim: int = 0, fingerprint: str = "", reset: bool = False, timeout_s: float | None = None
    ) -> pb.EnsureNamespaceReply:
        """Create this client's namespace unless it exists (with `reset`: drop it first, then create it)."""
        request = pb.EnsureNamespaceRequest(
            namespace=self.config.namespace, dim=dim, fingerprint=fingerprint, reset=reset
        )
        # A reset is not idempotent (a retry after a lost reply would drop rows written since): no retry then.
        return self._invoke(self.stub.EnsureNamespace, request, timeout_s, retry=not reset)

    def drop_namespace(self, timeout_s: float | None = None) -> pb.DropNamespaceReply:
        """Drop this client's namespace and its rows ("default" is emptied, not removed); NOT_FOUND when absent."""
        request = pb.DropNamespaceRequest(namespace=self.config.namespace)
        return self._invoke(self.stub.DropNamespace, request, timeout_s, retry=False)


def decode_neighbours(reply: pb.MineReply) -> Neighbours:
    """A MineReply as arrays of shape [anchors, k]."""
    k = max(reply.k, 1)
    ids = np.array(reply.neighbour_ids, dtype=np.int64).reshape(-1, k)
    return Neighbours(
        ids=ids,
        scores=np.array(reply.scores, dtype=np.float32).reshape(ids.shape),
        steps=np.array(reply.neighbour_steps, dtype=np.uint64).reshape(ids.shape),
        size=reply.size,
        unknown_anchor_ids=np.array(reply.unknown_anchor_ids, dtype=np.uint64),
        served_by_follower=reply.served_by_follower,
        replica_lag_seconds=reply.replica_lag_seconds,
        guard_dropped=reply.guard_dropped,
    )
