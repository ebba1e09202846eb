"""Fault drills against real miner processes: expired deadlines, clients that vanish mid-stream, SIGTERM under
load, and the --max-rows capacity limit (in memory and in the durable path).

What every drill checks in the end: each write is applied wholly or not at all (rows compared by Fetch, FLOAT32 on
the wire so values compare exactly), acknowledged writes are there, and the server answers the next call.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import redis

from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.miner_service.service.config import DurabilityConfig
from helip.miner_service.wire.tensors import encode
from tests.conftest import ROOT
from tests.reference import random_pairs

DIM = 64


def client_for(address: str, timeout_s: float = 30.0) -> MinerClient:
    client = MinerClient(ClientConfig(address=address, wire_dtype=pb.FLOAT32, retries=0, timeout_s=timeout_s))
    client.wait_ready(30)
    return client


def preload(client: MinerClient, n_rows: int, seed: int = 0, batch: int = 4096) -> None:
    rng = np.random.default_rng(seed)
    for first in range(0, n_rows, batch):
        ids = np.arange(first, min(first + batch, n_rows), dtype=np.uint64)
        image, text = random_pairs(rng, len(ids), DIM)
        client.upsert(ids, image, text, step=1)


def rows_state(client: MinerClient, ids: np.ndarray, image: np.ndarray, text: np.ndarray) -> str:
    """'all' (every row stored with these values), 'none' (none stored); anything else fails the test."""
    found, got_image, got_text = client.fetch(ids)
    if not found.any():
        return "none"
    assert found.all(), f"a write was applied in part: {int(found.sum())} of {len(ids)} rows stored"
    np.testing.assert_array_equal(got_image, image)
    np.testing.assert_array_equal(got_text, text)
    return "all"


def wait_until_quiet(client: MinerClient, quiet_s: float = 0.5, timeout_s: float = 30.0) -> int:
    """Wait until the row count stops changing (a handler may still be running after its client gave up)."""
    deadline = time.monotonic() + timeout_s
    size, since = client.stats().size, time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, "the miner kept writing"
        time.sleep(0.05)
        now = client.stats().size
        if now != size:
            size, since = now, time.monotonic()
    return size


def assert_serves(client: MinerClient, new_id: int) -> None:
    image, text = random_pairs(np.random.default_rng(new_id), 1, DIM)
    client.upsert([new_id], image, text, step=5)
    assert rows_state(client, np.array([new_id], dtype=np.uint64), image, text) == "all"
    assert client.mine(4, anchor_ids=[new_id]).ids.shape == (1, 4)


# ---- (a) a client deadline expires mid-request -----------------------------------------------------------------
def cancelled_mines(miner) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(miner.metrics_url, timeout=10).read().decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "helip_miner_requests_total" and s.labels == {"method": "Mine", "code": "CANCELLED"}
    )


def test_deadline_expiring_mid_request(miner_factory):
    miner = miner_factory("--dim", str(DIM), "--device", "cpu")
    client = client_for(miner.address)
    preload(client, 20_000)
    anchors = np.arange(2048, dtype=np.uint64)
    small = client.mine(8, anchor_ids=anchors[:4])
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as caught:
        client.mine(16, anchor_ids=anchors, timeout_s=0.05)  # the search alone takes far longer
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.perf_counter() - started < 2.0, "the client waited past its deadline"
    # The next calls are answered, and alike.
    again = client.mine(8, anchor_ids=anchors[:4])
    np.testing.assert_array_equal(again.ids, small.ids)
    # And the abandoned search was stopped between blocks rather than run to its end for nobody.
    deadline = time.monotonic() + 30
    while cancelled_mines(miner) < 1:
        assert time.monotonic() < deadline, "the abandoned Mine was never stopped"
        time.sleep(0.1)

    # A large upsert with a deadline too short to deliver it: applied wholly or not at all.
    ids = np.arange(100_000, 160_000, dtype=np.uint64)
    image, text = random_pairs(np.random.default_rng(1), len(ids), DIM)
    with pytest.raises(grpc.RpcError) as caught:
        client.upsert(ids, image, text, step=2, timeout_s=0.001)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    size = wait_until_quiet(client)
    state = rows_state(client, ids, image, text)
    assert size == 20_000 + (len(ids) if state == "all" else 0)
    assert_serves(client, 999_999)
    assert miner.process.poll() is None


# ---- (b) a client vanishes mid-UpsertStream ---------------------------------------------------------------------
STREAM_BASE_ID, STREAM_ROWS, STREAM_MESSAGES = 1_000_000, 512, 200


def stream_message(index: int) -> tuple[pb.UpsertRequest, np.ndarray, np.ndarray, np.ndarray]:
    """Message `index` of the drill's stream: its own 512 ids, rows from its own seed."""
    ids = np.arange(STREAM_ROWS, dtype=np.uint64) + STREAM_BASE_ID + index * STREAM_ROWS
    image, text = random_pairs(np.random.default_rng(10_000 + index), STREAM_ROWS, DIM)
    request = pb.UpsertRequest(ids=ids.tolist(), image=encode(image), text=encode(text), step=index + 1)
    return request, ids, image, text


def stream_until_killed(address: str) -> None:
    """The vanishing client (run as its own process): stream messages, saying after each one it handed to gRPC."""
    from helip.miner.v1 import miner_pb2_grpc as pb_grpc

    def messages():
        for index in range(STREAM_MESSAGES):
            yield stream_message(index)[0]
            print(f"sent {index}", flush=True)

    pb_grpc.MinerStub(grpc.insecure_channel(address)).UpsertStream(messages(), timeout=120)
    print("finished", flush=True)


def assert_stream_prefix(client: MinerClient, n_messages: int) -> int:
    """Each message wholly applied or not at all, and the applied ones a prefix of the stream. Returns it."""
    states = [rows_state(client, *stream_message(i)[1:]) for i in range(n_messages)]
    applied = states.count("all")
    assert states == ["all"] * applied + ["none"] * (n_messages - applied), "applied messages are not a prefix"
    return applied


def test_client_killed_mid_upsert_stream(miner_factory):
    miner = miner_factory("--dim", str(DIM), "--device", "cpu")
    client = client_for(miner.address)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from tests.integration.test_fault_drills import "
            f"stream_until_killed; stream_until_killed({miner.address!r})",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    sent = -1
    for line in writer.stdout:
        if line.startswith("sent"):
            sent = int(line.split()[1])
        if sent >= 40 or line.startswith("finished"):
            break
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert sent >= 40, "the client did not get going"
    size = wait_until_quiet(client)
    applied = assert_stream_prefix(client, STREAM_MESSAGES)
    assert size == applied * STREAM_ROWS
    assert applied < STREAM_MESSAGES, "the stream finished before the kill; the drill did not drill"
    assert_serves(client, 999_999)
    assert miner.process.poll() is None


def test_stream_generator_raising_mid_stream(miner_factory):
    miner = miner_factory("--dim", str(DIM), "--device", "cpu")
    client = client_for(miner.address)

    def messages():
        for index in range(5):
            yield stream_message(index)[0]
        raise RuntimeError("the trainer crashed while producing the stream")

    with pytest.raises(grpc.RpcError) as caught:
        client.stub.UpsertStream(messages(), timeout=30)
    assert caught.value.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED)
    size = wait_until_quiet(client)
    assert size == assert_stream_prefix(client, 6) * STREAM_ROWS
    assert_serves(client, 999_999)
    assert "UpsertStream failed" not in miner.log(), "a vanished client was logged as a miner failure"


# ---- (c) SIGTERM under load ------------------------------------------------------------------------------------
@dataclass
class CallRecord:
    kind: str
    started: float
    ended: float
    code: grpc.StatusCode
    ids: np.ndarray | None = None
    image: np.ndarray | None = None
    text: np.ndarray | None = None


@dataclass
class Load:
    """Writers and miners hammering one miner until they see it gone; every call recorded."""

    address: str
    records: list[CallRecord] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _record(self, record: CallRecord) -> None:
        with self.lock:
            self.records.append(record)

    def _call(self, kind: str, fn, **written) -> bool:
        started = time.monotonic()
        try:
            fn()
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
        self._record(CallRecord(kind, started, time.monotonic(), code, **written))
        return code == grpc.StatusCode.OK

    def writer(self, index: int) -> None:
        client = client_for(self.address)
        rng = np.random.default_rng(100 + index)
        for call in range(1_000_000):
            # Ids of their own per call, never rewritten: each call's rows stay checkable after the drill.
            ids = np.arange(32, dtype=np.uint64) + 10_000_000 * (index + 1) + 32 * call
            image, text = random_pairs(rng, 32, DIM)
            ok = self._call(
                "upsert",
                lambda: client.upsert(ids, image, text, step=2),  # noqa: B023 (called at once)
                ids=ids,
                image=image,
                text=text,
            )
            if not ok:
                return  # the miner is going or gone

    def miner(self, index: int) -> None:
        client = client_for(self.address)
        rng = np.random.default_rng(200 + index)
        while self._call("mine", lambda: client.mine(16, anchor_ids=rng.choice(20_000, 64, replace=False))):
            pass

    def slow_mine(self) -> None:
        client = client_for(self.address, timeout_s=120)
        self._call("slow_mine", lambda: client.mine(16, anchor_ids=np.arange(4096)))


@pytest.mark.slow
def test_sigterm_under_load(miner_factory, redis_url, key_prefix, tmp_path):
    snapshots = tmp_path / "snapshots"
    args = (
        "--dim",
        str(DIM),
        "--device",
        "cpu",
        "--redis-url",
        redis_url,
        "--key-prefix",
        key_prefix,
        "--snapshot-dir",
        str(snapshots),
        "--snapshot-interval-s",
        "0",
    )
    miner = miner_factory(*args)
    preload(client_for(miner.address), 20_000)
    load = Load(miner.address)
    threads = [threading.Thread(target=load.writer, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=load.miner, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    slow = threading.Thread(target=load.slow_mine)
    slow.start()
    time.sleep(0.3)  # the slow Mine (over a second of search) is now in flight
    sigterm_at = time.monotonic()
    miner.process.send_signal(signal.SIGTERM)
    assert miner.process.wait(60) == 0, miner.log()[-3000:]
    for thread in [*threads, slow]:
        thread.join(60)

    # Calls that reach the miner as it stops are refused (UNAVAILABLE) or, when gRPC had accepted one that no worker
    # had started yet, cancelled; either way the client knows it got no answer. Calls well inside must end OK.
    codes = {record.code for record in load.records}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, codes
    [slow_record] = [r for r in load.records if r.kind == "slow_mine"]
    assert slow_record.code == grpc.StatusCode.OK and slow_record.ended > sigterm_at
    settled = [r for r in load.records if r.started < sigterm_at - 0.2]  # surely inside the miner at SIGTERM
    assert all(r.code == grpc.StatusCode.OK for r in settled)
    assert sorted(p.name for p in snapshots.iterdir() if p.name.startswith("snap-")), "no shutdown snapshot"

    # After a restart (snapshot + log): every acknowledged write is there; every other write all or nothing.
    client = client_for(miner_factory(*args).address)
    writes = [r for r in load.records if r.kind == "upsert"]
    assert sum(r.code == grpc.StatusCode.OK for r in writes) >= 5  # writes queue behind the Mines' read lock
    states = [rows_state(client, r.ids, r.image, r.text) for r in writes]
    for record, state in zip(writes, states):
        if record.code == grpc.StatusCode.OK:
            assert state == "all", "an acknowledged write was lost"
    assert client.stats().size == 20_000 + 32 * states.count("all")


# ---- (d) the capacity limit -------------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_max_rows_refuses_instead_of_growing(miner_factory):
    miner = miner_factory("--dim", str(DIM), "--device", "cpu", "--max-rows", "1000")
    client = client_for(miner.address)
    rng = np.random.default_rng(5)
    image, text = random_pairs(rng, 1000, DIM)
    client.upsert(np.arange(900), image[:900], text[:900], step=1)
    with pytest.raises(grpc.RpcError) as caught:
        client.upsert(np.arange(850, 1050), image[:200], text[:200], step=2)  # 150 new rows: over by 50
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_rows" in caught.value.details()
    assert rows_state(client, np.arange(900, dtype=np.uint64), image[:900], text[:900]) == "all"  # not even in part
    assert client.stats().size == 900

    # A request far past the limit is refused before the store grows: the process does not swell.
    rss_before = rss_bytes(miner.process.pid)
    big_image, big_text = random_pairs(rng, 100_000, DIM)
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as caught:
            client.upsert(np.arange(10**6, 10**6 + 100_000), big_image, big_text)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rss_bytes(miner.process.pid) - rss_before < 200 << 20
    assert client.stats().capacity <= 1000

    # Filling up to the limit exactly, and overwriting at the limit, are fine.
    client.upsert(np.arange(900, 1000), image[900:], text[900:], step=3)
    client.upsert(np.arange(10), image[:10], text[:10], step=4)
    assert client.stats().size == 1000

    # UpsertStream: the messages before the refused one stay, the refused one and everything after do not.
    messages = [
        client.upsert_request([5, 6], image[:2], text[:2], step=6),
        client.upsert_request([5000], image[:1], text[:1], step=7),
        client.upsert_request([7], image[:1], text[:1], step=8),
    ]
    with pytest.raises(grpc.RpcError) as caught:
        client.upsert_stream(messages)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "message 1" in caught.value.details()
    stats = client.stats()
    assert (stats.size, stats.max_step) == (1000, 6)
    assert miner.process.poll() is None


def test_max_rows_refused_writes_stay_out_of_the_log(miner_factory, redis_url, key_prefix, tmp_path):
    args = (
        "--dim",
        str(DIM),
        "--device",
        "cpu",
        "--max-rows",
        "10",
        "--redis-url",
        redis_url,
        "--key-prefix",
        key_prefix,
        "--snapshot-dir",
        str(tmp_path / "snapshots"),
        "--snapshot-interval-s",
        "0",
    )
    miner = miner_factory(*args)
    client = client_for(miner.address)
    stream = DurabilityConfig(key_prefix=key_prefix).stream
    log = redis.Redis.from_url(redis_url)
    image, text = random_pairs(np.random.default_rng(6), 12, DIM)
    client.upsert(np.arange(8), image[:8], text[:8], step=1)
    with pytest.raises(grpc.RpcError) as caught:
        client.upsert(np.arange(100, 104), image[8:], text[8:], step=2)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as caught:
        client.upsert_stream(
            [
                client.upsert_request([50, 51], image[8:10], text[8:10], step=3),
                client.upsert_request([60, 61, 62], image[9:], text[9:], step=4),
            ]
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert log.xlen(stream) == 2  # the first upsert and the stream's first message; nothing refused
    # SIGKILL: no shutdown snapshot, the restart replays the log alone.
    miner.process.send_signal(signal.SIGKILL)
    miner.process.wait()
    client = client_for(miner_factory(*args).address)
    stats = client.stats()
    assert (stats.size, stats.max_step) == (10, 3)
    assert rows_state(client, np.arange(8, dtype=np.uint64), image[:8], text[:8]) == "all"
    assert rows_state(client, np.array([100, 101, 102, 103], dtype=np.uint64), image[8:], text[8:]) == "none"
    log.close()
