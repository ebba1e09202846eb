"""Every kind of bad input gets its status code and a message naming the field; the server keeps its rows."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.miner_service.wire.tensors import encode
from tests.reference import random_pairs

DIM = 16
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def setup(shared_miner):
    client = MinerClient(ClientConfig(address=shared_miner.address, wire_dtype=pb.FLOAT32, retries=0))
    client.wait_ready(30)
    image, text = random_pairs(np.random.default_rng(3), 40, DIM)
    client.upsert(np.arange(1000, 1040), image, text, step=3)
    baseline = client.mine(5, anchor_ids=[1000, 1001])
    yield client, baseline
    client.close()


def good_tensor(n=2, dim=DIM, dtype=pb.FLOAT32):
    image, _ = random_pairs(np.random.default_rng(0), n, dim)
    return encode(image, dtype)


def tensor_with(**changes):
    t = good_tensor()
    for key, value in changes.items():
        if key == "shape":
            del t.shape[:]
            t.shape.extend(value)
        else:
            setattr(t, key, value)
    return t


def nan_tensor():
    image, _ = random_pairs(np.random.default_rng(0), 2, DIM)
    image[1, 3] = np.nan
    return encode(image)


def inf_tensor():
    image, _ = random_pairs(np.random.default_rng(0), 2, DIM)
    image[0, 0] = np.inf
    return encode(image)


BAD_UPSERTS = {
    "wrong dim": (
        pb.UpsertRequest(ids=[1, 2], image=good_tensor(dim=8), text=good_tensor(dim=8)),
        INVALID,
        "image.shape",
    ),
    "bytes vs shape": (
        pb.UpsertRequest(ids=[1, 2], image=tensor_with(data=b"\0" * 10), text=good_tensor()),
        INVALID,
        "image.data",
    ),
    "3-d shape": (
        pb.UpsertRequest(ids=[1, 2], image=tensor_with(shape=[2, DIM, 1]), text=good_tensor()),
        INVALID,
        "image.shape",
    ),
    "ids vs rows": (pb.UpsertRequest(ids=[1, 2, 3], image=good_tensor(), text=good_tensor()), INVALID, "image.shape"),
    "text rows": (pb.UpsertRequest(ids=[1, 2], image=good_tensor(), text=good_tensor(n=3)), INVALID, "text.shape"),
    "nan": (pb.UpsertRequest(ids=[1, 2], image=nan_tensor(), text=good_tensor()), INVALID, "image.data"),
    "inf": (pb.UpsertRequest(ids=[1, 2], image=good_tensor(), text=inf_tensor()), INVALID, "text.data"),
    "duplicate ids": (pb.UpsertRequest(ids=[7, 7], image=good_tensor(), text=good_tensor()), INVALID, "ids"),
    "unspecified dtype": (
        pb.UpsertRequest(ids=[1, 2], image=tensor_with(dtype=pb.DTYPE_UNSPECIFIED), text=good_tensor()),
        INVALID,
        "image.dtype",
    ),
    "unknown dtype": (
        pb.UpsertRequest(ids=[1, 2], image=tensor_with(dtype=99), text=good_tensor()),
        INVALID,
        "image.dtype",
    ),
    "empty": (pb.UpsertRequest(), INVALID, "ids"),
    "missing text": (pb.UpsertRequest(ids=[1, 2], image=good_tensor()), INVALID, "text"),
}

BAD_MINES = {
    "k = 0": (pb.MineRequest(anchor_ids=[1000], k=0), INVALID, "k"),
    "k above limit": (pb.MineRequest(anchor_ids=[1000], k=65), INVALID, "k"),
    "no anchors": (pb.MineRequest(k=3), INVALID, "anchor_ids"),
    "ids vs embeddings": (
        pb.MineRequest(k=3, anchor_ids=[1000], image=good_tensor(), text=good_tensor()),
        INVALID,
        "anchor_ids",
    ),
    "image without text": (pb.MineRequest(k=3, image=good_tensor()), INVALID, "text"),
    "anchor wrong dim": (
        pb.MineRequest(k=3, image=good_tensor(dim=4), text=good_tensor(dim=4)),
        INVALID,
        "image.shape",
    ),
    "anchor nan": (pb.MineRequest(k=3, image=nan_tensor(), text=good_tensor()), INVALID, "image.data"),
    "unknown scoring": (pb.MineRequest(k=3, anchor_ids=[1000], scoring=9), INVALID, "scoring"),
    "negative cut": (pb.MineRequest(k=3, anchor_ids=[1000], max_similarity=-0.5), INVALID, "max_similarity"),
    "nan cut": (pb.MineRequest(k=3, anchor_ids=[1000], max_similarity=float("nan")), INVALID, "max_similarity"),
    "strict unknown anchors": (
        pb.MineRequest(k=3, anchor_ids=[1000, 987654], strict_anchors=True),
        grpc.StatusCode.NOT_FOUND,
        "anchor_ids",
    ),
}


def assert_intact(client, baseline):
    stats = client.stats()
    assert stats.size >= 40
    again = client.mine(5, anchor_ids=[1000, 1001])
    np.testing.assert_array_equal(again.ids, baseline.ids)
    np.testing.assert_allclose(again.scores, baseline.scores)


@pytest.mark.parametrize("case", sorted(BAD_UPSERTS))
def test_bad_upsert(setup, case):
    client, baseline = setup
    request, code, field = BAD_UPSERTS[case]
    size_before = client.stats().size
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.Upsert(request, timeout=10)
    assert caught.value.code() == code
    assert caught.value.details().startswith(field), caught.value.details()
    assert client.stats().size == size_before
    assert_intact(client, baseline)


@pytest.mark.parametrize("case", sorted(BAD_MINES))
def test_bad_mine(setup, case):
    client, baseline = setup
    request, code, field = BAD_MINES[case]
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.Mine(request, timeout=10)
    assert caught.value.code() == code
    assert caught.value.details().startswith(field), caught.value.details()
    assert_intact(client, baseline)


def test_unknown_anchor_ids_are_padded_and_listed(setup):
    client, baseline = setup
    got = client.mine(5, anchor_ids=[1000, 987654, 1001])
    assert got.unknown_anchor_ids.tolist() == [987654]
    assert (got.ids[1] == -1).all() and np.isneginf(got.scores[1]).all()
    np.testing.assert_array_equal(got.ids[[0, 2]], baseline.ids)


def test_empty_delete_and_unknown_delete(setup):
    client, baseline = setup
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.Delete(pb.DeleteRequest(), timeout=10)
    assert caught.value.code() == INVALID and caught.value.details().startswith("ids")
    assert client.delete([555555]).deleted == 0
    assert_intact(client, baseline)


def test_oversize_message_is_refused(setup):
    client, baseline = setup
    # 70 MiB of payload: over the server's 64 MiB limit (the client allows it, to reach the server).
    n = 70 * 1024 * 1024 // (4 * DIM)
    big = pb.Tensor(shape=[n, DIM], dtype=pb.FLOAT32, data=b"\0" * (n * DIM * 4))
    channel = grpc.insecure_channel(client.config.address, options=[("grpc.max_send_message_length", 256 << 20)])
    from helip.miner.v1 import miner_pb2_grpc

    with pytest.raises(grpc.RpcError) as caught:
        miner_pb2_grpc.MinerStub(channel).Upsert(pb.UpsertRequest(ids=[1], image=big, text=big), timeout=30)
    channel.close()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_intact(client, baseline)


def test_max_rows_is_resource_exhausted(miner_factory):
    miner = miner_factory("--dim", str(DIM), "--max-rows", "10")
    client = MinerClient(ClientConfig(address=miner.address, retries=0))
    client.wait_ready(30)
    image, text = random_pairs(np.random.default_rng(1), 12, DIM)
    client.upsert(np.arange(8), image[:8], text[:8])
    with pytest.raises(grpc.RpcError) as caught:
        client.upsert(np.arange(100, 104), image[:4], text[:4])
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_rows" in caught.value.details()
    assert client.stats().size == 8
    client.close()
