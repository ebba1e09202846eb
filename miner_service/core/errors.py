"""Errors raised by the miner core and the codec; the gRPC shell maps each to one status code."""


class MinerError(Exception):
    """Base class: a request the miner refuses, with the request field it is about."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class InvalidArgument(MinerError):
    """The request is malformed (shape, dtype, values, limits)."""


class NotFound(MinerError):
    """The request names rows that are not stored (only where the caller asked for strictness)."""


class ResourceExhausted(MinerError):
    """Applying the request would exceed a configured capacity."""


class Unavailable(MinerError):
    """A dependency the request needs (the durable log) cannot be reached; nothing was applied."""


class FailedPrecondition(MinerError):
    """The request cannot be served by this miner in its role (e.g. a write sent to a read-only follower)."""
