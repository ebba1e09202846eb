"""Refusals: miner errors that no retry can fix, told apart from outages.

An outage (UNAVAILABLE, DEADLINE_EXCEEDED, an overloaded miner) goes behind the circuit breaker and training goes
on with random pairs. A refusal (a bad request, a wrong token, a namespace the run may not use) would fail every
call alike: training on random pairs while warning every few seconds hides a mistake the user must fix. The first
refusal is logged once at ERROR, stops all asking, and is raised to the training loop by the next batch or push
(`MiningSession.check`).
"""

from __future__ import annotations

import logging
import threading

import grpc

from helip.miner_service.wire.status import refused_field

log = logging.getLogger(__name__)

REFUSAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
_HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: "check mining.token_file (or $HELIP_AUTH_TOKEN) against the miner's token",
    grpc.StatusCode.PERMISSION_DENIED: "check the client certificate and token the miner expects",
}


class MinerRefused(RuntimeError):
    """The miner refused this run's requests for a reason no retry can fix; the message says what to change."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, field: str = ""):
        super().__init__(message)
        self.code = code
        self.field = field


def is_refusal(error: grpc.RpcError) -> bool:
    return error.code() in REFUSAL_CODES


def refusal(error: grpc.RpcError, what: str) -> MinerRefused:
    """A MinerRefused for the grpc error a call `what` ("Mine", "push") got, naming the field the miner named."""
    code, field = error.code(), refused_field(error)
    about = f" (field {field})" if field else ""
    hint = _HINTS.get(code, "")
    message = f"the miner refused {what}: {code.name}{about}: {error.details()}" + (f"; {hint}" if hint else "")
    return MinerRefused(message, code, field)


class RefusalLatch:
    """Holds the first refusal of a session, from any thread; `check` raises it in the training loop's thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.error: MinerRefused | None = None

    def record(self, error: MinerRefused) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.error = error
        log.error("%s. Mining stops; the run stops at its next batch.", error)

    @property
    def refused(self) -> bool:
        return self.error is not None

    def check(self) -> None:
        if self.error is not None:
            raise self.error
