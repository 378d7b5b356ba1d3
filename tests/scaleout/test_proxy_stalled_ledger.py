"""`p402 proxy --db postgresql://…` SIGKILLed while the ledger's events table is stalled.

A database that is slow to take events (a lock, a long checkpoint, a vacuum) while
the rest of it answers is the worst moment for a crash: the proxy keeps answering
(its Records go behind the answers), the engine settles each call's hold, and the
Records' events wait in the group-commit writer. The holds saved in the meantime
are the calls' only safety net: a hold's row must stay until the event that settled
it has committed. Here a test transaction locks the events table against inserts
(the holds table stays writable) for several hold flushes, the proxy is killed
inside the stall, the lock goes, and the proxy is started again: every call it
answered reaches the ledger exactly once, those answered in the stall by their
saved hold expiring at its estimate (none is lost).
"""
from __future__ import annotations

import asyncio
import signal

import pytest

from tests.scaleout.conftest import asyncpg_dsn
from tests.support.openai_standin import OpenAIStandin
from tests.support.proxy_process import (
    CALLERS,
    UPSTREAM_KEY,
    proxy_process,
    storm,
    tenant_with_hold_ttl,
    wait_until_settled,
)

UPSTREAM_SECONDS = 0.6  # every call's hold is saved before its answer
ENV = {"P402_HOLDS_FLUSH_INTERVAL_SECONDS": "0.05", "P402_EXPIRE_INTERVAL_SECONDS": "0.1"}
STALL_SECONDS = 1.0  # twenty hold flushes, and more than a wave of answers


def _settled(pg_url: str, tenant: str) -> dict[str, list[tuple[str, int]]]:
    """reservation id -> its settling events (kind, cost)."""
    import asyncpg

    async def read():
        conn = await asyncpg.connect(asyncpg_dsn(pg_url))
        try:
            out: dict[str, list] = {}
            for r in await conn.fetch(
                    "SELECT reservation_id, kind, cost_nanos FROM events "
                    "WHERE tenant_id = $1 AND reservation_id != ''", tenant):
                out.setdefault(r["reservation_id"], []).append((r["kind"], r["cost_nanos"]))
            return out
        finally:
            await conn.close()

    return asyncio.run(read())


@pytest.mark.postgres
def test_a_proxy_killed_while_the_ledger_stalls_loses_no_answered_call(pg_url, tmp_path):
    import asyncpg

    tenant, key = tenant_with_hold_ttl(pg_url, 1, "stalled")
    answered: list[str] = []
    first_wave: list[str] = []  # recorded before the stall
    in_stall: list[str] = []  # answered while the events table was locked
    with OpenAIStandin.in_thread(api_key=UPSTREAM_KEY) as upstream:
        upstream.hang_next(UPSTREAM_SECONDS, times=10**6)
        proc, port = proxy_process(("--db", pg_url), upstream.base_url,
                                   tmp_path / "proxy.log", ENV)

        async def run():
            stop = asyncio.Event()
            load = asyncio.create_task(storm(port, key, answered, stop))
            lock = await asyncpg.connect(asyncpg_dsn(pg_url))
            try:
                while len(answered) < CALLERS:  # a first wave, recorded as usual
                    await asyncio.sleep(0.005)
                first_wave.extend(answered[:CALLERS])
                while await lock.fetchval(
                        "SELECT count(*) FROM events WHERE tenant_id = $1 AND "
                        "reservation_id = ANY($2::text[])", tenant, first_wave) < CALLERS:
                    await asyncio.sleep(0.01)
                # Inserts into events wait for this transaction; reads and every
                # other table (holds included) do not.
                tx = lock.transaction()
                await tx.start()
                await lock.execute("LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE")
                first = len(answered)
                await asyncio.sleep(STALL_SECONDS)
                in_stall.extend(answered[first:])
                proc.send_signal(signal.SIGKILL)
                stop.set()
                await load
                await tx.rollback()
            finally:
                await lock.close()

        try:
            asyncio.run(run())
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
        before = _settled(pg_url, tenant)
        # Started again: nothing comes for the tenant; its saved holds settle.
        proc2, _ = proxy_process(("--db", pg_url), upstream.base_url,
                                 tmp_path / "restart.log", ENV)
        try:
            wait_until_settled(lambda: _settled(pg_url, tenant), answered)
        finally:
            proc2.send_signal(signal.SIGTERM)
            proc2.wait(30)

    assert in_stall, "no call was answered while the ledger stalled"
    assert not [rid for rid in in_stall if rid in before]  # the kill took their Records
    after = _settled(pg_url, tenant)
    assert len(set(answered)) == len(answered)
    assert all(len(evs) == 1 for evs in after.values()), {
        r: e for r, e in after.items() if len(e) > 1}
    assert all(after[rid][0][1] > 0 for rid in answered)
    assert {after[rid][0][0] for rid in first_wave} == {"record"}
    assert {after[rid][0][0] for rid in in_stall} == {"expired"}
