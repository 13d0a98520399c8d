"""Executor domain errors, all expressed through :mod:`loraserve.errors`.

One place for the executor's failure vocabulary, so servicer code raises a named error and the
shared interceptor turns it into the gRPC status with ``google.rpc`` details:

- bad request fields            -> INVALID_ARGUMENT + BadRequest (``invalid``)
- unknown adapter / no READY    -> NOT_FOUND + ResourceInfo (``adapter_not_found``)
- queue full / no free slot     -> RESOURCE_EXHAUSTED + RetryInfo (``queue_full``, ``slots_busy``)
- registry unreachable, corrupt -> UNAVAILABLE (``fetch_failed``); the caller may retry
- deadline passed while waiting -> DEADLINE_EXCEEDED
- adapter does not fit the model -> FAILED_PRECONDITION (``adapter_incompatible``)
- model still loading            -> UNAVAILABLE (``warming_up``)
"""

from __future__ import annotations

from loraserve.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)


def invalid(violations: list[FieldViolation]) -> InvalidArgument:
    """One INVALID_ARGUMENT carrying every field violation found (not just the first)."""
    summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
    return InvalidArgument(f"invalid request: {summary}", violations)


def adapter_not_found(adapter_id: str, version: int, why: str = "") -> NotFound:
    name = f"{adapter_id}@{version}" if version else adapter_id
    message = f"adapter {name} not found" + (f" ({why})" if why else "")
    return NotFound(message, resource_type="adapter", resource_name=name)


def queue_full(depth: int, limit: int, retry_after_s: float) -> ResourceExhausted:
    return ResourceExhausted(
        f"executor queue is full ({depth}/{limit} requests waiting)",
        retry_after_s=retry_after_s,
        reason="QUEUE_FULL",
    )


def slots_busy(needed: int, total: int, retry_after_s: float) -> ResourceExhausted:
    return ResourceExhausted(
        f"no free adapter slot: {needed} needed, all {total} held by running requests or pinned",
        retry_after_s=retry_after_s,
        reason="ADAPTER_SLOTS_BUSY",
    )


def fetch_failed(adapter: str, why: str) -> Unavailable:
    return Unavailable(f"could not fetch adapter {adapter}: {why}", reason="ADAPTER_FETCH_FAILED")


def deadline_exceeded(stage: str) -> DeadlineExceeded:
    return DeadlineExceeded(f"deadline exceeded while {stage}")


def adapter_incompatible(adapter: str, why: str) -> FailedPrecondition:
    """The adapter's files parse but do not fit this executor's model (shape, rank, modules)."""
    return FailedPrecondition(
        f"adapter {adapter} cannot be served by this executor: {why}",
        reason="ADAPTER_INCOMPATIBLE",
    )


def warming_up(why: str) -> Unavailable:
    return Unavailable(f"executor not ready: {why}", reason="NOT_READY")
