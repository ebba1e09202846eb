"""Refusals against outages, with an in-process stand-in for the client: a code no retry can fix is logged once at
ERROR, stops the asking and surfaces in the training loop as MinerRefused (naming the field the miner named); an
outage keeps the breaker and training goes on with random pairs. The status round trip is checked on the wire."""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
import pytest
from grpc_status import rpc_status

from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.client.single import Neighbours
from helip.miner_service.wire.status import refusal_status, refused_field
from helip.trainer.pairs.mining import MiningConfig
from helip.trainer.pairs.refusals import MinerRefused, RefusalLatch, is_refusal, refusal
from helip.trainer.pairs.session import MiningSession

N = 1000


class StatusError(grpc.RpcError):
    """What a grpc call raises, carrying the rich status the server sent (trailing metadata)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = ""):
        self.status = refusal_status(code, message, field)

    def code(self):
        return self.status.code

    def details(self):
        return self.status.details

    def trailing_metadata(self):
        return self.status.trailing_metadata


class FailingMiner:
    """Mines and upserts fail with `error` once `error` is set; counts the calls."""

    namespace = "run"

    def __init__(self, max_k: int = 64, error: grpc.RpcError | None = None):
        self.max_k, self.error = max_k, error
        self.mines = self.upserts = 0

    def ensure_namespace(self, dim=0, fingerprint="", reset=False, timeout_s=None):
        if self.error is not None:
            raise self.error
        return pb.EnsureNamespaceReply(created=True, info=pb.NamespaceInfo(name="run", dim=dim))

    def stats(self):
        return pb.StatsReply(size=0, dim=8, max_k=self.max_k)

    def size(self):
        return N

    def mine(self, k, anchor_ids, **unused):
        self.mines += 1
        if self.error is not None:
            raise self.error
        ids = ((np.asarray(anchor_ids, dtype=np.int64) + 1) % N)[:, None]
        return Neighbours(ids, np.ones(ids.shape, np.float32), np.zeros(ids.shape, np.uint64), 0, np.zeros(0))

    def upsert(self, ids, image, text, step):
        self.upserts += 1
        if self.error is not None:
            raise self.error
        return pb.UpsertReply(size=len(ids))

    def close(self):
        pass


CONFIG = MiningConfig(k=4, prefetch=1, deadline_s=1.0, breaker_failures=2, breaker_cooldown_s=30)


def test_the_field_travels_as_a_bad_request_violation():
    error = StatusError(grpc.StatusCode.INVALID_ARGUMENT, "k: 5000 exceeds max_k 1024", "k")
    assert refused_field(error) == "k" and error.details() == "k: 5000 exceeds max_k 1024"
    assert rpc_status.from_call(error).code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert refused_field(StatusError(grpc.StatusCode.INVALID_ARGUMENT, "no field")) == ""
    made = refusal(error, "Mine")
    assert made.field == "k" and made.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "refused Mine: INVALID_ARGUMENT (field k): k: 5000 exceeds max_k 1024" in str(made)


@pytest.mark.parametrize(
    "code, refused",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, True),
        (grpc.StatusCode.UNAUTHENTICATED, True),
        (grpc.StatusCode.PERMISSION_DENIED, True),
        (grpc.StatusCode.FAILED_PRECONDITION, True),
        (grpc.StatusCode.UNAVAILABLE, False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, False),
        (grpc.StatusCode.INTERNAL, False),
    ],
)
def test_which_codes_are_refusals(code, refused):
    assert is_refusal(StatusError(code, "x")) is refused


def test_start_checks_k_against_the_miners_max_k():
    with pytest.raises(MinerRefused, match="mining.k is 4 but the miner answers at most max_k=2") as caught:
        MiningSession(CONFIG, client=FailingMiner(max_k=2)).start(dim=8)
    assert caught.value.field == "mining.k"
    assert MiningSession(CONFIG, client=FailingMiner(max_k=4)).start(dim=8).max_k == 4


def test_start_turns_a_wrong_token_into_a_refusal_naming_what_to_check():
    miner = FailingMiner(error=StatusError(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token"))
    with pytest.raises(MinerRefused, match="UNAUTHENTICATED.*mining.token_file"):
        MiningSession(CONFIG, client=miner).start(dim=8)


def test_a_refused_mine_is_logged_once_stops_the_asking_and_stops_the_loop(caplog):
    miner = FailingMiner(error=StatusError(grpc.StatusCode.INVALID_ARGUMENT, "k above max_k", "k"))
    session = MiningSession(CONFIG, client=miner)
    sampler = session.sampler(N, 8, steps=50)
    batches = iter(sampler)
    with caplog.at_level(logging.ERROR, logger="helip.trainer.pairs.refusals"):
        with pytest.raises(MinerRefused, match="field k") as caught:
            for _ in range(50):
                next(batches)
                time.sleep(0.01)
    assert caught.value.field == "k"
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    calls = miner.mines
    with pytest.raises(MinerRefused):
        sampler.compose(10)  # every later batch says the same
    assert miner.mines == calls  # no more asking
    assert session.counters.breaker_opened == 0  # a refusal is not an outage
    with pytest.raises(MinerRefused):
        session.push(np.arange(2), np.ones((2, 8), np.float32), np.ones((2, 8), np.float32), 0)
    session.close()


def test_a_refused_push_surfaces_at_the_next_push():
    miner = FailingMiner(error=StatusError(grpc.StatusCode.PERMISSION_DENIED, "certificate not allowed"))
    session = MiningSession(CONFIG, client=miner)
    rows = np.ones((2, 8), np.float32)
    assert session.push(np.arange(2), rows, rows, 0) is None
    assert session.pusher().flush(5)
    with pytest.raises(MinerRefused, match="PERMISSION_DENIED.*client certificate"):
        session.push(np.arange(2), rows, rows, 1)
    assert miner.upserts == 1
    session.close()


def test_an_outage_keeps_the_breaker_and_never_raises():
    miner = FailingMiner(error=StatusError(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    session = MiningSession(CONFIG, client=miner)
    sampler = session.sampler(N, 8, steps=30)
    layouts = []
    for ids in sampler:
        time.sleep(0.01)
        layouts.append(sampler.layout(ids))
    assert len(layouts) == 30 and sum(layout.n_hard for layout in layouts) == 0
    assert session.counters.breaker_opened == 1 and not session.refusals.refused
    session.close()


def test_the_latch_keeps_the_first_refusal():
    latch = RefusalLatch()
    latch.check()
    latch.record(MinerRefused("first"))
    latch.record(MinerRefused("second"))
    with pytest.raises(MinerRefused, match="first"):
        latch.check()


def test_a_sample_twice_in_a_batch_is_pushed_once():
    sent = []

    class Recording(FailingMiner):
        def upsert(self, ids, image, text, step):
            sent.append((ids.tolist(), image[:, 0].tolist()))
            return pb.UpsertReply(size=len(ids))

    session = MiningSession(CONFIG, client=Recording())
    rows = np.arange(4, dtype=np.float32)[:, None].repeat(8, axis=1)
    session.push(np.array([7, 3, 7, 5]), rows, rows, 0)  # row 2: a substitute already in the batch (id 7)
    assert session.pusher().flush(5)
    assert sent == [([3, 5, 7], [1.0, 3.0, 0.0])] and session.counters.pushed_rows == 3
    session.close()
