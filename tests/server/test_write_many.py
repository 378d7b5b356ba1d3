"""GroupCommitWriter.write_many: a batch's events queued and answered together (the
RecordBatch path), with write()'s semantics per event: order, idempotency, failure."""
from __future__ import annotations

import inspect

import pytest

from p402_server.ledger import LedgerEvent
from p402core._enums import InvalidArgument

T0 = 1_790_000_000_000 - 1_790_000_000_000 % 3_600_000


def _ev(tenant: str, event_id: str, cost: int = 10) -> LedgerEvent:
    return LedgerEvent(tenant, event_id, event_ms=T0, cost_nanos=cost, customer="c1",
                       budget_charges=(("b", T0),))


def _fail_once(monkeypatch, writer, name: str) -> None:
    """The writer's database step ``name`` raises on its first call (inside the
    transaction, after the events were inserted)."""
    real = getattr(writer._ops, name)
    calls = {"n": 0}

    def before():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("disk on fire")

    if inspect.iscoroutinefunction(real):
        async def wrapped(conn, arg):
            before()
            return await real(conn, arg)
    else:
        def wrapped(conn, arg):
            before()
            return real(conn, arg)
    monkeypatch.setattr(writer._ops, name, wrapped)


async def test_results_in_order_with_duplicates(store, writer, tenant):
    first = await writer.write(_ev(tenant, "old", 500))
    events = [_ev(tenant, "a", 1), _ev(tenant, "old", 999), _ev(tenant, "b", 2),
              _ev(tenant, "a", 777)]
    results = await writer.write_many(events)
    assert [r.event.event_id for r in results] == ["a", "old", "b", "a"]
    assert [r.duplicate for r in results] == [False, True, False, True]
    # a duplicate answers with the FIRST event: the ledger's, or the batch's first
    assert results[1].seq == first.seq and results[1].event.cost_nanos == 500
    assert results[3].seq == results[0].seq and results[3].event.cost_nanos == 1
    assert results[0].seq < results[2].seq  # queued in order
    assert await store.count_events(tenant) == 3
    assert await store.budget_totals(tenant) == {("b", T0): 503}


async def test_empty_batch(writer):
    assert await writer.write_many([]) == []


async def test_invalid_event_refuses_the_whole_batch(store, writer, tenant):
    bad = LedgerEvent(tenant, "bad", kind="nonsense")
    with pytest.raises(InvalidArgument) as err:
        await writer.write_many([_ev(tenant, "ok"), bad])
    assert err.value.field == "kind"
    await writer.flush()
    assert await store.count_events(tenant) == 0


@pytest.mark.parametrize("return_exceptions", [False, True])
async def test_failed_transaction(store, writer, tenant, monkeypatch, return_exceptions):
    _fail_once(monkeypatch, writer, "upsert_rollups")
    events = [_ev(tenant, f"e{i}") for i in range(5)]
    if return_exceptions:
        results = await writer.write_many(events, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
    else:
        with pytest.raises(RuntimeError, match="disk on fire"):
            await writer.write_many(events)
    assert await store.count_events(tenant) == 0  # rolled back
    again = await writer.write_many(events)  # the writer keeps going
    assert not any(r.duplicate for r in again)
    assert await store.count_events(tenant) == 5


async def test_large_batch_spans_transactions(store, tenant):
    from p402_server.ledger import GroupCommitWriter

    w = GroupCommitWriter(store, max_batch=64)
    await w.start()
    try:
        results = await w.write_many([_ev(tenant, f"e{i}") for i in range(300)])
    finally:
        await w.stop()
    assert [r.event.event_id for r in results] == [f"e{i}" for i in range(300)]
    assert not any(r.duplicate for r in results)
    assert sorted(r.seq for r in results) == [r.seq for r in results]
    assert w.stats.transactions >= 5
    assert await store.count_events(tenant) == 300
