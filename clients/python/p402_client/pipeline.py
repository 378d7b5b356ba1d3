"""Authorize over one long-lived stream: many concurrent callers, one RPC.

This module owns `AuthorizePipeline`, for an `AsyncP402Client` whose caller makes many
Authorize calls (a gateway, the P402 proxy's `--target` mode): each `authorize(...)`
is written to one StreamAuthorize call and answered in order, so a decision costs a
message on an open stream instead of a whole unary RPC.

`await pipe.authorize(model, **kw)` takes `client.authorize`'s keywords and returns
the same `Authorization`, or raises the same typed errors (`p402_client.errors`): the
server answers a request it refuses in-band (google.rpc.Status with ErrorInfo) and
the stream goes on. The client's `timeout` bounds each answer (DeadlineExceeded; a
late answer is discarded). When the stream breaks (the server restarts, the
connection drops), the requests it had not answered are sent again as unary
Authorize calls with the client's retries: each carries its client-made
reservation id, so a request the server had already decided is answered with the
same reservation, never a second hold. The next `authorize` opens a new stream.
`aclose()` ends the stream; it does not close the client.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

import grpc

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
    """One StreamAuthorize call shared by concurrent `authorize` calls (module
    docstring)."""

    def __init__(self, client: Any):
        self._client = client
        self._call = None
        self._pending: collections.deque[tuple[asyncio.Future, Any]] = collections.deque()
        self._reader: asyncio.Task | None = None
        self._writing = asyncio.Lock()
        self._closed = False

    async def authorize(self, model: str, **kw: Any) -> Authorization:
        if self._closed:
            raise RuntimeError("the pipeline is closed")
        c = self._client
        req = c._authorize_req(model, kw)
        fut = asyncio.get_running_loop().create_future()
        try:
            # One write at a time, queued in the order written: answers come back
            # in that order.
            async with self._writing:
                call = self._open()
                self._pending.append((fut, req))
                await call.write(req)
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:
            # The stream broke under us: this request goes as a unary call.
            log.debug("authorize stream unusable (%r); unary for this request", exc)
            if not fut.done():
                fut.set_exception(_Broken())
        try:
            async with asyncio.timeout(c.timeout):
                pb = await asyncio.shield(fut)
        except TimeoutError:
            from .errors import DeadlineExceeded

            fut.cancel()  # its answer, when it comes, is dropped by the reader
            raise DeadlineExceeded(
                "Deadline Exceeded: no answer on the authorize stream in time",
                code=grpc.StatusCode.DEADLINE_EXCEEDED, reason="DEADLINE_EXCEEDED") from None
        except _Broken:
            return cv.authorization(await c._call(c._meter.Authorize, req))
        if isinstance(pb, _InBandError):
            raise from_rpc_error(pb) from None
        return cv.authorization(pb)

    def _open(self):
        if self._call is None:
            c = self._client
            self._call = c._meter.StreamAuthorize(metadata=c._metadata,
                                                  timeout=c.stream_timeout)
            self._reader = asyncio.get_running_loop().create_task(
                self._read(self._call), name="p402-authorize-stream")
        return self._call

    async def _read(self, call) -> None:
        pending = self._pending
        try:
            async for msg in call:
                if not pending:
                    log.error("authorize stream answered a request it was not sent")
                    break
                fut, _req = pending.popleft()
                if fut.done():
                    continue  # timed out: the caller has gone
                if msg.WhichOneof("result") == "error":
                    fut.set_result(_InBandError(msg.error))
                else:
                    fut.set_result(msg.response)
        except grpc.RpcError as exc:
            if not self._closed:
                code = exc.code() if callable(getattr(exc, "code", None)) else exc
                log.warning("authorize stream ended: %s", code)
        except asyncio.CancelledError:
            pass
        finally:
            if self._call is call:
                self._call = None
            while pending:  # what it did not answer goes as unary calls
                fut, _req = pending.popleft()
                if not fut.done():
                    fut.set_exception(_Broken())

    async def aclose(self) -> None:
        """End the stream (requests still waiting are sent as unary calls)."""
        self._closed = True
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


__all__ = ["AuthorizePipeline"]
