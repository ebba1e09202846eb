"""The gRPC shell: protobuf <-> numpy, errors -> status codes, metrics, health, graceful shutdown."""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from contextlib import contextmanager

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from helip.miner.v1 import miner_pb2 as pb
from helip.miner.v1 import miner_pb2_grpc as pb_grpc
from helip.miner_service.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    MinerError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from helip.miner_service.core.miner import HardPairMiner
from helip.miner_service.core.search import SearchCancelled
from helip.miner_service.service import validation
from helip.miner_service.service.config import MinerConfig
from helip.miner_service.service.lag import LagSampler, ReplicaLag
from helip.miner_service.service.metrics import MinerMetrics
from helip.miner_service.service.namespaces import DEFAULT, Namespace, NamespaceRegistry
from helip.miner_service.wire.names import SERVICE_NAME, validate_fingerprint, validate_name
from helip.miner_service.wire.security import TokenInterceptor, load_token, server_credentials
from helip.miner_service.wire.shards import shard_of
from helip.miner_service.wire.status import refusal_status
from helip.miner_service.wire.tensors import encode

log = logging.getLogger(__name__)

_STATUS_OF_ERROR = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
}


def _rows_per_message(max_message_bytes: int, dim: int) -> int:
    # One message can carry at most this many rows (two fp32 tensors of dim per row must fit a message).
    return max(1, max_message_bytes // (8 * dim))


def _declared_dim(request: pb.UpsertRequest, fallback: int) -> int:
    """The dim an upsert's image tensor declares: what a namespace created by this write gets."""
    shape = request.image.shape
    return int(shape[1]) if len(shape) == 2 and shape[1] > 0 else fallback


class MinerServicer(pb_grpc.MinerServicer):
    """Routes each request to its namespace's core (a HardPairMiner, or a DurableMiner around one)."""

    def __init__(
        self,
        registry: NamespaceRegistry,
        config: MinerConfig,
        metrics: MinerMetrics,
        lag: LagSampler | None = None,
    ):
        self.registry = registry
        self.config = config
        self.metrics = metrics
        self.lag = lag  # a follower's latest lag sample, the worst over its namespaces (None: not a follower)
        registry.on_dropped = metrics.forget_namespace
        for namespace in registry.all():
            self.metrics.rows.labels(namespace.name).set(namespace.rows)
        self.metrics.namespaces.set(len(registry.names()))
        self.metrics.ivf_enabled.set(int(registry.get(DEFAULT).miner.stats().ivf_enabled))

    @contextmanager
    def _call(self, method: str, context: grpc.ServicerContext):
        """Count the call by status code; turn core errors into their status (context.abort raises)."""
        try:
            yield
        except MinerError as error:
            code = _STATUS_OF_ERROR[type(error)]
            log.info("%s refused (%s): %s", method, code.name, error)
            self.metrics.requests.labels(method, code.name).inc()
            # The field travels as a google.rpc.BadRequest violation too, so clients need not parse the message.
            context.abort_with_status(refusal_status(code, str(error), error.field))
        except SearchCancelled:
            # The caller's deadline passed or it cancelled: nobody waits for an answer, so give none.
            log.info("%s abandoned by the client; search stopped", method)
            self.metrics.requests.labels(method, "CANCELLED").inc()
            context.abort(grpc.StatusCode.CANCELLED, "the client went away")
        except grpc.RpcError:
            # A streaming request's iterator raises this when the client cancelled or vanished mid-stream: not a
            # miner failure, and nobody is left to answer (grpc ends the call quietly on this very error).
            log.info("%s cancelled by the client", method)
            self.metrics.requests.labels(method, "CANCELLED").inc()
            raise
        except Exception:
            log.exception("%s failed", method)
            self.metrics.requests.labels(method, "INTERNAL").inc()
            context.abort(grpc.StatusCode.INTERNAL, f"{method} failed inside the miner; see its log")
        else:
            self.metrics.requests.labels(method, "OK").inc()

    def _namespace(self, request) -> Namespace:
        return self.registry.get(validate_name(request.namespace))

    def _check_owned(self, ids: np.ndarray) -> None:
        shards = self.config.durability.shard_count
        if shards > 1:
            owner = shard_of(ids, shards)
            stray = owner != self.config.durability.shard_index
            if stray.any():
                raise InvalidArgument(
                    "ids",
                    f"id {int(ids[stray][0])} belongs to shard {int(owner[stray][0])} of "
                    f"{shards}, not to this one ({self.config.durability.shard_index})",
                )

    def _apply_upsert(self, request: pb.UpsertRequest) -> tuple[int, Namespace]:
        started = time.perf_counter()
        name = validate_name(request.namespace)
        namespace = self.registry.find(name)
        # A namespace's first write creates it with the write's dim; validate against that dim first.
        dim = namespace.dim if namespace else _declared_dim(request, self.config.dim)
        batch = validation.upsert_batch(request, dim, _rows_per_message(self.config.max_message_bytes, dim))
        self._check_owned(batch.ids)
        if namespace is None:
            namespace = self.registry.for_write(name, dim)
            self.metrics.namespaces.set(len(self.registry.names()))
        _, size = self.registry.upsert(namespace, batch.ids, batch.image, batch.text, batch.step)
        self.metrics.upsert_seconds.labels(name).observe(time.perf_counter() - started)
        self.metrics.upserted_rows.labels(name).inc(len(batch.ids))
        self.metrics.rows.labels(name).set(size)
        return len(batch.ids), namespace

    def Upsert(self, request, context):
        with self._call("Upsert", context):
            accepted, namespace = self._apply_upsert(request)
            return pb.UpsertReply(accepted=accepted, size=namespace.rows)

    def UpsertStream(self, request_iterator, context):
        accepted = 0
        namespace = None
        with self._call("UpsertStream", context):
            for index, request in enumerate(request_iterator):
                try:
                    rows, namespace = self._apply_upsert(request)
                    accepted += rows
                except MinerError as error:
                    # Messages before this one are applied and stay; say where the stream stopped.
                    raise type(error)(
                        error.field, f"message {index} (after {accepted} rows applied): {error.message}"
                    ) from error
            size = namespace.rows if namespace else self.registry.get(DEFAULT).rows
            return pb.UpsertReply(accepted=accepted, size=size)

    def Mine(self, request, context):
        with self._call("Mine", context):
            started = time.perf_counter()
            namespace = self._namespace(request)
            search = self.config.search
            query = validation.mine_query(request, namespace.dim, search.max_k, search.max_anchors)
            result = namespace.mine(query, cancelled=lambda: not context.is_active())
            lag = self._replica_lag()
            reply = pb.MineReply(
                k=query.k,
                size=result.size,
                served_by_follower=self.lag is not None,
                replica_lag_seconds=lag.seconds,
                guard_dropped=result.guard_dropped,
            )
            reply.neighbour_ids.extend(result.neighbour_ids.ravel().tolist())
            reply.scores.extend(result.scores.ravel().tolist())
            reply.neighbour_steps.extend(result.neighbour_steps.ravel().tolist())
            reply.unknown_anchor_ids.extend(result.unknown_anchor_ids.tolist())
            self.metrics.mine_seconds.labels(namespace.name).observe(time.perf_counter() - started)
            self.metrics.mined_anchors.inc(query.n_anchors)
            self.metrics.pass_mines.labels(namespace.name).observe(result.pass_mines)
            self.metrics.unknown_anchors.inc(len(result.unknown_anchor_ids))
            if query.positive_ratio:  # a series only for namespaces that use the guard
                self.metrics.guard_dropped.labels(namespace.name).inc(result.guard_dropped)
            found = result.neighbour_ids >= 0
            if found.any():
                staleness = result.newest_step - result.neighbour_steps[found].astype(np.float64)
                self.metrics.neighbour_staleness.observe(float(staleness.mean()))
                self.metrics.returned_neighbours.inc(int(found.sum()))
            return reply

    def _replica_lag(self) -> ReplicaLag:
        return self.lag.current if self.lag is not None else ReplicaLag()

    def Delete(self, request, context):
        with self._call("Delete", context):
            started = time.perf_counter()
            namespace = self._namespace(request)
            ids = validation.delete_ids(request)
            self._check_owned(ids)
            deleted, size = namespace.miner.delete(ids)
            self.metrics.delete_seconds.observe(time.perf_counter() - started)
            self.metrics.deleted_rows.inc(deleted)
            self.metrics.rows.labels(namespace.name).set(size)
            return pb.DeleteReply(deleted=deleted, size=size)

    def Fetch(self, request, context):
        with self._call("Fetch", context):
            namespace = self._namespace(request)
            ids = validation.fetch_ids(request, _rows_per_message(self.config.max_message_bytes, namespace.dim))
            found, image, text, steps = namespace.miner.fetch(ids)
            return pb.FetchReply(
                found_ids=ids[found].tolist(), image=encode(image), text=encode(text), steps=steps.tolist()
            )

    def Stats(self, request, context):
        with self._call("Stats", context):
            namespace = self._namespace(request)
            s = namespace.miner.stats()
            self.metrics.ivf_rows.set(s.ivf_rows)
            durability = self.config.durability
            namespaces = self.registry.all()
            self.metrics.namespaces.set(len(namespaces))  # a follower learns of namespaces without writes
            return pb.StatsReply(
                size=s.size,
                dim=s.dim,
                device=s.device,
                min_step=s.min_step,
                max_step=s.max_step,
                capacity=s.capacity,
                max_rows=s.max_rows,
                ivf_ready=s.ivf_ready,
                ivf_rows=s.ivf_rows,
                max_k=s.max_k,
                role=s.role,
                log_offset=s.log_offset,
                shard_index=durability.shard_index,
                shard_count=durability.shard_count,
                namespace=namespace.name,
                namespaces=[_info(n) for n in namespaces],
                total_rows=sum(n.rows for n in namespaces),
                max_total_rows=self.config.max_total_rows,
                replica_lag_seconds=self._replica_lag().seconds,
            )

    def EnsureNamespace(self, request, context):
        with self._call("EnsureNamespace", context):
            name = validate_name(request.namespace)
            fingerprint = validate_fingerprint(request.fingerprint)
            namespace, created = self.registry.ensure(name, int(request.dim), fingerprint, bool(request.reset))
            self.metrics.namespaces.set(len(self.registry.names()))
            self.metrics.rows.labels(name).set(namespace.rows)
            return pb.EnsureNamespaceReply(info=_info(namespace), created=created)

    def DropNamespace(self, request, context):
        with self._call("DropNamespace", context):
            name = validate_name(request.namespace)
            dropped_rows = self.registry.drop(name)
            self.metrics.namespaces.set(len(self.registry.names()))
            return pb.DropNamespaceReply(dropped_rows=dropped_rows)


def _info(namespace: Namespace) -> pb.NamespaceInfo:
    return pb.NamespaceInfo(
        name=namespace.name, dim=namespace.dim, rows=namespace.rows, fingerprint=namespace.record.fingerprint
    )


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]


class MinerServer:
    """A running miner: gRPC server, health service and (optionally) the /metrics endpoint."""

    def __init__(self, config: MinerConfig, miner: HardPairMiner | None = None):
        self.config = config
        if config.durability.follow and not config.durability.redis_url:
            raise ValueError("--follow needs --redis-url: a follower tails the leader's log")
        # Every namespace's core is built here; with a log, each recovers (snapshot + replay) before the port opens.
        self.registry = NamespaceRegistry(config, default_core=miner)
        self.registry.open()
        self.metrics = MinerMetrics.create()
        self.lag = None
        if config.durability.redis_url and config.durability.follow:
            self.lag = LagSampler(
                self.registry.lag, on_sample=lambda lag: self.metrics.replica_lag_seconds.set(lag.seconds)
            )
        self.servicer = MinerServicer(self.registry, config, self.metrics, self.lag)
        self.health = health.HealthServicer()
        token = load_token(config.security.token_file)
        interceptors = []
        if token:
            interceptors.append(
                TokenInterceptor(
                    token, on_refused=lambda method: self.metrics.requests.labels(method, "UNAUTHENTICATED").inc()
                )
            )
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rpc"),
            options=grpc_options(config.max_message_bytes),
            interceptors=interceptors,
        )
        pb_grpc.add_MinerServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        credentials = server_credentials(config.security)
        address = f"{config.host}:{config.port}"
        self.port = (
            self.server.add_secure_port(address, credentials) if credentials else self.server.add_insecure_port(address)
        )
        self.security_summary = (
            f"tls={'mutual' if config.security.tls_client_ca_file else 'on' if credentials else 'off'}"
            f", token={'on' if token else 'off'}"
        )
        if self.port == 0:
            raise OSError(f"could not bind {config.host}:{config.port}")
        self.metrics_port = None
        self._metrics_server = None
        self._stopped = threading.Event()

    def start(self) -> MinerServer:
        if self.config.metrics_port >= 0:
            self._metrics_server, _ = start_http_server(
                self.config.metrics_port, addr=self.config.metrics_host, registry=self.metrics.registry
            )
            self.metrics_port = self._metrics_server.server_port
        self.server.start()
        self.registry.start()
        if self.lag is not None:
            self.lag.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "miner serving on %s:%d (metrics on %s), dim=%d, device=%s, namespaces=%s, %s",
            self.config.host,
            self.port,
            f"{self.config.metrics_host}:{self.metrics_port}" if self.metrics_port else "off",
            self.config.dim,
            self.registry.get(DEFAULT).core.device,
            ",".join(self.registry.names()),
            self.security_summary,
        )
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within the grace period, then stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(self.config.grace_s if grace_s is None else grace_s).wait()
        if self.lag is not None:
            self.lag.stop()
        self.registry.stop()  # after the last write finished: the final snapshots cover every ack
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        log.info("miner stopped")

    def wait(self) -> None:
        self.server.wait_for_termination()

    def install_signal_handlers(self) -> None:
        def on_signal(signum, _frame):
            log.info("signal %s: shutting down", signal.Signals(signum).name)
            threading.Thread(target=self.stop, name="shutdown").start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
