"""Property-based fuzzing of the gRPC surface against one real miner process.

A hypothesis state machine sends random (often malformed) Upsert, UpsertStream, Mine, Delete and Fetch requests and
keeps a plain reference model of the rows (id -> image, text, step). After every call:
- the status is exactly the one the model predicts: OK, INVALID_ARGUMENT, NOT_FOUND or RESOURCE_EXHAUSTED, never
  INTERNAL or UNKNOWN, and the server process is still up;
- Stats (size, min_step, max_step) equals the model's;
- a successful Fetch returns the model's values bit for bit (rows are stored as float32, so FLOAT16 and BFLOAT16
  inputs come back as their exactly widened values), and a successful Mine returns only stored ids, never an
  excluded id or the anchor itself, with the scores of the brute-force reference (tests.reference).

One server (dim 8, max_k 16, max_rows 40) serves the whole module; each example starts by deleting every id of the
fixed id universe the machine draws from, so examples do not see each other's rows.
"""

from __future__ import annotations

import math
import warnings

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from helip.miner.v1 import miner_pb2 as pb
from helip.miner.v1 import miner_pb2_grpc as pb_grpc
from tests.conftest import start_miner
from tests.reference import reference_mine

DIM = 8
MAX_K = 16
MAX_ROWS = 40
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

# Small dense ids, plus the edges of the id map (dense table limit 2^28) and of int64 (the largest storable id).
STORABLE_IDS = [*range(48), 2**28 - 1, 2**28, 2**32, 2**63 - 1]
ID_UNIVERSE = [*STORABLE_IDS, 2**63, 2**64 - 1]
# Mostly distinct storable ids; sometimes duplicates and ids too large to store.
ids_strategy = st.lists(st.sampled_from(STORABLE_IDS), unique=True, max_size=12) | st.lists(
    st.sampled_from(ID_UNIVERSE), max_size=6
)
steps = st.sampled_from([0, 1, 2, 7, 2**32, 2**64 - 1])
WIRE = {pb.FLOAT32: "<f4", pb.FLOAT16: "<f2", pb.BFLOAT16: "<u2"}
# Mostly well formed, so that rows get stored and Mine has work; one tensor in four is corrupted.
CORRUPTIONS = ["none"] * 36 + [
    "wrong_dim",
    "short_data",
    "long_data",
    "shape_3d",
    "shape_1d",
    "dtype_unspecified",
    "dtype_unknown",
    "nan",
    "inf",
    "empty_message",
    "row_count",
]


class Reply:
    """The outcome of one call: its status code and, when OK, its reply message."""

    def __init__(self, code: grpc.StatusCode, message=None, details: str = ""):
        self.code, self.message, self.details = code, message, details


def call(rpc, request) -> Reply:
    try:
        return Reply(OK, rpc(request, timeout=20))
    except grpc.RpcError as error:
        return Reply(error.code(), details=error.details() or "")


def decoded(data: bytes, dtype: int, n: int) -> np.ndarray:
    """The float32 values the wire bytes mean (the contract's decoding, written independently of the server)."""
    wire = np.frombuffer(data, dtype=WIRE[dtype]).reshape(n, DIM)
    if dtype == pb.BFLOAT16:
        return (wire.astype(np.uint32) << 16).view(np.float32)
    return wire.astype(np.float32)


@st.composite
def tensor_specs(draw):
    return {
        "dtype": draw(st.sampled_from([pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16])),
        "corruption": draw(st.sampled_from(CORRUPTIONS)),
        # 1: unit rows; 1e3: unnormalised but fine; 1e5: overflows FLOAT16 to inf.
        "scale": draw(st.sampled_from([1.0, 1.0, 1.0, 1e-3, 1e3, 1e5])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def make_tensor(spec: dict, n: int) -> tuple[pb.Tensor, np.ndarray | None]:
    """A Tensor of n rows per `spec`, and the float32 rows the server must store (None: must be refused)."""
    rng = np.random.default_rng(spec["seed"])
    rows = rng.standard_normal((n, DIM)).astype(np.float32)
    rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-6)
    rows *= spec["scale"]
    dtype, corruption = spec["dtype"], spec["corruption"]
    if corruption == "nan" and n:
        rows[rng.integers(n), rng.integers(DIM)] = np.nan
    if corruption == "inf" and n:
        rows[rng.integers(n), rng.integers(DIM)] = -np.inf
    n_rows = n + 1 if corruption == "row_count" else n
    if corruption == "row_count":
        rows = np.vstack([rows, rows[:1] if n else np.zeros((1, DIM), np.float32)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # FLOAT16 overflow to inf is part of the test
        if dtype == pb.BFLOAT16:
            data = (np.ascontiguousarray(rows, dtype="<f4").view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            data = np.ascontiguousarray(rows, dtype=WIRE[dtype]).tobytes()
    shape = [n_rows, DIM]
    if corruption == "empty_message":
        return pb.Tensor(), None
    if corruption == "wrong_dim":
        shape = [n_rows * 2, DIM // 2]  # same byte count: only the dim is wrong
    elif corruption == "short_data":
        data = data[:-1]
    elif corruption == "long_data":
        data = data + b"\0\0"
    elif corruption == "shape_3d":
        shape = [n_rows, DIM, 1]
    elif corruption == "shape_1d":
        shape = [n_rows * DIM]
    tensor = pb.Tensor(shape=shape, dtype=dtype, data=data)
    if corruption == "dtype_unspecified":
        tensor.dtype = pb.DTYPE_UNSPECIFIED
    elif corruption == "dtype_unknown":
        tensor.dtype = 77  # proto3 enums are open: an unknown value reaches the server
    if corruption not in ("none", "nan", "inf") or not n:
        # Row-count and shape corruptions are refused; n == 0 with "none" is a valid empty tensor.
        valid = corruption == "none"
        return tensor, (decoded(data, dtype, n) if valid else None)
    values = decoded(data, dtype, n)
    return tensor, values


class Model:
    def __init__(self):
        self.rows: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}

    def new_rows(self, ids) -> int:
        return sum(1 for i in ids if i not in self.rows)

    def upsert_outcome(self, request: pb.UpsertRequest, image, text) -> grpc.StatusCode:
        """The status an upsert must get; image/text are the expected decoded rows (None: refused)."""
        ids = list(request.ids)
        if not ids or not request.HasField("image") or not request.HasField("text"):
            return INVALID
        if len(set(ids)) != len(ids) or image is None or text is None or max(ids) > 2**63 - 1:
            return INVALID  # ids above 2^63 - 1 could not come back in MineReply.neighbour_ids (int64)
        if not (np.isfinite(image).all() and np.isfinite(text).all()):
            return INVALID
        if len(self.rows) + self.new_rows(ids) > MAX_ROWS:
            return EXHAUSTED
        return OK

    def apply_upsert(self, request: pb.UpsertRequest, image, text) -> None:
        for j, i in enumerate(request.ids):
            self.rows[i] = (image[j], text[j], request.step)


class MinerMachine(RuleBasedStateMachine):
    stub: pb_grpc.MinerStub = None  # set by the fixture: one server for the module

    def __init__(self):
        super().__init__()
        self.model = Model()

    @initialize()
    def clean(self):
        reply = call(self.stub.Delete, pb.DeleteRequest(ids=ID_UNIVERSE))
        assert reply.code == OK, reply.details
        assert self.stub.Stats(pb.StatsRequest(), timeout=20).size == 0

    # ---- writes -------------------------------------------------------------------------------------------------
    def _upsert_request(self, ids, step, image_spec, text_spec, missing):
        image, image_rows = make_tensor(image_spec, len(ids))
        text, text_rows = make_tensor(text_spec, len(ids))
        request = pb.UpsertRequest(ids=ids, step=step)
        if missing != "image":
            request.image.CopyFrom(image)
        if missing != "text":
            request.text.CopyFrom(text)
        return request, image_rows, text_rows

    @rule(
        ids=ids_strategy,
        step=steps,
        image_spec=tensor_specs(),
        text_spec=tensor_specs(),
        missing=st.sampled_from([None] * 18 + ["image", "text"]),
    )
    def upsert(self, ids, step, image_spec, text_spec, missing):
        request, image, text = self._upsert_request(ids, step, image_spec, text_spec, missing)
        expected = self.model.upsert_outcome(request, image, text)
        reply = call(self.stub.Upsert, request)
        assert reply.code == expected, (reply.code, expected, reply.details)
        event(f"upsert {expected.name}")
        if expected == OK:
            self.model.apply_upsert(request, image, text)
            assert reply.message.accepted == len(ids)
            assert reply.message.size == len(self.model.rows)

    @rule(messages=st.lists(st.tuples(ids_strategy, steps, tensor_specs(), tensor_specs()), max_size=4))
    def upsert_stream(self, messages):
        requests, expected_code, applied = [], OK, 0
        model = self.model
        for ids, step, image_spec, text_spec in messages:
            request, image, text = self._upsert_request(ids, step, image_spec, text_spec, None)
            requests.append(request)
            if expected_code != OK:
                continue  # the stream stops at the first refused message
            expected_code = model.upsert_outcome(request, image, text)
            if expected_code == OK:
                model.apply_upsert(request, image, text)
                applied += len(ids)
        reply = call(self.stub.UpsertStream, iter(requests))
        assert reply.code == expected_code, (reply.code, expected_code, reply.details)
        if expected_code == OK:
            assert reply.message.accepted == applied
            assert reply.message.size == len(model.rows)

    @rule(ids=ids_strategy, repeat=st.booleans())
    def delete(self, ids, repeat):
        ids = ids + ids[:2] if repeat else ids  # an id named twice is deleted once
        reply = call(self.stub.Delete, pb.DeleteRequest(ids=ids))
        if not ids:
            assert reply.code == INVALID, reply.details
            return
        assert reply.code == OK, reply.details
        present = {i for i in ids if i in self.model.rows}
        for i in present:
            del self.model.rows[i]
        assert reply.message.deleted == len(present)
        assert reply.message.size == len(self.model.rows)

    # ---- reads --------------------------------------------------------------------------------------------------
    @rule(ids=ids_strategy, repeat=st.booleans())
    def fetch(self, ids, repeat):
        ids = ids + ids[:2] if repeat else ids
        reply = call(self.stub.Fetch, pb.FetchRequest(ids=ids))
        if not ids:
            assert reply.code == INVALID, reply.details
            return
        assert reply.code == OK, reply.details
        found = [i for i in ids if i in self.model.rows]
        assert list(reply.message.found_ids) == found
        assert list(reply.message.steps) == [self.model.rows[i][2] for i in found]
        for field, column in (("image", 0), ("text", 1)):
            tensor = getattr(reply.message, field)
            assert tensor.dtype == pb.FLOAT32 and list(tensor.shape) == [len(found), DIM]
            got = np.frombuffer(tensor.data, dtype="<f4").reshape(len(found), DIM)
            want = np.stack([self.model.rows[i][column] for i in found]) if found else np.zeros((0, DIM))
            np.testing.assert_array_equal(got, want)

    @rule(
        anchor_ids=ids_strategy,
        by=st.sampled_from(["id", "id", "id", "embedding", "embedding", "both", "neither"]),
        embedding_spec=tensor_specs(),
        n_embeddings=st.integers(0, 4),
        k=st.sampled_from([1, 3, 3, 5, 5, MAX_K, MAX_K, 0, MAX_K + 1, 2**32 - 1]),
        scoring=st.sampled_from([pb.SCORING_UNSPECIFIED, pb.PRODUCT, pb.SUM, pb.IMAGE, pb.TEXT] * 3 + [5, 99]),
        max_similarity=st.sampled_from([0.0, 0.0, 0.5, 0.9, 0.98, 1.0, 2.0] * 2 + [-0.25, math.nan, math.inf]),
        strict=st.booleans(),
        exclude_ids=ids_strategy,
    )
    def mine(self, anchor_ids, by, embedding_spec, n_embeddings, k, scoring, max_similarity, strict, exclude_ids):
        request = pb.MineRequest(
            k=k, scoring=scoring, max_similarity=max_similarity, strict_anchors=strict, exclude_ids=exclude_ids
        )
        q_image = q_text = None
        if by in ("id", "both"):
            request.anchor_ids.extend(anchor_ids)
        if by in ("embedding", "both"):
            if by == "both":
                n_embeddings = len(anchor_ids) if embedding_spec["seed"] % 4 else n_embeddings
            image, q_image = make_tensor(embedding_spec, n_embeddings)
            # The text tensor is well formed: a corruption of the image (row count included) must be refused.
            text, q_text = make_tensor(
                {**embedding_spec, "seed": embedding_spec["seed"] + 1, "corruption": "none"}, n_embeddings
            )
            request.image.CopyFrom(image)
            request.text.CopyFrom(text)
        expected = self._mine_outcome(request, by, q_image, q_text)
        reply = call(self.stub.Mine, request)
        assert reply.code == expected, (reply.code, expected, reply.details)
        event(f"mine {expected.name}")
        if expected == OK:
            self._check_neighbours(request, by, q_image, q_text, reply.message)

    def _mine_outcome(self, request, by, q_image, q_text) -> grpc.StatusCode:
        if not 1 <= request.k <= MAX_K or request.scoring not in (0, 1, 2, 3, 4):
            return INVALID
        if not math.isfinite(request.max_similarity) or request.max_similarity < 0:
            return INVALID
        if by == "neither" or (by == "id" and not request.anchor_ids):
            return INVALID
        if by in ("embedding", "both"):
            if q_image is None or q_text is None or len(q_image) == 0:
                return INVALID
            if not (np.isfinite(q_image).all() and np.isfinite(q_text).all()):
                return INVALID
            if by == "both" and request.anchor_ids and len(request.anchor_ids) != len(q_image):
                return INVALID
            return OK
        if request.strict_anchors and any(i not in self.model.rows for i in request.anchor_ids):
            return NOT_FOUND
        return OK

    def _check_neighbours(self, request, by, q_image, q_text, reply):
        rows = self.model.rows
        k = request.k
        n_anchors = len(q_image) if by in ("embedding", "both") else len(request.anchor_ids)
        ids = np.array(reply.neighbour_ids, dtype=np.int64).reshape(n_anchors, k)
        scores = np.array(reply.scores, dtype=np.float32).reshape(n_anchors, k)
        assert reply.k == k and reply.size == len(rows)
        assert len(reply.neighbour_steps) == n_anchors * k
        padding = ids == -1
        assert np.isneginf(scores[padding]).all()
        returned = set(ids[~padding].tolist())
        assert returned <= set(rows), f"ids not stored: {returned - set(rows)}"
        assert not returned & set(request.exclude_ids)
        self_ids = list(request.anchor_ids) if request.anchor_ids else None
        if by == "id":
            unknown = [i for i in request.anchor_ids if i not in rows]
            assert list(reply.unknown_anchor_ids) == unknown
            known = [a for a, i in enumerate(request.anchor_ids) if i in rows]
            assert padding[[a for a in range(n_anchors) if a not in known]].all()
            q_image = np.stack([rows[request.anchor_ids[a]][0] for a in known]) if known else np.zeros((0, DIM))
            q_text = np.stack([rows[request.anchor_ids[a]][1] for a in known]) if known else np.zeros((0, DIM))
            self_ids = [request.anchor_ids[a] for a in known]
            ids, scores = ids[known], scores[known]
        for a, row in enumerate(ids.tolist()):
            if self_ids is not None:
                assert self_ids[a] not in row, "an anchor's own row came back"
            assert len(set(i for i in row if i >= 0)) == sum(1 for i in row if i >= 0), "an id came back twice"
        largest = max(
            [np.abs(v[j]).max() for v in rows.values() for j in (0, 1)]
            + [np.abs(q_image).max(initial=0), np.abs(q_text).max(initial=0)]
        )
        if not rows or not len(q_image) or largest > 10:
            return  # unnormalised rows: float32 and the float64 reference may round differently; structure only
        event("mine compared with the reference")
        cut = request.max_similarity or 0.98
        want_ids, want_scores = reference_mine(
            {i: v[:2] for i, v in rows.items()},
            q_image,
            q_text,
            k,
            request.scoring or pb.PRODUCT,
            cut,
            self_ids=self_ids,
            exclude=[i for i in request.exclude_ids if i in rows],
        )
        # Ties may order differently; the scores, and which anchors have how many neighbours, may not.
        np.testing.assert_array_equal(ids >= 0, want_ids >= 0)
        np.testing.assert_allclose(
            np.where(ids >= 0, scores, 0), np.where(want_ids >= 0, want_scores, 0), rtol=1e-4, atol=1e-4
        )

    # ---- after every step ---------------------------------------------------------------------------------------
    @invariant()
    def stats_agree(self):
        stats = self.stub.Stats(pb.StatsRequest(), timeout=20)
        steps_stored = [v[2] for v in self.model.rows.values()]
        assert stats.size == len(self.model.rows)
        assert stats.min_step == (min(steps_stored) if steps_stored else 0)
        assert stats.max_step == (max(steps_stored) if steps_stored else 0)
        assert stats.dim == DIM and stats.max_rows == MAX_ROWS


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    miner = start_miner(
        tmp_path_factory.mktemp("fuzz-miner"),
        "--dim",
        str(DIM),
        "--max-k",
        str(MAX_K),
        "--max-rows",
        str(MAX_ROWS),
        "--device",
        "cpu",
    )
    channel = grpc.insecure_channel(miner.address)
    grpc.channel_ready_future(channel).result(timeout=30)
    yield miner, pb_grpc.MinerStub(channel)
    channel.close()
    assert miner.stop() == 0, miner.log()


def test_fuzz_grpc_surface(fuzz_server):
    miner, stub = fuzz_server
    MinerMachine.stub = stub
    run = settings(
        max_examples=75,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )(MinerMachine)
    try:
        run.TestCase().runTest()
    finally:
        assert miner.process.poll() is None, f"the miner died:\n{miner.log()[-4000:]}"
    assert "Traceback" not in miner.log(), miner.log()[-4000:]


# ---- what the fuzzer found, pinned as plain cases -------------------------------------------------------------
def _clean_stub(fuzz_server):
    _, stub = fuzz_server
    assert call(stub.Delete, pb.DeleteRequest(ids=ID_UNIVERSE)).code == OK
    return stub


def _upsert(stub, ids, seed=0):
    image, rows = make_tensor({"dtype": pb.FLOAT32, "corruption": "none", "scale": 1.0, "seed": seed}, len(ids))
    return call(stub.Upsert, pb.UpsertRequest(ids=ids, image=image, text=image, step=1)), rows


def test_mine_by_embedding_on_an_empty_store_is_padding(fuzz_server):
    stub = _clean_stub(fuzz_server)
    image, _ = make_tensor({"dtype": pb.FLOAT32, "corruption": "none", "scale": 1.0, "seed": 0}, 2)
    reply = call(stub.Mine, pb.MineRequest(image=image, text=image, k=3))
    assert reply.code == OK, reply.details  # was INTERNAL (IndexError gathering ids from an empty store)
    assert list(reply.message.neighbour_ids) == [-1] * 6 and reply.message.size == 0


def test_an_id_named_twice_in_delete_deletes_one_row(fuzz_server):
    stub = _clean_stub(fuzz_server)
    assert _upsert(stub, [0, 1, 2, 3, 4])[0].code == OK
    reply = call(stub.Delete, pb.DeleteRequest(ids=[1, 1]))
    assert reply.code == OK and reply.message.deleted == 1  # was 2, and row 4 (moved into slot 1) was gone
    assert list(call(stub.Fetch, pb.FetchRequest(ids=[0, 1, 2, 3, 4])).message.found_ids) == [0, 2, 3, 4]


def test_ids_that_do_not_fit_int64_are_refused(fuzz_server):
    stub = _clean_stub(fuzz_server)
    for too_large in (2**63, 2**64 - 1):  # would come back from Mine as negative ids (2^64 - 1 as -1, padding)
        reply, _ = _upsert(stub, [3, too_large])
        assert reply.code == INVALID and reply.details.startswith("ids"), reply.details
    assert _upsert(stub, [3, 2**63 - 1])[0].code == OK
    reply = call(stub.Mine, pb.MineRequest(anchor_ids=[3], k=1, max_similarity=2.0))
    assert list(reply.message.neighbour_ids) == [2**63 - 1]
