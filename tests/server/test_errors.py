"""Every error code the service returns, with its google.rpc.ErrorInfo naming the field."""
from __future__ import annotations

import grpc
import pytest
from google.type import money_pb2

from p402core import Conflict, InvalidArgument, NotFound, UnknownModel
from p402_server.wire.errors import DOMAIN, Overloaded, status_for
from service_harness import (  # noqa: F401 - fixtures
    admin_pb2,
    common_pb2,
    error_info,
    meter_pb2,
    owners,
    svc,
    usd,
)

MODEL = "gpt-4o-mini"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def fails(call, code: grpc.StatusCode):
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    assert exc.value.code() == code, exc.value.details()
    info = error_info(exc.value)
    assert info.domain == DOMAIN
    assert info.reason == info.reason.upper() and " " not in info.reason
    return exc.value, info


def authorize(**kw):
    kw.setdefault("model", MODEL)
    kw.setdefault("input_bytes", 10)
    return meter_pb2.AuthorizeRequest(**kw)


@pytest.mark.parametrize("request_kw, field", [
    (dict(owners=owners(customer="x" * 257)), "owners.customer"),
    (dict(owners=owners(employee="e" * 300)), "owners.employee"),
    (dict(model=""), "model"),
    (dict(input_bytes=-5), "input_bytes"),
    (dict(max_output_tokens=-1), "max_output_tokens"),
    (dict(ttl_seconds=-1), "ttl_seconds"),
    (dict(privacy_mode=42), "privacy_mode"),
    (dict(labels={f"k{i}": "v" for i in range(17)}), "labels"),
])
async def test_authorize_validation_names_the_field(svc, request_kw, field):
    _, info = await fails(svc.meter.Authorize(authorize(**request_kw), metadata=svc.auth),
                          INVALID)
    assert info.reason == "INVALID_ARGUMENT" and info.metadata["field"] == field


@pytest.mark.parametrize("usage, field", [
    (dict(input_tokens=-1), "usage.input_tokens"),
    (dict(output_tokens=-3), "usage.output_tokens"),
    (dict(input_tokens=10, cached_input_tokens=11), "usage.cached_input_tokens"),
    (dict(output_tokens=1, reasoning_tokens=2), "usage.reasoning_tokens"),
    (dict(input_tokens=10**9), "usage.input_tokens"),
])
async def test_record_usage_validation_names_the_field(svc, usage, field):
    req = meter_pb2.RecordRequest(model=MODEL, owners=owners(customer="a"),
                                  usage=common_pb2.Usage(**usage))
    _, info = await fails(svc.meter.Record(req, metadata=svc.auth), INVALID)
    assert info.metadata["field"] == field


async def test_record_money_and_enums(svc):
    bad_revenue = meter_pb2.RecordRequest(
        model=MODEL, owners=owners(customer="a"),
        revenue=money_pb2.Money(currency_code="USD", units=-1))
    _, info = await fails(svc.meter.Record(bad_revenue, metadata=svc.auth), INVALID)
    assert info.metadata["field"] == "revenue"
    euro = meter_pb2.RecordRequest(model=MODEL, owners=owners(customer="a"),
                                   revenue=money_pb2.Money(currency_code="EUR", units=1))
    _, info = await fails(svc.meter.Record(euro, metadata=svc.auth), INVALID)
    assert info.metadata["field"] == "revenue.currency_code"
    expired = meter_pb2.RecordRequest(model=MODEL, owners=owners(customer="a"),
                                      outcome=common_pb2.OUTCOME_EXPIRED)
    _, info = await fails(svc.meter.Record(expired, metadata=svc.auth), INVALID)
    assert info.metadata["field"] == "outcome"
    no_model = meter_pb2.RecordRequest(owners=owners(customer="a"))
    _, info = await fails(svc.meter.Record(no_model, metadata=svc.auth), INVALID)
    assert info.metadata["field"] == "model"


async def test_unknown_model_in_record_is_invalid_argument_on_model(svc):
    req = meter_pb2.RecordRequest(model="no-such-model", owners=owners(customer="a"),
                                  usage=common_pb2.Usage(input_tokens=1))
    err, info = await fails(svc.meter.Record(req, metadata=svc.auth), INVALID)
    assert info.metadata["field"] == "model" and "no-such-model" in err.details()


@pytest.mark.parametrize("query, field", [
    (dict(page_size=-1), "page_size"),
    (dict(page_token="not-a-token"), "page_token"),
    (dict(group_by=["planet"]), "group_by"),
    (dict(filter=meter_pb2.EventFilter(start_time_ms=-1)), "filter.start_time_ms"),
    (dict(filter=meter_pb2.EventFilter(start_time_ms=10, end_time_ms=5)),
     "filter.end_time_ms"),
    (dict(filter=meter_pb2.EventFilter(outcomes=[99])), "filter.outcomes"),
    (dict(filter=meter_pb2.EventFilter(owners=owners(task="t" * 257))),
     "filter.owners.task"),
])
async def test_query_validation_names_the_field(svc, query, field):
    _, info = await fails(svc.meter.Query(meter_pb2.QueryRequest(**query), metadata=svc.auth),
                          INVALID)
    assert info.metadata["field"] == field


@pytest.mark.parametrize("budget, field", [
    (admin_pb2.Budget(budget_id="", limit=usd(1)), "budget.budget_id"),
    (admin_pb2.Budget(budget_id="b"), "budget.limit"),
    (admin_pb2.Budget(budget_id="b", limit=money_pb2.Money(units=-5)), "budget.limit"),
    (admin_pb2.Budget(budget_id="b", limit=money_pb2.Money(units=1, nanos=-5)),
     "budget.limit.nanos"),
    (admin_pb2.Budget(budget_id="b", limit=usd(10), soft_limit=usd(20)), "budget.soft_limit"),
    (admin_pb2.Budget(budget_id="b", limit=usd(10), scope={"planet": "mars"}), "budget.scope"),
    (admin_pb2.Budget(budget_id="b", limit=usd(10), period=9), "budget.period"),
])
async def test_budget_validation_names_the_field(svc, budget, field):
    _, info = await fails(svc.admin.PutBudget(admin_pb2.PutBudgetRequest(budget=budget),
                                              metadata=svc.auth), INVALID)
    assert info.metadata["field"] == field


async def test_admin_validation(svc):
    _, info = await fails(svc.admin.CreateKey(admin_pb2.CreateKeyRequest(name="k"),
                                              metadata=svc.auth), INVALID)
    assert info.metadata["field"] == "scopes"
    _, info = await fails(svc.admin.PutPolicyRule(admin_pb2.PutPolicyRuleRequest(
        rule=admin_pb2.PolicyRule(rule_id="r")), metadata=svc.auth), INVALID)
    assert info.metadata["field"] == "rule.effect"
    _, info = await fails(svc.admin.ImportPrices(admin_pb2.ImportPricesRequest(
        format="csv", data=b"{}"), metadata=svc.auth), INVALID)
    assert info.metadata["field"] == "format"
    _, info = await fails(svc.admin.ImportPrices(admin_pb2.ImportPricesRequest(
        format="litellm", data=b"{nope"), metadata=svc.auth), INVALID)
    assert info.metadata["field"] == "data"
    _, info = await fails(svc.admin.UpdateSettings(admin_pb2.UpdateSettingsRequest(
        settings=admin_pb2.Settings(hold_ttl_seconds=-1), update_mask=["hold_ttl_seconds"]),
        metadata=svc.auth), INVALID)
    assert info.metadata["field"] == "settings.hold_ttl_seconds"
    _, info = await fails(svc.admin.UpdateSettings(admin_pb2.UpdateSettingsRequest(
        settings=admin_pb2.Settings(), update_mask=["colour"]), metadata=svc.auth), INVALID)
    assert info.metadata["field"] == "update_mask"
    _, info = await fails(svc.admin.ListKeys(admin_pb2.ListKeysRequest(page_size=-2),
                                             metadata=svc.auth), INVALID)
    assert info.metadata["field"] == "page_size"


async def test_not_found_names_the_field(svc):
    _, info = await fails(svc.meter.Release(meter_pb2.ReleaseRequest(reservation_id="nope"),
                                            metadata=svc.auth), grpc.StatusCode.NOT_FOUND)
    assert (info.reason, info.metadata["field"]) == ("NOT_FOUND", "reservation_id")
    _, info = await fails(svc.meter.Record(meter_pb2.RecordRequest(reservation_id="nope"),
                                           metadata=svc.auth), grpc.StatusCode.NOT_FOUND)
    assert info.metadata["field"] == "reservation_id"
    for call, field in [
        (svc.admin.DeleteBudget(admin_pb2.DeleteBudgetRequest(budget_id="x"),
                                metadata=svc.auth), "budget_id"),
        (svc.admin.DeletePolicyRule(admin_pb2.DeletePolicyRuleRequest(rule_id="x"),
                                    metadata=svc.auth), "rule_id"),
        (svc.admin.RevokeKey(admin_pb2.RevokeKeyRequest(key_id="x"), metadata=svc.auth),
         "key_id"),
    ]:
        _, info = await fails(call, grpc.StatusCode.NOT_FOUND)
        assert info.metadata["field"] == field


async def test_release_after_record_is_failed_precondition(svc):
    a = await svc.meter.Authorize(authorize(owners=owners(customer="a")), metadata=svc.auth)
    await svc.meter.Record(meter_pb2.RecordRequest(reservation_id=a.reservation_id),
                           metadata=svc.auth)
    err, info = await fails(svc.meter.Release(
        meter_pb2.ReleaseRequest(reservation_id=a.reservation_id), metadata=svc.auth),
        grpc.StatusCode.FAILED_PRECONDITION)
    assert info.reason == "CONFLICT" and a.reservation_id in err.details()


def _info(status):
    from google.rpc import error_details_pb2, status_pb2

    md = dict(status.trailing_metadata)
    s = status_pb2.Status.FromString(md["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    s.details[0].Unpack(info)
    return s, info


@pytest.mark.parametrize("exc, code, reason, field", [
    (InvalidArgument("usage.input_tokens", "bad"), INVALID, "INVALID_ARGUMENT",
     "usage.input_tokens"),
    (UnknownModel("m"), INVALID, "UNKNOWN_MODEL", "model"),
    (NotFound("budget", "b1"), grpc.StatusCode.NOT_FOUND, "NOT_FOUND", "budget_id"),
    (Conflict("settled"), grpc.StatusCode.FAILED_PRECONDITION, "CONFLICT", None),
    (ValueError("page_token: not ours"), INVALID, "INVALID_ARGUMENT", "page_token"),
    (Overloaded(), grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED", None),
    (RuntimeError("secret internals"), grpc.StatusCode.INTERNAL, "INTERNAL", None),
])
def test_the_one_mapping(exc, code, reason, field):
    status = status_for(exc)
    assert status.code == code
    s, info = _info(status)
    assert s.code == code.value[0] and (info.reason, info.domain) == (reason, DOMAIN)
    assert info.metadata.get("field") == field
    if code == grpc.StatusCode.INTERNAL:
        assert "secret" not in status.details  # internals are logged, not sent


def _cyclic_garbage_of_calls() -> list[str]:
    """What the cyclic collector would free now that belongs to a call: the server's
    call state, P402's frames (and whatever they hold) and P402's messages."""
    import gc

    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = []
        for o in gc.garbage:
            kind = type(o)
            if kind.__name__ in ("RPCState", "_ServicerContext"):
                found.append(kind.__name__)
            elif kind.__name__ == "frame" and "p402" in o.f_code.co_filename:
                found.append(f"frame {o.f_code.co_qualname}")
            elif kind.__module__.startswith("p402.v1"):
                found.append(kind.__name__)
        return found
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()


async def test_a_refused_call_is_freed_when_it_ends_not_by_the_cyclic_collector(svc):
    """A refused call must not leave its state (its request: up to 64 MiB) in
    reference cycles: a long-running server collects them seldom (gc_policy.py), and
    a client sending bad input would grow it without bound. Unary, streaming both
    ways, admin, a missing key and bytes that are not a message."""
    import asyncio
    import gc

    m = svc.meter
    bad = meter_pb2.RecordRequest(privacy_mode=99)  # no such mode: INVALID_ARGUMENT

    async def drain(call):
        async for _ in call:
            pass

    garbage = svc.channel.unary_unary("/p402.v1.MeterService/Record")

    calls = [
        lambda: m.Record(bad, metadata=svc.auth),
        lambda: m.RecordBatch(meter_pb2.RecordBatchRequest(records=[bad]), metadata=svc.auth),
        lambda: m.Authorize(authorize(model=""), metadata=svc.auth),
        lambda: drain(m.StreamRecords(iter([bad]), metadata=svc.auth)),
        lambda: drain(m.StreamRecordBatches(
            iter([meter_pb2.RecordBatchRequest(records=[bad])]), metadata=svc.auth)),
        lambda: drain(m.StreamAuthorize(iter([authorize()]))),  # no key
        lambda: m.Query(meter_pb2.QueryRequest(page_token="not-a-token"), metadata=svc.auth),
        lambda: drain(m.ExportEvents(meter_pb2.ExportEventsRequest(
            filter=meter_pb2.EventFilter(outcomes=[99])), metadata=svc.auth)),
        lambda: m.Query(meter_pb2.QueryRequest()),  # no key
        lambda: svc.admin.PutBudget(admin_pb2.PutBudgetRequest(), metadata=svc.auth),
        lambda: garbage(b"\xff\xff\xff", metadata=svc.auth),  # not a message at all
    ]
    for call in calls:  # warm: first-call caches are not garbage
        with pytest.raises(grpc.aio.AioRpcError):
            await call()
    await asyncio.sleep(0.2)
    gc.collect()
    for _ in range(5):
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError):
                await call()
    await asyncio.sleep(0.2)  # the server's side of each call has ended
    assert _cyclic_garbage_of_calls() == []
