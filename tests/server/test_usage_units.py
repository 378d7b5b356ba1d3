"""Usage beyond text tokens over the wire, on SQLite and PostgreSQL: a Record with
units and a service tier is priced from the model's unit and tier rates, kept in the
ledger (Query gives them back), chained with canonical encoding v2 (the chain
verifies), and bad units are INVALID_ARGUMENT naming the field, with nothing lost."""
from __future__ import annotations

import grpc
import pytest
from p402.v1 import common_pb2, meter_pb2

import p402core
from p402_server.ledger import canonical
from tests.server.service_harness import nanos, owners, svc_any  # noqa: F401

CATALOG = p402core.Catalog.default()


async def _events(svc):
    return (await svc.meter.Query(meter_pb2.QueryRequest(page_size=50),
                                  metadata=svc.auth)).events


async def test_units_and_tiers_are_priced_kept_and_chained(svc_any):
    svc = svc_any
    # gpt-audio: audio tokens at their own rates; the default catalog has them
    assert CATALOG.lookup("gpt-audio").units.get("audio_input_tokens")
    usage = common_pb2.Usage(input_tokens=1000, output_tokens=300, audio_input_tokens=600,
                             audio_output_tokens=200)
    a = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model="gpt-audio", owners=owners(customer="acme"), input_bytes=4000,
        max_output_tokens=500), metadata=svc.auth)
    r = await svc.meter.Record(meter_pb2.RecordRequest(
        reservation_id=a.reservation_id, usage=usage), metadata=svc.auth)
    want = CATALOG.cost_nanos("gpt-audio", input_tokens=1000, output_tokens=300,
                              audio_input_tokens=600, audio_output_tokens=200)
    assert nanos(r.cost) == want
    assert want > CATALOG.cost_nanos("gpt-audio", input_tokens=1000, output_tokens=300)

    # meter-only: a transcription by the second, a batch chat, images
    calls = [
        ("whisper-1", common_pb2.Usage(audio_ms=61_500), {"audio_ms": 61_500}, ""),
        ("gpt-4o-mini", common_pb2.Usage(input_tokens=10_000, output_tokens=1000,
                                         service_tier="batch"), {}, "batch"),
        ("low/1024-x-1024/gpt-image-1", common_pb2.Usage(images=3), {"images": 3}, ""),
        ("tts-1", common_pb2.Usage(characters=1234), {"characters": 1234}, ""),
    ]
    for model, u, units, tier in calls:
        r = await svc.meter.Record(meter_pb2.RecordRequest(
            model=model, owners=owners(customer="acme"), usage=u), metadata=svc.auth)
        want = CATALOG.cost_nanos(model, input_tokens=u.input_tokens,
                                  output_tokens=u.output_tokens, service_tier=tier, **units)
        assert want > 0 and nanos(r.cost) == want, model
    assert nanos(r.cost) == 18_510_000  # 1,234 characters x 15 USD per million
    batch = CATALOG.cost_nanos("gpt-4o-mini", input_tokens=10_000, output_tokens=1000,
                               service_tier="batch")
    assert batch * 2 == CATALOG.cost_nanos("gpt-4o-mini", input_tokens=10_000,
                                           output_tokens=1000)

    await svc.meter.Record(meter_pb2.RecordRequest(  # text tokens only
        model="gpt-4o", owners=owners(customer="acme"),
        usage=common_pb2.Usage(input_tokens=10, output_tokens=1)), metadata=svc.auth)
    events = {e.model: e for e in await _events(svc)}
    assert events["whisper-1"].usage.audio_ms == 61_500
    assert events["gpt-4o-mini"].usage.service_tier == "batch"
    assert events["low/1024-x-1024/gpt-image-1"].usage.images == 3
    assert events["gpt-audio"].usage.audio_output_tokens == 200
    # events with units are chained in encoding v2, the others stay v1; all verify
    rows, _ = await svc.store.query_events(svc.tenant_id, page_size=50)
    headers = {canonical.canonical_bytes(e).split(b"\n", 1)[0] for e in rows}
    assert headers == {b"p402.event.v1", b"p402.event.v2"}
    assert (await svc.store.verify_chain(svc.tenant_id)).ok


@pytest.mark.parametrize("usage,field", [
    (common_pb2.Usage(input_tokens=10, audio_input_tokens=11), "usage.input_tokens"),
    (common_pb2.Usage(output_tokens=5, reasoning_tokens=3, image_output_tokens=3),
     "usage.output_tokens"),
    (common_pb2.Usage(images=-1), "usage.images"),
    (common_pb2.Usage(pixels=2**62), "usage.pixels"),
    (common_pb2.Usage(service_tier="gold"), "usage.service_tier"),
    (common_pb2.Usage(service_tier="batch\x00"), "usage.service_tier"),
])
async def test_bad_units_are_refused_naming_the_field(svc_any, usage, field):
    svc = svc_any
    a = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model="gpt-4o-mini", owners=owners(customer="acme"), input_bytes=400),
        metadata=svc.auth)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.meter.Record(meter_pb2.RecordRequest(
            reservation_id=a.reservation_id, usage=usage), metadata=svc.auth)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()
    # nothing lost: the reservation is still open, a good Record settles it
    r = await svc.meter.Record(meter_pb2.RecordRequest(
        reservation_id=a.reservation_id, usage=common_pb2.Usage(input_tokens=100)),
        metadata=svc.auth)
    assert nanos(r.cost) == CATALOG.cost_nanos("gpt-4o-mini", input_tokens=100)


async def test_authorize_reserves_expected_quantities(svc_any):
    from p402.v1 import admin_pb2

    from tests.server.service_harness import usd

    svc = svc_any
    model = "low/1024-x-1024/gpt-image-1"
    per_image = CATALOG.cost_nanos(model, images=1)
    assert per_image > 0
    await svc.admin.PutBudget(admin_pb2.PutBudgetRequest(budget=admin_pb2.Budget(
        budget_id="img", limit=usd(3 * per_image), period=common_pb2.PERIOD_TOTAL,
        enforcement=common_pb2.ENFORCEMENT_HARD, scope={"customer": "acme"})),
        metadata=svc.auth)
    a = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model=model, owners=owners(customer="acme"), input_bytes=40,
        expected_usage=common_pb2.Usage(images=2)), metadata=svc.auth)
    assert a.decision == common_pb2.DECISION_ALLOW
    assert nanos(a.estimated_cost) >= 2 * per_image
    # two more images do not fit the HARD budget: denied before the call
    b = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model=model, owners=owners(customer="acme"), input_bytes=40,
        expected_usage=common_pb2.Usage(images=2)), metadata=svc.auth)
    assert b.decision == common_pb2.DECISION_DENY and "budget.exceeded" in b.reasons
    r = await svc.meter.Record(meter_pb2.RecordRequest(
        reservation_id=a.reservation_id, usage=common_pb2.Usage(images=2)),
        metadata=svc.auth)
    assert nanos(r.cost) == 2 * per_image

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
            model=model, owners=owners(customer="acme"), input_bytes=40,
            expected_usage=common_pb2.Usage(input_tokens=5)), metadata=svc.auth)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected_usage.input_tokens" in info.value.details()


async def test_exports_carry_units_so_v2_events_verify_from_the_export(svc_any):
    import csv
    import io

    from p402_server.ledger import evidence

    svc = svc_any
    await svc.meter.Record(meter_pb2.RecordRequest(
        model="whisper-1", owners=owners(customer="acme"),
        usage=common_pb2.Usage(audio_ms=2_500)), metadata=svc.auth)
    await svc.meter.Record(meter_pb2.RecordRequest(
        model="gpt-4o-mini", owners=owners(customer="acme"),
        usage=common_pb2.Usage(input_tokens=100, output_tokens=5, service_tier="flex")),
        metadata=svc.auth)
    stored = {e.event_id: e for e in (await svc.store.query_events(svc.tenant_id,
                                                                   page_size=10))[0]}
    for e in await _events(svc):
        row = evidence.event_row(e)
        assert row["usage"]["audio_ms"] == (2_500 if e.model == "whisper-1" else 0)
        # nested (jsonl) and flat (csv, every value a string) rows rebuild the event
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=evidence.CSV_COLUMNS)
        w.writeheader()
        w.writerow(evidence.flat_row(row))
        [flat] = list(csv.DictReader(io.StringIO(buf.getvalue())))
        for r in (row, flat):
            rebuilt = evidence.ledger_event(r, svc.tenant_id)
            assert canonical.canonical_bytes(rebuilt) == \
                canonical.canonical_bytes(stored[e.event_id])
