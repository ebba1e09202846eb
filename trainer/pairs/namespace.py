"""A run's namespace on the miner, and the fingerprint of its data set kept there.

One miner serves many runs; each run writes its rows into a namespace of its own (`mining.namespace`, by default
the name of the run's output directory). Sample ids are data set indices, so rows of another data set under the
same ids would be wrong neighbours: before its first push a run claims its namespace with a fingerprint of its
data set (sample count plus a hash of evenly spaced captions), and a namespace that holds another fingerprint
is refused unless the run asks to reset it. Any training loop can call `claim_namespace` with its client.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import grpc
import numpy as np

from helip.miner_service.wire.status import refused_field

log = logging.getLogger(__name__)

FINGERPRINT_CAPTIONS = 64  # captions hashed, evenly spaced from the first to the last sample
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


class NamespaceMismatch(RuntimeError):
    """The run's namespace on the miner holds another data set (or another dim)."""


def run_namespace(output_dir: str | Path) -> str:
    """The default namespace of a run: its output directory's name, reduced to the characters names allow."""
    name = _NOT_IN_NAME.sub("-", Path(output_dir).resolve().name).strip("-._")[:64]
    return name or "run"


def dataset_fingerprint(dataset, captions: int = FINGERPRINT_CAPTIONS) -> str:
    """ "samples=<n>;captions=<sha256 prefix>" of a data set with `__len__` and `caption(i)`.

    The captions of the first, the last and evenly spaced samples in between: cheap for any size (no image is
    read), and a different file, order or length almost surely changes it."""
    n = len(dataset)
    digest = hashlib.sha256(f"samples={n}".encode())
    positions = np.unique(np.linspace(0, n - 1, min(n, captions)).round().astype(np.int64)) if n else []
    for i in positions:
        try:
            caption = dataset.caption(int(i))
        except Exception as error:  # noqa: BLE001 - an unreadable caption still identifies the set by position
            caption = f"<unreadable: {type(error).__name__}>"
        digest.update(f"\n{int(i)}\t{caption}".encode())
    return f"samples={n};captions={digest.hexdigest()[:16]}"


def claim_namespace(client, namespace: str, dim: int, fingerprint: str, reset: bool = False):
    """Make sure the client's namespace exists for this data set; returns the miner's EnsureNamespaceReply.

    With `reset` the namespace is dropped and created empty. Raises NamespaceMismatch, naming both fingerprints
    and the ways forward, when it holds another data set or another dim."""
    try:
        reply = client.ensure_namespace(dim=dim, fingerprint=fingerprint, reset=reset)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
            raise
        ours = f" (this run's embeddings have dim {dim})" if refused_field(error) == "dim" else ""
        raise NamespaceMismatch(
            f"the miner refused namespace {namespace!r}: {error.details()}{ours}. Set mining.reset_namespace=true "
            f"to drop its rows and start it anew, or give this run another mining.namespace."
        ) from None
    stored = reply.info.fingerprint
    if stored != fingerprint:
        raise NamespaceMismatch(
            f"miner namespace {namespace!r} holds another data set: its fingerprint is {stored!r}, this run's is "
            f"{fingerprint!r}. To train this data set there and discard its {reply.info.rows} rows, set "
            f"mining.reset_namespace=true; to keep them, give this run its own mining.namespace."
        )
    log.info(
        "miner namespace %r: %s (%d rows, fingerprint %s)",
        namespace,
        "created" if reply.created else "reused",
        reply.info.rows,
        fingerprint,
    )
    return reply
