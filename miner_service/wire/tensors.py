"""Tensor message <-> numpy, without copies where the bytes allow it.

The wire format is row-major little-endian (DESIGN §3). Decoding returns a read-only numpy view over the message
bytes when the dtype is float32/float16; bfloat16 is widened to float32 (numpy has no bfloat16).
"""

from __future__ import annotations

import numpy as np

from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.core.errors import InvalidArgument

_NUMPY_OF_DTYPE = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.BFLOAT16: np.dtype("<u2"),  # raw bits, widened below
}


def decode(tensor: pb.Tensor, field: str) -> np.ndarray:
    """Decode a Tensor into an array of its shape; raise InvalidArgument naming `field` on any mismatch."""
    if tensor.dtype not in _NUMPY_OF_DTYPE:
        name = pb.DType.Name(tensor.dtype) if tensor.dtype in pb.DType.values() else str(tensor.dtype)
        raise InvalidArgument(f"{field}.dtype", f"unsupported dtype {name}; use FLOAT32, FLOAT16 or BFLOAT16")
    shape = tuple(int(s) for s in tensor.shape)
    if len(shape) != 2:
        raise InvalidArgument(f"{field}.shape", f"expected 2 dimensions [rows, dim], got {list(shape)}")
    wire = _NUMPY_OF_DTYPE[tensor.dtype]
    expected = shape[0] * shape[1] * wire.itemsize
    if len(tensor.data) != expected:
        raise InvalidArgument(
            f"{field}.data",
            f"holds {len(tensor.data)} bytes but shape {list(shape)} of {pb.DType.Name(tensor.dtype)} needs {expected}",
        )
    array = np.frombuffer(tensor.data, dtype=wire).reshape(shape)
    if tensor.dtype == pb.BFLOAT16:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def encode(array, dtype: int = pb.FLOAT32) -> pb.Tensor:
    """Encode a 2-D numpy array or torch tensor (any float dtype) as a Tensor of `dtype`."""
    wire = _wire_array(array, dtype)
    return pb.Tensor(shape=list(wire.shape), dtype=dtype, data=wire.tobytes())


def encode_field(field_number: int, array, dtype: int = pb.FLOAT32) -> list:
    """The wire bytes of a Tensor that is field `field_number` of an enclosing message, as parts to join.

    Byte for byte what serialising the message with `encode(array, dtype)` in that field gives, but the payload is
    the array's own buffer, not a copy: building a protobuf message with a large `bytes` field and serialising it
    copies the payload three times (and each fresh 8 MiB buffer costs as much in page faults as the copy).
    The caller concatenates the parts, in field order, with the message's other fields (protobuf allows that).
    """
    wire = _wire_array(array, dtype)
    data = memoryview(wire.reshape(-1).view(np.uint8))
    head = pb.Tensor(shape=list(wire.shape), dtype=dtype).SerializeToString()
    if data.nbytes:  # proto3 leaves an empty bytes field out
        head += _key(_TENSOR_DATA_FIELD) + _varint(data.nbytes)
    return [_key(field_number) + _varint(len(head) + data.nbytes) + head, data]


_TENSOR_DATA_FIELD = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number


def _key(field_number: int) -> bytes:
    return _varint(field_number << 3 | 2)  # wire type 2: length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _wire_array(array, dtype: int) -> np.ndarray:
    """`array` as a C-contiguous 2-D array of the wire dtype's bits (a view when it already is one)."""
    array = _to_numpy(array)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {array.shape}")
    if dtype == pb.BFLOAT16:
        bits = np.ascontiguousarray(array, dtype="<f4").view(np.uint32)
        # Round to nearest even on the dropped 16 bits, as hardware bf16 conversion does.
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        return (rounded >> 16).astype("<u2")
    if dtype in _NUMPY_OF_DTYPE:
        return np.ascontiguousarray(array, dtype=_NUMPY_OF_DTYPE[dtype])
    raise ValueError(f"unsupported dtype {dtype}")


def _to_numpy(array) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    # torch tensors (kept optional here so the codec does not import torch): detach, move to host, and keep
    # half precision as it is, which makes FLOAT16 encoding a plain byte copy.
    if hasattr(array, "detach"):
        array = array.detach()
        if str(array.dtype) == "torch.bfloat16":
            array = array.float()
        return array.cpu().numpy()
    return np.asarray(array)
