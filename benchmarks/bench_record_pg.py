"""How fast does the group-commit writer durably record events into PostgreSQL,
compared with raw ``asyncpg`` doing the same durable work?

Both sides, in the same run, each on a fresh database of the store's schema (created
by its migration), PostgreSQL's defaults (synchronous_commit on: an acknowledged
event is on disk):

- writer: 1000 concurrent callers, each awaiting ``GroupCommitWriter.write()`` one
  event at a time, as a server's handlers do (garbage collector tuned as in
  `p402 serve`, see bench_record_sqlite.py). The writer validates, converts,
  deduplicates, chains (canonical bytes and SHA-256 per event), takes the tenant's
  advisory lock, inserts, and upserts rollups, daily spend and budget periods.
- raw: one asyncpg transaction per 1000 rows: binary COPY of the same events
  (pre-built rows, hash chain and seqs included, computed before the clock starts)
  and the pre-aggregated upserts of hourly rollups, daily spend and budget periods
  (the writer's statements, their arguments built before the clock starts too):
  the database's own work with no Python per event inside the timed region, the
  floor. The ratio is writer / raw; each side is the best of --repeat alternating
  runs (the machine may be shared).

Run:  python benchmarks/bench_record_pg.py [--events N] [--repeat N] [--quick]
PostgreSQL from P402_TEST_PG_URL (default postgresql+asyncpg://postgres@127.0.0.1:5432/test,
used to create and drop the databases).
Targets: writer >= 15,000 events/s and >= 0.5x raw.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_record_sqlite as common  # noqa: E402  (sets sys.path)
from p402_server.ledger import open_store  # noqa: E402
from p402_server.ledger import schema as S  # noqa: E402
from p402_server.ledger.canonical import GENESIS, chain_step  # noqa: E402
from p402_server.ledger.model import EVENT_COLUMNS, to_values  # noqa: E402
from p402_server.ledger.writer import (  # noqa: E402
    _aggregate_daily, _aggregate_periods, _aggregate_rollups,
    _pg_upsert, _PgUpsert)

ADMIN_URL = os.environ.get("P402_TEST_PG_URL",
                           "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


def dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn(ADMIN_URL), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def fresh_db() -> tuple[str, str]:
    """A new database of the store's schema -> (SQLAlchemy URL, tenant id)."""
    from sqlalchemy.engine import make_url

    name = "p402_bench_" + secrets.token_hex(5)
    await admin(f'CREATE DATABASE "{name}"')
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    store = await open_store(url)
    tenant = await store.create_tenant("bench")
    await store.close()
    return url, tenant


async def drop(url: str) -> None:
    from sqlalchemy.engine import make_url

    await admin(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')


async def run_raw(url: str, events, batch: int) -> float:
    import asyncpg

    prev = GENESIS
    for i, e in enumerate(events, 1):  # the rows the writer stores, chained up front
        e.recorded_ms = common.T0_MS
        prev = e.chain_hash = chain_step(prev, e)
        e.chain_index = i
    batches, seq = [], 0
    rollup_upsert = _PgUpsert(S.rollups_hourly, S.ROLLUP_KEY, S.ROLLUP_SUMS)
    daily_upsert = _PgUpsert(S.spend_daily, S.SPEND_DAILY_KEY, S.ROLLUP_SUMS)
    for i in range(0, len(events), batch):
        chunk = events[i : i + batch]
        rows = [to_values(e) for e in chunk]
        records = [(seq + j + 1, *r) for j, r in enumerate(rows)]
        seq += len(rows)
        rollups = _aggregate_rollups(rows)
        batches.append((records, rollup_upsert.args(rollups),
                        daily_upsert.args(_aggregate_daily(rollups)), _aggregate_periods(chunk)))
    periods_sql = _pg_upsert("budget_periods", ("tenant_id", "budget_id", "period_start_ms"),
                             ("committed_nanos",))
    columns = ("seq", *EVENT_COLUMNS)
    conn = await asyncpg.connect(dsn(url))
    try:
        t0 = time.perf_counter()
        for records, rollups, days, periods in batches:
            async with conn.transaction():
                await conn.copy_records_to_table("events", records=records, columns=columns)
                await conn.execute(*rollups)
                await conn.execute(*days)
                if periods:
                    await conn.executemany(periods_sql, periods)
        elapsed = time.perf_counter() - t0
        count = await conn.fetchval("SELECT count(*) FROM events")
        assert count == len(events), count
    finally:
        await conn.close()
    return elapsed


async def measure(n: int, concurrency: int, repeat: int) -> dict:
    res = {"raw": 0.0, "writer": 0.0, "mean_batch": 0.0}
    for _ in range(repeat):
        for side in ("raw", "writer"):
            url, tenant = await fresh_db()
            try:
                events = common.make_events(n, tenant)
                if side == "raw":
                    res["raw"] = max(res["raw"], n / await run_raw(url, events, concurrency))
                else:
                    elapsed, mean_batch = await common.run_writer_url(url, events, concurrency)
                    if n / elapsed > res["writer"]:
                        res["writer"], res["mean_batch"] = n / elapsed, mean_batch
            finally:
                await drop(url)
    res["ratio"] = res["writer"] / res["raw"]
    return res


async def amain(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=30_000)
    ap.add_argument("--repeat", type=int, default=3, help="best of N alternating runs")
    ap.add_argument("--quick", action="store_true", help="10,000 events, one run per side")
    args = ap.parse_args(argv)
    if args.quick:
        args.events, args.repeat = 10_000, 1
    try:
        await admin("SELECT 1")
    except Exception as exc:  # noqa: BLE001
        raise SystemExit(f"PostgreSQL at {ADMIN_URL} unreachable: {exc!r}")
    print(common.machine())
    print(f"{args.events} events per run, best of {args.repeat}; PostgreSQL, "
          "synchronous_commit on; writer's GC "
          f"{os.environ.get('P402_GC') or 'tuned as p402 serve'}")
    r = await measure(args.events, 1000, args.repeat)
    print(f" 1000 concurrent: writer {r['writer']:>9,.0f} ev/s (mean batch "
          f"{r['mean_batch']:.0f})   raw asyncpg 1000/commit {r['raw']:>9,.0f} ev/s   "
          f"ratio {r['ratio']:.2f}x (targets: >= 15,000 ev/s, >= 0.5x)")
    return r


def main(argv=None) -> dict:
    try:
        import uvloop

        return uvloop.run(amain(argv))
    except ImportError:
        return asyncio.run(amain(argv))


if __name__ == "__main__":
    main()
