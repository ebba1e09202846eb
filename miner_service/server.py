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
from miner_service import validation
from miner_service.config import MinerConfig
from miner_service.core_api import MinerCore
from miner_service.durable import DurableMiner
from miner_service.errors import (
    FailedPrecondition,
    InvalidArgument,
    MinerError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from miner_service.lag import LagSampler, ReplicaLag
from miner_service.metrics import MinerMetrics
from miner_service.miner import HardPairMiner
from miner_service.search import SearchCancelled
from miner_service.security import TokenInterceptor, load_token, server_credentials
from miner_service.sharding import shard_of
from miner_service.tensors import encode

log = logging.getLogger(__name__)

SERVICE_NAME = "helip.miner.v1.Miner"
_STATUS_OF_ERROR = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
}


class MinerServicer(pb_grpc.MinerServicer):
    """miner: any MinerCore (the in-memory core, or the core behind its durable log).
    lag: a follower's latest lag sample (None: not a follower)."""

    def __init__(self, miner: MinerCore, config: MinerConfig, metrics: MinerMetrics, lag: LagSampler | None = None):
        self.miner = miner
        self.config = config
        self.metrics = metrics
        self.lag = lag
        # One message can carry at most this many rows (two fp32 tensors of dim per row must fit a message).
        self.max_rows_per_request = max(1, config.max_message_bytes // (8 * miner.dim))
        self.metrics.rows.set(miner.size)
        self.metrics.ivf_enabled.set(int(miner.stats().ivf_enabled))

    @contextmanager
    def _call(self, method: str, context: grpc.ServicerContext):
        """Count the call by status code; turn core errors into their status (context.abort raises)."""
        try:
            yield
        except MinerError as error:
            code = _STATUS_OF_ERROR[type(error)]
            log.info("%s refused (%s): %s", method, code.name, error)
            self.metrics.requests.labels(method, code.name).inc()
            context.abort(code, str(error))
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

    def _apply_upsert(self, request: pb.UpsertRequest) -> int:
        started = time.perf_counter()
        batch = validation.upsert_batch(request, self.miner.dim, self.max_rows_per_request)
        self._check_owned(batch.ids)
        _, size = self.miner.upsert(batch.ids, batch.image, batch.text, batch.step)
        self.metrics.upsert_seconds.observe(time.perf_counter() - started)
        self.metrics.upserted_rows.inc(len(batch.ids))
        self.metrics.rows.set(size)
        return len(batch.ids)

    def Upsert(self, request, context):
        with self._call("Upsert", context):
            accepted = self._apply_upsert(request)
            return pb.UpsertReply(accepted=accepted, size=self.miner.size)

    def UpsertStream(self, request_iterator, context):
        accepted = 0
        with self._call("UpsertStream", context):
            for index, request in enumerate(request_iterator):
                try:
                    accepted += self._apply_upsert(request)
                except MinerError as error:
                    # Messages before this one are applied and stay; say where the stream stopped.
                    raise type(error)(
                        error.field, f"message {index} (after {accepted} rows applied): {error.message}"
                    ) from error
            return pb.UpsertReply(accepted=accepted, size=self.miner.size)

    def Mine(self, request, context):
        with self._call("Mine", context):
            started = time.perf_counter()
            search = self.config.search
            query = validation.mine_query(request, self.miner.dim, search.max_k, search.max_anchors)
            result = self.miner.mine(query, cancelled=lambda: not context.is_active())
            lag = self._replica_lag()
            reply = pb.MineReply(
                k=query.k,
                size=result.size,
                served_by_follower=self.lag is not None,
                replica_lag_seconds=lag.seconds,
            )
            reply.neighbour_ids.extend(result.neighbour_ids.ravel().tolist())
            reply.scores.extend(result.scores.ravel().tolist())
            reply.neighbour_steps.extend(result.neighbour_steps.ravel().tolist())
            reply.unknown_anchor_ids.extend(result.unknown_anchor_ids.tolist())
            self.metrics.mine_seconds.observe(time.perf_counter() - started)
            self.metrics.mined_anchors.inc(query.n_anchors)
            self.metrics.unknown_anchors.inc(len(result.unknown_anchor_ids))
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
            ids = validation.delete_ids(request)
            self._check_owned(ids)
            deleted, size = self.miner.delete(ids)
            self.metrics.delete_seconds.observe(time.perf_counter() - started)
            self.metrics.deleted_rows.inc(deleted)
            self.metrics.rows.set(size)
            return pb.DeleteReply(deleted=deleted, size=size)

    def Fetch(self, request, context):
        with self._call("Fetch", context):
            ids = validation.fetch_ids(request, self.max_rows_per_request)
            found, image, text, steps = self.miner.fetch(ids)
            return pb.FetchReply(
                found_ids=ids[found].tolist(), image=encode(image), text=encode(text), steps=steps.tolist()
            )

    def Stats(self, request, context):
        with self._call("Stats", context):
            s = self.miner.stats()
            self.metrics.ivf_rows.set(s.ivf_rows)
            durability = self.config.durability
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
                replica_lag_seconds=self._replica_lag().seconds,
            )


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]


class MinerServer:
    """A running miner: gRPC server, health service and (optionally) the /metrics endpoint."""

    def __init__(self, config: MinerConfig, miner: HardPairMiner | None = None):
        self.config = config
        core = miner or HardPairMiner(config.dim, config.search, max_rows=config.max_rows)
        self.durable = None
        if config.durability.redis_url:
            self.durable = DurableMiner(core, config.durability)
            self.durable.recover()  # snapshot + log replay, before the port opens
        elif config.durability.follow:
            raise ValueError("--follow needs --redis-url: a follower tails the leader's log")
        self.miner: MinerCore = self.durable or core
        self.metrics = MinerMetrics.create()
        self.lag = None
        if self.durable is not None and config.durability.follow:
            self.lag = LagSampler(
                self.durable.lag, on_sample=lambda lag: self.metrics.replica_lag_seconds.set(lag.seconds)
            )
        self.servicer = MinerServicer(self.miner, config, self.metrics, self.lag)
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
        if self.durable is not None:
            self.durable.start()
        if self.lag is not None:
            self.lag.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "miner serving on %s:%d (metrics on %s), dim=%d, device=%s, %s",
            self.config.host,
            self.port,
            f"{self.config.metrics_host}:{self.metrics_port}" if self.metrics_port else "off",
            self.miner.dim,
            self.miner.device,
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
        if self.durable is not None:
            self.durable.stop()  # after the last write finished: the final snapshot covers every ack
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
