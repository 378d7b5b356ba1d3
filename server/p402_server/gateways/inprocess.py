"""P402 inside the caller's process: the gRPC services called directly, no transport.

Owns `EmbeddedP402` (the ledger's group-commit writer, the tenant runtime and the key
cache of a server, started in this process without a listening port) and
`InProcessClient` (an `AsyncP402Client` whose stubs call the servicers' methods
directly). It is what `p402 proxy --db` runs on: a decision costs microseconds, not a
loopback RPC of about a millisecond each way.

One code path, no divergent implementation: every call goes through the same
servicer methods, the same `unary` wrapper (key check, scopes, tenant from the key,
the one exception-to-status mapping) and the same client conversions as over gRPC;
only protobuf serialization and the HTTP/2 hops are gone. Authorize, once per
proxied call, is the exception in form, not in substance (`EmbeddedP402.authorize`):
the same key check (`KeyCache.authenticate_key`), decision (`MeterService.decide`)
and status mapping (`errors.logged_status`), called without a metadata context, and
the engine's answer made into the client's Authorization directly rather than
through an AuthorizeResponse (the same values: a property test holds them equal);
it carries no client-made reservation id (`InProcessClient._authorize_req`).
Errors reach the caller as the client's typed errors (`p402_client.errors`), built
from the status the wrapper aborts with, and the client's deadline applies as it
would on the wire (DEADLINE_EXCEEDED).

With `leases=True` (PostgreSQL, several processes on one ledger) the embedded
runtime is one more process of the fleet: HARD budgets leased in slices, config
sync, the cross-process settlement rules (SCALEOUT.md).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc

from p402.v1 import admin_pb2, meter_pb2
from p402_client import AsyncP402Client
from p402_client import _convert as cv
from p402_client.client import _Common
from p402_client.types import Authorization, BudgetStatus, Decision, Enforcement
from p402_server.api.auth import METER
from p402_server.observe import logs as _logs
from p402_server.wire.errors import logged_status

log = logging.getLogger("p402.inprocess")

PEER = "inprocess"


class InProcessRpcError(grpc.RpcError):
    """A call's failure status, shaped like grpc.aio's AioRpcError for the client."""

    def __init__(self, code: grpc.StatusCode, details: str = "",
                 trailing_metadata: Any = ()):
        super().__init__(details)
        self._code, self._details = code, details
        self._trailing = tuple(trailing_metadata or ())

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing

    def __str__(self) -> str:
        return f"{self._code.name}: {self._details}"


class _Context:
    """The part of grpc.aio.ServicerContext that P402's servicers use. A call that
    set a status other than OK (`errors.fail`) ends with `failure()`."""

    __slots__ = ("_metadata", "trailing", "code", "details")

    def __init__(self, metadata: Any):
        self._metadata = tuple(metadata or ())
        self.trailing: tuple = ()
        self.code = None
        self.details = ""

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def failure(self) -> InProcessRpcError | None:
        """The call's error, when its status was set and is not OK."""
        if self.code is None or self.code is grpc.StatusCode.OK:
            return None
        return InProcessRpcError(self.code, self.details, self.trailing)

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def peer(self) -> str:
        return PEER

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailing = tuple(metadata or ())

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Any = ()) -> None:
        raise InProcessRpcError(code, details, trailing_metadata)


def _deadline_exceeded() -> InProcessRpcError:
    return InProcessRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


class _Resumed:
    """Awaits the rest of a coroutine that was run up to its first suspension
    (`first`, what it yielded): what `await coro` would have done from there on,
    sends, throws (a cancellation) and close included."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro, first):
        self._coro, self._first = coro, first

    def __await__(self):
        coro, out = self._coro, self._first
        while True:
            try:
                sent = yield out
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to the coroutine
                try:
                    out = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    out = coro.send(sent)
                except StopIteration as done:
                    return done.value


class _Unary:
    """A unary-unary method: `await stub.M(request, timeout=, metadata=)`.

    With a timeout, the handler runs first without one: most calls (a decision in
    memory, a key already in the cache, a record queued) finish without ever
    waiting, and a deadline timer per call cost more than the call's own Python.
    Only a handler that does wait (the store, a lease, the writer) runs the rest of
    its way under the deadline."""

    __slots__ = ("_handler",)

    def __init__(self, handler):
        self._handler = handler

    async def __call__(self, request, timeout: float | None = None, metadata: Any = ()):
        ctx = _Context(metadata)
        resp = await _within(self._handler(request, ctx), timeout)
        if ctx.code is not None:
            err = ctx.failure()
            if err is not None:
                raise err
        return resp


async def _within(coro, timeout: float | None):
    """`await coro`, DEADLINE_EXCEEDED past `timeout` seconds; the deadline is armed
    only once the coroutine waits (`_Unary`)."""
    if timeout is None:
        return await coro
    try:
        first = coro.send(None)
    except StopIteration as done:
        return done.value
    try:
        async with asyncio.timeout(timeout):
            return await _Resumed(coro, first)
    except TimeoutError:
        raise _deadline_exceeded() from None


class _ServerStream:
    """A unary-stream method: `stub.M(request, timeout=, metadata=)` is an async
    iterator of responses; `trailing_metadata()` once it is exhausted, as grpc.aio."""

    def __init__(self, handler, request, timeout: float | None, metadata: Any):
        self._ctx = _Context(metadata)
        self._gen = handler(request, self._ctx)
        self._deadline = (asyncio.get_running_loop().time() + timeout
                          if timeout is not None else None)

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            if self._deadline is None:
                return await self._gen.__anext__()
            try:
                async with asyncio.timeout_at(self._deadline):
                    return await self._gen.__anext__()
            except TimeoutError:
                await self._gen.aclose()
                raise _deadline_exceeded() from None
        except StopAsyncIteration:
            err = self._ctx.failure()
            if err is not None:
                raise err from None
            raise

    async def trailing_metadata(self) -> tuple:
        return self._ctx.trailing

    def cancel(self) -> bool:
        asyncio.ensure_future(self._gen.aclose())
        return True


class _StreamMethod:
    __slots__ = ("_handler",)

    def __init__(self, handler):
        self._handler = handler

    def __call__(self, request, timeout: float | None = None, metadata: Any = ()):
        return _ServerStream(self._handler, request, timeout, metadata)


class _Stub:
    """Each method of a service, bound to a servicer (unary-unary and unary-stream;
    client-streaming methods are not offered in process: use their batch twins)."""

    def __init__(self, servicer, service_descriptor):
        for m in service_descriptor.methods:
            handler = getattr(servicer, m.name, None)
            if handler is None or m.client_streaming:
                continue
            setattr(self, m.name, _StreamMethod(handler) if m.server_streaming
                    else _Unary(handler))


class EmbeddedP402:
    """A P402 server's runtime in this process, without a port (module docstring).

    `await start()` starts the writer and the runtime's background work; `await
    stop()` writes every open hold, flushes the writer and (with leases) returns
    this process's leases. The caller owns and closes `store`.
    """

    def __init__(self, store, *, config=None, core=None, leases: bool = False):
        from p402_server.api.admin_service import AdminService
        from p402_server.api.meter_service import MeterService
        from p402_server.assembly import build_runtime

        self.store = store
        self.writer, self.runtime, self.auth, self.config = build_runtime(
            store, config=config, core=core, leases=leases)
        self.meter_service = MeterService(
            self.runtime, self.auth, max_batch_records=self.config.max_batch_records)
        self.admin_service = AdminService(self.runtime, self.auth)
        self._meter_stub = _Stub(self.meter_service,
                                 meter_pb2.DESCRIPTOR.services_by_name["MeterService"])
        self._admin_stub = _Stub(self.admin_service,
                                 admin_pb2.DESCRIPTOR.services_by_name["AdminService"])
        self._started = self._stopped = False

    async def start(self) -> None:
        await self.writer.start()
        await self.runtime.start()
        self._started = True
        log.info("embedded P402 runtime started (core: %s)", self.runtime.core.describe())

    async def stop(self) -> None:
        if self._stopped or not self._started:
            return
        self._stopped = True
        await self.runtime.stop()
        await self.writer.stop()
        if self.runtime.leases is not None:  # after the writer drained
            await self.runtime.leases.close()

    def client(self, api_key: str, **kw: Any) -> "InProcessClient":
        """An async client with `api_key`, calling this runtime directly."""
        return InProcessClient(self, api_key, **kw)

    async def authorize(self, api_key: str, request) -> Authorization:
        """Authorize, as the meter service answers it, as the client's Authorization.

        The same key check, tenant, decision and error mapping as the RPC (`unary`,
        MeterService.decide, errors.logged_status), without a context to read the key
        back from, and without an AuthorizeResponse built only to be read back when
        the engine's answer is the whole answer (Deciding.authorize's `core`)."""
        svc = self.meter_service
        if _logs.enabled:  # --log-format json: every line names its request
            _logs.REQUEST_ID.set(_logs.request_id_from(()))
        try:
            key = await self.auth.authenticate_key(api_key, METER, "Authorize", "meter")
            core = svc.metrics is None and svc.otel is None  # they count the message
            started = 0.0 if core else time.perf_counter()
            resp = await svc.decide(key, request, core=core)
            if not core:
                svc._authorized(key, request, resp, started, True)
        except Exception as exc:  # noqa: BLE001 - the one mapping, as over the wire
            status = logged_status(exc, "Authorize")
            raise InProcessRpcError(status.code, status.details,
                                    status.trailing_metadata) from None
        if type(resp) is meter_pb2.AuthorizeResponse:
            return cv.authorization(resp)
        return authorization_from_core(resp)


class _Keyed:
    """A method of EmbeddedP402 called as a stub's method is (`request, timeout=,
    metadata=`), with the client's key: what `AsyncP402Client._call` retries."""

    __slots__ = ("_method", "_key")

    def __init__(self, method, api_key: str):
        self._method, self._key = method, api_key

    async def __call__(self, request, timeout: float | None = None, metadata: Any = ()):
        return await _within(self._method(self._key, request), timeout)


def authorization_from_core(a) -> Authorization:
    """The client's Authorization of the engine's (p402core) one: what
    `cv.authorization(convert.authorization_to_proto(a))` gives, without the message."""
    return Authorization(
        decision=cv._enum(Decision, int(a.decision)),
        reasons=tuple(a.reasons),
        rule_ids=tuple(a.rule_ids),
        reservation_id=a.reservation_id,
        estimated_cost_nanos=a.estimated_cost_nanos,
        estimated_input_tokens=a.estimated_input_tokens,
        estimated_output_tokens=a.estimated_output_tokens,
        output_token_cap=a.output_token_cap,
        budgets=tuple([BudgetStatus(s.budget_id, s.limit_nanos, s.committed_nanos,
                                    s.held_nanos, s.remaining_nanos, s.period_start_ms,
                                    Enforcement.parse(int(s.enforcement)))
                       for s in a.budgets]) if a.budgets else (),
        model=a.model,
        provider=a.provider,
        catalog_version=a.catalog_version,
        expire_time_ms=a.expires_ms,
        retry_after_ms=getattr(a, "retry_after_ms", 0) or 0,
    )


class InProcessClient(AsyncP402Client):
    """`AsyncP402Client` over an `EmbeddedP402`: the same methods, results and errors,
    no channel. Client-streaming calls (stream_records…) are not offered in process."""

    def __init__(self, embedded: EmbeddedP402, api_key: str, **kw: Any):
        # _Common validates the key and the options exactly as for a remote client.
        _Common.__init__(self, PEER, api_key, **kw)
        self._channel = None
        self._meter = embedded._meter_stub
        self._admin = embedded._admin_stub
        self._authorize_direct = _Keyed(embedded.authorize,  # the key _Common kept
                                        self._metadata[0][1].removeprefix("Bearer "))

    async def authorize(self, model: str, **kw: Any) -> Authorization:
        """See P402Client.authorize (EmbeddedP402.authorize: no message answered)."""
        return await self._call(self._authorize_direct, self._authorize_req(model, kw))

    def _authorize_req(self, model: str, kw: dict[str, Any]):
        # No reservation id made here for retries: over the wire it makes a retry
        # after a lost answer idempotent, but in process no answer is lost, and an
        # Authorize that raised or ran out of time held nothing (the decision and its
        # hold are one synchronous step after any wait), so a retry cannot hold
        # twice. The runtime then keeps no answer per call for replays.
        return cv.authorize_request(model, **kw)

    async def close(self) -> None:
        return None


__all__ = ["EmbeddedP402", "InProcessClient", "InProcessRpcError"]
