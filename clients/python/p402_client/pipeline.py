"""Authorize over one long-lived stream: many concurrent callers, one RPC.

This module owns `AuthorizePipeline`, for an `AsyncP402Client` whose caller makes many
Authorize calls (a gateway, the P402 proxy's `--target` mode): each `authorize(...)`
joins the next message of one StreamAuthorizeBatches call and is answered in order,
so a decision costs a share of a message on an open stream instead of a whole unary
RPC. Requests that arrive while a message is being written go together in the next
one (at most `max_batch`): nothing waits to fill a batch, so one caller alone sends
one request per message and many callers share the per-message cost.

`await pipe.authorize(model, **kw)` takes `client.authorize`'s keywords and returns
the same `Authorization`, or raises the same typed errors (`p402_client.errors`): the
server answers a request it refuses in-band (google.rpc.Status with ErrorInfo) and
the stream goes on. The client's `timeout` bounds each answer (DeadlineExceeded; a
late answer is discarded). When the stream breaks (the server restarts, the
connection drops), the requests it had not answered are sent again as unary
Authorize calls with the client's retries: each carries its client-made
reservation id, so a request the server had already decided is answered with the
same reservation, never a second hold. The next `authorize` opens a new stream. A
server without StreamAuthorizeBatches (UNIMPLEMENTED) is asked with unary calls
from then on. `aclose()` sends what is queued, then ends the stream; it does not
close the client.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

import grpc

from p402.v1 import meter_pb2

from . import _convert as cv
from .errors import from_rpc_error
from .types import Authorization

log = logging.getLogger("p402_client.pipeline")

_DETAILS = "grpc-status-details-bin"


class _InBandError(grpc.RpcError):
    """A request's in-band google.rpc.Status, shaped for `from_rpc_error`."""

    def __init__(self, status):
        super().__init__(status.message)
        self._status = status

    def code(self) -> grpc.StatusCode:
        return _CODES.get(self._status.code, grpc.StatusCode.UNKNOWN)

    def details(self) -> str:
        return self._status.message

    def trailing_metadata(self) -> tuple:
        return ((_DETAILS, self._status.SerializeToString()),)


_CODES = {c.value[0]: c for c in grpc.StatusCode}


class _Broken(Exception):
    """The stream ended before answering this request."""


class AuthorizePipeline:
    """One StreamAuthorizeBatches call shared by concurrent `authorize` calls (module
    docstring)."""

    def __init__(self, client: Any, *, max_batch: int = 500):
        if not 1 <= max_batch <= 1000:
            raise ValueError("max_batch: from 1 to 1000 (the server's limit per message)")
        self._client = client
        self._max_batch = max_batch
        self._call = None
        # Requests not yet written, and the messages written on the current stream
        # and not yet answered (in the order written: answers come back in that
        # order; each stream has its own, so a broken one fails only its own).
        self._outbox: list[tuple[asyncio.Future, Any]] = []
        self._pending: collections.deque[list[tuple[asyncio.Future, Any]]] = (
            collections.deque())
        self._sender: asyncio.Task | None = None
        self._reader: asyncio.Task | None = None
        self._unary = False  # the server has no StreamAuthorizeBatches
        self._closed = False

    async def authorize(self, model: str, **kw: Any) -> Authorization:
        if self._closed:
            raise RuntimeError("the pipeline is closed")
        c = self._client
        req = c._authorize_req(model, kw)
        if self._unary:
            return cv.authorization(await c._call(c._meter.Authorize, req))
        fut = asyncio.get_running_loop().create_future()
        self._outbox.append((fut, req))
        if self._sender is None:
            # A task writes, not the caller: a caller cancelled mid-write (its client
            # hung up) must not cut a message that carries other callers' requests.
            self._sender = asyncio.get_running_loop().create_task(
                self._send(), name="p402-authorize-send")
        try:
            # Awaited directly: a timeout or a cancelled caller cancels `fut`, and the
            # reader drops the answer of a future that is done.
            async with asyncio.timeout(c.timeout):
                pb = await fut
        except TimeoutError:
            from .errors import DeadlineExceeded

            raise DeadlineExceeded(
                "Deadline Exceeded: no answer on the authorize stream in time",
                code=grpc.StatusCode.DEADLINE_EXCEEDED, reason="DEADLINE_EXCEEDED") from None
        except _Broken:
            return cv.authorization(await c._call(c._meter.Authorize, req))
        if isinstance(pb, _InBandError):
            raise from_rpc_error(pb) from None
        return cv.authorization(pb)

    async def _send(self) -> None:
        """Write what the outbox holds, a message at a time, until it is empty."""
        outbox, limit = self._outbox, self._max_batch
        call = None
        try:
            while outbox:
                batch = outbox[:limit]
                del outbox[:limit]
                pending = None
                try:
                    call, pending = self._open()
                    pending.append(batch)
                    await call.write(meter_pb2.AuthorizeBatchRequest(
                        requests=[req for _fut, req in batch]))
                except (grpc.RpcError, asyncio.InvalidStateError) as exc:
                    # The stream broke under us (its reader fails what it had not
                    # answered): this message, never sent, is answered by nobody;
                    # its requests go as unary calls.
                    log.debug("authorize stream unusable (%r); unary for %d requests",
                              exc, len(batch))
                    if pending and pending[-1] is batch:
                        pending.pop()
                    _broken(batch)
        except BaseException:
            # Cancelled (the loop is closing), perhaps mid-write: whether that message
            # went out is unknown, so its stream must not carry another (answers
            # would be matched to the wrong requests); its reader fails what it had
            # not answered, and nobody waits in vain for the rest.
            if call is not None:
                call.cancel()
            _broken(outbox)
            outbox.clear()
            raise
        finally:
            self._sender = None

    def _open(self):
        """(the current stream, its messages not yet answered), opened if need be."""
        if self._call is None:
            c = self._client
            self._call = c._meter.StreamAuthorizeBatches(metadata=c._metadata,
                                                         timeout=c.stream_timeout)
            self._pending = collections.deque()
            self._reader = asyncio.get_running_loop().create_task(
                self._read(self._call, self._pending), name="p402-authorize-stream")
        return self._call, self._pending

    async def _read(self, call, pending) -> None:
        try:
            async for msg in call:
                results = msg.results
                if not pending or len(results) != len(pending[0]):
                    log.error("authorize stream answered a message it was not sent")
                    break
                for (fut, _req), res in zip(pending.popleft(), results):
                    if fut.done():
                        continue  # timed out: the caller has gone
                    if res.WhichOneof("result") == "error":
                        fut.set_result(_InBandError(res.error))
                    else:
                        fut.set_result(res.response)
        except grpc.RpcError as exc:
            code = exc.code() if callable(getattr(exc, "code", None)) else exc
            if code == grpc.StatusCode.UNIMPLEMENTED:
                log.warning("the server has no StreamAuthorizeBatches (older than this "
                            "client): Authorize as unary calls")
                self._unary = True
            elif not self._closed:
                log.warning("authorize stream ended: %s", code)
        except asyncio.CancelledError:
            pass
        finally:
            if self._call is call:
                self._call = None
            while pending:  # what it did not answer goes as unary calls
                _broken(pending.popleft())

    async def aclose(self) -> None:
        """Send what is queued, then end the stream (requests whose answers have not
        come when it ends are sent as unary calls)."""
        self._closed = True
        sender = self._sender
        if sender is not None:
            try:
                await asyncio.wait_for(asyncio.shield(sender), 5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                sender.cancel()
        call, reader = self._call, self._reader
        self._call = None
        if call is not None:
            try:
                await call.done_writing()
            except (grpc.RpcError, asyncio.InvalidStateError):
                pass
        if reader is not None:
            try:
                await asyncio.wait_for(reader, 5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                reader.cancel()
        if call is not None:
            call.cancel()


def _broken(batch: list[tuple[asyncio.Future, Any]]) -> None:
    for fut, _req in batch:
        if not fut.done():
            fut.set_exception(_Broken())


__all__ = ["AuthorizePipeline"]
