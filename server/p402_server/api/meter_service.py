"""MeterService servicer: Authorize, Record (unary, batch, stream), Release, Query,
ExportEvents and Ping.

Owns the wire-level behaviour of p402.v1.MeterService. Each method is plain: the
`unary` / `streaming` decorators (errors.py) authenticate the call against its scopes
(auth.py) and map whatever it raises to a gRPC status; the work is in the tenant
runtime (runtime/tenant.py), the conversions in convert.py. The tenant always comes from
the API key, never from the request.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from p402.v1 import meter_pb2, meter_pb2_grpc
from p402_server.api.auth import ANY, METER, READ
from p402_server.ledger import evidence
from p402_server.privacy import modes as _privacy
from p402_server.privacy import signing
from p402_server.runtime.process import Runtime
from p402_server.wire import convert
from p402_server.wire.errors import rpc_status_for, streaming, unary
from p402core import InvalidArgument

log = logging.getLogger("p402.server.meter")


class MeterService(meter_pb2_grpc.MeterServiceServicer):
    def __init__(self, runtime: Runtime, auth, *, max_batch_records: int = 10_000,
                 max_authorize_batch: int = 1_000, metrics=None, otel=None):
        self.runtime = runtime
        self.metrics = metrics  # metrics.Metrics, or None
        self.otel = otel  # otel.Otel (spans and metrics over OTLP), or None
        self.store = runtime.store
        self.auth = auth
        self.max_batch_records = max_batch_records
        self.max_authorize_batch = max_authorize_batch
        self._implementation = runtime.core.IMPLEMENTATION
        self._nonces = signing.NonceCache()  # signed reports' replay memory

    @unary(METER)
    async def Authorize(self, request, context, key):
        started = time.perf_counter()
        resp = await self.decide(key, request)
        self._authorized(key, request, resp, started, True)
        return resp

    async def decide(self, key, request, core: bool = False):
        """The decision on `request` for the caller `key` (checked already): an
        AuthorizeResponse, or with `core` the engine's Authorization when that is
        the whole answer (TenantRuntime.authorize)."""
        rt = self.runtime.tenants.get(key.tenant_id) or await self.runtime.get(key.tenant_id)
        if rt.leases is None:  # one process: never awaits on its own
            return rt.authorize(request, core=core)
        return await rt.authorize_exact(request, core=core)

    def _authorized(self, key, request, resp, started: float, rpc: bool) -> None:
        """Count a decision (metrics, OpenTelemetry), whichever RPC asked for it; only
        a unary Authorize's latency is an RPC's."""
        if self.metrics is not None:
            self.metrics.authorized(resp, started, rpc)
        if self.otel is not None:
            self.otel.authorized(key.tenant_id, request, resp, started, rpc)

    async def _decide_in_band(self, rt, key, request):
        """A stream's answer to one request: what Authorize would answer, its error
        included (as a google.rpc.Status, for this request only)."""
        started = time.perf_counter()
        try:
            resp = (rt.authorize(request) if rt.leases is None
                    else await rt.authorize_exact(request))
        except Exception as exc:  # noqa: BLE001 - answered in-band, the one mapping
            return meter_pb2.StreamAuthorizeResponse(error=rpc_status_for(exc))
        self._authorized(key, request, resp, started, False)
        return meter_pb2.StreamAuthorizeResponse(response=resp)

    async def _stream_tenant(self, context, method: str):
        """(key, tenant runtime) of a stream's next message: the key is checked again
        per message, so a revocation applies mid-stream."""
        key = await self.auth.authenticate(context, METER, method, "meter")
        runtime = self.runtime
        return key, runtime.tenants.get(key.tenant_id) or await runtime.get(key.tenant_id)

    @streaming(METER)
    async def StreamAuthorize(self, request_iterator, context, key):
        # Requests are answered one by one, in order (a lease round trip, when one
        # is due, delays the requests behind it). Each is answered what Authorize
        # would answer, an error included, and the stream goes on.
        async for request in request_iterator:
            try:
                key, rt = await self._stream_tenant(context, "StreamAuthorize")
            except Exception as exc:  # noqa: BLE001 - answered in-band, the one mapping
                yield meter_pb2.StreamAuthorizeResponse(error=rpc_status_for(exc))
                continue
            yield await self._decide_in_band(rt, key, request)

    @streaming(METER)
    async def StreamAuthorizeBatches(self, request_iterator, context, key):
        """StreamAuthorize a message of requests at a time: one answer message per
        request message, a result per request in order. A message over the size
        limit ends the stream (INVALID_ARGUMENT naming `requests`); everything else
        is answered in-band per request, as StreamAuthorize does."""
        limit = self.max_authorize_batch
        async for batch in request_iterator:
            requests = batch.requests
            if len(requests) > limit:
                raise InvalidArgument("requests", f"at most {limit} per message")
            try:
                key, rt = await self._stream_tenant(context, "StreamAuthorizeBatches")
            except Exception as exc:  # noqa: BLE001 - every request of it refused
                refused = meter_pb2.StreamAuthorizeResponse(error=rpc_status_for(exc))
                yield meter_pb2.AuthorizeBatchResponse(results=[refused] * len(requests))
                continue
            yield meter_pb2.AuthorizeBatchResponse(
                results=[await self._decide_in_band(rt, key, r) for r in requests])

    @unary(METER)
    async def Record(self, request, context, key):
        started = time.perf_counter()
        rt = self.runtime.tenants.get(key.tenant_id) or await self.runtime.get(key.tenant_id)
        attested = self._attest(rt, context, "Record", request, (request,))
        resp = await rt.record(request, attested=attested)
        if self.metrics is not None:
            self.metrics.recorded((request.outcome,), started)
        if self.otel is not None:
            self.otel.recorded(key.tenant_id, request, resp, started)
        return resp

    # --- signed reports (privacy mode private_gateway; signing.py) ------------------

    def _attest(self, rt, context, method: str, message, records) -> bool:
        """Verify the call's signature when it carries one or a record needs one
        (private_gateway); True = verified. Raises before anything is settled."""
        headers = signing.call_headers(context)
        if signing.SIGNATURE_HEADER not in headers and not any(
                rt.privacy.resolve(r.privacy_mode) == _privacy.PRIVATE_GATEWAY
                for r in records):
            return False
        secrets = rt.settings.get(_privacy.SECRETS) or {}
        signing.verify_call(headers, method, message, tenant_id=rt.tenant_id,
                            gateways=secrets.get("gateways") or {},
                            skew_seconds=rt.privacy.skew_seconds, nonces=self._nonces)
        return True

    @unary(METER)
    async def RecordBatch(self, request, context, key):
        records = request.records
        if len(records) > self.max_batch_records:
            raise InvalidArgument("records", f"at most {self.max_batch_records} per batch")
        rt = self.runtime.tenants.get(key.tenant_id) or await self.runtime.get(key.tenant_id)
        # Validate every record first: a bad one fails the call before anything settles.
        started = time.perf_counter()
        parsed = [convert.validate_record(r, f"records[{i}].") for i, r in enumerate(records)]
        attested = self._attest(rt, context, "RecordBatch", request, records)
        resp = meter_pb2.RecordBatchResponse(
            results=await _record_all(rt, records, parsed, attested))
        if self.metrics is not None:
            self.metrics.recorded([r.outcome for r in records], started, batch=True)
        return resp

    @streaming(METER)
    async def StreamRecordBatches(self, request_iterator, context, key):
        """RecordBatch over one stream: each batch is validated whole and settled in
        arrival order; the next batches settle while earlier ones commit (group
        commit), and responses go out in request order."""
        rt = self.runtime.tenants.get(key.tenant_id) or await self.runtime.get(key.tenant_id)
        pending: asyncio.Queue = asyncio.Queue(maxsize=16)
        done = object()
        loop = asyncio.get_running_loop()

        async def reader():
            try:
                async for request in request_iterator:
                    records = request.records
                    if len(records) > self.max_batch_records:
                        raise InvalidArgument(
                            "records", f"at most {self.max_batch_records} per batch")
                    parsed = [convert.validate_record(r, f"records[{i}].")
                              for i, r in enumerate(records)]
                    # Signed per call, not per message, like StreamRecords.
                    if any(rt.privacy.resolve(r.privacy_mode) == _privacy.PRIVATE_GATEWAY
                           for r in records):
                        raise signing.stream_refused()
                    task = loop.create_task(_record_all(rt, records, parsed, False))
                    await pending.put(task)
                    if await _refused(task):
                        break  # the stream ends with its error: nothing after it
            finally:
                await pending.put(done)

        feeder = loop.create_task(reader())
        try:
            while True:
                fut = await pending.get()
                if fut is done:
                    break
                yield meter_pb2.RecordBatchResponse(results=await fut)
            await feeder
        finally:
            if not feeder.done():
                feeder.cancel()
            while not pending.empty():
                fut = pending.get_nowait()
                if fut is not done:
                    fut.cancel()

    @streaming(METER)
    async def StreamRecords(self, request_iterator, context, key):
        rt = self.runtime.tenants.get(key.tenant_id) or await self.runtime.get(key.tenant_id)
        # Pipelined: records settle in arrival order, their commits overlap (group
        # commit), responses go out in request order.
        pending: asyncio.Queue = asyncio.Queue(maxsize=1024)
        done = object()

        async def reader():
            try:
                async for r in request_iterator:
                    # A stream is signed per call, not per message: signed reports
                    # go through Record or RecordBatch (meter.proto).
                    if rt.privacy.resolve(r.privacy_mode) == _privacy.PRIVATE_GATEWAY:
                        raise signing.stream_refused()
                    # Bad input ends the stream here, before anything after it starts.
                    parsed = convert.validate_record(r)
                    task = asyncio.ensure_future(rt.record(r, "", parsed))
                    await pending.put(task)
                    if await _refused(task):
                        break  # the stream ends with its error: nothing after it
            finally:
                await pending.put(done)

        feeder = asyncio.ensure_future(reader())
        try:
            while True:
                fut = await pending.get()
                if fut is done:
                    break
                yield await fut
            await feeder
        finally:
            if not feeder.done():
                feeder.cancel()
            while not pending.empty():
                fut = pending.get_nowait()
                if fut is not done:
                    fut.cancel()

    @unary(METER)
    async def Release(self, request, context, key):
        rt = self.runtime.tenants.get(key.tenant_id) or await self.runtime.get(key.tenant_id)
        event_id, statuses = await rt.release(request.reservation_id)
        resp = meter_pb2.ReleaseResponse(event_id=event_id)
        for s in statuses:
            convert.budget_status_to_proto(s, resp.budgets.add())
        return resp

    @unary(READ)
    async def GetReceipt(self, request, context, key):
        event_id = convert.check_str(request.event_id, "event_id", required=True)
        rt = self.runtime.tenants.get(key.tenant_id) or await self.runtime.get(key.tenant_id)
        return meter_pb2.GetReceiptResponse(receipt=await rt.receipt(event_id))

    @unary(READ)
    async def Query(self, request, context, key):
        flt = convert.filter_from_proto(request.filter)
        group_by = convert.group_by_from_proto(request.group_by)
        if request.page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        # Above the maximum is coerced to it (AIP-158), like the store does.
        page_size = min(request.page_size, convert.MAX_PAGE_SIZE)
        convert.check_str(request.page_token, "page_token")
        resp = meter_pb2.QueryResponse()
        if group_by:
            rows, token = await self.store.query_spend(
                key.tenant_id, flt, group_by, page_size=page_size,
                page_token=request.page_token)
            for row in rows:
                convert.spend_row_to_proto(row, resp.rows.add())
        else:
            events, token = await self.store.query_events(
                key.tenant_id, flt, page_size=page_size,
                page_token=request.page_token)
            for ev in events:
                convert.event_to_proto(ev, resp.events.add())
        resp.next_page_token = token
        return resp

    @streaming(READ)
    async def ExportEvents(self, request, context, key):
        flt = convert.filter_from_proto(request.filter)
        rt = self.runtime.tenants.get(key.tenant_id) or await self.runtime.get(key.tenant_id)
        # Each event carries the chain hash before it, so even a filtered export
        # verifies on its own; the call ends with the signed digest (evidence.py).
        export = evidence.ChainedExport(self.store, key.tenant_id, flt)
        async for e in export.events():
            yield e
        signed = export.finish(rt.settings, time.time_ns() // 1_000_000)
        context.set_trailing_metadata(
            ((evidence.DIGEST_HEADER, json.dumps(signed, sort_keys=True)),))

    @unary(ANY)
    async def Ping(self, request, context, key):
        return meter_pb2.PingResponse(tenant=key.tenant_id,
                                      implementation=self._implementation)


async def _refused(task: asyncio.Future) -> bool:
    """Let a stream's record settle in the engine (it runs up to its commit) and say
    whether it was refused there: then the stream reads nothing more (meter.proto: a
    bad message ends the stream; what was answered before it stays)."""
    await asyncio.sleep(0)
    return task.done() and not task.cancelled() and task.exception() is not None


async def _record_all(rt, records, parsed, attested: bool) -> list:
    """Every record of a batch, responses in request order (TenantRuntime.record_batch:
    settled in the engine in request order, committed through one write_many)."""
    if not records:
        return []
    return await rt.record_batch(records, parsed, attested=attested)


__all__ = ["MeterService"]

