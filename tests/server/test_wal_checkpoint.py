"""On a SQLite file, the group-commit writer's WAL is checkpointed beside its
transactions (writer._Checkpointer), not only by a commit past SQLite's 1000 pages.

A connection opened with ``immutable=1`` reads the database file alone, without the
WAL: it sees an event only once a checkpoint has copied it there.
"""
from __future__ import annotations

import sqlite3

from p402_server.ledger import GroupCommitWriter, open_store
from p402_server.ledger import writer as writer_mod
from p402_server.ledger.model import LedgerEvent


def _events_in_file(path) -> int:
    con = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return con.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        con.close()


async def _started_writer(tmp_path):
    """(the database file, its store, a tenant, a started writer on it)."""
    path = tmp_path / "ledger.db"
    store = await open_store(f"sqlite:///{path}")
    tenant = await store.create_tenant("acme")
    writer = GroupCommitWriter(store)
    await writer.start()
    return path, store, tenant, writer


async def test_committed_events_reach_the_database_file(tmp_path):
    path, store, tenant, writer = await _started_writer(tmp_path)
    try:
        for k in range(3):  # a few small transactions: far below 1000 WAL pages
            await writer.write_many([LedgerEvent(tenant, f"e{k}-{j}", cost_nanos=j + 1)
                                     for j in range(20)])
        ops = writer._ops
        assert isinstance(ops, writer_mod._SqliteThreadOps)
        backstop = ops._conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one()
        ops._conn.rollback()
        assert backstop == writer_mod._Checkpointer.BACKSTOP_PAGES
    finally:
        await writer.stop()  # waits for the checkpoint the last commit asked for
    assert ops._checkpointer is None and ops._executor is None
    assert _events_in_file(path) == 60 == await store.count_events(tenant)
    await store.close()


async def test_a_failing_checkpoint_costs_no_write(tmp_path, monkeypatch, caplog):
    path, store, tenant, writer = await _started_writer(tmp_path)
    checkpointer = writer._ops._checkpointer

    class Broken:
        def cursor(self):
            raise sqlite3.OperationalError("disk I/O error")

        def close(self):
            pass

    monkeypatch.setattr(checkpointer, "_conn", Broken())
    try:
        results = await writer.write_many([LedgerEvent(tenant, f"e{j}") for j in range(10)])
        await writer.flush()
    finally:
        await writer.stop()
    assert [r.duplicate for r in results] == [False] * 10
    assert checkpointer.failures >= 1
    assert "WAL checkpoint failed" in caplog.text
    assert await store.count_events(tenant) == 10
    await store.close()


async def test_a_checkpoint_is_asked_for_per_enough_events_or_commits(tmp_path):
    """Not after every commit (one Record at a time, a checkpoint's fsync per commit
    slowed the next one): after EVERY_EVENTS events or EVERY_COMMITS commits, and at
    close for what is left."""
    path, store, tenant, writer = await _started_writer(tmp_path)
    checkpointer = writer._ops._checkpointer
    asked = []
    real = checkpointer.request
    checkpointer.request = lambda: (asked.append(1), real())[1]
    cp = writer_mod._Checkpointer
    try:
        for k in range(cp.EVERY_COMMITS - 1):  # small commits, one event each
            await writer.write(LedgerEvent(tenant, f"one-{k}"))
        assert asked == []
        await writer.write(LedgerEvent(tenant, "one-last"))
        assert len(asked) == 1  # the EVERY_COMMITS-th commit
        await writer.write_many([LedgerEvent(tenant, f"big-{j}")
                                 for j in range(cp.EVERY_EVENTS)])
        assert len(asked) == 2  # a batch of EVERY_EVENTS asks at once
        await writer.write(LedgerEvent(tenant, "tail"))
        assert len(asked) == 2
    finally:
        await writer.stop()
    assert len(asked) == 3  # at close, for the tail
    assert _events_in_file(path) == cp.EVERY_COMMITS + cp.EVERY_EVENTS + 1
    await store.close()
