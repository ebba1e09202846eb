import numpy as np
import pytest
import torch

from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.miner_service.core.errors import InvalidArgument
from helip.miner_service.service import validation


@pytest.mark.parametrize("wire_dtype", [pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16])
@pytest.mark.parametrize("rows,dim", [(0, 8), (1, 3), (300, 64)])
def test_upsert_bytes_are_the_serialised_message(wire_dtype, rows, dim):
    """The hand-joined Upsert bytes equal protobuf's own serialisation, byte for byte."""
    rng = np.random.default_rng(rows)
    client = MinerClient(ClientConfig(address="127.0.0.1:1", wire_dtype=wire_dtype))  # never connects
    ids = rng.choice(1 << 40, rows, replace=False).astype(np.uint64) * np.uint64(1 << 20)  # large ids too
    image = rng.standard_normal((rows, dim)).astype(np.float32)
    text = rng.standard_normal((rows, 2 * dim))[:, ::2]  # float64, not contiguous
    for step in (0, 7, 1 << 40):
        expected = client.upsert_request(ids, image, text, step).SerializeToString()
        assert client.upsert_request_bytes(ids, image, text, step) == expected
    half = torch.from_numpy(image).half()
    assert (
        client.upsert_request_bytes(ids, half, half, 1) == client.upsert_request(ids, half, half, 1).SerializeToString()
    )
    client.close()


def _upsert(ids: list[int]) -> pb.UpsertRequest:
    rows = pb.Tensor(shape=[len(ids), 2], dtype=pb.FLOAT32, data=np.zeros((len(ids), 2), np.float32).tobytes())
    return pb.UpsertRequest(ids=ids, image=rows, text=rows)


def test_duplicate_ids_refused_in_any_order():
    for ids in ([1, 2, 3, 4], [4, 3, 2, 1], [7, 1, 9, 2], [(1 << 63) - 1, 0]):
        assert validation.upsert_batch(_upsert(ids), 2, 100).ids.tolist() == ids
    for ids in ([1, 2, 2, 3], [3, 1, 2, 1]):
        with pytest.raises(InvalidArgument, match="duplicate ids"):
            validation.upsert_batch(_upsert(ids), 2, 100)
