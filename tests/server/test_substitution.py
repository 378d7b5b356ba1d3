"""A Record naming another model than its reservation (a gateway's fallback route) is
priced at the model actually called, charged to the budgets the reservation held,
and says so (reason model.substituted), on SQLite and PostgreSQL."""
from __future__ import annotations

from p402.v1 import admin_pb2, common_pb2, meter_pb2

import p402core
from tests.server.service_harness import nanos, owners, svc_any, usd  # noqa: F401

CATALOG = p402core.Catalog.default()


async def test_a_fallback_model_is_priced_as_called_on_the_reserved_budgets(svc_any):
    svc = svc_any
    await svc.admin.PutBudget(admin_pb2.PutBudgetRequest(budget=admin_pb2.Budget(
        budget_id="acme", limit=usd(10**9), period=common_pb2.PERIOD_TOTAL,
        scope={"customer": "acme"})), metadata=svc.auth)
    a = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model="gpt-4o-mini", owners=owners(customer="acme"), input_bytes=4000,
        max_output_tokens=500), metadata=svc.auth)
    usage = common_pb2.Usage(input_tokens=1000, output_tokens=200)
    r = await svc.meter.Record(meter_pb2.RecordRequest(
        reservation_id=a.reservation_id, model="gpt-4o", usage=usage), metadata=svc.auth)
    want = CATALOG.cost_nanos("gpt-4o", input_tokens=1000, output_tokens=200)
    assert want > CATALOG.cost_nanos("gpt-4o-mini", input_tokens=1000, output_tokens=200)
    assert nanos(r.cost) == want
    [ev] = (await svc.meter.Query(meter_pb2.QueryRequest(page_size=10),
                                  metadata=svc.auth)).events
    assert ev.model == "gpt-4o" and "model.substituted" in ev.reasons
    [b] = [x for x in r.budgets if x.budget_id == "acme"]
    assert nanos(b.committed) == want and nanos(b.held) == 0

    # The reserved model (or its own name again) is no substitution.
    a2 = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model="gpt-4o-mini", owners=owners(customer="acme"), input_bytes=400,
        max_output_tokens=50), metadata=svc.auth)
    r2 = await svc.meter.Record(meter_pb2.RecordRequest(
        reservation_id=a2.reservation_id, model="gpt-4o-mini", usage=usage),
        metadata=svc.auth)
    assert nanos(r2.cost) == CATALOG.cost_nanos("gpt-4o-mini", input_tokens=1000,
                                                output_tokens=200)
    events = (await svc.meter.Query(meter_pb2.QueryRequest(page_size=10),
                                    metadata=svc.auth)).events
    assert [e.reasons for e in events if e.event_id == r2.event_id] == [[]]
