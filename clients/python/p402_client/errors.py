"""The client's typed errors, and the one mapping from gRPC failures to them.

Every error the client raises on purpose is a `P402Error` carrying the gRPC status
`code` (a `grpc.StatusCode`, or None for errors raised before any call), the
`reason` and the `field` the server put in its `google.rpc.ErrorInfo` detail, and the
server's `message`. Bad arguments caught in the client itself raise the same
`InvalidArgument` the server would, naming the same field.
"""
from __future__ import annotations

from typing import Any

import grpc

ERROR_DOMAIN = "p402.dev"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class P402Error(Exception):
    """Base of every error the P402 client raises on purpose."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None,
                 reason: str = "", field: str = "",
                 metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.field = field
        self.metadata = dict(metadata or {})

    def __str__(self) -> str:
        code = f"{self.code.name}: " if self.code is not None else ""
        return f"{code}{self.message}"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(code={self.code.name if self.code else None}, "
                f"reason={self.reason!r}, field={self.field!r}, message={self.message!r})")


class InvalidArgument(P402Error, ValueError):
    """Bad input; `field` names it ("owners.customer", "usage.input_tokens", …)."""

    def __init__(self, field: str, message: str, **kw: Any):
        kw.setdefault("code", grpc.StatusCode.INVALID_ARGUMENT)
        kw.setdefault("reason", "INVALID_ARGUMENT")
        super().__init__(message if field in message else f"{field}: {message}",
                         field=field, **kw)


class Unauthenticated(P402Error):
    """The API key is missing, unknown or revoked."""


class PermissionDenied(P402Error):
    """The key is valid but lacks the scope this call needs."""


class NotFound(P402Error, LookupError):
    """A named thing (reservation, budget, rule, key) does not exist for this tenant."""


class FailedPrecondition(P402Error):
    """The request contradicts current state (e.g. a reservation already settled)."""


class ResourceExhausted(P402Error):
    """The server is at its concurrency cap (backpressure); retry later."""


class Unavailable(P402Error, ConnectionError):
    """The server cannot be reached (after the client's retries)."""


class DeadlineExceeded(P402Error, TimeoutError):
    """The call did not finish within its deadline (after the client's retries)."""


class Denied(P402Error):
    """Authorize answered DENY; raised by the metering helpers (`meter`, `wrap_openai`),
    never by `authorize()` itself, where a DENY is data.

    `authorization` is the full answer, `reasons` its stable reason codes
    (`budget.exceeded`, `policy.rate_limited`, …), `retry_after_ms` the server's hint
    on a rate-limit denial (0 otherwise).
    """

    def __init__(self, authorization: Any):
        self.authorization = authorization
        self.reasons: tuple[str, ...] = tuple(authorization.reasons)
        self.rule_ids: tuple[str, ...] = tuple(authorization.rule_ids)
        self.retry_after_ms: int = int(authorization.retry_after_ms)
        super().__init__(f"denied: {', '.join(self.reasons) or 'no reason given'}"
                         f" (model {authorization.model or '?'})",
                         reason=self.reasons[0] if self.reasons else "DENIED")


class BudgetDenied(Denied):
    """DENY because a budget cannot fit the call (`budget.exceeded` among the reasons)."""


class PolicyDenied(Denied):
    """DENY by a policy rule, a rate limit or an unpriced model (no budget reason)."""


def denial(authorization: Any) -> Denied:
    """The typed exception for a DENY: BudgetDenied when a budget refused, else
    PolicyDenied (a budget reason wins: raising the budget is what unblocks it)."""
    if any(r.startswith("budget.") for r in authorization.reasons):
        return BudgetDenied(authorization)
    return PolicyDenied(authorization)


class RecorderFull(ResourceExhausted):
    """The background recorder's bounded queue stayed full for its put timeout
    (fail-closed): the service is not keeping up or cannot be reached."""


_BY_CODE: dict[grpc.StatusCode, type[P402Error]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: FailedPrecondition,
    grpc.StatusCode.ABORTED: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def _error_info(trailing: Any) -> tuple[str, dict[str, str]]:
    """(reason, metadata) of the first ErrorInfo in the status details, if any.

    Parsed from the `grpc-status-details-bin` trailer directly (what
    grpcio-status's `rpc_status.from_call` does) so sync and aio errors share the
    code path; a malformed trailer is ignored rather than masking the real error.
    """
    if not trailing:
        return "", {}
    from google.rpc import error_details_pb2, status_pb2

    for key, value in trailing:
        if key != _STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # noqa: BLE001 - a bad trailer must not hide the error
            return "", {}
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return info.reason, dict(info.metadata)
    return "", {}


def from_rpc_error(err: grpc.RpcError) -> P402Error:
    """The typed P402Error for a failed call (sync `grpc.RpcError` or aio `AioRpcError`)."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    try:
        trailing = err.trailing_metadata()
    except Exception:  # noqa: BLE001
        trailing = None
    reason, meta = _error_info(trailing)
    field = meta.get("field", "")
    cls = _BY_CODE.get(code, P402Error)
    message = details or (code.name if code is not None else "unknown error")
    if cls is InvalidArgument:
        return InvalidArgument(field, message, code=code, reason=reason or code.name,
                               metadata=meta)
    return cls(message, code=code, reason=reason or (code.name if code else ""),
               field=field, metadata=meta)


__all__ = [
    "ERROR_DOMAIN",
    "P402Error",
    "InvalidArgument",
    "Unauthenticated",
    "PermissionDenied",
    "NotFound",
    "FailedPrecondition",
    "ResourceExhausted",
    "Unavailable",
    "DeadlineExceeded",
    "Denied",
    "BudgetDenied",
    "PolicyDenied",
    "RecorderFull",
    "denial",
    "from_rpc_error",
]
