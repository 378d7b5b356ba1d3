"""StreamAuthorizeBatches: a message of Authorize requests answered by one message, a
result per request in order, each what unary Authorize answers (errors in-band for
their request only); an oversized message ends the stream naming `requests` and
reserves nothing; a key revoked mid-stream refuses every request of the next message;
decisions made on either stream are counted in the metrics like unary ones."""
from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from p402.v1 import admin_pb2, common_pb2, meter_pb2
from tests.server.service_harness import bearer, nanos, owners, svc, usd  # noqa: F401

MODEL = "gpt-4o-mini"


def request(**kw) -> meter_pb2.AuthorizeRequest:
    kw.setdefault("owners", owners(customer="acme"))
    kw.setdefault("model", MODEL)
    return meter_pb2.AuthorizeRequest(**kw)


def field_of(status) -> str:
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            return info.metadata["field"]
    raise AssertionError("no ErrorInfo in the in-band status")


async def held(svc, budget_id: str) -> int:
    """What `budget_id` holds now, asked with a zero-cost unary Authorize (unknown
    model: denied, reserves nothing)."""
    a = await svc.meter.Authorize(request(model="no-such-model"), metadata=svc.auth)
    [b] = [b for b in a.budgets if b.budget_id == budget_id]
    return nanos(b.held)


async def put_cap(svc) -> None:
    await svc.admin.PutBudget(admin_pb2.PutBudgetRequest(budget=admin_pb2.Budget(
        budget_id="cap", limit=usd(10**12), period=common_pb2.PERIOD_TOTAL,
        enforcement=common_pb2.ENFORCEMENT_HARD, scope={"customer": "acme"})),
        metadata=svc.auth)


async def test_a_message_is_answered_in_order_as_authorize_would(svc):
    await put_cap(svc)
    reqs = [request(input_bytes=400 * (i + 1), max_output_tokens=50) for i in range(4)]
    reqs.insert(2, request(max_output_tokens=-5))  # refused: its own error only
    reqs.append(request(model="no-such-model"))  # denied: an answer, not an error
    call = svc.meter.StreamAuthorizeBatches(metadata=svc.auth)
    await call.write(meter_pb2.AuthorizeBatchRequest(requests=reqs))
    first = await call.read()
    await call.write(meter_pb2.AuthorizeBatchRequest(requests=[request(max_output_tokens=50)]))
    second = await call.read()
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF

    kinds = [r.WhichOneof("result") for r in first.results]
    assert kinds == ["response", "response", "error", "response", "response", "response"]
    err = first.results[2].error
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert field_of(err) == "max_output_tokens"
    allowed = [r.response for r in first.results[:2] + first.results[3:5]]
    assert all(a.decision == common_pb2.DECISION_ALLOW and a.reservation_id for a in allowed)
    # Each answer belongs to its request: estimates grow with the prompt sizes.
    sizes = [a.estimated_input_tokens for a in allowed]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    assert first.results[5].response.decision == common_pb2.DECISION_DENY
    # The same request as a unary call gets the same estimate; every allowed one holds.
    unary = await svc.meter.Authorize(reqs[0], metadata=svc.auth)
    assert nanos(unary.estimated_cost) == nanos(allowed[0].estimated_cost)
    [again] = second.results
    total = sum(nanos(a.estimated_cost) for a in allowed + [again.response, unary])
    assert await held(svc, "cap") == total


async def test_an_oversized_message_ends_the_stream_and_reserves_nothing(svc):
    await put_cap(svc)
    call = svc.meter.StreamAuthorizeBatches(metadata=svc.auth)
    await call.write(meter_pb2.AuthorizeBatchRequest(
        requests=[request(max_output_tokens=50)] * 2))
    ok = await call.read()
    await call.write(meter_pb2.AuthorizeBatchRequest(
        requests=[request(max_output_tokens=50)] * 1001))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requests" in err.value.details() and "1000" in err.value.details()
    assert await held(svc, "cap") == sum(nanos(r.response.estimated_cost) for r in ok.results)


async def test_a_key_revoked_mid_stream_refuses_the_next_message(svc):
    created = await svc.admin.CreateKey(admin_pb2.CreateKeyRequest(
        name="gw", scopes=[admin_pb2.SCOPE_METER]), metadata=svc.auth)
    call = svc.meter.StreamAuthorizeBatches(metadata=bearer(created.api_key))
    await call.write(meter_pb2.AuthorizeBatchRequest(requests=[request()] * 2))
    before = await call.read()
    await svc.admin.RevokeKey(admin_pb2.RevokeKeyRequest(key_id=created.key.key_id),
                              metadata=svc.auth)
    await call.write(meter_pb2.AuthorizeBatchRequest(requests=[request()] * 3))
    after = await call.read()
    call.cancel()
    assert [r.WhichOneof("result") for r in before.results] == ["response"] * 2
    assert [r.WhichOneof("result") for r in after.results] == ["error"] * 3
    assert {r.error.code for r in after.results} == {grpc.StatusCode.UNAUTHENTICATED.value[0]}


def counts(svc) -> tuple[float, float]:
    """(decisions counted, unary Authorize RPCs timed) in the server's metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = svc.server.metrics.exposition().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    decided = sum(s.value for s in fams["p402_decisions"].samples
                  if s.name == "p402_decisions_total")
    timed = sum(s.value for s in fams["p402_rpc_duration_seconds"].samples
                if s.name == "p402_rpc_duration_seconds_count"
                and s.labels["method"] == "Authorize")
    return decided, timed


async def test_decisions_on_streams_are_counted_like_unary_ones(svc):
    decided, timed = counts(svc)
    call = svc.meter.StreamAuthorizeBatches(metadata=svc.auth)
    await call.write(meter_pb2.AuthorizeBatchRequest(requests=[request()] * 4))
    await call.read()
    call.cancel()
    assert counts(svc) == (decided + 4, timed)  # decisions, not RPCs: no RPC latency
    single = svc.meter.StreamAuthorize(metadata=svc.auth)
    for _ in range(3):
        await single.write(request())
        await single.read()
    single.cancel()
    assert counts(svc) == (decided + 7, timed)
    await svc.meter.Authorize(request(), metadata=svc.auth)
    assert counts(svc) == (decided + 8, timed + 1)


async def test_hostile_fields_fail_their_own_request_only(svc):
    await put_cap(svc)
    good = request(max_output_tokens=50)
    hostile = [request(owners=owners(customer="a\x00b")),
               request(model="gpt\x00"),
               request(input_bytes=2**63 - 1),
               request(max_output_tokens=2**63 - 1),
               request(labels={"env\x00": "x"}),
               request(reservation_id="r" * 300)]
    call = svc.meter.StreamAuthorizeBatches(metadata=svc.auth)
    await call.write(meter_pb2.AuthorizeBatchRequest(requests=[good, *hostile, good]))
    resp = await call.read()
    call.cancel()
    assert [r.WhichOneof("result") for r in resp.results] == (
        ["response"] + ["error"] * 6 + ["response"])
    assert [field_of(r.error) for r in resp.results[1:-1]] == [
        "owners.customer", "model", "input_bytes", "max_output_tokens", "labels",
        "reservation_id"]
    assert {r.error.code for r in resp.results[1:-1]} == {
        grpc.StatusCode.INVALID_ARGUMENT.value[0]}
    # Only the two good requests hold anything.
    assert await held(svc, "cap") == sum(nanos(r.response.estimated_cost)
                                         for r in (resp.results[0], resp.results[-1]))
