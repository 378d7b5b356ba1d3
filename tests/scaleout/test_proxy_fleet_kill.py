"""Two `p402 proxy --db URL --lease on` processes on one PostgreSQL ledger share a
HARD budget; one is SIGKILLed in the middle of a wave of its answers, the other
keeps serving.

The killed proxy had answered calls whose Records were still lingering (they go
behind the answer): their holds were saved (each call takes longer at the upstream
than a hold flush), so the survivor, once the dead proxy's registration has lapsed,
expires them into the ledger at their estimate. Then:
- every call either proxy answered is in the ledger exactly once (its Record, or
  its hold expired), at a cost above zero;
- the HARD budget is never exceeded: the ledger's committed plus every open hold,
  sampled from the store throughout, stays within the limit, and so does the end;
- the budget ran out during the test (some calls were refused 402), so the limit
  was what stopped spending, and at least one answered call of the dead proxy was
  settled by the survivor (else the kill proved nothing).
"""
from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest

from tests.scaleout.conftest import asyncpg_dsn
from tests.support.openai_standin import OpenAIStandin
from tests.support.proxy_process import (
    UPSTREAM_KEY,
    proxy_process,
    storm,
    wait_until_settled,
)

UPSTREAM_SECONDS = 0.6
CALLERS = 12  # per proxy
ENV = {"P402_HOLDS_FLUSH_INTERVAL_SECONDS": "0.05", "P402_EXPIRE_INTERVAL_SECONDS": "0.1",
       "P402_LEASE_TTL_SECONDS": "3", "P402_LEASE_SAFETY_SECONDS": "1",
       "P402_LEASE_INTERVAL_SECONDS": "0.02", "P402_LEASE_RECLAIM_GRACE_SECONDS": "1"}
BUDGET = "acme-cap"


async def _setup(pg_url: str, hold_ttl_seconds: int = 1, calls: int = 60
                 ) -> tuple[str, str, int]:
    """A tenant whose holds expire `hold_ttl_seconds` after their call, a meter key and
    a HARD budget for about `calls` calls -> (tenant, meter key, the budget's limit)."""
    from p402_server.gateways.inprocess import EmbeddedP402
    from p402_server.ledger import open_store
    from p402_server.server import init_tenant

    store = await open_store(pg_url)
    try:
        tenant, admin_key = await init_tenant(store, "fleet-kill")
        await store.put_settings(tenant, {**await store.get_settings(tenant),
                                          "hold_ttl_seconds": hold_ttl_seconds})
        rt = EmbeddedP402(store)
        await rt.start()
        try:
            admin = rt.client(admin_key)
            key = (await admin.create_key("caller", ["meter"])).api_key
            probe = await admin.authorize("gpt-4o-mini", owners={"customer": "probe"},
                                          input_bytes=21, max_output_tokens=20)
            await admin.release(probe.reservation_id)
            limit = calls * probe.estimated_cost_nanos
            await admin.put_budget(BUDGET, limit_nanos=limit, period="TOTAL",
                                   enforcement="HARD", scope={"customer": "acme"})
        finally:
            await rt.stop()
    finally:
        await store.close()
    return tenant, key, limit


async def _held(conn, tenant: str) -> int:
    """The budget's committed plus its open holds, in one snapshot of the store."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        committed = await conn.fetchval(
            "SELECT coalesce(sum(committed_nanos), 0) FROM budget_periods "
            "WHERE tenant_id = $1 AND budget_id = $2", tenant, BUDGET)
        holds = await conn.fetch(
            "SELECT h.data FROM holds h WHERE h.tenant_id = $1 AND NOT EXISTS (SELECT 1 "
            "FROM events e WHERE e.tenant_id = h.tenant_id AND "
            "e.reservation_id = h.reservation_id)", tenant)
    for row in holds:
        hold = json.loads(row["data"])["hold"]
        if BUDGET in hold["budget_ids"]:
            committed += hold["amount_nanos"]
    return committed


def _ledger(pg_url: str, tenant: str) -> tuple[dict[str, list[tuple[str, int, str]]], int]:
    """(reservation id -> the events that settled it: kind, cost, reasons; the
    budget's committed plus open holds), read now."""
    import asyncpg

    async def read():
        conn = await asyncpg.connect(asyncpg_dsn(pg_url))
        try:
            out: dict[str, list] = {}
            for r in await conn.fetch(
                    "SELECT reservation_id, kind, cost_nanos, reasons FROM events "
                    "WHERE tenant_id = $1 AND reservation_id != ''", tenant):
                out.setdefault(r["reservation_id"], []).append(
                    (r["kind"], r["cost_nanos"], r["reasons"]))
            return out, await _held(conn, tenant)
        finally:
            await conn.close()

    return asyncio.run(read())


@pytest.mark.postgres
def test_a_sigkilled_leased_proxy_neither_loses_calls_nor_overspends(pg_url, tmp_path):
    import asyncpg

    tenant, key, limit = asyncio.run(_setup(pg_url))
    with OpenAIStandin.in_thread(api_key=UPSTREAM_KEY) as upstream:
        upstream.hang_next(UPSTREAM_SECONDS, times=10**6)
        procs = [proxy_process(("--db", pg_url, "--lease", "on"), upstream.base_url,
                               tmp_path / f"proxy{i}.log", ENV) for i in range(2)]
        answered: list[list[str]] = [[], []]
        refused: list[list[int]] = [[], []]
        peaks: list[int] = []

        async def run():
            conn = await asyncpg.connect(asyncpg_dsn(pg_url))
            stops = [asyncio.Event(), asyncio.Event()]
            loads = [asyncio.create_task(storm(port, key, answered[i], stops[i], refused[i],
                                               callers=CALLERS, pause=0.05))
                     for i, (_proc, port) in enumerate(procs)]

            async def sample():
                while not stops[1].is_set():
                    peaks.append(await _held(conn, tenant))
                    await asyncio.sleep(0.02)

            sampler = asyncio.create_task(sample())
            try:
                # Half of a wave of the first proxy's answers out: the Records of
                # those just answered still linger in it, and the kill takes them.
                while len(answered[0]) < CALLERS + CALLERS // 2:
                    await asyncio.sleep(0.0005)
                procs[0][0].send_signal(signal.SIGKILL)
                stops[0].set()
                await loads[0]
                # The survivor serves on past the dead one's lapse (3 s) and the
                # expiry of its holds, until the budget has refused calls.
                deadline = time.monotonic() + 30
                started = time.monotonic()
                while time.monotonic() - started < 6 or 402 not in refused[1]:
                    assert time.monotonic() < deadline, "the budget never ran out"
                    await asyncio.sleep(0.05)
                stops[1].set()
                await loads[1]
                await sampler
            finally:
                await conn.close()

        try:
            asyncio.run(run())
            # Every answered call settles: Records flush, the dead one's holds
            # expire (swept by the survivor).
            calls = answered[0] + answered[1]
            wait_until_settled(lambda: _ledger(pg_url, tenant)[0], calls)
            settled, held = _ledger(pg_url, tenant)
            peaks.append(held)
        finally:
            for proc, _port in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(30)

    assert len(set(calls)) == len(calls)
    assert all(len(evs) == 1 for evs in settled.values()), {
        r: e for r, e in settled.items() if len(e) > 1}
    assert all(settled[rid][0][1] > 0 for rid in calls)
    assert max(peaks) <= limit, (max(peaks), limit)
    assert 402 in refused[1]
    # The kill took lingering Records with it: those calls are charged at their
    # estimate by the survivor, never at nothing.
    expired = [rid for rid in answered[0] if settled[rid][0][0] == "expired"]
    assert expired, "the kill took no Record: the test proved nothing"
    assert not [rid for rid in answered[1] if settled[rid][0][0] != "record"]
