"""The SQLite writer's multi-row statements (ledger/writer.py `_ManyRows`).

The writer's thread runs each batch's inserts and upserts as a few multi-row
statements instead of an executemany (one GIL release per row). These tests check
they do what the executemany did: every row, in order, the same changed-row count
(DO NOTHING skips uncounted, upserts counted), upserts of one key inside one
statement added up, within SQLite's bound-variable limit, in at most log2(n)
statements; and that a whole batch through the writer still lands as before.
"""
from __future__ import annotations

import random

import pytest
import sqlalchemy as sa

from p402_server.ledger import LedgerEvent, open_store
from p402_server.ledger.model import EventFilter
from p402_server.ledger.writer import GroupCommitWriter, _ManyRows

INSERT = "INSERT INTO t (k, a, b) VALUES (?, ?, ?) ON CONFLICT (k) DO NOTHING"
UPSERT = ("INSERT INTO t (k, a, b) VALUES (?, ?, ?) ON CONFLICT (k) DO UPDATE SET "
          "a = t.a + excluded.a, b = excluded.b")


@pytest.fixture
def conn(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path}/t.db")
    statements = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def count(_conn, _cursor, statement, params, _context, executemany):
        statements.append((statement, executemany, len(params)))

    with engine.connect() as c:
        c.exec_driver_sql("CREATE TABLE t (k INTEGER PRIMARY KEY, a INTEGER, b TEXT)")
        c.commit()
        statements.clear()
        yield c, statements
    engine.dispose()


def test_the_statement_is_split_into_head_group_and_tail():
    many = _ManyRows(INSERT)
    assert many.width == 3
    assert many.text(2) == ("INSERT INTO t (k, a, b) VALUES (?, ?, ?), (?, ?, ?) "
                            "ON CONFLICT (k) DO NOTHING")
    many.limit(32766)
    assert many.max_rows == 512  # the cap
    many.limit(999)
    assert many.max_rows == 256  # 256 * 3 <= 999 < 512 * 3
    many.limit(5)
    assert many.max_rows == 1


@pytest.mark.parametrize("n", [0, 1, 2, 3, 255, 256, 257, 1000, 1023])
def test_every_row_in_order_in_at_most_log2_statements(conn, n):
    c, statements = conn
    many = _ManyRows(INSERT)
    many.limit(999)  # 256 rows of 3 per statement at most
    rows = [(i * 7 + 1, i, f"r{i}") for i in range(n)]
    assert many.run(c, rows) == n
    inserts = list(statements)
    # rowid order is insertion order: the rows went in as given.
    got = c.exec_driver_sql("SELECT k, a, b FROM t ORDER BY rowid").all()
    assert [tuple(r) for r in got] == rows
    assert all(not em and p <= 999 for _s, em, p in inserts)
    assert sum(p for _s, _em, p in inserts) == 3 * n
    assert len(inserts) <= n.bit_length() + n // 256


def test_do_nothing_skips_are_not_counted_and_upserts_add_up(conn):
    c, _ = conn
    many = _ManyRows(INSERT)
    assert many.run(c, [(1, 1, "a"), (2, 2, "b")]) == 2
    # Two of five already there: three inserted, the counts say so.
    assert many.run(c, [(1, 9, "x"), (3, 3, "c"), (2, 9, "y"), (4, 4, "d"),
                        (5, 5, "e")]) == 3
    assert c.exec_driver_sql("SELECT a FROM t WHERE k = 1").scalar_one() == 1
    up = _ManyRows(UPSERT)
    # The same key twice inside one statement: the second row updates the first.
    assert up.run(c, [(1, 10, "p"), (6, 6, "f"), (1, 100, "q")]) == 3
    assert tuple(c.exec_driver_sql("SELECT a, b FROM t WHERE k = 1").one()) == (111, "q")


def test_the_same_as_executemany_for_random_rows(conn):
    c, _ = conn
    rng = random.Random(7)
    many = _ManyRows(UPSERT)
    many.limit(300)
    c.exec_driver_sql("CREATE TABLE u (k INTEGER PRIMARY KEY, a INTEGER, b TEXT)")
    for _ in range(20):
        rows = [(rng.randrange(50), rng.randrange(-5, 5), rng.choice("xyz"))
                for _ in range(rng.randrange(0, 300))]
        assert many.run(c, rows) == len(rows)
        if rows:  # the executemany it replaces, on a twin table
            c.exec_driver_sql(UPSERT.replace(" t ", " u ").replace("t.a", "u.a"), rows)
    assert (c.exec_driver_sql("SELECT k, a, b FROM t ORDER BY k").all()
            == c.exec_driver_sql("SELECT k, a, b FROM u ORDER BY k").all())


async def test_a_writer_batch_lands_through_multi_row_statements(tmp_path):
    store = await open_store(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    writer = GroupCommitWriter(store, max_batch=1000)
    await writer.start()
    try:
        t0 = 1_790_000_000_000
        events = [LedgerEvent("acme", f"e{i:04d}", event_ms=t0 + i, cost_nanos=10 + i,
                              customer=f"c{i % 7}") for i in range(700)]
        results = await writer.write_many(events)
        assert [r.event.event_id for r in results] == [e.event_id for e in events]
        assert not any(r.duplicate for r in results)
        again = await writer.write_many(events[:10])  # retried: the first results
        assert all(r.duplicate for r in again)
    finally:
        await writer.stop()
    got, _ = await store.query_events("acme", EventFilter(), page_size=1000)
    assert sorted(e.event_id for e in got) == [e.event_id for e in events]
    assert sum(e.cost_nanos for e in got) == sum(10 + i for i in range(700))
    await store.close()
