"""Statements, on SQLite and PostgreSQL: closing a month states each customer's spend
(lines by feature and model, totals equal to the ledger), closing again gives the
same statement, a late event goes into the next statement as an adjustment and never
into the closed one, the signature covers every line, and the ledger check catches a
statement that does not match it."""
from __future__ import annotations

import datetime as dt
import json

import grpc
import pytest
from p402.v1 import admin_pb2, common_pb2, meter_pb2

from p402_server.ledger import receipts

from p402_server.ledger import statements
from tests.server.service_harness import nanos, owners, svc_any  # noqa: F401


def _ms(y, m, d) -> int:
    return int(dt.datetime(y, m, d, 12, tzinfo=dt.timezone.utc).timestamp() * 1000)


OCT, NOV = _ms(2026, 10, 15), _ms(2026, 11, 10)


async def _rec(svc, customer, feature, model, when, tokens=10_000, revenue=None):
    r = await svc.meter.Record(meter_pb2.RecordRequest(
        model=model, owners=owners(customer=customer, feature=feature), event_time_ms=when,
        usage=common_pb2.Usage(input_tokens=tokens, output_tokens=tokens // 10)),
        metadata=svc.auth)
    return nanos(r.cost)


async def _close(svc, period, customer=None):
    req = (admin_pb2.CloseStatementsRequest(period=period, every_customer=True)
           if customer is None else
           admin_pb2.CloseStatementsRequest(period=period, customer=customer))
    resp = await svc.admin.CloseStatements(req, metadata=svc.auth)
    return [json.loads(s.document_json) for s in resp.statements], resp


async def _keys(svc):
    resp = await svc.admin.GetEvidenceKeys(admin_pb2.GetEvidenceKeysRequest(),
                                           metadata=svc.auth)
    return receipts.keys_from_set(json.loads(resp.key_set_json))


async def test_close_states_each_customer_and_late_events_become_adjustments(svc_any):
    svc = svc_any
    oct_acme = [await _rec(svc, "acme", "chat", "gpt-4o-mini", OCT),
                await _rec(svc, "acme", "chat", "gpt-4o", OCT)]
    nov_acme = [await _rec(svc, "acme", "chat", "gpt-4o-mini", NOV),
                await _rec(svc, "acme", "search", "gpt-4o-mini", NOV, tokens=3000)]
    nov_globex = await _rec(svc, "globex", "chat", "gpt-4o", NOV)

    [oct_st], resp = await _close(svc, "2026-10")
    assert oct_st["customer"] == "acme" and oct_st["totals"]["cost_nanos"] == sum(oct_acme)
    assert {(x["feature"], x["model"]) for x in oct_st["lines"]} == {
        ("chat", "gpt-4o-mini"), ("chat", "gpt-4o")}
    assert resp.statements[0].csv.startswith(",".join(statements.CSV_COLUMNS))
    keys = await _keys(svc)
    assert statements.verify_document(json.dumps(oct_st), keys)[0]
    # closing again: the same statement, byte for byte
    again, resp2 = await _close(svc, "2026-10")
    assert resp2.statements[0].document_json == resp.statements[0].document_json

    # a late October event: not in October's statement, in the next one as an adjustment
    late = await _rec(svc, "acme", "chat", "gpt-4o-mini", OCT + 3600_000)
    got = await svc.admin.GetStatement(admin_pb2.GetStatementRequest(
        period="2026-10", customer="acme"), metadata=svc.auth)
    assert got.document_json == resp.statements[0].document_json
    nov, _ = await _close(svc, "2026-11")
    by = {s["customer"]: s for s in nov}
    assert set(by) == {"acme", "globex"}
    acme = by["acme"]
    assert sum(x["cost_nanos"] for x in acme["lines"]) == sum(nov_acme)
    assert [a["period"] for a in acme["adjustments"]] == ["2026-10"]
    assert acme["adjustments"][0]["cost_nanos"] == late
    assert acme["totals"]["cost_nanos"] == sum(nov_acme) + late
    assert acme["after_index"] == oct_st["through_index"]
    assert by["globex"]["totals"]["cost_nanos"] == nov_globex and not by["globex"]["adjustments"]
    # totals equal the ledger's events the statement names: November's up to its head,
    # and October's committed since October was closed
    events = (await svc.meter.Query(meter_pb2.QueryRequest(page_size=100),
                                    metadata=svc.auth)).events
    nov_start, nov_end = statements.period_bounds("2026-11")
    covered = [e for e in events if e.owners.customer == "acme"
               and e.chain_index <= acme["through_index"]
               and (nov_start <= e.event_time_ms < nov_end
                    or e.chain_index > acme["after_index"])]
    assert sum(nanos(e.cost) for e in covered) == acme["totals"]["cost_nanos"]
    assert len(covered) == acme["totals"]["events"] == 3

    # the ledger check: genuine statements verify, altered ones do not
    for s in (oct_st, acme, by["globex"]):
        v = await svc.admin.VerifyStatement(admin_pb2.Statement(document_json=json.dumps(s)),
                                            metadata=svc.auth)
        assert v.ok, v.reason
    forged = json.loads(json.dumps(acme))
    forged["lines"][0]["cost_nanos"] -= 1
    v = await svc.admin.VerifyStatement(admin_pb2.Statement(document_json=json.dumps(forged)),
                                        metadata=svc.auth)
    assert not v.ok and "altered" in v.reason
    listed = await svc.admin.ListStatements(admin_pb2.ListStatementsRequest(
        every_customer=True), metadata=svc.auth)
    assert [(s.period, s.customer) for s in listed.statements][0] == ("2026-10", "acme")
    assert len(listed.statements) == 3


async def test_refusals(svc_any):
    svc = svc_any
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _close(svc, "2026-13")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "period" in \
        info.value.details()
    now = dt.datetime.now(dt.timezone.utc)
    await _rec(svc, "acme", "chat", "gpt-4o-mini", int(now.timestamp() * 1000))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _close(svc, now.strftime("%Y-%m"), "acme")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.admin.GetStatement(admin_pb2.GetStatementRequest(
            period="2026-01", customer="acme"), metadata=svc.auth)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await _close(svc, "2026-01"))[0] == []  # nothing to state


async def test_a_validly_signed_statement_that_the_ledger_does_not_back_is_caught(svc_any):
    """Signed by the tenant's own key, but not what the ledger says (a statement made
    outside P402, or from a ledger since changed): the recomputation names the fields."""
    svc = svc_any
    await _rec(svc, "acme", "chat", "gpt-4o-mini", OCT)
    [doc], _ = await _close(svc, "2026-10")
    rt = await svc.server.runtime.get(svc.tenant_id)
    body = {k: v for k, v in doc.items() if k not in ("kid", "sig")}
    body["lines"][0]["cost_nanos"] += 1_000
    body["totals"]["cost_nanos"] += 1_000
    resigned = statements.sign(body, rt.receipt_signer())
    assert statements.verify_document(resigned, await _keys(svc))[0]  # the signature holds
    v = await svc.admin.VerifyStatement(admin_pb2.Statement(document_json=resigned),
                                        metadata=svc.auth)
    assert not v.ok and set(v.differences) == {"lines", "totals"}
