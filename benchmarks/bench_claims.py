"""What do settlement claims cost the ledger's writer? (scale-out)

With leases on, every settling event (record, release, expiry) carries
``LedgerEvent.claim``: the group-commit writer inserts a hold_claims row for its
reservation in the event's own transaction and reads the winners back, so one event
settles a reservation whichever process sees it. This measures that cost where it
lands: the writer's durable throughput with every event claiming a distinct
reservation, against the same writer and events without claims, in the same run.

Both sides: 1000 concurrent callers awaiting ``GroupCommitWriter.write()`` one event
at a time (a server's handlers), fresh database each run, best of --repeat
alternating runs. SQLite (a file, WAL, synchronous=FULL) always; PostgreSQL when
P402_BENCH_PG_URL (default postgresql+asyncpg://postgres@127.0.0.1:5432/postgres,
used to CREATE/DROP a fresh database) answers.

Run:  /work/venv/bin/python benchmarks/bench_claims.py [--events N] [--repeat R]
Figure: claims / plain throughput (1.0 = free). Target: >= 0.8.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from bench_record_sqlite import machine, make_events  # noqa: E402  (sets sys.path)

from p402_server.ledger import open_store  # noqa: E402
from p402_server.ledger.writer import GroupCommitWriter  # noqa: E402

PG_ADMIN_URL = os.environ.get("P402_BENCH_PG_URL",
                              "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
CONCURRENCY = 1000
TARGET = 0.8


async def _run(url: str, n: int, claims: bool) -> float:
    """events/s of one writer run on a fresh database at `url`."""
    store = await open_store(url)
    tenant_id = await store.create_tenant("bench")
    events = make_events(n, tenant_id)
    for i, ev in enumerate(events):
        ev.reservation_id = f"rsv-{i:09d}"
        ev.claim = claims
    writer = GroupCommitWriter(store, max_batch=CONCURRENCY)
    await writer.start()
    feed = iter(events)

    async def caller() -> None:
        for event in feed:
            res = await writer.write(event)
            assert not res.claimed_by

    t0 = time.perf_counter()
    await asyncio.gather(*[caller() for _ in range(CONCURRENCY)])
    elapsed = time.perf_counter() - t0
    await writer.stop()
    assert writer.stats.events == n, writer.stats
    await store.close()
    return n / elapsed


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL.replace("+asyncpg", "", 1), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _pg_url(name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def measure(backend: str, n: int, repeat: int, workdir: str) -> dict:
    best = {False: 0.0, True: 0.0}
    for r in range(repeat):
        for claims in (False, True):
            if backend == "sqlite":
                path = os.path.join(workdir, f"claims-{claims}-{r}.db")
                rate = asyncio.run(_run(f"sqlite:///{path}", n, claims))
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(path + suffix):
                        os.remove(path + suffix)
            else:
                name = "p402_bench_claims_" + secrets.token_hex(4)
                asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
                try:
                    rate = asyncio.run(_run(_pg_url(name), n, claims))
                finally:
                    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            best[claims] = max(best[claims], rate)
    return {"plain": best[False], "claims": best[True], "ratio": best[True] / best[False]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3, help="best of N alternating runs")
    args = ap.parse_args(argv)
    print(machine())
    print(f"{args.events} events per run, {CONCURRENCY} concurrent callers, "
          f"best of {args.repeat}")
    backends = ["sqlite"]
    try:
        asyncio.run(_pg_admin("SELECT 1"))
        backends.append("postgresql")
    except Exception as exc:  # not reachable here: say so, measure SQLite only
        print(f"PostgreSQL skipped ({PG_ADMIN_URL} unreachable: {exc!r})")
    out = {}
    with tempfile.TemporaryDirectory() as workdir:
        for backend in backends:
            r = out[backend] = measure(backend, args.events, args.repeat, workdir)
            verdict = "meets" if r["ratio"] >= TARGET else "MISSES"
            print(f"{backend:>10}: plain {r['plain']:>9,.0f} ev/s   with claims "
                  f"{r['claims']:>9,.0f} ev/s   ratio {r['ratio']:.2f}x "
                  f"({verdict} target {TARGET})")
    return out


def test_claims(benchmark):
    """pytest-benchmark entry: one pedantic round of the whole comparison."""
    out = benchmark.pedantic(main, args=(["--events", "5000", "--repeat", "1"],),
                             rounds=1, iterations=1)
    for backend, r in out.items():
        benchmark.extra_info[f"{backend}_ratio"] = round(r["ratio"], 3)


if __name__ == "__main__":
    main()
