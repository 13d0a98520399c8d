"""Domain errors and their one mapping to gRPC status codes with ``google.rpc`` details.

Servers raise these from servicer code; the error interceptor (``loraserve.server``) turns them
into a status with rich details. Clients turn an ``grpc.RpcError`` back into the same class with
:func:`from_rpc_error`, so callers of the SDK catch ``loraserve.errors.NotFound`` and friends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "loraserve.api.v1"


@dataclass(slots=True)
class FieldViolation:
    field: str
    description: str


class LoraserveError(Exception):
    """Base class: an error with a gRPC status code and optional structured details."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.message = message
        # ErrorInfo.reason: the code's name unless the raiser names something more specific.
        self.reason = reason or self.code.name
        self.metadata = dict(metadata or {})

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]

    def to_status(self) -> grpc.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        status.details.extend(self.details())
        return rpc_status.to_status(status)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(LoraserveError):
    """Bad input; carries ``BadRequest`` field violations."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, violations: list[FieldViolation] | None = None, **kw):
        super().__init__(message, **kw)
        self.violations = list(violations or [])

    @classmethod
    def field(cls, field_name: str, description: str) -> InvalidArgument:
        return cls(f"{field_name}: {description}", [FieldViolation(field_name, description)])

    def details(self) -> list[any_pb2.Any]:
        out = super().details()
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        return out + [packed]


class NotFound(LoraserveError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, message: str, *, resource_type: str = "", resource_name: str = "", **kw):
        super().__init__(message, **kw)
        self.resource_type = resource_type
        self.resource_name = resource_name

    def details(self) -> list[any_pb2.Any]:
        out = super().details()
        info = error_details_pb2.ResourceInfo(
            resource_type=self.resource_type,
            resource_name=self.resource_name,
            description=self.message,
        )
        packed = any_pb2.Any()
        packed.Pack(info)
        return out + [packed]


class AlreadyExists(LoraserveError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(LoraserveError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(LoraserveError):
    """Full (queue, slots, memory); carries ``RetryInfo`` with a suggested delay."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **kw):
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s

    def details(self) -> list[any_pb2.Any]:
        out = super().details()
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(self.retry_after_s * 1e9))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        return out + [packed]


class Unavailable(LoraserveError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(LoraserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(LoraserveError):
    code = grpc.StatusCode.CANCELLED


class Unauthenticated(LoraserveError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(LoraserveError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Internal(LoraserveError):
    code = grpc.StatusCode.INTERNAL


class Unimplemented(LoraserveError):
    code = grpc.StatusCode.UNIMPLEMENTED


_BY_CODE: dict[grpc.StatusCode, type[LoraserveError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Unauthenticated,
        PermissionDenied,
        Internal,
        Unimplemented,
    )
}


@dataclass(slots=True)
class RpcErrorInfo:
    """The structured details a client reads off a failed call."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    violations: list[FieldViolation] = field(default_factory=list)
    retry_after_s: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def parse_rpc_error(err: grpc.RpcError) -> RpcErrorInfo:
    """Read code, message and ``google.rpc`` details off a failed call (sync or aio)."""
    code = err.code()
    message = err.details() or ""
    info = RpcErrorInfo(code=code, message=message)
    status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
    if status is None:
        return info
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            info.violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            info.retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            ei = error_details_pb2.ErrorInfo()
            detail.Unpack(ei)
            info.reason = ei.reason
            info.metadata = dict(ei.metadata)
    return info


def from_rpc_error(err: grpc.RpcError) -> LoraserveError:
    """Turn a failed call into the matching domain error (for SDK callers)."""
    info = parse_rpc_error(err)
    cls = _BY_CODE.get(info.code, LoraserveError)
    if cls is InvalidArgument:
        out: LoraserveError = InvalidArgument(info.message, info.violations)
    elif cls is ResourceExhausted:
        out = ResourceExhausted(info.message, retry_after_s=info.retry_after_s or 1.0)
    else:
        out = cls(info.message)
        out.code = info.code
    if info.reason:
        out.reason = info.reason
    out.metadata = info.metadata
    return out


assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == code_pb2.INVALID_ARGUMENT
