"""Refusals on the wire: a status code, a message, and the request field at fault as a `google.rpc.BadRequest`
field violation (the standard rich error model), so a client reads the field without parsing the message."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


def refusal_status(code: grpc.StatusCode, message: str, field: str = "") -> grpc.Status:
    """A status for `context.abort_with_status`: `message`, plus a BadRequest naming `field` when there is one."""
    status = status_pb2.Status(code=code.value[0], message=message)
    if field:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[{"field": field, "description": message}]))
        status.details.append(detail)
    return rpc_status.to_status(status)


def refused_field(error: grpc.RpcError) -> str:
    """The request field a refusal names (its first BadRequest field violation), or "" when it names none."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # details that disagree with the code or message: no field to trust
        return ""
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            if bad_request.field_violations:
                return bad_request.field_violations[0].field
    return ""
