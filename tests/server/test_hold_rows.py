"""Open holds saved to the ledger: what a restart or another process reads back.

The periodic write-behind encodes each hold from its Authorization (the price's JSON
once per price); the shutdown path encodes the engine's own hold records. Both must
store the same data, or a hold restored elsewhere would settle differently.
"""
from __future__ import annotations

import asyncio
import json
import sqlite3

from p402_server.gateways.inprocess import EmbeddedP402
from p402_server.ledger import open_store
from p402_server.ledger.model import EventFilter, hold_row
from p402_server.server import init_tenant


async def _stored(path) -> dict:
    con = sqlite3.connect(path)
    try:
        rows = con.execute("SELECT reservation_id, expires_ms, data, maker, amount_nanos, "
                           "budget_ids FROM holds").fetchall()
    finally:
        con.close()
    return {r[0]: r[1:] for r in rows}


async def _started(path):
    """A ledger at `path` with a tenant, and a runtime started on it."""
    store = await open_store(f"sqlite+aiosqlite:///{path}")
    tenant, admin_key = await init_tenant(store, "holds")
    emb = EmbeddedP402(store)
    await emb.start()
    return store, tenant, admin_key, emb


async def test_write_behind_rows_are_the_engine_hold_records(tmp_path):
    path = tmp_path / "ledger.db"
    store, tenant, admin_key, emb = await _started(path)
    try:
        admin = emb.client(admin_key)
        # A SOFT budget nearly spent: holds in its scope are WARN (their meta is kept).
        await admin.put_budget("soft", limit_nanos=1_000, enforcement="SOFT",
                               scope={"customer": "acme"})
        meter = emb.client(admin_key)
        auths = [
            await meter.authorize("gpt-4o-mini", owners={"customer": "acme"},
                                  labels={"team": "a", "env": "prod"}, input_bytes=400,
                                  max_output_tokens=50, attempt=2, retry_of="r-1"),
            await meter.authorize("gpt-4o", owners={"customer": "zeta", "task": "t"},
                                  input_bytes=10, max_output_tokens=5),
            await meter.authorize("gpt-4o-mini", input_bytes=10, max_output_tokens=5),
        ]
        assert all(a.allowed and a.reservation_id for a in auths)
        assert auths[0].decision.name == "WARN"
        rt = next(iter(emb.runtime.tenants.values()))
        await rt.flush_holds()
        written = await _stored(path)
        records = {rec["reservation_id"]: rec for rec in rt.engine.hold_records()}
        assert set(written) == set(records) == {a.reservation_id for a in auths}
        for rid, (expires_ms, data, maker, amount, budget_ids) in written.items():
            rec = records[rid]
            meta = rt._hold_meta.get(rid)
            # (tuples in the meta are JSON arrays: compare what JSON makes of both)
            expected = {"hold": rec, "meta": list(meta) if meta else None}
            assert json.loads(data) == json.loads(json.dumps(expected))
            assert expires_ms == rec["expires_ms"] and maker == ""
            assert amount == rec["amount_nanos"]
            assert json.loads(budget_ids) == rec["budget_ids"]
        assert records[auths[0].reservation_id]["budget_ids"] == ["soft"]
        assert json.loads(written[auths[0].reservation_id][1])["meta"] is not None

        # Settled holds are deleted at the next flush; shutdown writes the rest whole.
        await meter.record(auths[0].reservation_id, input_tokens=100, output_tokens=20)
        await rt.flush_holds()
        assert set(await _stored(path)) == {a.reservation_id for a in auths[1:]}
    finally:
        await emb.stop()
    after_stop = await _stored(path)
    assert set(after_stop) == {a.reservation_id for a in auths[1:]}

    # A restart puts them back, and they settle as they would have here.
    emb2 = EmbeddedP402(store)
    await emb2.start()
    try:
        meter = emb2.client(admin_key)
        rec = await meter.record(auths[1].reservation_id, input_tokens=10, output_tokens=5)
        assert rec.cost_nanos > 0
        assert rec.estimated_cost_nanos == auths[1].estimated_cost_nanos  # the hold's
        events, _ = await store.query_events(tenant, EventFilter(), page_size=10)
        settled = next(ev for ev in events if ev.event_id == rec.event_id)
        assert (settled.customer, settled.task) == ("zeta", "t")  # owners from the hold
    finally:
        await emb2.stop()
        await store.close()


async def test_holds_saved_through_the_store_once_the_writer_stopped(tmp_path):
    path = tmp_path / "ledger.db"
    store, tenant, _, emb = await _started(path)
    await emb.writer.stop()
    try:
        row = hold_row(tenant, "r1", 123, json.dumps({"hold": {}}), "", {"amount_nanos": 7,
                                                                          "budget_ids": ["b"]})
        await emb.writer.save_holds(tenant, [row])
        assert (await _stored(path))["r1"] == (123, '{"hold": {}}', "", 7, '["b"]')
        await emb.writer.save_holds(tenant, [], ["r1"])
        assert "r1" not in await _stored(path)
    finally:
        await emb.runtime.stop()
        await store.close()


async def test_a_hold_never_written_is_never_deleted_and_a_written_one_is(tmp_path):
    """The write-behind deletes the saved row of a settled hold, and only that: a
    Record settled before its hold was ever written sends no delete to the ledger."""
    path = tmp_path / "ledger.db"
    store, _tenant, admin_key, emb = await _started(path)
    deleted: list = []
    real = emb.writer.save_holds

    async def save_holds(tenant_id, rows, deletes=()):
        deleted.extend(deletes)
        return await real(tenant_id, rows, deletes)

    emb.writer.save_holds = save_holds
    try:
        meter = emb.client(admin_key)
        early = await meter.authorize("gpt-4o-mini", owners={"customer": "acme"},
                                      input_bytes=40, max_output_tokens=5)
        rt = next(iter(emb.runtime.tenants.values()))
        await rt.flush_holds()  # `early` is on disk
        late = await meter.authorize("gpt-4o-mini", owners={"customer": "acme"},
                                     input_bytes=40, max_output_tokens=5)
        for a in (early, late):  # `late` settles before any flush wrote it
            await meter.record(a.reservation_id, input_tokens=9, output_tokens=4)
        again = await meter.record(late.reservation_id, input_tokens=9, output_tokens=4)
        assert again.duplicate
        await rt.flush_holds()
        assert deleted == [early.reservation_id]
        assert await _stored(path) == {}
    finally:
        await emb.stop()
        await store.close()


async def test_a_saved_hold_stays_until_the_event_that_settles_it_is_committed(tmp_path):
    """The hold is the call's safety net until the ledger has its settlement: a flush
    between the engine's settlement and the event's commit must not delete it, or a
    crash in that gap loses the call (neither its Record nor its hold is saved)."""
    path = tmp_path / "ledger.db"
    store, _tenant, admin_key, emb = await _started(path)
    gate = asyncio.Event()
    try:
        meter = emb.client(admin_key)
        auths = [await meter.authorize("gpt-4o-mini", owners={"customer": "acme"},
                                       input_bytes=40, max_output_tokens=20)
                 for _ in range(2)]
        rt = next(iter(emb.runtime.tenants.values()))
        await rt.flush_holds()
        assert set(await _stored(path)) == {a.reservation_id for a in auths}
        # The writer's transactions wait at the gate: the Records' events stay queued.
        transaction = emb.writer._transaction

        async def gated(batch):
            await gate.wait()
            return await transaction(batch)

        emb.writer._transaction = gated
        record = asyncio.ensure_future(
            meter.record(auths[0].reservation_id, input_tokens=10, output_tokens=5))
        release = asyncio.ensure_future(meter.release(auths[1].reservation_id))
        while rt.engine.hold_records():  # both settled in the engine
            await asyncio.sleep(0.001)
        await rt.flush_holds()
        assert set(await _stored(path)) == {a.reservation_id for a in auths}
        assert not record.done() and not release.done()
        gate.set()
        assert (await record).cost_nanos > 0
        await release
        await rt.flush_holds()  # committed: now they go
        assert await _stored(path) == {}
    finally:
        gate.set()
        await emb.stop()
        await store.close()
