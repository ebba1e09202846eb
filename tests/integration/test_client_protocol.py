"""One conformance suite for every miner client: one miner, a durable leader with two followers, and three shards
must answer alike (the promise of miner_service/client/protocol.py), so a caller never needs to know which it holds.

Each kind's processes start once for the module; every test works in a namespace of its own, dropped afterwards.
Followers apply the leader's log a little later, so a test waits for them (`Deployment.caught_up`) before it reads.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest

from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.client.protocol import MineQuery, MinerApi
from helip.miner_service.client.replicas import ReplicatedMinerClient
from helip.miner_service.client.sharded import ShardedMinerClient
from helip.miner_service.client.single import ClientConfig, FetchedRows, MinerClient, Neighbours
from helip.miner_service.wire.status import refused_field
from tests.conftest import MinerProcess, start_miner
from tests.reference import random_pairs, reference_mine

DIM = 16
MAX_K = 64
ROWS = 240
STEP = 7
CONFIG = ClientConfig(wire_dtype=pb.FLOAT32, timeout_s=20, retries=0)
SCORINGS = {"product": pb.PRODUCT, "sum": pb.SUM, "image": pb.IMAGE, "text": pb.TEXT}

pytestmark = pytest.mark.slow  # seven miner processes: about 50 s in all


@dataclass
class Deployment:
    """Miner processes of one kind, and how to make a client of them bound to a namespace."""

    kind: str
    connect: Callable[[ClientConfig], MinerApi]
    leader: str = ""  # the address followers copy, when there are followers
    followers: list[str] = field(default_factory=list)

    def client(self, namespace: str) -> MinerApi:
        client = self.connect(dataclasses.replace(CONFIG, namespace=namespace))
        client.wait_ready(30)
        return client

    def caught_up(self, namespace: str, timeout_s: float = 20) -> None:
        """Wait until every follower has applied all the leader holds of `namespace` (its log offset), as
        tests/integration/test_replicas.py does; a follower learns of a new namespace, or forgets a dropped one,
        within a poll of the leader's registry."""
        if not self.followers:
            return
        config = dataclasses.replace(CONFIG, namespace=namespace)
        with MinerClient(dataclasses.replace(config, address=self.leader)) as leader:
            head = _log_offset(leader)
        deadline = time.monotonic() + timeout_s
        for address in self.followers:
            with MinerClient(dataclasses.replace(config, address=address)) as follower:
                while _log_offset(follower) != head:
                    assert time.monotonic() < deadline, f"follower {address} did not catch up on {namespace}"
                    time.sleep(0.02)


def _log_offset(replica: MinerClient) -> str | None:
    """The last log entry `replica` applied to its namespace; None where it does not hold the namespace."""
    try:
        return replica.stats().log_offset
    except grpc.RpcError as error:
        if refused_field(error) != "namespace":
            raise
        return None


@pytest.fixture(scope="module")
def redis_prefix():
    """A key prefix of this module's own on the real Redis (REDIS_URL), its keys deleted at the end."""
    import redis

    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"helip-test-{uuid.uuid4().hex[:12]}"
    yield url, prefix
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()


@pytest.fixture(scope="module", params=["single", "replicated", "sharded"])
def deployment(request, tmp_path_factory, redis_prefix):
    workdir = tmp_path_factory.mktemp(request.param)
    started: list[MinerProcess] = []

    def start(*args: str) -> list[MinerProcess]:
        """Miners with `args` each (concurrently: most of a start is importing torch)."""
        with ThreadPoolExecutor(len(args)) as pool:
            miners = list(pool.map(lambda a: start_miner(workdir, "--dim", str(DIM), "--max-k", str(MAX_K), *a), args))
        started.extend(miners)
        return miners

    try:
        if request.param == "single":
            (miner,) = start(())
            yield Deployment("single", lambda c: MinerClient(dataclasses.replace(c, address=miner.address)))
        elif request.param == "replicated":
            url, prefix = redis_prefix
            durable = ("--redis-url", url, "--key-prefix", prefix)
            (leader,) = start((*durable, "--snapshot-dir", str(workdir / "snapshots")))
            followers = [f.address for f in start((*durable, "--follow"), (*durable, "--follow"))]
            yield Deployment(
                "replicated",
                lambda c: ReplicatedMinerClient(leader.address, followers, c),
                leader=leader.address,
                followers=followers,
            )
        else:
            shards = [s.address for s in start(*(("--shard", f"{i}/3") for i in range(3)))]
            yield Deployment("sharded", lambda c: ShardedMinerClient(shards, c))
    finally:
        for miner in started:
            miner.stop(timeout_s=10)


@pytest.fixture
def namespace() -> str:
    return f"conformance-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def api(deployment, namespace):
    """A client of this kind bound to a fresh namespace of dim DIM, dropped afterwards."""
    client = deployment.client(namespace)
    client.ensure_namespace(DIM)
    yield client
    client.drop_namespace()
    client.close()


@dataclass(frozen=True)
class Stored:
    ids: np.ndarray  # uint64, spread over the whole id space (and so over shards)
    image: np.ndarray
    text: np.ndarray

    def rows(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """id -> (image, text), as reference_mine takes them."""
        return {int(i): (self.image[j], self.text[j]) for j, i in enumerate(self.ids)}

    def positions(self, ids) -> np.ndarray:
        return np.searchsorted(self.ids, np.asarray(ids, dtype=np.uint64))


@pytest.fixture
def stored(api, deployment, namespace) -> Stored:
    """ROWS random pairs written at step STEP, visible to every replica."""
    rng = np.random.default_rng(sum(map(ord, namespace)))
    ids = np.sort(rng.choice(2**40, ROWS, replace=False)).astype(np.uint64)
    image, text = random_pairs(rng, ROWS, DIM)
    api.upsert(ids, image, text, step=STEP)
    deployment.caught_up(namespace)
    return Stored(ids, image, text)


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def assert_same_answer(got: Neighbours, want: Neighbours) -> None:
    for name in ("ids", "scores", "steps", "unknown_anchor_ids"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert (got.size, got.served_by_follower, got.missing_shards) == (
        want.size,
        want.served_by_follower,
        want.missing_shards,
    )


def assert_like_reference(answer: Neighbours, want_ids, want_scores, deployment: Deployment, size: int) -> None:
    assert isinstance(answer, Neighbours)
    np.testing.assert_array_equal(answer.ids, want_ids)
    np.testing.assert_allclose(answer.scores, want_scores, rtol=1e-5, atol=1e-6)
    assert answer.ids.dtype == np.int64 and answer.scores.dtype == np.float32 and answer.steps.dtype == np.uint64
    assert (answer.steps[answer.ids >= 0] == STEP).all() and (answer.steps[answer.ids < 0] == 0).all()
    assert answer.size == size and answer.missing_shards == ()
    assert answer.served_by_follower == bool(deployment.followers)  # reads go to the followers


def test_every_client_is_a_miner_api_bound_to_its_namespace(api, namespace):
    assert isinstance(api, MinerApi)
    assert api.namespace == namespace
    assert api.wait_ready(5) is None
    request = api.upsert_request([1, 2], np.ones((2, DIM)), np.ones((2, DIM)), step=3)
    assert isinstance(request, pb.UpsertRequest) and request.namespace == namespace and list(request.ids) == [1, 2]


def test_writes_and_stats_reply_with_one_miners_messages(api, deployment, namespace):
    rng = np.random.default_rng(1)
    ids = np.sort(rng.choice(2**40, 60, replace=False)).astype(np.uint64)
    image, text = random_pairs(rng, 60, DIM)

    reply = api.upsert(ids[:40], image[:40], text[:40], step=2)
    assert isinstance(reply, pb.UpsertReply) and (reply.accepted, reply.size) == (40, 40)
    reply = api.upsert(ids[30:40], image[30:40], text[30:40], step=3)  # overwrites: accepted, not new
    assert (reply.accepted, reply.size) == (10, 40)
    requests = [api.upsert_request(ids[i : i + 7], image[i : i + 7], text[i : i + 7], step=4) for i in range(40, 60, 7)]
    reply = api.upsert_stream(requests)
    assert isinstance(reply, pb.UpsertReply) and (reply.accepted, reply.size) == (20, 60)

    stats = api.stats()
    assert isinstance(stats, pb.StatsReply)
    assert (stats.size, stats.dim, stats.namespace, stats.min_step, stats.max_step) == (60, DIM, namespace, 2, 4)
    assert (stats.shard_index, stats.shard_count, stats.max_k) == (0, 1, MAX_K)
    assert any(info.name == namespace and info.rows == 60 for info in stats.namespaces)
    size = api.size()
    assert type(size) is int and size == 60

    reply = api.delete(np.concatenate([ids[:10], [2**41]]))  # an id never stored is not counted
    assert isinstance(reply, pb.DeleteReply) and (reply.deleted, reply.size) == (10, 50)
    assert api.size() == 50
    deployment.caught_up(namespace)
    assert not api.fetch_rows(ids[:10]).found.any() and api.fetch_rows(ids[10:]).found.all()


def test_fetch_rows_answers_in_request_order_with_one_miners_types(api, stored):
    wanted = np.array([stored.ids[5], 2**41, stored.ids[200], stored.ids[0], 2**41 + 1], dtype=np.uint64)
    rows = api.fetch_rows(wanted)
    assert isinstance(rows, FetchedRows)
    assert rows.found.dtype == bool and rows.found.tolist() == [True, False, True, True, False]
    assert rows.ids.dtype == np.uint64 and rows.ids.tolist() == wanted[rows.found].tolist()
    at = stored.positions(rows.ids)
    for got, want in ((rows.image, stored.image[at]), (rows.text, stored.text[at])):
        assert got.dtype == np.float32 and got.shape == (3, DIM)
        np.testing.assert_array_equal(got, want)
    assert rows.steps.dtype == np.uint64 and rows.steps.tolist() == [STEP] * 3

    found, image, text = api.fetch(wanted)
    assert found.tolist() == rows.found.tolist() and image.shape == text.shape == (3, DIM)
    nothing = api.fetch_rows([2**41, 2**42])
    assert nothing.found.tolist() == [False, False] and nothing.ids.shape == (0,)
    assert nothing.image.shape == nothing.text.shape == (0, DIM) and nothing.steps.shape == (0,)


def test_namespaces_are_created_reset_and_dropped_as_on_one_miner(deployment, namespace):
    client = deployment.client(namespace)
    reply = client.ensure_namespace(DIM, fingerprint="data-v1")
    assert isinstance(reply, pb.EnsureNamespaceReply) and reply.created
    assert (reply.info.name, reply.info.dim, reply.info.rows, reply.info.fingerprint) == (namespace, DIM, 0, "data-v1")
    image, text = random_pairs(np.random.default_rng(2), 3, DIM)
    # Readable at once, though a follower may not know of it yet.
    answer = client.mine(2, image=image[:1], text=text[:1])
    assert answer.ids.tolist() == [[-1, -1]] and answer.size == 0
    assert client.fetch_rows([11]).found.tolist() == [False]
    # One row lands on one shard only; the namespace is every shard's all the same.
    assert client.upsert([11], image[:1], text[:1], step=1).size == 1
    assert client.stats().size == 1
    reply = client.ensure_namespace(DIM)
    assert not reply.created and (reply.info.rows, reply.info.fingerprint) == (1, "data-v1")
    error = refusal(lambda: client.ensure_namespace(DIM + 1))
    assert (error.code(), refused_field(error)) == (grpc.StatusCode.FAILED_PRECONDITION, "dim")

    reply = client.ensure_namespace(DIM, reset=True)
    assert reply.created and reply.info.rows == 0 and client.size() == 0
    client.upsert([21, 22], image[1:], text[1:], step=2)
    reply = client.drop_namespace()
    assert isinstance(reply, pb.DropNamespaceReply) and reply.dropped_rows == 2
    deployment.caught_up(namespace)
    for call in (client.drop_namespace, client.stats, lambda: client.mine(3, anchor_ids=[21])):
        error = refusal(call)
        assert (error.code(), refused_field(error)) == (grpc.StatusCode.NOT_FOUND, "namespace")
    client.close()


def test_a_first_write_of_one_row_creates_the_namespace_for_every_read(deployment, namespace):
    client = deployment.client(namespace)
    image, text = random_pairs(np.random.default_rng(3), 2, DIM)
    assert client.upsert([5], image[:1], text[:1], step=STEP).size == 1
    deployment.caught_up(namespace)
    answer = client.mine(4, image=image[1:], text=text[1:])
    want_ids, want_scores = reference_mine({5: (image[0], text[0])}, image[1:], text[1:], 4)
    assert_like_reference(answer, want_ids, want_scores, deployment, size=1)
    assert client.fetch_rows([5]).found.tolist() == [True] and client.stats().size == 1
    assert client.drop_namespace().dropped_rows == 1
    client.close()


@pytest.mark.parametrize("scoring", SCORINGS.values(), ids=SCORINGS.keys())
def test_mine_equals_the_reference_by_id_and_by_embedding(api, deployment, stored, scoring):
    rng = np.random.default_rng(scoring)
    anchors = stored.ids[rng.choice(ROWS, 12, replace=False)]
    at = stored.positions(anchors)
    q_image, q_text, self_ids = stored.image[at], stored.text[at], anchors.astype(np.int64)
    exclude = stored.ids[rng.choice(ROWS, 30, replace=False)]

    answer = api.mine(10, anchor_ids=anchors, exclude_ids=exclude, scoring=scoring)
    want = reference_mine(stored.rows(), q_image, q_text, 10, scoring, self_ids=self_ids, exclude=exclude)
    assert_like_reference(answer, *want, deployment, size=ROWS)
    assert answer.unknown_anchor_ids.size == 0
    query = MineQuery(10, anchor_ids=anchors, exclude_ids=exclude, scoring=scoring)
    assert_same_answer(api.mine_query(query), answer)

    r_image, r_text = random_pairs(rng, 5, DIM)
    answer = api.mine(7, image=r_image, text=r_text, exclude_ids=exclude, max_similarity=0.9, scoring=scoring)
    want = reference_mine(stored.rows(), r_image, r_text, 7, scoring, cut=0.9, exclude=exclude)
    assert_like_reference(answer, *want, deployment, size=ROWS)
    query = MineQuery(7, image=r_image, text=r_text, exclude_ids=exclude, max_similarity=0.9, scoring=scoring)
    assert_same_answer(api.mine_query(query), answer)

    # Anchors by embedding whose ids are known: each is not its own neighbour.
    answer = api.mine(6, anchor_ids=anchors, image=q_image, text=q_text, scoring=scoring)
    want = reference_mine(stored.rows(), q_image, q_text, 6, scoring, self_ids=self_ids)
    assert_like_reference(answer, *want, deployment, size=ROWS)


@pytest.mark.parametrize("ratio", [0.9, 0.5])
def test_the_false_negative_guard_equals_the_reference_on_every_client(api, deployment, stored, ratio):
    rng = np.random.default_rng(int(ratio * 10))
    anchors = stored.ids[rng.choice(ROWS, 12, replace=False)]
    at = stored.positions(anchors)
    answer = api.mine(10, anchor_ids=anchors, positive_ratio=ratio)
    want = reference_mine(
        stored.rows(), stored.image[at], stored.text[at], 10, self_ids=anchors.astype(np.int64), positive_ratio=ratio
    )
    assert_like_reference(answer, *want, deployment, size=ROWS)
    # Stored pairs as anchors by embedding, without their ids and without the near-duplicate cut: each anchor's own
    # row is its best candidate, and its caption fits the anchor exactly as well as its own pair does, so the guard
    # (not the cut) drops it: at least one drop per anchor, on every client.
    query = MineQuery(7, image=stored.image[at[:5]], text=stored.text[at[:5]], max_similarity=2.0, positive_ratio=ratio)
    answer = api.mine_query(query)
    want = reference_mine(stored.rows(), stored.image[at[:5]], stored.text[at[:5]], 7, cut=2.0, positive_ratio=ratio)
    assert_like_reference(answer, *want, deployment, size=ROWS)
    assert (answer.ids != anchors[:5, None].astype(np.int64)).all() and answer.guard_dropped >= 5


def test_unknown_anchor_ids_get_padding_rows_or_not_found_when_strict(api, deployment, stored):
    unknown = np.array([2**41 + 3, 2**41 + 1], dtype=np.uint64)
    anchors = np.array([stored.ids[3], unknown[0], stored.ids[100], unknown[1]], dtype=np.uint64)
    answer = api.mine(5, anchor_ids=anchors)
    known = np.array([True, False, True, False])
    at = stored.positions(anchors[known])
    want_ids, want_scores = reference_mine(
        stored.rows(), stored.image[at], stored.text[at], 5, self_ids=anchors[known].astype(np.int64)
    )
    assert answer.ids.shape == (4, 5) and (answer.ids[~known] == -1).all() and np.isneginf(answer.scores[~known]).all()
    np.testing.assert_array_equal(answer.ids[known], want_ids)
    assert answer.unknown_anchor_ids.dtype == np.uint64 and answer.unknown_anchor_ids.tolist() == unknown.tolist()

    nobody = api.mine(5, anchor_ids=unknown)  # not one anchor known: still one miner's answer
    assert nobody.ids.tolist() == [[-1] * 5] * 2 and nobody.unknown_anchor_ids.tolist() == unknown.tolist()
    assert nobody.size == ROWS and nobody.served_by_follower == bool(deployment.followers)

    for strict_anchors in (anchors, unknown):
        error = refusal(lambda a=strict_anchors: api.mine(5, anchor_ids=a, strict_anchors=True))
        assert (error.code(), refused_field(error)) == (grpc.StatusCode.NOT_FOUND, "anchor_ids")
        assert error.details() == f"anchor_ids: 2 anchor ids are not stored, e.g. {unknown.tolist()}"


INVALID = grpc.StatusCode.INVALID_ARGUMENT
WRONG_DIM = np.ones((2, DIM // 2), np.float32)
FOUR_ROWS = np.ones((4, DIM), np.float32)
# name: (call on a client holding `stored`, the field named, the message after "field: ")
BAD_INPUT = {
    "k 0": (lambda api, s: api.mine(0, anchor_ids=s.ids[:2]), "k", f"must be in 1..{MAX_K}, got 0"),
    "k above max_k": (
        lambda api, s: api.mine(MAX_K + 1, image=FOUR_ROWS, text=FOUR_ROWS),
        "k",
        f"must be in 1..{MAX_K}, got {MAX_K + 1}",
    ),
    "k 0, no anchor known": (lambda api, s: api.mine(0, anchor_ids=[2**41]), "k", f"must be in 1..{MAX_K}, got 0"),
    "k 0, strict": (
        lambda api, s: api.mine(0, anchor_ids=[2**41], strict_anchors=True),
        "k",
        f"must be in 1..{MAX_K}, got 0",
    ),
    "wrong-dim anchors": (
        lambda api, s: api.mine(3, image=WRONG_DIM, text=WRONG_DIM),
        "image.shape",
        f"dim is {DIM // 2} but this miner stores dim {DIM}",
    ),
    "scoring": (lambda api, s: api.mine(3, anchor_ids=s.ids[:2], scoring=9), "scoring", "unknown scoring 9"),
    "max_similarity": (
        lambda api, s: api.mine(3, anchor_ids=s.ids[:2], max_similarity=-1.0),
        "max_similarity",
        "must be a finite value >= 0, got -1.0",
    ),
    "positive_ratio above 1": (
        lambda api, s: api.mine(3, anchor_ids=s.ids[:2], positive_ratio=1.5),
        "positive_ratio",
        "must be in (0, 1], or 0 for no guard, got 1.5",
    ),
    "negative positive_ratio": (
        lambda api, s: api.mine(3, anchor_ids=s.ids[:2], positive_ratio=-0.5),
        "positive_ratio",
        "must be in (0, 1], or 0 for no guard, got -0.5",
    ),
    "no anchors": (
        lambda api, s: api.mine(3, anchor_ids=[]),
        "anchor_ids",
        "empty: give anchor_ids or anchor embeddings (image, text)",
    ),
    "wrong-dim upsert": (
        lambda api, s: api.upsert(s.ids[:2], WRONG_DIM, WRONG_DIM),
        "image.shape",
        f"dim is {DIM // 2} but this miner stores dim {DIM}",
    ),
    "rows for other ids": (
        lambda api, s: api.upsert(s.ids[:5], FOUR_ROWS, FOUR_ROWS),
        "image.shape",
        "has 4 rows for 5 ids",
    ),
    "empty upsert": (
        lambda api, s: api.upsert([], np.zeros((0, DIM)), np.zeros((0, DIM))),
        "ids",
        "empty: an upsert needs at least one id",
    ),
    "empty delete": (lambda api, s: api.delete([]), "ids", "empty: a delete needs at least one id"),
    "empty fetch": (lambda api, s: api.fetch_rows([]), "ids", "empty: a fetch needs at least one id"),
}


@pytest.mark.parametrize("case", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_refused_naming_the_field_and_changes_nothing(api, deployment, namespace, stored, case):
    call, field_name, message = case
    error = refusal(lambda: call(api, stored))
    assert (error.code(), refused_field(error), error.details()) == (INVALID, field_name, f"{field_name}: {message}")
    deployment.caught_up(namespace)
    assert api.size() == ROWS and api.fetch_rows(stored.ids).found.all()
