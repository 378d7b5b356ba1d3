"""A real P402 server for the service tests: grpc.aio on 127.0.0.1:0 over a store.

`start_service(url)` opens the store (migrated), creates a tenant with its first
admin key (init_tenant), starts the server and connects a grpc.aio channel.
Test modules use the `svc` fixture (SQLite in tmp_path) and, where a test is
worth running on PostgreSQL too, `svc_any` (SQLite, and PostgreSQL when reachable;
mandatory when CI=true).
"""
from __future__ import annotations

import asyncio
import os
import secrets
from dataclasses import dataclass, field

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from p402.v1 import admin_pb2, admin_pb2_grpc, common_pb2, meter_pb2, meter_pb2_grpc

from p402_server.runtime.config import ServerConfig
from p402_server.server import create_server, init_tenant
from p402_server.ledger import open_store

# Same source and CI rule as the store fixtures (tests/server/conftest.py).
PG_ADMIN_URL = os.environ.get("P402_TEST_PG_URL",
                              "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Background work fast enough for tests to observe (expiry, hold write-behind).
FAST = dict(expire_interval_seconds=0.05, holds_flush_interval_seconds=0.05, grace_seconds=2.0)


def bearer(key: str) -> tuple:
    return (("authorization", f"Bearer {key}"),)


@dataclass
class Service:
    url: str
    store: object
    server: object
    port: int
    channel: grpc.aio.Channel
    tenant_id: str
    api_key: str
    config: ServerConfig
    extra: list = field(default_factory=list)

    @property
    def auth(self) -> tuple:
        return bearer(self.api_key)

    @property
    def meter(self) -> meter_pb2_grpc.MeterServiceStub:
        return meter_pb2_grpc.MeterServiceStub(self.channel)

    @property
    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self.channel)

    async def key(self, *scopes: str, name: str = "test") -> str:
        """A new key of this tenant with the given scopes (through the admin API)."""
        resp = await self.admin.CreateKey(
            admin_pb2.CreateKeyRequest(
                name=name, scopes=[getattr(admin_pb2, f"SCOPE_{s.upper()}") for s in scopes]),
            metadata=self.auth)
        return resp.api_key

    async def tenant(self, name: str) -> tuple[str, str]:
        """Another tenant of the same server -> (tenant_id, admin key)."""
        return await init_tenant(self.store, name)

    async def restart(self, **config) -> None:
        """Stop the server and the store, then start both again on the same ledger."""
        await self.channel.close()
        await self.server.stop(2.0)
        await self.store.close()
        self.store = await open_store(self.url)
        cfg = ServerConfig(**{**FAST, **config}) if config else self.config
        self.server, self.port = create_server("127.0.0.1:0", store=self.store, config=cfg)
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")

    async def close(self) -> None:
        await self.channel.close()
        await self.server.stop(2.0)
        await self.store.close()


async def start_service(url: str, **config) -> Service:
    store = await open_store(url)
    tenant_id, api_key = await init_tenant(store, "acme")
    cfg = ServerConfig(**{**FAST, **config})
    server, port = create_server("127.0.0.1:0", store=store, config=cfg)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return Service(url, store, server, port, channel, tenant_id, api_key, cfg)


async def _pg_database() -> tuple[str, object]:
    """A fresh PostgreSQL database -> (url, drop coroutine factory); raises if unreachable."""
    import asyncpg

    dsn = PG_ADMIN_URL.replace("postgresql+asyncpg://", "postgresql://")
    name = "p402_svc_" + secrets.token_hex(4)
    conn = await asyncio.wait_for(asyncpg.connect(dsn), 3)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()

    async def drop():
        c = await asyncpg.connect(dsn)
        try:
            await c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await c.close()

    from sqlalchemy.engine import make_url

    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    return url, drop


@pytest.fixture
async def svc(tmp_path):
    s = await start_service(f"sqlite+aiosqlite:///{tmp_path}/p402.db")
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def svc_any(request, tmp_path):
    drop = None
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/p402.db"
    else:
        try:
            url, drop = await _pg_database()
        except Exception as exc:  # noqa: BLE001 - any failure to connect means "unreachable"
            if IN_CI:
                pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is required when CI=true: {exc}")
            pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    s = await start_service(url)
    try:
        yield s
    finally:
        await s.close()
        if drop is not None:
            await drop()


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The google.rpc.ErrorInfo detail of a failed call (asserts there is one)."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no google.rpc.Status details on {err.code()}"
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo in the status details")


def owners(**kw) -> common_pb2.Owners:
    return common_pb2.Owners(**kw)


def usd(nanos: int):
    from google.type import money_pb2

    units, rest = divmod(nanos, 1_000_000_000)
    return money_pb2.Money(currency_code="USD", units=units, nanos=rest)


def nanos(m) -> int:
    return m.units * 1_000_000_000 + m.nanos


__all__ = ["svc", "svc_any", "start_service", "Service", "bearer", "error_info", "owners",
           "usd", "nanos", "FAST", "meter_pb2", "admin_pb2", "common_pb2"]
