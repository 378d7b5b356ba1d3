"""The dashboard tests' harness: a real P402 server (gRPC + the dashboard on
127.0.0.1, port 0) over a SQLite ledger in tmp_path, two tenants, keys of every
scope, and a seeded ledger written through the real gRPC Authorize/Record path (so
budgets, policy results, retries and catalog versions are what the service makes).
A module of its own (not conftest.py), so test modules can import its helpers by a
name no other test directory uses; conftest.py re-exports the fixtures.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import aiohttp
import grpc
import pytest
from google.type import money_pb2
from p402.v1 import admin_pb2, admin_pb2_grpc, common_pb2, meter_pb2, meter_pb2_grpc

from p402_server.runtime.config import ServerConfig
from p402_server.dashboard import DashboardConfig
from p402_server.server import create_server, init_tenant
from p402_server.ledger import open_store

MODEL = "gpt-4o-mini"  # default catalog: 150,000 pico-USD/token in, 600,000 out
FAST = dict(expire_interval_seconds=0.05, holds_flush_interval_seconds=0.05,
            grace_seconds=2.0)


def money(nanos: int) -> money_pb2.Money:
    units, rest = divmod(nanos, 1_000_000_000)
    return money_pb2.Money(currency_code="USD", units=units, nanos=rest)


def md(key: str) -> tuple:
    return (("authorization", f"Bearer {key}"),)


@dataclass
class Tenant:
    tenant_id: str
    admin_key: str
    read_key: str = ""
    meter_key: str = ""
    event_ids: list[str] = field(default_factory=list)


@dataclass
class Dash:
    store: object
    server: object
    channel: grpc.aio.Channel
    a: Tenant
    b: Tenant

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def meter(self):
        return meter_pb2_grpc.MeterServiceStub(self.channel)

    @property
    def admin(self):
        return admin_pb2_grpc.AdminServiceStub(self.channel)

    async def key(self, t: Tenant, *scopes: str) -> str:
        resp = await self.admin.CreateKey(admin_pb2.CreateKeyRequest(
            name="+".join(scopes), scopes=[getattr(admin_pb2, f"SCOPE_{s.upper()}")
                                           for s in scopes]), metadata=md(t.admin_key))
        return resp.api_key

    async def record(self, t: Tenant, *, customer: str, feature: str = "chat",
                     workflow: str = "support", input_tokens: int = 1000,
                     output_tokens: int = 200, revenue: int = 0, attempt: int = 0,
                     retry_of: str = "", outcome=common_pb2.OUTCOME_SUCCESS,
                     event_id: str = "", model: str = MODEL) -> str:
        """Authorize then Record one call; returns the event id."""
        a = await self.meter.Authorize(meter_pb2.AuthorizeRequest(
            model=model, owners=common_pb2.Owners(customer=customer, feature=feature,
                                                  workflow=workflow),
            input_bytes=input_tokens * 4, max_output_tokens=500), metadata=md(t.admin_key))
        r = await self.meter.Record(meter_pb2.RecordRequest(
            event_id=event_id, reservation_id=a.reservation_id,
            usage=common_pb2.Usage(input_tokens=input_tokens, output_tokens=output_tokens),
            revenue=money(revenue) if revenue else None, attempt=attempt, retry_of=retry_of,
            outcome=outcome), metadata=md(t.admin_key))
        t.event_ids.append(r.event_id)
        return r.event_id


async def _start(tmp_path, **dash_cfg) -> Dash:
    store = await open_store(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    a_id, a_key = await init_tenant(store, "Acme Corp")
    b_id, b_key = await init_tenant(store, "Beta LLC")
    server, port = create_server(
        "127.0.0.1:0", store=store, config=ServerConfig(**FAST), http="127.0.0.1:0",
        dashboard_config=DashboardConfig(**dash_cfg))
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    d = Dash(store, server, channel, Tenant(a_id, a_key), Tenant(b_id, b_key))
    for t in (d.a, d.b):
        t.read_key = await d.key(t, "read")
        t.meter_key = await d.key(t, "meter")
    return d


async def seed(d: Dash) -> None:
    """Tenant A: a budget, a few customers, a retry chain, revenue; tenant B: one event."""
    await d.admin.PutBudget(admin_pb2.PutBudgetRequest(budget=admin_pb2.Budget(
        budget_id="acme-month", limit=money(2_000_000_000),
        scope={"customer": "acme"})), metadata=md(d.a.admin_key))
    first = await d.record(d.a, customer="acme", revenue=5_000_000, event_id="ev-first",
                           outcome=common_pb2.OUTCOME_TIMEOUT, attempt=1)
    await d.record(d.a, customer="acme", revenue=5_000_000, event_id="ev-retry",
                   attempt=2, retry_of=first)
    await d.record(d.a, customer="globex", feature="search", workflow="triage",
                   input_tokens=3000, output_tokens=50)
    await d.record(d.a, customer="initech", feature="summarize", workflow="reports",
                   input_tokens=200, output_tokens=900, revenue=100_000)
    await d.record(d.b, customer="beta-secret-customer", event_id="ev-beta-only")


async def close(d: Dash) -> None:
    await d.channel.close()
    await d.server.stop(2.0)
    await d.store.close()


@pytest.fixture
async def dash(tmp_path):
    d = await _start(tmp_path)
    await seed(d)
    try:
        yield d
    finally:
        await close(d)


@pytest.fixture
async def http(dash):
    """An HTTP client with its own cookie jar (unsafe=True: cookies for 127.0.0.1)."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        yield s


_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    m = _CSRF.search(html)
    assert m, "no CSRF token in the form"
    return m.group(1)


async def sign_in(http: aiohttp.ClientSession, base: str, key: str, *,
                  expect: int = 200) -> aiohttp.ClientResponse:
    """GET the form, POST the key with its CSRF token; returns the final response."""
    async with http.get(base + "/dashboard/signin") as r:
        token = csrf_of(await r.text())
    resp = await http.post(base + "/dashboard/signin",
                           data={"csrf": token, "api_key": key, "next": ""})
    await resp.read()
    assert resp.status == expect, (resp.status, await resp.text())
    return resp
