"""`p402 serve --workers 2`: two processes share one port (SO_REUSEPORT),
each with its own leases; the supervisor restarts a worker that dies and forwards
SIGTERM to all. On a SQLite file (workers on one machine share it like PostgreSQL).
"""
from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time

import grpc
from google.type import money_pb2
from p402.v1 import admin_pb2, admin_pb2_grpc, common_pb2, meter_pb2, meter_pb2_grpc

from .conftest import Replica

USD = 1_000_000_000


def _children(pid: int) -> set[int]:
    out = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out.update(int(x) for x in f.read().split())
    return out


def _lease_rows(db: str, tenant: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT holder_id, granted_nanos, used_nanos, expires_ms FROM budget_leases "
            "WHERE tenant_id = ?", (tenant,)).fetchall()


def _holder_pids(rows) -> set[int]:
    # holder_id is "<host>:<pid>:<random>/<n>" (leases.LeaseManager)
    return {int(h.split("/")[0].split(":")[1]) for h, *_ in rows}


async def _authorize_everywhere(target: str, md, channels: int = 16) -> int:
    """One Authorize per fresh connection (own subchannel pool: its own TCP
    connection, so the kernel spreads them over the workers), each retried until
    allowed (a worker denies until its first slice lands). -> calls allowed."""
    async def one():
        async with grpc.aio.insecure_channel(
                target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = meter_pb2_grpc.MeterServiceStub(ch)
            for _ in range(200):
                a = await stub.Authorize(meter_pb2.AuthorizeRequest(
                    model="gpt-4o-mini", owners=common_pb2.Owners(customer="acme"),
                    input_bytes=4000, max_output_tokens=200), metadata=md, timeout=30)
                if a.decision != common_pb2.DECISION_DENY:
                    return 1
                await asyncio.sleep(0.02)
            return 0
    return sum(await asyncio.gather(*(one() for _ in range(channels))))


def test_two_workers_share_the_port_each_with_its_own_leases(tmp_path):
    from p402_server.server import init_tenant
    from p402_server.ledger import open_store

    db = str(tmp_path / "workers.db")
    url = f"sqlite+aiosqlite:///{db}"

    async def init():
        store = await open_store(url)
        try:
            return await init_tenant(store, "workers")
        finally:
            await store.close()
    tenant, key = asyncio.run(init())
    md = (("authorization", f"Bearer {key}"),)
    sup = Replica(url, {}, tmp_path / "workers.log", extra_args=("--workers", "2"))
    try:
        sup.wait_ready()

        async def budget():
            async with grpc.aio.insecure_channel(sup.target) as ch:
                await admin_pb2_grpc.AdminServiceStub(ch).PutBudget(
                    admin_pb2.PutBudgetRequest(budget=admin_pb2.Budget(
                        budget_id="team", scope={"customer": "acme"},
                        period=common_pb2.PERIOD_MONTH, enforcement=common_pb2.ENFORCEMENT_HARD,
                        limit=money_pb2.Money(currency_code="USD", units=100))),
                    metadata=md, timeout=30)
        asyncio.run(budget())
        workers = _children(sup.proc.pid)
        assert len(workers) == 2
        assert asyncio.run(_authorize_everywhere(sup.target, md)) == 16
        # Both workers served (each leased the budget on its own), and only they.
        assert _holder_pids(_lease_rows(db, tenant)) == workers

        # A worker that dies is started again; the new one leases on its own.
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = _children(sup.proc.pid)
            if len(now) == 2 and victim not in now:
                break
            time.sleep(0.1)
        now = _children(sup.proc.pid)
        assert len(now) == 2 and victim not in now
        (fresh,) = now - workers
        sup.wait_ready()
        for _ in range(10):  # until the new worker has served some of them
            asyncio.run(_authorize_everywhere(sup.target, md))
            if fresh in _holder_pids(_lease_rows(db, tenant)):
                break
        assert fresh in _holder_pids(_lease_rows(db, tenant))
    finally:
        rc = sup.stop()
    assert rc == 0  # SIGTERM reached every worker; each drained and exited
    rows = _lease_rows(db, tenant)
    stopped_at = time.time_ns() // 1_000_000
    for holder, _granted, _used, expires_ms in rows:
        pid = int(holder.split(":")[1])
        if pid != victim:  # returned at shutdown: set to expire at once
            assert expires_ms <= stopped_at
    with sqlite3.connect(db) as conn:
        (leased,) = conn.execute(
            "SELECT leased_nanos FROM budget_allocations WHERE tenant_id = ?",
            (tenant,)).fetchone()
    # The allocation's invariant: leased = what the lease rows still hold.
    assert leased == sum(g - u for _h, g, u, _e in rows)
