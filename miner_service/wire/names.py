"""Namespace names and data-set fingerprints as the wire carries them: checked the same way by client and server."""

from __future__ import annotations

import re

from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.core.errors import InvalidArgument

# The gRPC service's full name, as health checks and service configs name it (from the contract, not retyped).
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Miner"].full_name
DEFAULT_NAMESPACE = "default"
MAX_NAME_CHARS = 64
MAX_FINGERPRINT_CHARS = 1024
# Names become Redis key parts, directory names and metrics label values: a small, safe alphabet.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def validate_name(name: str, field: str = "namespace") -> str:
    """The namespace a request names ("" -> "default"); InvalidArgument naming `field` when malformed."""
    if not name:
        return DEFAULT_NAMESPACE
    if len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(field, f"{len(name)} characters; a namespace name has at most {MAX_NAME_CHARS}")
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            field,
            f"{name!r} is not a namespace name: use letters, digits, '_', '.', '-', starting with a letter or digit",
        )
    return name


def validate_fingerprint(fingerprint: str, field: str = "fingerprint") -> str:
    if len(fingerprint) > MAX_FINGERPRINT_CHARS:
        raise InvalidArgument(field, f"{len(fingerprint)} characters; at most {MAX_FINGERPRINT_CHARS}")
    return fingerprint
