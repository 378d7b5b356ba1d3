"""MeterService servicer: Authorize, Record (unary, batch, stream), Release, Query,
ExportEvents and Ping.

Owns the wire-level behaviour of p402.v1.MeterService. Each method is plain: the
`unary` / `streaming` decorators (errors.py) authenticate the call against its scopes
(auth.py) and map whatever it raises to a gRPC status; the work is in the tenant
runtime (runtime.py), the conversions in convert.py. The tenant always comes from
the API key, never from the request.
"""
from __future__ import annotations

import asyncio
import logging

from p402.v1 import meter_pb2, meter_pb2_grpc

from p402core import InvalidArgument

from . import convert
from .auth import ANY, METER, READ
from .errors import unary, streaming
from .runtime import Runtime

log = logging.getLogger("p402.server.meter")


class MeterService(meter_pb2_grpc.MeterServiceServicer):
    def __init__(self, runtime: Runtime, auth, *, max_batch_records: int = 10_000):
        self.runtime = runtime
        self.store = runtime.store
        self.auth = auth
        self.max_batch_records = max_batch_records
        self._implementation = runtime.core.IMPLEMENTATION

    @unary(METER)
    async def Authorize(self, request, context, key):
        rt = self.runtime.tenants.get(key.tenant_id) or await self.runtime.get(key.tenant_id)
        return rt.authorize(request)

    @unary(METER)
    async def Record(self, request, context, key):
        rt = self.runtime.tenants.get(key.tenant_id) or await self.runtime.get(key.tenant_id)
        return await rt.record(request)

    @unary(METER)
    async def RecordBatch(self, request, context, key):
        records = request.records
        if len(records) > self.max_batch_records:
            raise InvalidArgument("records", f"at most {self.max_batch_records} per batch")
        rt = self.runtime.tenants.get(key.tenant_id) or await self.runtime.get(key.tenant_id)
        # Validate every record first: a bad one fails the call before anything settles.
        parsed = [convert.validate_record(r, f"records[{i}].") for i, r in enumerate(records)]
        # One awaited write per record; the group-commit writer coalesces them into
        # one transaction. Settling stays in request order (tasks start in order and
        # settle before their first await).
        tasks = [asyncio.ensure_future(rt.record(r, f"records[{i}].", parsed[i]))
                 for i, r in enumerate(records)]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        return meter_pb2.RecordBatchResponse(results=results)

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
                    await pending.put(asyncio.ensure_future(rt.record(r)))
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
        async for ev in self.store.iter_events(key.tenant_id, flt):
            yield convert.event_to_proto(ev)

    @unary(ANY)
    async def Ping(self, request, context, key):
        return meter_pb2.PingResponse(tenant=key.tenant_id,
                                      implementation=self._implementation)


__all__ = ["MeterService"]

