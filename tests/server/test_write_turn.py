"""On a SQLite file, the store's own writes are never starved by the group-commit
writer (Store.write_turn).

SQLite lets one connection write at a time and its busy handler is not fair: a
connection polling for the lock can wait behind back-to-back transactions of the
writer's thread until busy_timeout, then fail with "database is locked". Here the
timeout is cut to 5 ms and the writer kept busy without a pause; every store write
made meanwhile must still succeed.
"""
from __future__ import annotations

import asyncio

from p402_server.ledger import GroupCommitWriter
from p402_server.ledger import engine as store_engine
from p402_server.ledger import open_store
from p402_server.ledger.model import LedgerEvent, hold_row


async def test_store_writes_take_their_turn_beside_a_saturated_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(store_engine, "SQLITE_BUSY_TIMEOUT_MS", 5)
    store = await open_store(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    tenant = await store.create_tenant("acme")
    writer = GroupCommitWriter(store)
    await writer.start()
    stop = asyncio.Event()
    written = 0

    async def flood(k: int) -> None:
        nonlocal written
        i = 0
        while not stop.is_set():
            await writer.write_many([LedgerEvent(tenant, f"f{k}-{i}-{j}", cost_nanos=1)
                                     for j in range(50)])
            written += 50
            i += 1

    floods = [asyncio.ensure_future(flood(k)) for k in range(32)]
    try:
        await asyncio.sleep(0.2)
        for n in range(30):
            row = hold_row(tenant, f"h{n}", 1, '{"hold": {}}', "", {})
            await store.save_hold_rows(tenant, [row])  # the store's own connection
            await store.purge_contents()
            await writer.save_holds(tenant, [], [f"h{n}"])  # the writer's thread
        assert await store.load_holds(tenant) == []
    finally:
        stop.set()
        await asyncio.gather(*floods)
        await writer.stop()
    assert written > 0 and await store.count_events(tenant) == written
    await store.close()
