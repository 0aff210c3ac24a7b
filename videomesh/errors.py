"""Domain errors and the one table that maps them to gRPC status codes with rich details.

Domain code raises these; `serving.py`'s interceptor (and `abort_with`) turn them into a
google.rpc.Status carrying ErrorInfo, BadRequest field violations and RetryInfo, so clients
see a precise code and a message that says what to fix, never a Python traceback.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "videomesh.dev"


class VideomeshError(Exception):
    """Base class: a message for the user, a machine-readable reason, optional details."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        violations: list[tuple[str, str]] | None = None,
        retry_after: float | None = None,
        metadata: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        self.violations = list(violations or [])
        if field:
            self.violations.append((field, message))
        self.retry_after = retry_after
        self.metadata = dict(metadata or {})


class InvalidArgument(VideomeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class Unauthenticated(VideomeshError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(VideomeshError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class NotFound(VideomeshError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class ResourceExhausted(VideomeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class FailedPrecondition(VideomeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Unavailable(VideomeshError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class Cancelled(VideomeshError):
    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


class DeadlineExceeded(VideomeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class AlreadyExists(VideomeshError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


def _pack(msg) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def to_status(err: VideomeshError) -> grpc.Status:
    """Build the rich google.rpc.Status for an error."""
    details = [_pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata))]
    if err.violations:
        br = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in err.violations
            ]
        )
        details.append(_pack(br))
    if err.retry_after is not None:
        secs = max(0.0, float(err.retry_after))
        delay = duration_pb2.Duration(seconds=int(secs), nanos=int((secs % 1) * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=getattr(code_pb2, err.code.name), message=err.message, details=details)
    return rpc_status.to_status(status)


_BY_CODE: dict[grpc.StatusCode, type[VideomeshError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        ResourceExhausted,
        FailedPrecondition,
        Unavailable,
        Cancelled,
        DeadlineExceeded,
        AlreadyExists,
    )
}


def from_rpc_error(err: grpc.RpcError) -> VideomeshError:
    """Turn a downstream RpcError back into a domain error, keeping code, reason and details."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code, VideomeshError)
    out = cls(message or code.name)
    if cls is VideomeshError:
        out.code = code if code is not None else grpc.StatusCode.UNKNOWN
    info = details_of(err)
    if "reason" in info:
        out.reason = info["reason"]
    out.violations = info.get("violations", [])
    out.retry_after = info.get("retry_after")
    return out


def details_of(err: grpc.RpcError) -> dict:
    """Decode the rich details of an RpcError: reason, field violations, retry delay."""
    out: dict = {}
    try:
        status = rpc_status.from_call(err)
    except Exception:
        status = None
    if status is None:
        return out
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            out["reason"] = info.reason
            out["metadata"] = dict(info.metadata)
        elif d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            out["violations"] = [(v.field, v.description) for v in br.field_violations]
        elif d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            ri = error_details_pb2.RetryInfo()
            d.Unpack(ri)
            out["retry_after"] = ri.retry_delay.seconds + ri.retry_delay.nanos / 1e9
    return out
