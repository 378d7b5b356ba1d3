"""The one mapping from exceptions to gRPC status codes (STYLE: "The wire contract").

Owns `ServiceError` (an error the service raises on purpose, already carrying its
code), `status_for(exc)` (any exception -> `grpc.Status` with a `google.rpc.Status`
holding a `google.rpc.ErrorInfo`: reason UPPER_SNAKE, domain "p402.dev", metadata
{"field": ...}) and the decorators `unary` / `streaming` that authenticate a call,
run a plain servicer method and turn whatever it raises into that status.

| raised                                  | code                | reason           |
|-----------------------------------------|---------------------|------------------|
| p402core.InvalidArgument (field)        | INVALID_ARGUMENT    | INVALID_ARGUMENT |
| p402core.UnknownModel (Record, admin)   | INVALID_ARGUMENT    | UNKNOWN_MODEL    |
| p402core.NotFound                       | NOT_FOUND           | NOT_FOUND        |
| p402core.Conflict                       | FAILED_PRECONDITION | CONFLICT         |
| ValueError from the store (page_token…) | INVALID_ARGUMENT    | INVALID_ARGUMENT |
| Overloaded                              | RESOURCE_EXHAUSTED  | OVERLOADED       |
| ServiceError                            | its own             | its own          |
| anything else                           | INTERNAL (logged)   | INTERNAL         |

In Authorize an unknown model is a DENY decision (data), never an error; only
Record and the admin calls raise it.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Callable

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from p402_server.observe import logs as _logs
from p402core import Conflict, InvalidArgument, NotFound, UnknownModel

log = logging.getLogger("p402.server")

DOMAIN = "p402.dev"

# Fields named in ValueError messages of the form "<field>: <message>" (the store's
# convention, same as p402core.InvalidArgument's str()).
_FIELD_PREFIX = re.compile(r"^([a-z_][a-z0-9_.\[\]]*):\s")


class ServiceError(Exception):
    """An error the service raises on purpose, with its status code and reason."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, *,
                 field: str = "", metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.field = field
        self.metadata = dict(metadata or {})


class Overloaded(ServiceError):
    """The server (or one of its queues) is at capacity: retry later."""

    def __init__(self, message: str = "server overloaded; retry later", **metadata: str):
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED", message,
                         metadata=metadata)


def invalid(field: str, message: str) -> InvalidArgument:
    """Shorthand used by the validators: bad input naming the field."""
    return InvalidArgument(field, message)


def unauthenticated(reason: str, message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, reason, message,
                        field="authorization")


def permission_denied(required: str, method: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING",
        f"{method} needs an API key with scope {required!r}",
        metadata={"required_scope": required, "method": method},
    )


def not_found(field: str, kind: str, ident: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, "NOT_FOUND",
                        f"{kind} {ident!r} not found", field=field,
                        metadata={"kind": kind, "id": ident})


# NotFound.kind (core and server) -> the request field that named it.
_KIND_FIELD = {
    "reservation": "reservation_id",
    "budget": "budget_id",
    "rule": "rule_id",
    "policy rule": "rule_id",
    "key": "key_id",
    "api key": "key_id",
    "tenant": "tenant",
}


def _error_for(exc: BaseException) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, InvalidArgument):
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT",
                            str(exc), field=exc.field)
    if isinstance(exc, UnknownModel):
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_MODEL",
                            f"model: {exc}", field="model",
                            metadata={"model": exc.model})
    if isinstance(exc, NotFound):
        field = _KIND_FIELD.get(exc.kind, exc.kind.replace(" ", "_") + "_id")
        return ServiceError(grpc.StatusCode.NOT_FOUND, "NOT_FOUND", str(exc),
                            field=field, metadata={"kind": exc.kind, "id": exc.ident})
    if isinstance(exc, Conflict):
        return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "CONFLICT", str(exc),
                            field=getattr(exc, "field", "") or "")
    if isinstance(exc, ValueError):
        field = getattr(exc, "field", "") or ""
        if not field:
            m = _FIELD_PREFIX.match(str(exc))
            field = m.group(1) if m else ""
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT",
                            str(exc), field=field)
    return ServiceError(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error")


def rpc_status_for(exc: BaseException) -> status_pb2.Status:
    """`exc` as a google.rpc.Status with an ErrorInfo detail (reason, field): what a
    failed call carries in its trailers, and what a stream answers in-band."""
    err = _error_for(exc)
    metadata = dict(err.metadata)
    if err.field:
        metadata["field"] = err.field
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=err.code.value[0], message=err.message, details=[detail])


def status_for(exc: BaseException) -> grpc.Status:
    """`exc` as a grpc.Status carrying google.rpc.Status + ErrorInfo details."""
    return rpc_status.to_status(rpc_status_for(exc))


def logged_status(exc: BaseException, method: str) -> grpc.Status:
    """The status `method` ends with for `exc`, logged as fits (an INTERNAL one with
    its traceback)."""
    status = status_for(exc)
    if status.code is grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=exc)
    elif log.isEnabledFor(logging.DEBUG):
        log.debug("%s -> %s: %s", method, status.code.name, status.details)
    return status


def fail(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    """Log as fits and set the status of `exc` on the call; the wrapper then returns
    and the call ends with it (a unary response is discarded for a status not OK).

    Not `context.abort`: it raises AbortError through grpc's own frames, and that
    exception's traceback ties the call's state (its request included, up to the
    64 MiB a message may hold) into reference cycles that only the cyclic collector
    frees, which a long-running process runs seldom (gc_policy.py). A refused call
    must be freed as soon as it ends, whatever a client sends. For the same reason
    the exception's traceback (and its chain's) goes once logged: a task that failed
    with it holds it, and its frames hold that task (`await task` re-raised it)."""
    status = logged_status(exc, method)
    _drop_tracebacks(exc)
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)


def _drop_tracebacks(exc: BaseException | None) -> None:
    for _ in range(16):  # a chain is short; the bound guards against a looped one
        if exc is None:
            return
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


class MalformedRequest:
    """Stands in for a request whose bytes are not a valid message.

    grpc.aio decodes a request before any servicer code runs, and a DecodeError
    there reaches the client as UNKNOWN with an ERROR traceback in the server's log
    (one per request: a bad client could flood it). `LenientRegistration` hands this
    marker to the servicer instead, and the wrappers below turn it into
    INVALID_ARGUMENT through the one mapping, like any other bad input.
    """

    __slots__ = ("error",)

    def __init__(self, error: str):
        self.error = error


def _malformed(request: MalformedRequest) -> InvalidArgument:
    return InvalidArgument("request", f"not a valid protobuf message ({request.error})")


def _lenient(deserializer: Callable) -> Callable:
    def decode(data: bytes):
        try:
            return deserializer(data)
        except DecodeError as exc:
            return MalformedRequest(str(exc) or "undecodable bytes")

    return decode


def _lenient_handler(handler):
    if handler is None or handler.request_deserializer is None:
        return handler
    return handler._replace(request_deserializer=_lenient(handler.request_deserializer))


class LenientRegistration:
    """Stands in for the server in the generated ``add_…Servicer_to_server``
    functions: the method handlers they register reach the server with a lenient
    request deserializer each (bytes that are not a message become a
    MalformedRequest).

    Done once, at registration, rather than by a server interceptor: an
    interceptor puts a coroutine and gRPC's handler lookup chain (a closure that
    refers to itself: a reference cycle per call) in front of every call.
    """

    def __init__(self, server):
        self._server = server

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self._server.add_registered_method_handlers(
            service, {name: _lenient_handler(h) for name, h in handlers.items()})

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(tuple(_LenientGeneric(h) for h in handlers))


class _LenientGeneric(grpc.GenericRpcHandler):
    """A generic handler's answers with lenient deserializers (built once a method)."""

    def __init__(self, inner):
        self._inner = inner
        self._handlers: dict = {}

    def service(self, handler_call_details):
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        cached = self._handlers.get(handler_call_details.method)
        if cached is None or cached[0] is not handler:
            cached = (handler, _lenient_handler(handler))
            self._handlers[handler_call_details.method] = cached
        return cached[1]


async def _checked(requests):
    # Client-streamed requests: a malformed one ends the call with INVALID_ARGUMENT.
    async for request in requests:
        if type(request) is MalformedRequest:
            raise _malformed(request)
        yield request


# `unary` / `streaming` wrap servicer methods `async def m(self, request, context,
# principal)`; `self.auth` is the server's KeyCache (p402_server.api.auth). They stay
# thin because every call goes through them (the Ping benchmark measures them).

def unary(scopes: frozenset, name: str | None = None) -> Callable:
    def deco(fn: Callable) -> Callable:
        method = name or fn.__name__
        required = _required(scopes)

        @functools.wraps(fn)
        async def wrapper(self, request, context):
            if _logs.enabled:  # --log-format json: every line names its request
                _logs.REQUEST_ID.set(_logs.request_id_from(context.invocation_metadata()))
            try:
                if type(request) is MalformedRequest:
                    raise _malformed(request)
                principal = await self.auth.authenticate(context, scopes, method, required)
                return await fn(self, request, context, principal)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 - the one mapping point
                fail(context, exc, method)
                return None

        return wrapper

    return deco


def streaming(scopes: frozenset, name: str | None = None) -> Callable:
    """For async-generator methods (server streaming and bidi streaming)."""

    def deco(fn: Callable) -> Callable:
        method = name or fn.__name__
        required = _required(scopes)

        @functools.wraps(fn)
        async def wrapper(self, request, context):
            if _logs.enabled:
                _logs.REQUEST_ID.set(_logs.request_id_from(context.invocation_metadata()))
            try:
                if type(request) is MalformedRequest:
                    raise _malformed(request)
                if hasattr(request, "__aiter__"):
                    request = _checked(request)
                principal = await self.auth.authenticate(context, scopes, method, required)
                async for item in fn(self, request, context, principal):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit):
                raise
            except Exception as exc:  # noqa: BLE001 - the one mapping point
                fail(context, exc, method)

        return wrapper

    return deco


def _required(scopes: frozenset) -> str:
    # The least-privileged scope that grants the call, for the error message.
    for s in ("meter", "read", "admin"):
        if s in scopes:
            return s
    return "admin"


__all__ = [
    "DOMAIN",
    "ServiceError",
    "Overloaded",
    "MalformedRequest",
    "LenientRegistration",
    "invalid",
    "unauthenticated",
    "permission_denied",
    "not_found",
    "status_for",
    "logged_status",
    "rpc_status_for",
    "fail",
    "unary",
    "streaming",
]
