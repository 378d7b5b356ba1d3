"""MeterService end to end against a real server (grpc.aio on 127.0.0.1, real store)."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from p402.v1 import meter_pb2_grpc

from service_harness import (  # noqa: F401 - fixtures
    admin_pb2,
    common_pb2,
    meter_pb2,
    nanos,
    owners,
    start_service,
    svc_any,
    usd,
)

MODEL = "gpt-4o-mini"  # 150,000 pico-USD/token in, 600,000 out (default catalog)


@pytest.fixture
def svc(svc_any):
    """Every service test here runs on SQLite and, when reachable, PostgreSQL."""
    return svc_any


def usage(i: int, o: int) -> common_pb2.Usage:
    return common_pb2.Usage(input_tokens=i, output_tokens=o)


async def put_budget(s, budget_id: str, limit_nanos: int, **kw):
    return await s.admin.PutBudget(
        admin_pb2.PutBudgetRequest(budget=admin_pb2.Budget(
            budget_id=budget_id, limit=usd(limit_nanos), **kw)), metadata=s.auth)


async def budget_status(s, budget_id: str):
    resp = await s.admin.ListBudgets(admin_pb2.ListBudgetsRequest(), metadata=s.auth)
    return next(b.status for b in resp.budgets if b.budget_id == budget_id)


async def events(s, **flt) -> list:
    resp = await s.meter.Query(meter_pb2.QueryRequest(
        filter=meter_pb2.EventFilter(**flt), page_size=1000), metadata=s.auth)
    return list(resp.events)


async def eventually(fn, timeout: float = 5.0):
    """Poll an async predicate-returning function until it gives a truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fn()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.02)


async def test_authorize_record_query_end_to_end(svc):
    s = svc
    await put_budget(s, "acme-month", 10**9, scope={"customer": "acme"})
    a = await s.meter.Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=owners(customer="acme", feature="chat"), input_bytes=4000,
        max_output_tokens=500, labels={"env": "prod"}), metadata=s.auth)
    assert a.decision == common_pb2.DECISION_ALLOW
    assert a.reservation_id and a.output_token_cap == 500
    assert [b.budget_id for b in a.budgets] == ["acme-month"]
    assert nanos(a.budgets[0].held) == nanos(a.estimated_cost) > 0

    r = await s.meter.Record(meter_pb2.RecordRequest(
        reservation_id=a.reservation_id, usage=usage(1000, 200), revenue=usd(5_000_000)),
        metadata=s.auth)
    cost = (1000 * 150_000 + 200 * 600_000 + 500) // 1000
    assert nanos(r.cost) == cost
    assert nanos(r.estimated_cost) == nanos(a.estimated_cost)
    assert r.evidence == common_pb2.EVIDENCE_REPORTED and not r.duplicate
    assert r.event_id == a.reservation_id  # reserved Records default to the reservation id
    st = r.budgets[0]
    assert nanos(st.committed) == cost and nanos(st.held) == 0

    (ev,) = await events(s)
    assert ev.kind == "record" and ev.owners.customer == "acme" and ev.owners.feature == "chat"
    assert dict(ev.labels) == {"env": "prod"}  # from the hold: the Record had none
    assert nanos(ev.cost) == cost and nanos(ev.revenue) == 5_000_000
    assert ev.catalog_version == a.catalog_version and ev.sequence > 0
    assert list(ev.budget_ids) == ["acme-month"]

    spend = await s.meter.Query(meter_pb2.QueryRequest(group_by=["customer", "feature"]),
                                metadata=s.auth)
    (row,) = spend.rows
    assert dict(row.group) == {"customer": "acme", "feature": "chat"}
    assert row.event_count == 1 and nanos(row.cost) == cost
    assert nanos(row.margin) == 5_000_000 - cost
    assert nanos((await budget_status(s, "acme-month")).committed) == cost


async def test_denied_authorize_becomes_an_event(svc):
    await put_budget(svc, "tiny", 1_000, scope={"customer": "acme"})
    a = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=owners(customer="acme"), input_bytes=40_000), metadata=svc.auth)
    assert a.decision == common_pb2.DECISION_DENY
    assert "budget.exceeded" in a.reasons and not a.reservation_id
    found = await eventually(lambda: events(svc, outcomes=[common_pb2.OUTCOME_DENIED]))
    (ev,) = found
    assert ev.kind == "denied" and ev.decision == common_pb2.DECISION_DENY
    assert nanos(ev.cost) == 0 and nanos(ev.estimated_cost) == nanos(a.estimated_cost) > 0
    assert list(ev.reasons) == list(a.reasons) and ev.owners.customer == "acme"
    assert nanos((await budget_status(svc, "tiny")).committed) == 0


async def test_unknown_model_in_authorize_is_a_deny_decision(svc):
    a = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model="no-such-model-xyz", owners=owners(customer="acme"), input_bytes=10),
        metadata=svc.auth)
    assert a.decision == common_pb2.DECISION_DENY
    assert list(a.reasons) == ["price.unknown_model"]


async def test_record_is_idempotent_by_event_id(svc):
    await put_budget(svc, "all", 10**9)
    req = meter_pb2.RecordRequest(event_id="call-1", model=MODEL, usage=usage(1000, 100),
                                  owners=owners(customer="acme"))
    first, second = [await svc.meter.Record(req, metadata=svc.auth) for _ in range(2)]
    assert not first.duplicate and second.duplicate
    assert second.event_id == first.event_id == "call-1"
    assert nanos(second.cost) == nanos(first.cost) > 0
    # Concurrent retries too: still one event.
    await asyncio.gather(*[svc.meter.Record(req, metadata=svc.auth) for _ in range(5)])
    assert len(await events(svc)) == 1
    assert nanos((await budget_status(svc, "all")).committed) == nanos(first.cost)


async def test_retry_of_reserved_record_without_event_id_is_idempotent(svc):
    await put_budget(svc, "all", 10**9)
    a = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=owners(customer="acme"), input_bytes=100), metadata=svc.auth)
    req = meter_pb2.RecordRequest(reservation_id=a.reservation_id, usage=usage(50, 10))
    first = await svc.meter.Record(req, metadata=svc.auth)
    again = await svc.meter.Record(req, metadata=svc.auth)
    # A different event_id for the same reservation returns the first result as well.
    other = await svc.meter.Record(meter_pb2.RecordRequest(
        event_id="other", reservation_id=a.reservation_id, usage=usage(9999, 10)),
        metadata=svc.auth)
    assert (again.duplicate, other.duplicate) == (True, True)
    assert again.event_id == other.event_id == first.event_id
    assert nanos(other.cost) == nanos(first.cost)
    assert len(await events(svc)) == 1
    assert nanos((await budget_status(svc, "all")).committed) == nanos(first.cost)


async def test_duplicate_after_restart_is_not_counted_twice(svc):
    await put_budget(svc, "all", 10**9)
    req = meter_pb2.RecordRequest(event_id="call-9", model=MODEL, usage=usage(1000, 100),
                                  owners=owners(customer="acme"))
    first = await svc.meter.Record(req, metadata=svc.auth)
    await svc.restart()  # the recent-id memory is gone; the ledger remembers
    again = await svc.meter.Record(req, metadata=svc.auth)
    assert again.duplicate and nanos(again.cost) == nanos(first.cost)
    assert nanos((await budget_status(svc, "all")).committed) == nanos(first.cost)
    assert len(await events(svc)) == 1


async def test_concurrent_records_coalesce_into_few_transactions(svc):
    writer = svc.server.writer
    before = writer.stats.transactions
    n = 64
    reqs = [meter_pb2.RecordRequest(event_id=f"c-{i}", model=MODEL, usage=usage(10, 1),
                                    owners=owners(customer=f"cust-{i % 4}"))
            for i in range(n)]
    results = await asyncio.gather(*[svc.meter.Record(r, metadata=svc.auth) for r in reqs])
    assert all(not r.duplicate for r in results)
    assert writer.stats.transactions - before < n // 2
    assert len(await events(svc)) == n


async def test_record_batch_and_stream(svc):
    batch = meter_pb2.RecordBatchRequest(records=[
        meter_pb2.RecordRequest(event_id=f"b-{i}", model=MODEL, usage=usage(10, i),
                                owners=owners(feature="batch")) for i in range(20)])
    resp = await svc.meter.RecordBatch(batch, metadata=svc.auth)
    assert [r.event_id for r in resp.results] == [f"b-{i}" for i in range(20)]
    assert [nanos(r.cost) for r in resp.results] == [
        (10 * 150_000 + i * 600_000 + 500) // 1000 for i in range(20)]
    again = await svc.meter.RecordBatch(batch, metadata=svc.auth)
    assert all(r.duplicate for r in again.results)

    async def gen():
        for i in range(30):
            yield meter_pb2.RecordRequest(event_id=f"s-{i}", model=MODEL, usage=usage(5, 5),
                                          owners=owners(feature="stream"))

    out = [r async for r in svc.meter.StreamRecords(gen(), metadata=svc.auth)]
    assert [r.event_id for r in out] == [f"s-{i}" for i in range(30)]
    assert len(await events(svc)) == 50


async def test_record_batch_is_validated_before_anything_settles(svc):
    batch = meter_pb2.RecordBatchRequest(records=[
        meter_pb2.RecordRequest(event_id="ok", model=MODEL, usage=usage(1, 1),
                                owners=owners(customer="a")),
        meter_pb2.RecordRequest(event_id="bad", model=MODEL, usage=usage(-1, 1),
                                owners=owners(customer="a")),
    ])
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await svc.meter.RecordBatch(batch, metadata=svc.auth)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "records[1].usage.input_tokens" in exc.value.details()
    assert await events(svc) == []


async def test_release_voids_the_hold_and_is_idempotent(svc):
    await put_budget(svc, "all", 10**9)
    a = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=owners(customer="acme"), input_bytes=1000), metadata=svc.auth)
    assert nanos((await budget_status(svc, "all")).held) > 0
    r1 = await svc.meter.Release(meter_pb2.ReleaseRequest(reservation_id=a.reservation_id),
                                 metadata=svc.auth)
    r2 = await svc.meter.Release(meter_pb2.ReleaseRequest(reservation_id=a.reservation_id),
                                 metadata=svc.auth)
    assert r1.event_id == r2.event_id
    st = await budget_status(svc, "all")
    assert nanos(st.held) == 0 and nanos(st.committed) == 0
    (ev,) = await events(svc)
    assert ev.kind == "released" and ev.outcome == common_pb2.OUTCOME_CANCELLED
    assert nanos(ev.cost) == 0


async def test_hold_expiry_produces_an_expired_event(svc):
    await put_budget(svc, "all", 10**9)
    a = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=owners(customer="acme"), input_bytes=2000, ttl_seconds=1),
        metadata=svc.auth)
    found = await eventually(lambda: events(svc, outcomes=[common_pb2.OUTCOME_EXPIRED]))
    (ev,) = found
    assert ev.kind == "expired" and ev.reservation_id == a.reservation_id
    assert ev.evidence == common_pb2.EVIDENCE_ESTIMATED
    assert nanos(ev.cost) == nanos(a.estimated_cost) > 0  # never under-count
    st = await budget_status(svc, "all")
    assert nanos(st.committed) == nanos(a.estimated_cost) and nanos(st.held) == 0
    # A late Record of the expired reservation returns the expiry, not a second charge.
    late = await svc.meter.Record(meter_pb2.RecordRequest(
        reservation_id=a.reservation_id, usage=usage(10, 10)), metadata=svc.auth)
    assert late.duplicate and nanos(late.cost) == nanos(a.estimated_cost)


async def test_restart_restores_budget_totals_and_open_holds(svc):
    await put_budget(svc, "all", 10**9)
    open_hold = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=owners(customer="acme"), input_bytes=3000), metadata=svc.auth)
    done = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=owners(customer="acme"), input_bytes=3000), metadata=svc.auth)
    rec = await svc.meter.Record(meter_pb2.RecordRequest(
        reservation_id=done.reservation_id, usage=usage(700, 70)), metadata=svc.auth)
    before = await budget_status(svc, "all")
    await svc.restart()
    after = await budget_status(svc, "all")
    assert nanos(after.committed) == nanos(before.committed) == nanos(rec.cost)
    assert nanos(after.held) == nanos(before.held) == nanos(open_hold.estimated_cost)
    # The restored hold settles normally; the recorded one stays settled.
    r = await svc.meter.Record(meter_pb2.RecordRequest(
        reservation_id=open_hold.reservation_id, usage=usage(100, 10)), metadata=svc.auth)
    assert not r.duplicate
    again = await svc.meter.Record(meter_pb2.RecordRequest(
        reservation_id=done.reservation_id, usage=usage(700, 70)), metadata=svc.auth)
    assert again.duplicate
    final = await budget_status(svc, "all")
    assert nanos(final.committed) == nanos(rec.cost) + nanos(r.cost)
    assert nanos(final.held) == 0


async def test_a_restart_settles_saved_holds_without_a_call_for_their_tenant(svc):
    # A process alone on its ledger builds a tenant on its first call; after a
    # restart, the tenants with saved holds are built at once, so a hold whose call
    # died with the old process reaches the ledger at its expiry (at its estimate)
    # even when the tenant never calls again.
    a = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=owners(customer="acme"), input_bytes=3000, ttl_seconds=1),
        metadata=svc.auth)
    await svc.server.runtime.tenants[svc.tenant_id].flush_holds()
    await svc.restart()
    assert not svc.server.runtime.tenants  # nothing has called since
    deadline = time.monotonic() + 15
    while not await svc.store.settled_reservations(svc.tenant_id, [a.reservation_id]):
        assert time.monotonic() < deadline, "the saved hold was never settled"
        await asyncio.sleep(0.05)
    (ev,) = await events(svc, outcomes=[common_pb2.OUTCOME_EXPIRED])
    assert ev.reservation_id == a.reservation_id
    assert nanos(ev.cost) == nanos(a.estimated_cost) > 0
    assert ev.evidence == common_pb2.EVIDENCE_ESTIMATED


async def test_settled_hold_not_yet_deleted_is_not_restored(tmp_path):
    # Holds are written behind: a crash can leave a settled hold in the holds table.
    s = await start_service(f"sqlite+aiosqlite:///{tmp_path}/p.db",
                            holds_flush_interval_seconds=3600)
    try:
        await put_budget(s, "all", 10**9)
        a = await s.meter.Authorize(meter_pb2.AuthorizeRequest(
            model=MODEL, owners=owners(customer="acme"), input_bytes=3000), metadata=s.auth)
        rt = s.server.runtime.tenants[s.tenant_id]
        await rt.flush_holds()  # the hold is on disk ...
        r = await s.meter.Record(meter_pb2.RecordRequest(
            reservation_id=a.reservation_id, usage=usage(10, 1)), metadata=s.auth)
        assert [h[0] for h in await s.store.load_holds(s.tenant_id)] == [a.reservation_id]
        # ... and a "crash" before its delete is written: a new server on the ledger.
        rt._hold_deletes.clear()
        await s.restart()
        st = await budget_status(s, "all")
        assert nanos(st.held) == 0 and nanos(st.committed) == nanos(r.cost)
    finally:
        await s.close()


async def test_export_streams_every_event_in_ledger_order(svc):
    for i in range(15):
        await svc.meter.Record(meter_pb2.RecordRequest(
            event_id=f"e-{i}", model=MODEL, usage=usage(1, 1), owners=owners(task=f"t{i}")),
            metadata=svc.auth)
    out = [e async for e in svc.meter.ExportEvents(meter_pb2.ExportEventsRequest(),
                                                   metadata=svc.auth)]
    assert [e.event_id for e in out] == [f"e-{i}" for i in range(15)]
    assert [e.sequence for e in out] == sorted(e.sequence for e in out)


async def test_query_pages_walk_every_event_once(svc):
    for i in range(25):
        await svc.meter.Record(meter_pb2.RecordRequest(
            event_id=f"p-{i}", model=MODEL, usage=usage(1, 1), owners=owners(customer="x")),
            metadata=svc.auth)
    seen, token = [], ""
    while True:
        resp = await svc.meter.Query(meter_pb2.QueryRequest(page_size=7, page_token=token),
                                     metadata=svc.auth)
        seen += [e.event_id for e in resp.events]
        token = resp.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(f"p-{i}" for i in range(25)) and len(seen) == 25


async def test_health_and_reflection_answer(svc):
    health = health_pb2_grpc.HealthStub(svc.channel)
    for name in ("", "p402.v1.MeterService", "p402.v1.AdminService"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(svc.channel)

    async def ask():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    (answer,) = [r async for r in refl.ServerReflectionInfo(ask())]
    names = {s.name for s in answer.list_services_response.service}
    assert {"p402.v1.MeterService", "p402.v1.AdminService", "grpc.health.v1.Health"} <= names


async def test_health_reports_not_serving_during_shutdown(svc):
    health = svc.server.health
    await svc.server.stop(0.5)
    resp = await health.Check(health_pb2.HealthCheckRequest(service=""), None)
    assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_resource_exhausted_past_the_concurrency_cap(tmp_path):
    s = await start_service(f"sqlite+aiosqlite:///{tmp_path}/p.db", max_concurrent_rpcs=1)
    try:
        gate = asyncio.Event()

        async def idle():  # a stream that holds its slot until told to finish
            await gate.wait()
            return
            yield  # pragma: no cover

        holder = s.meter.StreamRecords(idle(), metadata=s.auth)
        reading = asyncio.ensure_future(holder.read())
        await asyncio.sleep(0.2)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await s.meter.Ping(meter_pb2.PingRequest(), metadata=s.auth)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        gate.set()
        await reading
        assert await holder.code() == grpc.StatusCode.OK
        assert (await s.meter.Ping(meter_pb2.PingRequest(), metadata=s.auth)).tenant
    finally:
        await s.close()


async def test_admin_changes_apply_to_the_engine_at_once(svc):
    a = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=owners(customer="acme"), input_bytes=10), metadata=svc.auth)
    assert a.decision == common_pb2.DECISION_ALLOW
    await svc.admin.PutPolicyRule(admin_pb2.PutPolicyRuleRequest(rule=admin_pb2.PolicyRule(
        rule_id="need-feature", effect=admin_pb2.EFFECT_REQUIRE_OWNERS,
        require_owners=["feature"])), metadata=svc.auth)
    d = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=owners(customer="acme"), input_bytes=10), metadata=svc.auth)
    assert d.decision == common_pb2.DECISION_DENY
    assert "policy.owner_missing" in d.reasons and list(d.rule_ids) == ["need-feature"]
    rules = await svc.admin.ListPolicyRules(admin_pb2.ListPolicyRulesRequest(),
                                            metadata=svc.auth)
    assert [r.rule_id for r in rules.rules] == ["need-feature"]
    await svc.admin.DeletePolicyRule(admin_pb2.DeletePolicyRuleRequest(rule_id="need-feature"),
                                     metadata=svc.auth)
    ok = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=owners(customer="acme"), input_bytes=10), metadata=svc.auth)
    assert ok.decision == common_pb2.DECISION_ALLOW


async def test_settings_and_prices(svc):
    s = await svc.admin.UpdateSettings(admin_pb2.UpdateSettingsRequest(
        settings=admin_pb2.Settings(hold_ttl_seconds=60, allow_unknown_models=True,
                                    fallback_input_pico_per_token=1_000_000,
                                    fallback_output_pico_per_token=2_000_000),
        update_mask=["hold_ttl_seconds", "allow_unknown_models",
                     "fallback_input_pico_per_token", "fallback_output_pico_per_token"]),
        metadata=svc.auth)
    assert s.hold_ttl_seconds == 60 and s.default_output_tokens == 4096
    got = await svc.admin.GetSettings(admin_pb2.GetSettingsRequest(), metadata=svc.auth)
    assert got == s
    a = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model="house-model", owners=owners(customer="a"), input_bytes=100), metadata=svc.auth)
    assert a.decision == common_pb2.DECISION_WARN and "price.unknown_model" in a.reasons
    assert a.expire_time_ms - int(time.time() * 1000) <= 61_000

    data = b'{"house-model": {"input_cost_per_token": 0.000002, "output_cost_per_token": ' \
           b'0.000008, "litellm_provider": "house", "mode": "chat"}, "img": ' \
           b'{"output_cost_per_image": 0.04, "mode": "image_generation"}, "ocr-x": ' \
           b'{"ocr_cost_per_credit": 0.01, "mode": "ocr"}}'
    imp = await svc.admin.ImportPrices(admin_pb2.ImportPricesRequest(format="litellm",
                                                                     data=data),
                                       metadata=svc.auth)
    # the image model is priced per image; a per-credit price is not a unit P402 knows
    assert imp.imported_count == 2 and len(imp.skipped) == 1
    prices = await svc.admin.ListPrices(admin_pb2.ListPricesRequest(model_filter="house"),
                                        metadata=svc.auth)
    (p,) = prices.prices
    assert (p.input_pico_per_token, p.output_pico_per_token, p.tenant_override) == (
        2_000_000, 8_000_000, True)
    a2 = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model="house-model", owners=owners(customer="a"), input_bytes=100), metadata=svc.auth)
    assert a2.decision == common_pb2.DECISION_ALLOW
    assert a2.catalog_version == imp.catalog_version != a.catalog_version
    r = await svc.meter.Record(meter_pb2.RecordRequest(
        reservation_id=a2.reservation_id, usage=usage(1000, 1000)), metadata=svc.auth)
    assert nanos(r.cost) == (1000 * 2_000_000 + 1000 * 8_000_000 + 500) // 1000
    assert r.catalog_version == imp.catalog_version


async def test_ping_names_tenant_and_implementation(svc):
    import p402core

    r = await svc.meter.Ping(meter_pb2.PingRequest(), metadata=svc.auth)
    assert r.tenant == svc.tenant_id and r.implementation == p402core.IMPLEMENTATION


async def test_authorize_retry_with_the_same_reservation_id_holds_once(svc):
    await put_budget(svc, "all", 10**9)
    req = meter_pb2.AuthorizeRequest(model=MODEL, owners=owners(customer="acme"),
                                     input_bytes=5000, reservation_id="gw-123")
    first = await svc.meter.Authorize(req, metadata=svc.auth)
    again = await svc.meter.Authorize(req, metadata=svc.auth)
    assert first == again and first.reservation_id == "gw-123"
    assert nanos((await budget_status(svc, "all")).held) == nanos(first.estimated_cost)
    by_request = meter_pb2.AuthorizeRequest(model=MODEL, owners=owners(customer="acme"),
                                            input_bytes=5000, request_id="req-7")
    r1 = await svc.meter.Authorize(by_request, metadata=svc.auth)
    r2 = await svc.meter.Authorize(by_request, metadata=svc.auth)
    assert r1.reservation_id == r2.reservation_id
    assert nanos((await budget_status(svc, "all")).held) == 2 * nanos(first.estimated_cost)


async def test_serve_shuts_down_gracefully_and_writes_open_holds(tmp_path):
    from p402_server.server import init_tenant, serve
    from p402_server.ledger import open_store

    url = f"sqlite+aiosqlite:///{tmp_path}/serve.db"
    store = await open_store(url)
    _tenant, key = await init_tenant(store, "acme")
    await store.close()
    ports: list[int] = []
    stop = asyncio.Event()
    task = asyncio.create_task(serve(url, "127.0.0.1:0", ready=ports.append, stop_event=stop))
    while not ports:
        assert not task.done(), task.exception()
        await asyncio.sleep(0.01)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as ch:
        from p402.v1 import meter_pb2_grpc

        meter = meter_pb2_grpc.MeterServiceStub(ch)
        md = (("authorization", f"Bearer {key}"),)
        a = await meter.Authorize(meter_pb2.AuthorizeRequest(
            model=MODEL, owners=owners(customer="acme"), input_bytes=100), metadata=md)
        r = await meter.Record(meter_pb2.RecordRequest(
            event_id="last", model=MODEL, owners=owners(customer="acme"),
            usage=usage(10, 10)), metadata=md)
    stop.set()
    await asyncio.wait_for(task, 10)
    store = await open_store(url)
    try:
        holds = await store.load_holds(_tenant)
        assert [h[0] for h in holds] == [a.reservation_id]
        assert (await store.get_event(_tenant, "last")).cost_nanos == nanos(r.cost)
    finally:
        await store.close()


def test_sigterm_stops_the_server_process(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (
        "import logging, sys;"
        f"sys.path[:0] = [{root!r}, {root + '/server'!r}, {root + '/clients/python'!r}];"
        "logging.basicConfig(level=logging.INFO);"
        "from p402_server.server import run;"
        f"run('sqlite+aiosqlite:///{tmp_path}/sig.db', '127.0.0.1:0')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == 0, log
    assert "shutting down" in log and "p402 stopped" in log


async def test_record_of_an_unknown_reservation_is_metered_not_lost(svc):
    # A hold authorized just before a crash (inside the holds' write-behind window) is
    # gone after the restart; the gateway's Record must still meter the call.
    await put_budget(svc, "all", 10**12)
    req = meter_pb2.RecordRequest(reservation_id="r-lost-1", model=MODEL,
                                  owners=common_pb2.Owners(customer="acme"),
                                  usage=usage(1000, 100))
    r = await svc.meter.Record(req, metadata=svc.auth)
    assert not r.duplicate
    cost = 1000 * 150_000 // 1000 + 100 * 600_000 // 1000  # nano-USD
    assert r.cost.units * 10**9 + r.cost.nanos == cost
    again = await svc.meter.Record(req, metadata=svc.auth)
    assert again.duplicate and again.event_id == r.event_id
    (ev,) = [e for e in await events(svc) if e.event_id == r.event_id]
    assert ev.reservation_id == "r-lost-1"
    assert "reservation.unknown" in ev.reasons
    assert (await budget_status(svc, "all")).committed.nanos == cost
    # Without a model there is nothing to price: still NOT_FOUND, naming the field.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.meter.Record(meter_pb2.RecordRequest(reservation_id="r-lost-2"),
                               metadata=svc.auth)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_flood_past_the_cap_is_refused_not_dropped(tmp_path):
    """Thousands of calls at once, far past max_concurrent_rpcs: each is served or
    refused with RESOURCE_EXHAUSTED (retryable backpressure). None is CANCELLED by
    gRPC core's pending-call queue (server.py sizes it above the cap)."""
    s = await start_service(f"sqlite+aiosqlite:///{tmp_path}/p.db", max_concurrent_rpcs=64)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") for _ in range(4)]
    try:
        stubs = [meter_pb2_grpc.MeterServiceStub(ch) for ch in channels]
        req = meter_pb2.AuthorizeRequest(model=MODEL, owners=owners(customer="acme"),
                                         input_bytes=100)

        async def one(i):
            try:
                await stubs[i % 4].Authorize(req, metadata=s.auth, timeout=60)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        codes = await asyncio.gather(*(one(i) for i in range(3000)))
        seen = {c: codes.count(c) for c in set(codes)}
        assert set(seen) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, seen
        assert seen.get(grpc.StatusCode.OK, 0) > 0
    finally:
        for ch in channels:
            await ch.close()
        await s.close()
