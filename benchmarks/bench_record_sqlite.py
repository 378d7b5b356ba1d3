"""How fast does the group-commit writer durably record events into SQLite, compared
with raw ``sqlite3`` doing the same durable work?

Both sides, in the same run, on fresh database files of the same schema (created by
the store's migration), with WAL and ``synchronous=FULL`` (an acknowledged event is
on disk):

- writer: B concurrent callers (B = 100 and 1000), each awaiting
  ``GroupCommitWriter.write()`` one event at a time, as a server's handlers do; every
  call returns after its commit. The writer validates, converts, deduplicates,
  chains (canonical bytes and SHA-256 per event), inserts, learns the seqs, and
  upserts rollups, daily spend and budget periods; asyncio's cost of 1000 waiting
  callers is part of its number. The garbage collector is tuned as in `p402 serve`
  (gc_policy.tune_gc; ``P402_GC=default`` keeps Python's own settings).
- raw: one ``sqlite3`` transaction per B rows: ``executemany`` INSERT of the same
  events (pre-built tuples, hash chain included, computed before the clock starts)
  plus ``executemany`` of the pre-aggregated upserts of hourly rollups, daily
  spend per customer and budget periods: the writer's database work, with no Python
  per event inside the timed region. This is the floor the database itself
  sets; the ratio is writer / raw. Each side is the best of --repeat alternating runs
  (the machine may be shared); "mean batch" is events per writer transaction.

Run:  /work/venv/bin/python benchmarks/bench_record_sqlite.py [--events N]
or:   /work/venv/bin/python -m pytest benchmarks/bench_record_sqlite.py -q -s
Targets: writer ≥ 25,000 events/s and ≥ 0.6× raw.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import random
import sqlite3
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "server")):
    if p not in sys.path:
        sys.path.insert(0, p)

import sqlalchemy  # noqa: E402

from p402_server.gc_policy import tune_gc  # noqa: E402
from p402_server.ledger import GroupCommitWriter, LedgerEvent, open_store  # noqa: E402
from p402_server.ledger import schema as S  # noqa: E402
from p402_server.ledger.canonical import GENESIS, chain_step  # noqa: E402
from p402_server.ledger.model import EVENT_COLUMNS, to_values  # noqa: E402
from p402_server.ledger.writer import (  # noqa: E402
    _aggregate_daily,
    _aggregate_periods,
    _aggregate_rollups,
)

T0_MS = 1_790_000_000_000


def make_events(n: int, tenant_id: str, seed: int = 402) -> list[LedgerEvent]:
    """Seeded, realistic mix: 200 customers, 12 features, 6 models, 3 providers."""
    rnd = random.Random(seed)
    models = [("openai", "gpt-4.1"), ("openai", "gpt-4.1-mini"), ("anthropic", "claude-sonnet-4"),
              ("anthropic", "claude-haiku-4"), ("google", "gemini-2.5-pro"), ("google", "gemini-2.5-flash")]
    out = []
    for i in range(n):
        provider, model = rnd.choice(models)
        inp = rnd.randint(100, 20_000)
        outp = rnd.randint(10, 2_000)
        out.append(LedgerEvent(
            tenant_id=tenant_id,
            event_id=f"ev-{seed}-{i:09d}",
            event_ms=T0_MS + rnd.randint(0, 6 * 3_600_000),
            customer=f"cust-{rnd.randint(1, 200)}",
            feature=f"feat-{rnd.randint(1, 12)}",
            workflow="wf-1",
            labels={"env": "prod"} if i % 4 else {},
            provider=provider,
            model=model,
            input_tokens=inp,
            cached_input_tokens=inp // 4,
            output_tokens=outp,
            cost_nanos=inp * 2_000 + outp * 8_000,
            estimated_cost_nanos=inp * 2_000 + 4096 * 8_000,
            decision=1,
            outcome=1,
            evidence=2,
            privacy_mode=1,
            budget_ids=("monthly",),
            budget_charges=(("monthly", 1_788_220_800_000),),
        ))
    return out


async def run_writer(path: str, events: list[LedgerEvent], concurrency: int) -> tuple[float, float]:
    """``concurrency`` callers, each awaiting one write at a time (a server's handlers):
    while one batch commits, the next one gathers. Returns (seconds, mean batch)."""
    return await run_writer_url(f"sqlite:///{path}", events, concurrency)


async def run_writer_url(url: str, events: list[LedgerEvent],
                         concurrency: int) -> tuple[float, float]:
    """run_writer on any store URL (bench_record_pg.py uses it on PostgreSQL)."""
    store = await open_store(url)
    writer = GroupCommitWriter(store, max_batch=max(concurrency, 1000))
    await writer.start()
    feed = iter(events)

    async def caller() -> None:
        for event in feed:
            await writer.write(event)

    thresholds = gc.get_threshold()
    tune_gc()  # as a serving process does once started
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*[caller() for _ in range(concurrency)])
        elapsed = time.perf_counter() - t0
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    await writer.stop()
    stats = writer.stats
    assert stats.events == len(events), stats
    await store.close()
    return elapsed, stats.events / stats.transactions


def run_raw(path: str, events: list[LedgerEvent], batch: int) -> float:
    cols = list(EVENT_COLUMNS)
    ins_events = (f"INSERT INTO events ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                  "ON CONFLICT (tenant_id, event_id) DO NOTHING")
    key, sums = list(S.ROLLUP_KEY), list(S.ROLLUP_SUMS)
    upsert = (f"INSERT INTO rollups_hourly ({', '.join(key + sums)}) "
              f"VALUES ({', '.join('?' * (len(key) + len(sums)))}) "
              f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET "
              + ", ".join(f"{s} = {s} + excluded.{s}" for s in sums))
    dkey = list(S.SPEND_DAILY_KEY)
    daily = (f"INSERT INTO spend_daily ({', '.join(dkey + sums)}) "
             f"VALUES ({', '.join('?' * (len(dkey) + len(sums)))}) "
             f"ON CONFLICT ({', '.join(dkey)}) DO UPDATE SET "
             + ", ".join(f"{s} = {s} + excluded.{s}" for s in sums))
    periods = ("INSERT INTO budget_periods (tenant_id, budget_id, period_start_ms, committed_nanos) "
               "VALUES (?, ?, ?, ?) ON CONFLICT (tenant_id, budget_id, period_start_ms) DO UPDATE "
               "SET committed_nanos = committed_nanos + excluded.committed_nanos")
    # Everything but the database work is prepared outside the timed region.
    prev = GENESIS
    for i, e in enumerate(events, 1):
        e.recorded_ms = T0_MS
        # the same rows the writer stores: chained (computed here, outside the timing)
        prev = e.chain_hash = chain_step(prev, e)
        e.chain_index = i
    batches = []
    for i in range(0, len(events), batch):
        chunk = events[i : i + batch]
        rows = [to_values(e) for e in chunk]  # tuples in EVENT_COLUMNS order
        rollups = _aggregate_rollups(rows)  # tuples in key + sums order
        batches.append((rows, rollups, _aggregate_daily(rollups), _aggregate_periods(chunk)))
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    t0 = time.perf_counter()
    for rows, rollups, days, budget_rows in batches:
        con.execute("BEGIN")
        con.executemany(ins_events, rows)
        con.executemany(upsert, rollups)
        con.executemany(daily, days)
        con.executemany(periods, budget_rows)
        con.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    (count,) = con.execute("SELECT count(*) FROM events").fetchone()
    assert count == len(events), count
    con.close()
    return elapsed


async def _fresh_schema(path: str) -> str:
    store = await open_store(f"sqlite:///{path}")
    tenant_id = await store.create_tenant("bench")
    await store.close()
    return tenant_id


def _run_loop(coro, loop: str):
    """Run on the event loop the server uses: uvloop when installed (p402 serve)."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def _default_loop() -> str:
    try:
        import uvloop  # noqa: F401

        return "uvloop"
    except ImportError:
        return "asyncio"


def measure(n: int, concurrency: int, workdir: str, repeat: int, loop: str = "asyncio") -> dict:
    """Best of ``repeat`` alternating runs of each side (the machine may be shared)."""
    res = {"raw": 0.0, "writer": 0.0, "mean_batch": 0.0}
    for r in range(repeat):
        for name in ("raw", "writer"):
            path = os.path.join(workdir, f"{name}-{concurrency}-{r}.db")
            tenant_id = asyncio.run(_fresh_schema(path))
            events = make_events(n, tenant_id)
            if name == "raw":
                res[name] = max(res[name], n / run_raw(path, events, concurrency))
            else:
                elapsed, mean_batch = _run_loop(run_writer(path, events, concurrency), loop)
                if n / elapsed > res[name]:
                    res[name], res["mean_batch"] = n / elapsed, mean_batch
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)
    res["ratio"] = res["writer"] / res["raw"]
    return res


def machine() -> str:
    return (
        f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
        f"{platform.system()} {platform.release()} | Python {platform.python_version()} "
        f"SQLite {sqlite3.sqlite_version} SQLAlchemy {sqlalchemy.__version__}"
        + _ver("aiosqlite") + _ver("uvloop")
    )


def _ver(mod: str) -> str:
    try:
        from importlib.metadata import version

        return f" {mod} {version(mod)}"
    except Exception:  # pragma: no cover
        return ""


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=30_000)
    ap.add_argument("--repeat", type=int, default=3, help="best of N alternating runs")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default=_default_loop(),
                    help="event loop for the writer (default: what `p402 serve` uses)")
    ap.add_argument("--dir", default=None, help="where the database files go (default: a temp dir)")
    args = ap.parse_args(argv)
    print(machine())
    print(f"{args.events} events per run, best of {args.repeat}; durable (WAL, synchronous=FULL);"
          f" writer on {args.loop}, GC {os.environ.get('P402_GC') or 'tuned as p402 serve'}")
    out = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        for conc in (100, 1000):
            r = measure(args.events, conc, workdir, args.repeat, args.loop)
            out[conc] = r
            print(f"{conc:>5} concurrent: writer {r['writer']:>9,.0f} ev/s (mean batch "
                  f"{r['mean_batch']:.0f})   raw sqlite3 {conc}/commit {r['raw']:>9,.0f} ev/s"
                  f"   ratio {r['ratio']:.2f}x")
    return out


def test_record_sqlite(benchmark):
    """pytest-benchmark entry: one pedantic round of the whole comparison."""
    out = benchmark.pedantic(main, args=(["--events", "20000", "--repeat", "2"],), rounds=1, iterations=1)
    for conc, r in out.items():
        benchmark.extra_info[f"writer_ev_s_{conc}"] = round(r["writer"])
        benchmark.extra_info[f"raw_ev_s_{conc}"] = round(r["raw"])
        benchmark.extra_info[f"ratio_{conc}"] = round(r["ratio"], 3)


if __name__ == "__main__":
    main()
