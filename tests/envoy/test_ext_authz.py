"""Envoy ext_authz: Check calls made with the xds-protos stubs, as Envoy makes them,
against a P402 server started with ext_authz on."""
from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

pytest.importorskip("envoy.service.auth.v3.external_auth_pb2",
                    reason="xds-protos is not installed (extra `envoy`)")

from envoy.service.auth.v3 import (  # noqa: E402
    attribute_context_pb2 as ac,
    external_auth_pb2 as ea,
    external_auth_pb2_grpc as ea_grpc,
)
from google.rpc import code_pb2  # noqa: E402

import p402core  # noqa: E402

CATALOG = p402core.Catalog.default()
BODY = {"model": "gpt-4o-mini", "max_tokens": 300,
        "messages": [{"role": "user", "content": "Review this diff, please." * 10}]}


class Rig:
    def __init__(self, stub, admin, meter_key, store):
        self.stub, self.admin, self.meter_key, self.store = stub, admin, meter_key, store

    async def check(self, *, headers=None, body=BODY, ext=None, key="meter",
                    raw: bool = False):
        h = {"content-type": "application/json", ":path": "/v1/chat/completions",
             ":method": "POST"}
        if key == "meter":
            h["authorization"] = f"Bearer {self.meter_key}"
        elif key:
            h["authorization"] = f"Bearer {key}"
        h.update(headers or {})
        http = ac.AttributeContext.HttpRequest(method="POST", path="/v1/chat/completions",
                                               host="llm.internal", headers=h)
        if body is not None:
            data = json.dumps(body)
            if raw:
                http.raw_body = data.encode()
            else:
                http.body = data
            http.size = len(data.encode())
        req = ea.CheckRequest(attributes=ac.AttributeContext(
            request=ac.AttributeContext.Request(http=http),
            context_extensions=ext or {}))
        return await self.stub.Check(req, timeout=5)

    async def events(self, n=1, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            page = await self.admin.query(page_size=100)
            if len(page.items) >= n or time.monotonic() > deadline:
                return list(reversed(page.items))
            await asyncio.sleep(0.02)


async def _start(tmp_path, **envoy_kw):
    from p402_client import AsyncP402Client
    from p402_server.gateways.envoy import EnvoyConfig
    from p402_server.server import create_server, init_tenant
    from p402_server.ledger import open_store

    store = await open_store(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    server, port = create_server("127.0.0.1:0", store=store,
                                 ext_authz=EnvoyConfig(**envoy_kw) if envoy_kw else True)
    await server.start()
    _t, admin_key = await init_tenant(store, "envoy-test")
    admin = AsyncP402Client(f"127.0.0.1:{port}", api_key=admin_key, timeout=10.0)
    meter = await admin.create_key("envoy", ["meter"])
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    rig = Rig(ea_grpc.AuthorizationStub(channel), admin, meter.api_key, store)

    async def stop():
        await channel.close()
        await admin.close()
        await server.stop(1.0)
        await store.close()

    return rig, stop


@pytest.fixture
async def rig(tmp_path):
    r, stop = await _start(tmp_path)
    try:
        yield r
    finally:
        await stop()


def _headers(ok) -> dict:
    return {h.header.key: h.header.value for h in ok.headers}


async def test_ok_adds_reservation_header_and_dynamic_metadata(rig):
    resp = await rig.check(headers={"x-p402-customer": "acme", "x-p402-label-team": "infra"},
                           ext={"feature": "code-review", "workflow": "pr-bot"})
    assert resp.status.code == code_pb2.OK
    assert resp.HasField("ok_response")
    h = _headers(resp.ok_response)
    rid = h["x-p402-reservation-id"]
    assert rid and h["x-p402-decision"] == "ALLOW"
    assert int(h["x-p402-output-token-cap"]) == 300  # the body's max_tokens
    md = resp.dynamic_metadata
    assert md["decision"] == "ALLOW" and md["reservation_id"] == rid
    # Money as a decimal string (a Struct number would be a float).
    est = int(md["estimated_cost_nanos"])
    price = CATALOG.lookup("gpt-4o-mini")
    assert est >= price.cost_nanos(1, 300) > 0
    assert list(resp.ok_response.headers_to_remove) == []

    # The reservation is real: recording it lands owners from headers and extensions.
    res = await rig.admin.record(rid, input_tokens=70, output_tokens=120)
    assert res.cost_nanos == price.cost_nanos(70, 120)
    [ev] = await rig.events()
    assert (ev.owners.customer, ev.owners.feature, ev.owners.workflow) == (
        "acme", "code-review", "pr-bot")
    assert ev.labels == {"team": "infra"}


async def test_route_extensions_win_over_caller_headers(rig):
    resp = await rig.check(headers={"x-p402-feature": "free-lunch"},
                           ext={"feature": "code-review", "label.env": "prod"})
    rid = _headers(resp.ok_response)["x-p402-reservation-id"]
    await rig.admin.record(rid, input_tokens=10, output_tokens=10)
    [ev] = await rig.events()
    assert ev.owners.feature == "code-review" and ev.labels == {"env": "prod"}


async def test_raw_body_and_max_output_tokens(rig):
    body = {"model": "gpt-4o-mini", "input": "hello", "max_output_tokens": 42}
    resp = await rig.check(body=body, raw=True, headers={"x-p402-customer": "a"})
    assert int(_headers(resp.ok_response)["x-p402-output-token-cap"]) == 42


async def test_budget_denial_is_402_with_json_body(rig):
    await rig.admin.put_budget("tiny", limit_nanos=1_000, period="TOTAL",
                               enforcement="HARD", scope={"customer": "acme"})
    resp = await rig.check(headers={"x-p402-customer": "acme"})
    assert resp.status.code == code_pb2.PERMISSION_DENIED
    d = resp.denied_response
    assert d.status.code == 402
    assert {h.header.key: h.header.value for h in d.headers}["content-type"] == \
        "application/json"
    body = json.loads(d.body)
    assert body["error"]["type"] == "insufficient_quota"
    assert body["error"]["code"] == "budget.exceeded" and body["error"]["param"] is None
    assert resp.dynamic_metadata["decision"] == "DENY"
    [ev] = await rig.events()
    assert ev.kind == "denied" and ev.owners.customer == "acme"


async def test_rate_limit_is_429_with_retry_after(rig):
    await rig.admin.put_policy_rule("slow", "RATE_LIMIT", rate_limit=1,
                                    rate_unit="REQUESTS", window_seconds=30,
                                    per="customer")
    first = await rig.check(headers={"x-p402-customer": "acme"})
    assert first.status.code == code_pb2.OK
    second = await rig.check(headers={"x-p402-customer": "acme"})
    d = second.denied_response
    assert second.status.code == code_pb2.RESOURCE_EXHAUSTED and d.status.code == 429
    headers = {h.header.key: h.header.value for h in d.headers}
    assert 1 <= int(headers["retry-after"]) <= 30
    assert json.loads(d.body)["error"]["code"] == "policy.rate_limited"
    # Another customer has its own bucket.
    other = await rig.check(headers={"x-p402-customer": "globex"})
    assert other.status.code == code_pb2.OK


async def test_key_from_context_extension(rig):
    resp = await rig.check(key="", ext={"p402_key": rig.meter_key, "customer": "acme"})
    assert resp.status.code == code_pb2.OK


async def test_missing_and_unknown_keys_are_401(rig):
    resp = await rig.check(key="")
    assert resp.denied_response.status.code == 401
    resp = await rig.check(key="p402_" + "z" * 40)
    assert resp.status.code == code_pb2.UNAUTHENTICATED
    assert resp.denied_response.status.code == 401
    assert json.loads(resp.denied_response.body)["error"]["code"] == "invalid_api_key"


async def test_a_read_only_key_is_403(rig):
    reader = await rig.admin.create_key("reader", ["read"])
    resp = await rig.check(key=reader.api_key, headers={"x-p402-customer": "a"})
    assert resp.denied_response.status.code == 403


async def test_no_model_anywhere_is_400_naming_it(rig):
    resp = await rig.check(body=None, headers={"x-p402-customer": "a"})
    d = resp.denied_response
    assert d.status.code == 400 and json.loads(d.body)["error"]["param"] == "model"
    # The header (or the route's extension) can name the model instead.
    resp = await rig.check(body=None, headers={"x-p402-customer": "a",
                                               "x-p402-model": "gpt-4o-mini"})
    assert resp.status.code == code_pb2.OK


async def test_bad_owner_value_is_400_naming_the_field(rig):
    resp = await rig.check(headers={"x-p402-customer": "x" * 5000})
    d = resp.denied_response
    assert d.status.code == 400
    assert "customer" in json.loads(d.body)["error"]["param"]


async def test_input_bytes_follow_the_body_length(rig):
    small = await rig.check(headers={"x-p402-customer": "a"},
                            body={**BODY, "messages": [{"role": "user", "content": "hi"}]})
    big = await rig.check(headers={"x-p402-customer": "a"},
                          body={**BODY, "messages": [{"role": "user",
                                                      "content": "x" * 40_000}]})
    assert int(big.dynamic_metadata["estimated_cost_nanos"]) > \
        int(small.dynamic_metadata["estimated_cost_nanos"])


async def test_strip_authorization_when_configured(tmp_path):
    rig, stop = await _start(tmp_path, strip_authorization=True, provider="openai")
    try:
        resp = await rig.check(headers={"x-p402-customer": "a"})
        assert list(resp.ok_response.headers_to_remove) == ["authorization"]
    finally:
        await stop()


async def test_health_and_reflection_include_the_authorization_service(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from p402_server.gateways.envoy import SERVICE_NAME

    assert SERVICE_NAME == "envoy.service.auth.v3.Authorization"
    rig, stop = await _start(tmp_path)
    try:
        port = rig.admin.target.rsplit(":", 1)[1]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            resp = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)

            async def ask():
                yield reflection_pb2.ServerReflectionRequest(list_services="")
                # What `grpcurl describe` asks: the file that defines the service.
                yield reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol=SERVICE_NAME)

            listed, described = [r async for r in refl.ServerReflectionInfo(ask())]
            names = {s.name for s in listed.list_services_response.service}
            assert {SERVICE_NAME, "p402.v1.MeterService", "p402.v1.AdminService",
                    "grpc.health.v1.Health"} <= names
            assert not described.HasField("error_response"), described.error_response
            assert described.file_descriptor_response.file_descriptor_proto
    finally:
        await stop()


async def test_without_ext_authz_the_service_is_not_announced(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from p402_server.gateways.envoy import SERVICE_NAME
    from p402_server.server import create_server
    from p402_server.ledger import open_store

    store = await open_store(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    server, port = create_server("127.0.0.1:0", store=store)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop(1.0)
        await store.close()
