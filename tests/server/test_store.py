"""The store, on SQLite and PostgreSQL: migrations, keys, tenant scoping, config, holds,
the group-commit writer (coalescing, idempotency, failure, write-behind, durability),
rollups, spend, filters and pagination.

Expected values come from an independent oracle where it matters (Python over the
events as written, or a GROUP BY over the events table), never from the code under
test alone.
"""
from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections import Counter, defaultdict
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from p402_server.ledger import (
    GROUPS,
    EventFilter,
    GroupCommitWriter,
    LedgerEvent,
    normalize_url,
    open_store,
)
from p402_server.ledger import schema as S
from p402_server.ledger.canonical import GENESIS, chain_step
from p402core._enums import OWNER_KEYS, Decision, Evidence, InvalidArgument, NotFound, Outcome

HEAD_REVISION = "0009"  # 0008: budget_openings; 0009: statements
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOUR = 3_600_000
T0 = 1_790_000_000_000 - 1_790_000_000_000 % HOUR  # an hour boundary in 2026
SUMS = ("events", "input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens",
        "reasoning_tokens", "cost_nanos", "estimated_cost_nanos", "revenue_nanos")


def make_events(tenant_id: str, n: int, *, seed: int = 1, prefix: str = "e") -> list[LedgerEvent]:
    """Seeded events over 30 hours with a mix of every dimension the store groups by."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        inp = rnd.randint(0, 5000)
        out.append(LedgerEvent(
            tenant_id=tenant_id,
            event_id=f"{prefix}{i}",
            event_ms=T0 + rnd.randint(0, 30 * HOUR - 1),
            kind=rnd.choice(["record", "record", "record", "denied", "expired"]),
            reservation_id=f"r{i}",
            customer=rnd.choice(["c1", "c2", "c3", ""]),
            feature=rnd.choice(["chat", "search"]),
            workflow=rnd.choice(["", "wf"]),
            department=rnd.choice(["", "eng"]),
            labels=rnd.choice([{}, {"env": "prod"}, {"env": "dev", "team": "x"}]),
            provider=rnd.choice(["openai", "anthropic"]),
            model=rnd.choice(["m1", "m2", "m3"]),
            input_tokens=inp,
            cached_input_tokens=inp // 3,
            output_tokens=rnd.randint(0, 900),
            reasoning_tokens=rnd.randint(0, 10),
            cost_nanos=rnd.randint(0, 10**7),
            estimated_cost_nanos=rnd.randint(0, 10**7),
            revenue_nanos=rnd.choice([0, rnd.randint(0, 10**7)]),
            decision=rnd.choice([Decision.ALLOW, Decision.WARN, Decision.DENY]),
            reasons=("budget.soft_limit",) if i % 5 == 0 else (),
            outcome=rnd.choice([Outcome.SUCCESS, Outcome.PROVIDER_ERROR, Outcome.DENIED]),
            evidence=rnd.choice([Evidence.ESTIMATED, Evidence.REPORTED]),
            privacy_mode=1,
            budget_ids=("b-month",),
            budget_charges=(("b-month", T0 - 5 * 24 * HOUR), ("b-day", T0 + (i % 2) * 24 * HOUR)),
        ))
    return out


async def write_all(writer, events):
    return await asyncio.gather(*[writer.write(e) for e in events])


def matches(ev: LedgerEvent, f: EventFilter) -> bool:
    """The oracle for EventFilter semantics."""
    return (
        (not f.since_ms or ev.event_ms >= f.since_ms)
        and (not f.until_ms or ev.event_ms < f.until_ms)
        and all(getattr(ev, d) == v for d, v in f.owners.items())
        and all(ev.labels.get(k) == v for k, v in f.labels.items())
        and (not f.models or ev.model in f.models)
        and (not f.providers or ev.provider in f.providers)
        and (not f.outcomes or ev.outcome in f.outcomes)
        and (not f.decisions or ev.decision in f.decisions)
        and (not f.evidences or ev.evidence in f.evidences)
        and (not f.kinds or ev.kind in f.kinds)
    )


def bucket(ms: int, name: str) -> int:
    if name == "hour":
        return ms - ms % HOUR
    if name == "day":
        return ms - ms % (24 * HOUR)
    d = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return int(datetime(d.year, d.month, 1, tzinfo=timezone.utc).timestamp()) * 1000


ENUMS = {"outcome": Outcome, "decision": Decision, "evidence": Evidence}


def oracle_spend(events, f: EventFilter, group_by):
    groups: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(SUMS))
    for ev in events:
        if not matches(ev, f):
            continue
        key = tuple(bucket(ev.event_ms, g) if g in ("hour", "day", "month") else ENUMS[g](getattr(ev, g)).name
                    if g in ENUMS else getattr(ev, g) for g in group_by)
        s = groups[key]
        s[0] += 1
        for i, name in enumerate(SUMS[1:], 1):
            s[i] += getattr(ev, name)
    return {k: v for k, v in groups.items()}


def as_oracle(rows, group_by):
    return {tuple(r.group[g] for g in group_by): [getattr(r, s) for s in SUMS] for r in rows}


# -- URLs, migrations, connection setup ----------------------------------------------


def test_normalize_url_rewrites_drivers():
    assert normalize_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    assert normalize_url("sqlite+aiosqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    assert normalize_url("postgresql://u@h:5432/d") == "postgresql+asyncpg://u@h:5432/d"
    assert normalize_url("postgres://u:pw@h/d") == "postgresql+asyncpg://u:pw@h/d"
    assert normalize_url("postgresql+psycopg2://u@h/d") == "postgresql+asyncpg://u@h/d"


@pytest.mark.parametrize("url", ["", "not a url", "mysql://u@h/d", "oracle://x", None])
async def test_bad_url_names_db(url):
    with pytest.raises(ValueError) as err:
        await open_store(url)
    assert err.value.field == "db"


async def test_sqlite_missing_directory_names_db(tmp_path):
    with pytest.raises(ValueError) as err:
        await open_store(f"sqlite:///{tmp_path}/nope/p402.db")
    assert err.value.field == "db"


async def test_migrations_are_idempotent(empty_store_url):
    store_url = empty_store_url
    s = await open_store(store_url)  # migrates
    try:
        assert await s.schema_revision() == HEAD_REVISION
        tid = await s.create_tenant("keep me")
        await s.migrate()
        await s.migrate()
        assert await s.schema_revision() == HEAD_REVISION
        assert (await s.get_tenant(tid)).name == "keep me"
    finally:
        await s.close()
    s = await open_store(store_url)  # and again from a new process's point of view
    try:
        assert (await s.get_tenant(tid)).name == "keep me"
    finally:
        await s.close()


async def test_open_without_create_does_not_migrate(empty_store_url):
    s = await open_store(empty_store_url, create=False)
    try:
        assert await s.schema_revision() is None
        await s.migrate()
        assert await s.schema_revision() == HEAD_REVISION
    finally:
        await s.close()


async def test_migrated_schema_matches_schema_py(store):
    """The hand-written migration and schema.py describe the same database."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    def diff(sync_conn):
        ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True})
        return compare_metadata(ctx, S.metadata)

    async with store.engine.connect() as conn:
        assert await conn.run_sync(diff) == []


async def test_sqlite_pragmas_on_every_connection(tmp_path):
    s = await open_store(f"sqlite:///{tmp_path / 'p.db'}")
    try:
        async with s.engine.connect() as c1, s.engine.connect() as c2:
            for conn in (c1, c2):
                assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
                assert (await conn.exec_driver_sql("PRAGMA synchronous")).scalar() == 2  # FULL
                assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
                assert (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar() >= 1000
    finally:
        await s.close()


# -- tenants and keys ----------------------------------------------------------------


async def test_keys_are_hashed_at_rest(store, tenant):
    info, plaintext = await store.create_key(tenant, ["meter", "read"], "gateway")
    assert plaintext.startswith("p402_") and len(plaintext) == 45
    assert plaintext[5:].isalnum() and plaintext.isascii()
    assert info.prefix == plaintext[:12]
    assert info.scopes == frozenset({"meter", "read"})
    async with store.engine.connect() as conn:
        rows = (await conn.execute(sa.select(S.api_keys))).mappings().all()
    assert len(rows) == 1
    stored = " ".join(str(v) for v in rows[0].values())
    assert plaintext not in stored and plaintext[12:] not in stored
    assert rows[0]["key_hash"] == hashlib.sha256(plaintext.encode()).hexdigest()
    found = await store.find_key(plaintext)
    assert found == info
    assert await store.find_key(plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")) is None
    assert await store.find_key("Bearer " + plaintext) is None
    _, other = await store.create_key(tenant, "admin")
    assert other != plaintext


async def test_key_scopes_are_checked(store, tenant):
    for bad in ([], ["meter", "root"], "", "write"):
        with pytest.raises(ValueError) as err:
            await store.create_key(tenant, bad)
        assert err.value.field == "scopes"
    info, _ = await store.create_key(tenant, "meter, admin")
    assert info.scopes == {"meter", "admin"}


async def test_key_for_unknown_tenant_is_not_found(store):
    with pytest.raises(NotFound):
        await store.create_key("t_nobody", ["read"])


async def test_tenant_scoping_of_keys(store):
    a = await store.create_tenant("a")
    b = await store.create_tenant("b")
    ka, pa = await store.create_key(a, ["meter"], "a-key")
    kb, pb = await store.create_key(b, ["read"], "b-key")
    assert [k.key_id for k in await store.list_keys(a)] == [ka.key_id]
    assert [k.key_id for k in await store.list_keys(b)] == [kb.key_id]
    # b cannot revoke a's key, and a's key keeps working
    assert await store.revoke_key(b, ka.key_id) is False
    assert (await store.find_key(pa)).tenant_id == a
    # a revokes its own: takes effect at once, twice is still "found"
    assert await store.revoke_key(a, ka.key_id) is True
    assert await store.find_key(pa) is None
    revoked = await store.find_key(pa, include_revoked=True)
    assert revoked.revoked and revoked.tenant_id == a
    assert await store.revoke_key(a, ka.key_id) is True
    assert (await store.find_key(pa, include_revoked=True)).revoked_ms == revoked.revoked_ms
    assert await store.list_keys(a, include_revoked=False) == []
    assert (await store.find_key(pb)).key_id == kb.key_id
    await store.touch_key(kb.key_id, 1234)
    assert (await store.find_key(pb)).last_used_ms == 1234


async def test_tenants_and_settings(store):
    t = await store.create_tenant("acme", settings={"privacy_mode": "metadata_only"})
    got = await store.get_tenant(t)
    assert got.name == "acme" and got.settings == {"privacy_mode": "metadata_only"}
    await store.put_settings(t, {"allow_clamp": True, "hold_ttl_seconds": 60})
    assert await store.get_settings(t) == {"allow_clamp": True, "hold_ttl_seconds": 60}
    assert await store.get_tenant("t_missing") is None
    with pytest.raises(NotFound):
        await store.get_settings("t_missing")
    with pytest.raises(NotFound):
        await store.put_settings("t_missing", {})
    with pytest.raises(ValueError) as err:
        await store.create_tenant("  ")
    assert err.value.field == "name"
    assert [x.tenant_id for x in await store.list_tenants()] == [t]


# -- config ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["budget", "policy", "price"])
async def test_config_specs_per_tenant(store, kind):
    put, get = getattr(store, f"put_{kind}"), getattr(store, f"get_{kind}")
    delete = getattr(store, f"delete_{kind}")
    listing = getattr(store, "list_" + {"budget": "budgets", "policy": "policies", "price": "prices"}[kind])
    a = await store.create_tenant("a")
    b = await store.create_tenant("b")
    spec = {"id": "x", "limit_nanos": 5 * 10**9, "scope": {"customer": "c1"}, "nested": [1, 2]}
    await put(a, "x", spec)
    await put(a, "w", {"id": "w"})
    await put(b, "x", {"id": "x", "other": True})
    assert await listing(a) == {"w": {"id": "w"}, "x": spec}  # ordered by id
    assert await listing(b) == {"x": {"id": "x", "other": True}}
    await put(a, "x", {"id": "x", "limit_nanos": 1})  # replace
    assert await get(a, "x") == {"id": "x", "limit_nanos": 1}
    assert await delete(b, "w") is False  # a's id, b's scope
    assert await delete(a, "w") is True
    assert await delete(a, "w") is False
    assert list(await listing(a)) == ["x"]
    assert await get(a, "w") is None
    with pytest.raises(NotFound):
        await put("t_missing", "x", spec)
    with pytest.raises(ValueError) as err:
        await put(a, "y", {"bad": object()})
    assert err.value.field == "spec"


# -- holds -------------------------------------------------------------------------------


async def test_holds_write_behind_roundtrip(store):
    a = await store.create_tenant("a")
    b = await store.create_tenant("b")
    await store.save_holds(a, [("r1", 100, {"amount": 5, "budgets": ["x"]}), ("r2", 200, {"amount": 7})])
    await store.save_holds(b, [("r1", 300, {"amount": 9})])
    await store.save_holds(a, [("r2", 250, {"amount": 8}), ("r3", 400, {})], deletes=["r1"])
    assert await store.load_holds(a) == [("r2", 250, {"amount": 8}), ("r3", 400, {})]
    assert await store.load_holds(b) == [("r1", 300, {"amount": 9})]
    await store.save_holds(a, [], deletes=["r2", "r3", "unknown"])
    assert await store.load_holds(a) == []
    assert await store.load_holds(b) == [("r1", 300, {"amount": 9})]


# -- the writer ---------------------------------------------------------------------------


async def test_written_event_reads_back_identically(store, writer, tenant):
    ev = LedgerEvent(
        tenant, "full", event_ms=T0 + 5, recorded_ms=T0 + 9, kind="expired", reservation_id="r",
        customer="c", feature="f", workflow="w", task="t", department="d", employee="e",
        labels={"k": "v", "ünï": "çødé \"quoted\""}, provider="p", model="m",
        input_tokens=10, cached_input_tokens=3, cache_write_tokens=2, output_tokens=7,
        reasoning_tokens=1, cost_nanos=2**62, estimated_cost_nanos=5, overrun_nanos=-3,
        revenue_nanos=11, decision=Decision.WARN, reasons=("budget.soft_limit", "policy.warned"),
        rule_ids=("r1",), budget_ids=("b1", "b2"), outcome=Outcome.EXPIRED,
        evidence=Evidence.ESTIMATED, privacy_mode=2, attempt=2, retry_of="full-0",
        catalog_version="cat-1", duplicate_of="orig", chain_hash="ab" * 32,
        budget_charges=(("b1", T0), ("b2", 0)), prompt_fingerprint="f" * 32,
        response_fingerprint="0" * 32,
    )
    expected = ev.to_dict()
    res = await writer.write(ev)
    assert not res.duplicate and res.seq > 0
    got = await store.get_event(tenant, "full")
    # The writer owns the chain columns: a caller's chain_hash is replaced.
    first_link = chain_step(GENESIS, LedgerEvent.from_dict(expected))
    assert got.to_dict() == {**expected, "seq": res.seq, "chain_index": 1,
                             "chain_hash": first_link}
    assert (res.event.chain_index, res.event.chain_hash) == (1, first_link)
    assert LedgerEvent.from_dict(got.to_dict()) == got


async def test_writer_fills_in_times(store, tenant):
    store.now_ms = lambda: T0 + 42
    w = GroupCommitWriter(store)
    await w.start()
    res = await w.write(LedgerEvent(tenant, "x"))
    await w.stop()
    assert (res.event.recorded_ms, res.event.event_ms) == (T0 + 42, T0 + 42)


async def test_concurrent_writes_coalesce_and_are_readable(store, writer, tenant):
    events = make_events(tenant, 300)
    results = await write_all(writer, events)
    # 300 concurrent callers, far fewer transactions (two, typically: with nothing
    # in flight the writer sends half and converts the other half meanwhile)
    assert writer.stats.transactions <= 3
    assert writer.stats.largest_batch >= 100
    assert sorted(r.seq for r in results) == sorted(set(r.seq for r in results))
    assert not any(r.duplicate for r in results)
    assert await store.count_events(tenant) == 300
    stored = {e.event_id: e async for e in store.iter_events(tenant)}
    for ev, res in zip(events, results):  # every acknowledged seq is the stored one
        assert stored[ev.event_id].seq == res.seq == ev.seq
        assert stored[ev.event_id].cost_nanos == ev.cost_nanos


async def test_pipelined_batches_keep_order_and_chain(store, tenant):
    """A burst larger than 2 * PIPELINE_MIN with nothing in flight is split: the
    first half commits while later arrivals join the second; order, seqs and the
    chain are as if one writer had taken them one by one."""
    from p402_server.ledger.writer import PIPELINE_MIN

    w = GroupCommitWriter(store, max_batch=1000)
    await w.start()
    try:
        events = make_events(tenant, 4 * PIPELINE_MIN)
        results = await write_all(w, events)
        assert w.stats.transactions >= 2
        assert w.stats.largest_batch < len(events)
        # chain order follows the queue order: the events were queued in list order
        assert [r.event.chain_index for r in results] == list(range(1, len(events) + 1))
        assert [r.seq for r in results] == sorted(r.seq for r in results)
    finally:
        await w.stop()
    assert (await store.verify_chain(tenant)).count == len(events)


async def test_max_batch_bounds_a_transaction(store, tenant):
    w = GroupCommitWriter(store, max_batch=10)
    await w.start()
    await write_all(w, make_events(tenant, 55))
    await w.stop()
    assert w.stats.largest_batch == 10
    assert w.stats.transactions >= 6
    assert await store.count_events(tenant) == 55


async def _rollup_total(store, tenant):
    ru = S.rollups_hourly
    async with store.engine.connect() as conn:
        return (await conn.execute(
            sa.select(sa.func.sum(ru.c.events), sa.func.sum(ru.c.cost_nanos)).where(ru.c.tenant_id == tenant)
        )).one()


async def test_duplicates_counted_once(store, writer, tenant):
    def ev(cost):
        return LedgerEvent(tenant, "dup", event_ms=T0, cost_nanos=cost, customer="c1",
                           budget_charges=(("b", T0),))

    # concurrently, in one batch: the first submitted wins
    results = await asyncio.gather(*[writer.write(ev(100 + i)) for i in range(5)])
    assert [r.duplicate for r in results] == [False, True, True, True, True]
    assert {r.seq for r in results} == {results[0].seq}
    assert all(r.event.cost_nanos == 100 for r in results)
    # later, against the table: the ledger's copy comes back
    later = await writer.write(ev(999))
    assert later.duplicate and later.seq == results[0].seq and later.event.cost_nanos == 100
    # and a batch mixing a new event with the old duplicate
    mixed = await asyncio.gather(writer.write(ev(7)), writer.write(LedgerEvent(tenant, "new", event_ms=T0)))
    assert mixed[0].duplicate and not mixed[1].duplicate
    assert await store.count_events(tenant) == 2
    events_sum, cost_sum = await _rollup_total(store, tenant)
    assert (int(events_sum), int(cost_sum)) == (2, 100)
    assert await store.budget_totals(tenant) == {("b", T0): 100}
    assert await store.recompute_budget_totals(tenant) == {("b", T0): 100}
    assert writer.stats.duplicates == 6


async def test_same_event_id_in_two_tenants_is_two_events(store, writer):
    a = await store.create_tenant("a")
    b = await store.create_tenant("b")
    ra, rb = await asyncio.gather(writer.write(LedgerEvent(a, "same")), writer.write(LedgerEvent(b, "same")))
    assert not ra.duplicate and not rb.duplicate and ra.seq != rb.seq
    assert await store.count_events(a) == 1 and await store.count_events(b) == 1


async def test_budget_periods_consistent_with_events(store, writer, tenant):
    events = make_events(tenant, 120)
    await write_all(writer, events)
    await write_all(writer, make_events(tenant, 40))  # all duplicates: must change nothing
    expected: Counter = Counter()
    for ev in events:
        for charge in ev.budget_charges:
            expected[charge] += ev.cost_nanos
    assert await store.budget_totals(tenant) == dict(expected)
    assert await store.recompute_budget_totals(tenant) == dict(expected)


async def test_rollups_equal_group_by_over_events(store, writer, tenant):
    other = await store.create_tenant("other")
    await write_all(writer, make_events(tenant, 250) + make_events(other, 50, seed=9))
    # written in several batches too, so rollup rows get updated, not only inserted
    await write_all(writer, make_events(tenant, 100, seed=2, prefix="late"))
    # and batches mixing events already in the ledger with new ones: only the new ones
    # may reach the rollups
    await write_all(writer, make_events(tenant, 60) + make_events(tenant, 30, seed=3, prefix="mix"))
    async with store.engine.connect() as conn:
        want, got = await _rollups_and_group_by(conn)
    assert len(want) > 50
    assert got == want


async def _rollups_and_group_by(conn) -> tuple[list, list]:
    """(the events grouped by rollup key with their sums, the rollup rows), sorted."""
    ev, ru = S.events, S.rollups_hourly
    dims = [ev.c[d] for d in S.ROLLUP_DIMS]
    hour = (ev.c.event_ms - ev.c.event_ms % sa.literal_column(str(HOUR))).label("hour_ms")
    group_by = sa.select(
        ev.c.tenant_id, hour, *dims, sa.func.count(),
        *[sa.func.sum(ev.c[s]) for s in SUMS[1:]],
    ).group_by(ev.c.tenant_id, sa.literal_column("2"), *dims)
    rollups = sa.select(*[ru.c[k] for k in S.ROLLUP_KEY], *[ru.c[s] for s in SUMS])
    out = []
    for q in (group_by, rollups):
        rows = (await conn.execute(q)).all()
        out.append(sorted(tuple(int(x) if not isinstance(x, str) else x for x in r)
                          for r in rows))
    return out[0], out[1]


# Owners the array literals of the PostgreSQL upserts must carry as they are.
AWKWARD = ["", "a,b", '"q"', "back\\slash", "{braces}", "NULL", " pad ", "\\\"", "é 中 🙂",
           "tab\u00a0nbsp", "'single'", "}{", ",", '\\"x']


async def test_rollups_of_awkward_owners_equal_group_by_over_events(store, writer, tenant):
    events = [LedgerEvent(tenant, f"awk-{i}-{j}", event_ms=T0 + j * HOUR, customer=c,
                          feature=AWKWARD[(i + 3) % len(AWKWARD)], model=AWKWARD[-1 - i],
                          cost_nanos=1000 + i, input_tokens=j + 1)
              for i, c in enumerate(AWKWARD) for j in range(3)]
    await write_all(writer, events)
    sd = S.spend_daily
    daily = sa.select(sd.c.customer, sd.c.events, sd.c.cost_nanos)
    async with store.engine.connect() as conn:
        want, got = await _rollups_and_group_by(conn)
        days = {c: (int(n), int(cost)) for c, n, cost in (await conn.execute(daily)).all()}
    assert got == want and len(got) == len(events)
    assert {r[2] for r in got} == set(AWKWARD)
    assert days == {c: (3, 3 * (1000 + i)) for i, c in enumerate(AWKWARD)}


@pytest.mark.postgres
async def test_pg_array_literals_read_back_as_the_values(pg_session_url):
    import asyncpg

    from p402_server.ledger.writer import _pg_array_literal

    conn = await asyncpg.connect(pg_session_url.replace("+asyncpg", ""))
    try:
        for values in ([*AWKWARD], ["only"], [""], ["\\"], ['"']):
            lit = _pg_array_literal(tuple(values), True)
            assert await conn.fetchval("SELECT $1::text::varchar[]", lit) == values
        ints = (0, -1, 2**63 - 1, -(2**63), 42)
        lit = _pg_array_literal(ints, False)
        assert await conn.fetchval("SELECT $1::text::bigint[]", lit) == list(ints)
    finally:
        await conn.close()


def test_pg_array_literal_refuses_values_of_another_type():
    from p402_server.ledger.writer import _pg_array_literal

    assert _pg_array_literal(("a", 1), True) is None
    assert _pg_array_literal(("a", None), True) is None
    assert _pg_array_literal((1, "2"), False) is None
    assert _pg_array_literal((1, True), False) is None  # a bool is not a count
    assert _pg_array_literal((1, 2.0), False) is None
    assert _pg_array_literal((), True) == "{}"
    assert _pg_array_literal(('a"b', "c\\d"), True) == '{"a\\"b","c\\\\d"}'


# -- failures -------------------------------------------------------------------------------


def patch_op(monkeypatch, writer, name, before):
    """Run ``before(conn, arg)`` ahead of the writer's database step ``name`` (sync on
    the SQLite writer thread, async on the Core path); it may raise to inject a fault."""
    real = getattr(writer._ops, name)
    if inspect.iscoroutinefunction(real):
        async def wrapped(conn, arg):
            before(conn, arg)
            return await real(conn, arg)
    else:
        def wrapped(conn, arg):
            before(conn, arg)
            return real(conn, arg)
    monkeypatch.setattr(writer._ops, name, wrapped)


async def test_failed_transaction_fails_every_waiter(store, writer, tenant, monkeypatch):
    calls = {"n": 0}

    def fail_first(conn, rows):
        calls["n"] += 1
        if calls["n"] == 1:  # after the events were inserted, inside the transaction
            raise RuntimeError("disk on fire")

    patch_op(monkeypatch, writer, "upsert_rollups", fail_first)
    events = make_events(tenant, 20)
    results = await asyncio.gather(*[writer.write(e) for e in events], return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    # rolled back: nothing of that batch is in the ledger, rollups or budget periods
    assert await store.count_events(tenant) == 0
    assert await store.budget_totals(tenant) == {}
    assert writer.stats.failed_transactions == 1
    # the writer keeps going
    again = await write_all(writer, make_events(tenant, 20))
    assert not any(r.duplicate for r in again)
    assert await store.count_events(tenant) == 20


async def test_invalid_event_is_refused_before_queueing(store, writer, tenant):
    good = LedgerEvent(tenant, "ok")
    bad = LedgerEvent(tenant, "bad", kind="nonsense")
    results = await asyncio.gather(writer.write(good), writer.write(bad), return_exceptions=True)
    assert not isinstance(results[0], BaseException)
    assert isinstance(results[1], InvalidArgument) and results[1].field == "kind"
    for field, value in [("event_id", ""), ("cost_nanos", 2**63), ("customer", "x" * 300),
                         ("labels", {"k": 1}), ("input_tokens", 1.5), ("decision", True)]:
        ev = LedgerEvent(tenant, "v")
        setattr(ev, field, value)
        with pytest.raises(InvalidArgument) as err:
            writer.write_behind(ev)
        assert err.value.field == field
    assert await store.count_events(tenant) == 1


async def test_write_behind_is_retried_until_it_lands(store, tenant, monkeypatch):
    w = GroupCommitWriter(store, retry_base_s=0.001)
    await w.start()
    calls = {"n": 0}

    def flaky(conn, values):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ConnectionError("database restarting")

    patch_op(monkeypatch, w, "insert_events", flaky)
    for ev in make_events(tenant, 5):
        w.write_behind(ev)
    await w.flush()
    assert await store.count_events(tenant) == 5
    assert w.stats.retries >= 5 and w.stats.dead_letters == 0
    await w.stop()


async def test_write_behind_gives_up_loudly(store, tenant, monkeypatch, caplog):
    w = GroupCommitWriter(store, retry_limit=2, retry_base_s=0.001)
    await w.start()

    def down(conn, values):
        raise ConnectionError("gone")

    patch_op(monkeypatch, w, "insert_events", down)
    w.write_behind(LedgerEvent(tenant, "lost-1"))
    await w.stop()
    assert [e.event_id for e in w.dead_letters] == ["lost-1"]
    assert any("lost-1" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


async def test_write_behind_then_stop_flushes(store, tenant):
    w = GroupCommitWriter(store)
    await w.start()
    for ev in make_events(tenant, 75):
        w.write_behind(ev)
    await w.stop()
    await w.stop()  # idempotent
    assert await store.count_events(tenant) == 75
    with pytest.raises(RuntimeError):
        await w.write(LedgerEvent(tenant, "late"))
    with pytest.raises(RuntimeError):
        w.write_behind(LedgerEvent(tenant, "late"))


async def test_write_before_start_raises(store, tenant):
    w = GroupCommitWriter(store)
    with pytest.raises(RuntimeError):
        await w.write(LedgerEvent(tenant, "x"))
    await w.stop()  # never started: nothing to do


DURABILITY_CHILD = textwrap.dedent("""
    import asyncio, sys
    sys.path[:0] = [{repo!r}, {server!r}]
    from p402_server.ledger import GroupCommitWriter, LedgerEvent, open_store

    async def main():
        store = await open_store({url!r})
        writer = GroupCommitWriter(store)
        await writer.start()
        i = 0
        while True:  # until SIGKILL; no stop(), no close()
            batch = [LedgerEvent({tenant!r}, f"k{{i + j}}", cost_nanos=1) for j in range(3)]
            await asyncio.gather(*[writer.write(e) for e in batch])
            for e in batch:
                sys.stdout.write(e.event_id + "\\n")
            sys.stdout.flush()
            i += 3

    asyncio.run(main())
""")


async def test_acknowledged_writes_survive_sigkill(tmp_path):
    url = f"sqlite:///{tmp_path / 'durable.db'}"
    s = await open_store(url)
    tenant = await s.create_tenant("durable")
    await s.close()
    code = DURABILITY_CHILD.format(repo=REPO, server=os.path.join(REPO, "server"), url=url, tenant=tenant)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    acked = []
    try:
        while len(acked) < 60:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not line:
                raise AssertionError((await proc.stderr.read()).decode())
            acked.append(line.decode().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    s = await open_store(url)
    try:
        for event_id in acked:
            assert await s.get_event(tenant, event_id) is not None, event_id
        assert await s.count_events(tenant) >= len(acked)
        assert await s.recompute_budget_totals(tenant) == await s.budget_totals(tenant)
        assert (await s.verify_chain(tenant)).ok  # a crash never leaves half a link
    finally:
        await s.close()


# -- queries --------------------------------------------------------------------------------


FILTERS = [
    EventFilter(),
    EventFilter(since_ms=T0 + 5 * HOUR, until_ms=T0 + 9 * HOUR),
    EventFilter(since_ms=T0 + 5 * HOUR + 17, until_ms=T0 + 9 * HOUR - 1),
    EventFilter(until_ms=T0 + 2 * HOUR),
    EventFilter(owners={"customer": "c1"}),
    EventFilter(owners={"customer": "", "feature": "chat"}),
    EventFilter(labels={"env": "prod"}),
    EventFilter(labels={"env": "dev", "team": "x"}, models=("m1", "m2")),
    EventFilter(models=("m3",), providers=("openai",)),
    EventFilter(outcomes=(Outcome.PROVIDER_ERROR, Outcome.DENIED)),
    EventFilter(decisions=(Decision.DENY,), evidences=(Evidence.ESTIMATED,)),
    EventFilter(kinds=("denied", "expired")),
]


@pytest.fixture
async def ledger(store, writer, tenant):
    """250 events of `tenant` plus 40 of another tenant that no query may see."""
    events = make_events(tenant, 250)
    await write_all(writer, events)
    await write_all(writer, make_events(await store.create_tenant("noise"), 40, seed=5))
    return events


@pytest.mark.parametrize("flt", FILTERS, ids=lambda f: repr(f)[12:70])
async def test_filters_match_the_oracle(store, tenant, ledger, flt):
    want = sorted(e.event_id for e in ledger if matches(e, flt))
    assert want, "every filter here selects something"
    assert await store.count_events(tenant, flt) == len(want)
    got = [e.event_id async for e in store.iter_events(tenant, flt, batch=7)]
    assert sorted(got) == want
    page, _ = await store.query_events(tenant, flt, page_size=1000)
    assert sorted(e.event_id for e in page) == want


@pytest.mark.parametrize("order", ["desc", "asc"])
async def test_pagination_walks_every_row_once(store, tenant, ledger, order):
    flt = EventFilter(owners={"feature": "chat"})
    seen, token, pages = [], "", 0
    while True:
        page, token = await store.query_events(tenant, flt, page_size=7, page_token=token, order=order)
        assert len(page) <= 7
        seen.extend(e.seq for e in page)
        pages += 1
        if not token:
            break
    assert len(seen) == len(set(seen)) == sum(1 for e in ledger if matches(e, flt))
    assert seen == sorted(seen, reverse=(order == "desc"))
    assert pages == -(-len(seen) // 7)  # no empty trailing page


async def test_page_size_and_token_errors(store, tenant, ledger):
    page, token = await store.query_events(tenant, page_size=0)
    assert len(page) == 100 and token
    page, _ = await store.query_events(tenant, page_size=5000)
    assert len(page) == 250  # capped at 1000, all of them
    with pytest.raises(ValueError) as err:
        await store.query_events(tenant, page_size=-1)
    assert err.value.field == "page_size"
    for bad in ("%%%", "bm90LWEtdG9rZW4", "ZWQ6LTE"):
        with pytest.raises(ValueError) as err:
            await store.query_events(tenant, page_token=bad)
        assert err.value.field == "page_token"
    _, asc_token = await store.query_events(tenant, page_size=3, order="asc")
    with pytest.raises(ValueError) as err:
        await store.query_events(tenant, page_token=asc_token, order="desc")
    assert err.value.field == "page_token"
    with pytest.raises(ValueError) as err:
        await store.query_spend(tenant, None, ["customer"], page_token=asc_token)
    assert err.value.field == "page_token"
    with pytest.raises(ValueError) as err:
        await store.query_events(tenant, EventFilter(owners={"team": "x"}))
    assert err.value.field == "owners"


async def test_another_tenant_sees_nothing(store, ledger):
    stranger = await store.create_tenant("stranger")
    assert await store.count_events(stranger) == 0
    assert await store.query_events(stranger) == ([], "")
    assert await store.query_spend(stranger, None, ["customer"]) == ([], "")
    assert await store.budget_totals(stranger) == {}


SPEND_CASES = [
    (EventFilter(), []),
    (EventFilter(), ["customer"]),
    (EventFilter(), ["feature", "model", "provider"]),
    (EventFilter(since_ms=T0 + 3 * HOUR, until_ms=T0 + 20 * HOUR), ["hour"]),
    (EventFilter(owners={"customer": "c2"}), ["day", "outcome", "decision", "evidence"]),
    (EventFilter(models=("m1",)), ["month", "department", "workflow"]),
]


@pytest.mark.parametrize("flt,group_by", SPEND_CASES)
async def test_spend_from_rollups_equals_spend_from_events(store, tenant, ledger, flt, group_by):
    from p402_server.ledger.queries import rollups_can_answer

    assert rollups_can_answer(flt)
    want = oracle_spend(ledger, flt, group_by)
    rolled, _ = await store.query_spend(tenant, flt, group_by, page_size=1000, source="rollups")
    scanned, _ = await store.query_spend(tenant, flt, group_by, page_size=1000, source="events")
    auto, _ = await store.query_spend(tenant, flt, group_by, page_size=1000)
    assert [r.to_dict() for r in rolled] == [r.to_dict() for r in scanned] == [r.to_dict() for r in auto]
    assert as_oracle(rolled, group_by) == want
    costs = [r.cost_nanos for r in rolled]
    assert costs == sorted(costs, reverse=True)
    assert all(r.margin_nanos == r.revenue_nanos - r.cost_nanos for r in rolled)


DAY = 24 * HOUR
DAILY_CASES = [
    (EventFilter(), ["customer"]),
    (EventFilter(), ["day", "customer"]),
    (EventFilter(since_ms=T0 - T0 % DAY + DAY, until_ms=T0 - T0 % DAY + 2 * DAY), ["customer"]),
    (EventFilter(owners={"customer": "c2"}), ["month"]),
    (EventFilter(), []),
]


@pytest.mark.parametrize("flt,group_by", DAILY_CASES)
async def test_spend_daily_equals_spend_from_events(store, tenant, ledger, flt, group_by):
    """spend_daily (per customer and UTC day) answers the billing queries exactly,
    and auto picks it for them."""
    from p402_server.ledger.queries import daily_can_answer

    assert daily_can_answer(flt, group_by)
    want = oracle_spend(ledger, flt, group_by)
    daily, _ = await store.query_spend(tenant, flt, group_by, page_size=1000, source="daily")
    scanned, _ = await store.query_spend(tenant, flt, group_by, page_size=1000, source="events")
    auto, _ = await store.query_spend(tenant, flt, group_by, page_size=1000)
    assert [r.to_dict() for r in daily] == [r.to_dict() for r in scanned] == [r.to_dict() for r in auto]
    assert as_oracle(daily, group_by) == want


@pytest.mark.parametrize("flt,group_by", [
    (EventFilter(), ["feature"]),
    (EventFilter(), ["customer", "hour"]),
    (EventFilter(owners={"feature": "chat"}), ["customer"]),
    (EventFilter(models=("m1",)), ["customer"]),
    (EventFilter(since_ms=T0 + HOUR), ["customer"]),
])
async def test_spend_daily_refuses_what_it_cannot_answer(store, tenant, ledger, flt, group_by):
    from p402_server.ledger.queries import daily_can_answer

    assert not daily_can_answer(flt, group_by)
    with pytest.raises(InvalidArgument) as err:
        await store.query_spend(tenant, flt, group_by, source="daily")
    assert err.value.field == "source"
    auto, _ = await store.query_spend(tenant, flt, group_by, page_size=1000)
    assert as_oracle(auto, group_by) == oracle_spend(ledger, flt, group_by)


@pytest.mark.parametrize("flt", [
    EventFilter(labels={"env": "prod"}),
    EventFilter(kinds=("record",)),
    EventFilter(since_ms=T0 + HOUR + 1),
])
async def test_spend_falls_back_to_events(store, tenant, ledger, flt):
    from p402_server.ledger.queries import rollups_can_answer

    assert not rollups_can_answer(flt)
    rows, _ = await store.query_spend(tenant, flt, ["customer", "model"], page_size=1000)
    assert as_oracle(rows, ["customer", "model"]) == oracle_spend(ledger, flt, ["customer", "model"])
    with pytest.raises(ValueError) as err:
        await store.query_spend(tenant, flt, ["customer"], source="rollups")
    assert err.value.field == "source"


async def test_spend_pagination_and_group_by_errors(store, tenant, ledger):
    group_by = ["customer", "feature", "model"]
    everything, token = await store.query_spend(tenant, None, group_by, page_size=1000)
    assert token == ""
    walked, token = [], ""
    while True:
        page, token = await store.query_spend(tenant, None, group_by, page_size=4, page_token=token)
        walked.extend(page)
        if not token:
            break
    assert [r.to_dict() for r in walked] == [r.to_dict() for r in everything]
    for bad in (["customer", "colour"], ["customer", "customer"], ["labels"]):
        with pytest.raises(ValueError) as err:
            await store.query_spend(tenant, None, bad)
        assert err.value.field == "group_by"
    assert set(GROUPS) >= set(OWNER_KEYS)


async def test_month_and_day_buckets_are_utc_calendar(store, writer, tenant):
    feb_end = int(datetime(2026, 2, 28, 23, 30, tzinfo=timezone.utc).timestamp() * 1000)
    mar_start = int(datetime(2026, 3, 1, 0, 30, tzinfo=timezone.utc).timestamp() * 1000)
    await write_all(writer, [
        LedgerEvent(tenant, "feb", event_ms=feb_end, cost_nanos=5),
        LedgerEvent(tenant, "mar", event_ms=mar_start, cost_nanos=7),
    ])
    for source in ("rollups", "events"):
        rows, _ = await store.query_spend(tenant, None, ["month", "day"], source=source)
        assert {(r.group["month"], r.group["day"], r.cost_nanos) for r in rows} == {
            (int(datetime(2026, 2, 1, tzinfo=timezone.utc).timestamp() * 1000),
             int(datetime(2026, 2, 28, tzinfo=timezone.utc).timestamp() * 1000), 5),
            (int(datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp() * 1000),
             int(datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp() * 1000), 7),
        }


async def test_labels_stored_as_json_text(store, writer, tenant):
    await writer.write(LedgerEvent(tenant, "l", labels={"a": "1"}, budget_ids=("b",)))
    ev = S.events
    async with store.engine.connect() as conn:
        labels, budget_ids = (await conn.execute(sa.select(ev.c.labels, ev.c.budget_ids))).one()
    assert json.loads(labels) == {"a": "1"} and json.loads(budget_ids) == ["b"]


async def test_in_memory_sqlite_store_works_end_to_end():
    """sqlite:// (tests, demos) takes the Core write path on one shared connection."""
    s = await open_store("sqlite://")
    try:
        tenant = await s.create_tenant("mem")
        w = GroupCommitWriter(s)
        await w.start()
        results = await write_all(w, make_events(tenant, 30) + make_events(tenant, 5))
        await w.stop()
        assert [r.duplicate for r in results] == [False] * 30 + [True] * 5
        assert await s.count_events(tenant) == 30
        assert await s.budget_totals(tenant) == await s.recompute_budget_totals(tenant)
        rolled, _ = await s.query_spend(tenant, None, ["customer"], source="rollups")
        scanned, _ = await s.query_spend(tenant, None, ["customer"], source="events")
        assert [r.to_dict() for r in rolled] == [r.to_dict() for r in scanned]
    finally:
        await s.close()


async def test_flush_waits_for_earlier_events_only(store, tenant):
    w = GroupCommitWriter(store)
    await w.start()
    for ev in make_events(tenant, 40):
        w.write_behind(ev)
    await asyncio.gather(w.flush(), w.flush())  # concurrent flushes both wait
    assert await store.count_events(tenant) == 40
    await w.flush()  # nothing pending: returns at once
    await w.stop()


async def test_a_crashed_writer_fails_its_callers_instead_of_hanging(store, tenant, monkeypatch):
    w = GroupCommitWriter(store)

    async def broken_window():
        raise AssertionError("bug in the writer loop")

    monkeypatch.setattr(w, "_gather_window", broken_window)
    await w.start()
    with pytest.raises(RuntimeError, match="stopped unexpectedly"):
        await asyncio.wait_for(w.write(LedgerEvent(tenant, "x")), 5)
    with pytest.raises(RuntimeError):
        await w.write(LedgerEvent(tenant, "y"))
    await w.stop()  # still releases the writer's connection and thread
    await w.stop()


async def test_two_writers_on_one_database_count_each_event_once(store, tenant):
    """Two processes' writers (here: two writers, two connections) racing on the same
    event ids: the unique key decides, every event is counted exactly once."""
    w1, w2 = GroupCommitWriter(store, max_batch=50), GroupCommitWriter(store, max_batch=50)
    await w1.start()
    await w2.start()
    events_a = make_events(tenant, 200)
    # equal ids and values, distinct objects, in the opposite order (on PostgreSQL two
    # transactions then want the same row locks: the writer must not deadlock)
    events_b = make_events(tenant, 200)[::-1]
    results = await asyncio.gather(
        *[w.write(e) for pair in zip(events_a, events_b) for w, e in zip((w1, w2), pair)]
    )
    assert w1.stats.failed_transactions == w2.stats.failed_transactions == 0
    await w1.stop()
    await w2.stop()
    firsts = Counter(r.event.event_id for r in results if not r.duplicate)
    assert set(firsts.values()) == {1} and len(firsts) == 200
    by_id = defaultdict(set)
    for r in results:
        by_id[r.event.event_id].add(r.seq)
    assert all(len(seqs) == 1 for seqs in by_id.values())  # both callers see one seq
    assert await store.count_events(tenant) == 200
    events_sum, cost_sum = await _rollup_total(store, tenant)
    assert int(events_sum) == 200 and int(cost_sum) == sum(e.cost_nanos for e in events_a)
    assert await store.budget_totals(tenant) == await store.recompute_budget_totals(tenant)
    # Both writers extended one chain: positions 1..200, every link good.
    assert sorted(r.event.chain_index for r in results if not r.duplicate) == list(range(1, 201))
    assert await store.verify_chain(tenant) == (True, 200, (await store.chain_head(tenant))[1], None, "")


async def test_a_cancelled_caller_does_not_disturb_the_batch(store, writer, tenant):
    events = make_events(tenant, 10)
    tasks = [asyncio.ensure_future(writer.write(e)) for e in events]
    await asyncio.sleep(0)  # all queued
    tasks[3].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[3], asyncio.CancelledError)
    assert all(not isinstance(r, BaseException) for i, r in enumerate(done) if i != 3)
    await writer.flush()
    assert await store.count_events(tenant) == 10  # the cancelled one committed too
    again = await writer.write(make_events(tenant, 10)[3])  # a retry is a duplicate
    assert again.duplicate


# -- the hash chain (canonical.py) ------------------------------------------------------


def test_canonical_encoding_is_the_documented_one():
    """Version 1 spelled out for a small event: a verifier in another language must
    be able to rebuild these bytes from the module docstring alone."""
    from p402_server.ledger.canonical import canonical_bytes

    ev = LedgerEvent("t", "é", event_ms=5, recorded_ms=6, labels={"b": "2", "a": "1"},
                     cost_nanos=-3, decision=Decision.DENY, reasons=("x", ""),
                     budget_charges=(("b1", 7),), duplicate_of=None, prompt_fingerprint="ff")
    owners = "0:," * 6
    want = (b"p402.event.v1\n" + b"1:t," + "2:é,".encode() + b"5,6,6:record,0:,"
            + owners.encode() + b"16:1:a,1:1,1:b,1:2,," + b"0:,0:," + b"0," * 5
            + b"-3,0,0,0," + b"3," + b"7:1:x,0:,," + b"0:,0:," + b"10:7:2:b1,7,,,"
            + b"0,0,0,0," + b"0:,0:," + b"~," + b"2:ff," + b"~,")
    assert canonical_bytes(ev) == want
    # chain_step is SHA-256(prev || canonical) in hex
    assert chain_step(GENESIS, ev) == hashlib.sha256(bytes(32) + want).hexdigest()


def test_canonical_encoding_ignores_storage_fields_and_content():
    from p402_server.ledger.canonical import canonical_bytes
    from p402_server.ledger.model import Content

    a = make_events("t", 1)[0]
    b = LedgerEvent.from_dict(a.to_dict())
    b.seq, b.chain_index, b.chain_hash = 99, 7, "ab" * 32
    b.contents = (Content("prompt", "secret"),)
    assert canonical_bytes(a) == canonical_bytes(b)
    # ...while every economic field matters, including ones that are easy to forget
    for name, value in [("recorded_ms", 1), ("revenue_nanos", 1), ("labels", {"x": "y"}),
                        ("budget_charges", (("z", 1),)), ("duplicate_of", ""),
                        ("response_fingerprint", "aa"), ("attempt", 3), ("employee", "e")]:
        c = LedgerEvent.from_dict(a.to_dict())
        setattr(c, name, value)
        assert canonical_bytes(c) != canonical_bytes(a), name
    # no ambiguity between adjacent fields
    x, y = LedgerEvent.from_dict(a.to_dict()), LedgerEvent.from_dict(a.to_dict())
    x.customer, x.feature = "ab", "c"
    y.customer, y.feature = "a", "bc"
    assert canonical_bytes(x) != canonical_bytes(y)


async def _chained(store, writer, tenant, n=12):
    events = make_events(tenant, n)
    for e in events:  # one by one: chain order is then event order
        await writer.write(e)
    return events


async def test_chain_links_every_event_per_tenant(store, writer, tenant):
    other = await store.create_tenant("other")
    events = make_events(tenant, 30)
    results = await write_all(writer, events + make_events(other, 5, prefix="o"))
    mine = [r.event for r in results if r.event.tenant_id == tenant]
    assert sorted(e.chain_index for e in mine) == list(range(1, 31))
    prev = GENESIS
    for ev in sorted(mine, key=lambda e: e.chain_index):  # the oracle: chain_step by hand
        prev = chain_step(prev, await store.get_event(tenant, ev.event_id))
        assert prev == ev.chain_hash
    assert await store.chain_head(tenant) == (30, prev)
    assert await store.verify_chain(tenant) == (True, 30, prev, None, "")
    assert (await store.verify_chain(other)).count == 5  # its own chain, from 1
    assert await store.chain_head(await store.create_tenant("empty")) == (0, GENESIS)


async def test_duplicates_do_not_enter_the_chain(store, writer, tenant):
    events = make_events(tenant, 10)
    await write_all(writer, events[:4])
    # a batch mixing events already in the ledger, repeats inside the batch and new ones
    again = make_events(tenant, 10)
    results = await write_all(writer, [again[1], again[5], again[3], again[5], again[8]])
    assert [r.duplicate for r in results] == [True, False, True, True, False]
    res = await store.verify_chain(tenant)
    assert res.ok and res.count == 6
    assert sorted(r.event.chain_index for r in results) == [2, 4, 5, 5, 6]


async def test_chain_survives_a_failed_transaction(store, tenant, monkeypatch):
    w = GroupCommitWriter(store)
    await w.start()
    try:
        await w.write(make_events(tenant, 1, prefix="a")[0])
        original = w._ops.write_batch
        boom = {"on": True}

        async def failing(*args):
            if boom["on"]:
                boom["on"] = False
                raise RuntimeError("disk on fire")
            return await original(*args)

        monkeypatch.setattr(w._ops, "write_batch", failing)
        with pytest.raises(RuntimeError):
            await w.write(make_events(tenant, 1, prefix="b")[0])
        res = await w.write(make_events(tenant, 1, prefix="c")[0])
        assert res.event.chain_index == 2  # the failed batch did not move the head
    finally:
        await w.stop()
    assert (await store.verify_chain(tenant)).ok


async def _sql(store, sql: str, **params):
    async with store.engine.begin() as conn:
        await conn.execute(sa.text(sql), params)


async def _move(store, tenant, frm: int, to: int):
    await _sql(store, "UPDATE events SET chain_index = :to WHERE tenant_id = :t AND chain_index = :f",
               t=tenant, f=frm, to=to)


TAMPERING = ["modified", "modified_and_rehashed", "deleted", "deleted_and_renumbered",
             "inserted", "inserted_unchained", "appended", "reordered"]


@pytest.mark.parametrize("how", TAMPERING)
async def test_verify_names_the_first_bad_position(store, writer, tenant, how):
    await _chained(store, writer, tenant, 12)
    assert (await store.verify_chain(tenant)).ok
    t = tenant
    if how == "modified":
        await _sql(store, "UPDATE events SET cost_nanos = cost_nanos + 1 WHERE tenant_id = :t AND chain_index = 5", t=t)
        want = 5
    elif how == "modified_and_rehashed":  # the forger fixes the row's own hash
        await _sql(store, "UPDATE events SET customer = 'someone-else' WHERE tenant_id = :t AND chain_index = 5", t=t)
        ev4 = (await store.query_events(t, order="asc", page_size=4))[0][-1]
        page = (await store.query_events(t, order="asc", page_size=5))[0]
        await _sql(store, "UPDATE events SET chain_hash = :h WHERE tenant_id = :t AND chain_index = 5",
                   t=t, h=chain_step(ev4.chain_hash, page[-1]))
        want = 6  # the next link no longer fits
    elif how == "deleted":
        await _sql(store, "DELETE FROM events WHERE tenant_id = :t AND chain_index = 5", t=t)
        want = 5
    elif how == "deleted_and_renumbered":
        await _sql(store, "DELETE FROM events WHERE tenant_id = :t AND chain_index = 5", t=t)
        for i in range(6, 13):
            await _move(store, t, i, i - 1)
        want = 5
    elif how == "inserted":  # a forged event squeezed in at position 5
        for i in range(12, 4, -1):
            await _move(store, t, i, i + 1)
        forged = make_events(t, 1, prefix="forged")[0]
        forged.recorded_ms = T0
        ev4 = (await store.query_events(t, order="asc", page_size=4))[0][-1]
        forged.chain_index, forged.chain_hash = 5, chain_step(ev4.chain_hash, forged)
        from p402_server.ledger.model import to_row

        async with store.engine.begin() as conn:
            await conn.execute(S.events.insert().values(**to_row(forged)))
        want = 6  # the forged row links to 4, but the old 5 (now 6) does not link to it
    elif how == "inserted_unchained":
        from p402_server.ledger.model import to_row

        forged = make_events(t, 1, prefix="forged")[0]
        forged.recorded_ms = T0
        async with store.engine.begin() as conn:
            await conn.execute(S.events.insert().values(**to_row(forged)))
        want = 13
    elif how == "appended":
        from p402_server.ledger.model import to_row

        forged = make_events(t, 1, prefix="forged")[0]
        forged.recorded_ms, forged.chain_index, forged.chain_hash = T0, 13, "0" * 64
        async with store.engine.begin() as conn:
            await conn.execute(S.events.insert().values(**to_row(forged)))
        want = 13
    else:  # reordered: positions 3 and 4 swap
        await _move(store, t, 3, -3)
        await _move(store, t, 4, 3)
        await _move(store, t, -3, 4)
        want = 3
    res = await store.verify_chain(t)
    assert not res.ok
    assert res.first_bad_index == want, res
    assert res.count == want - 1 and res.reason
    # and the same verdict from an export of the events (what `p402 verify FILE` walks)
    if how not in ("inserted_unchained",):
        from p402_server.ledger.canonical import verify_events

        rows = [LedgerEvent.from_dict(e.to_dict()) async for e in store.iter_events(t)]
        rows.sort(key=lambda e: e.chain_index)
        assert verify_events(rows).first_bad_index == want


async def test_verify_a_partial_export_from_its_prev_hash(store, writer, tenant):
    from p402_server.ledger.canonical import verify_events

    await _chained(store, writer, tenant, 10)
    evs = [e async for e in store.iter_events(tenant)]
    evs.sort(key=lambda e: e.chain_index)
    res = verify_events(evs[4:], prev_hex=evs[3].chain_hash, first_index=5)
    assert res.ok and res.count == 6 and res.head == evs[-1].chain_hash
    assert not verify_events(evs[4:], prev_hex=evs[2].chain_hash, first_index=5).ok


async def test_migration_chains_events_written_before_it(empty_store_url):
    """A 0001 database with events: upgrading to 0002 gives them a valid chain."""
    from alembic import command
    from alembic.config import Config

    from p402_server.ledger.engine import MIGRATIONS_DIR
    from p402_server.ledger.model import to_row

    s = await open_store(empty_store_url, create=False)
    try:
        def upgrade_to_0001(sync_conn):
            cfg = Config()
            cfg.set_main_option("script_location", MIGRATIONS_DIR)
            cfg.attributes["connection"] = sync_conn
            command.upgrade(cfg, "0001")

        async with s.engine.begin() as conn:
            await conn.run_sync(upgrade_to_0001)
            old_columns = {c.name for c in S.events.columns} - {
                "chain_index", "prompt_fingerprint", "response_fingerprint",
                "service_tier", "units"}
            from p402_server.ledger.model import to_values
            from p402_server.ledger.writer import _aggregate_rollups

            for tid, n in (("ta", 7), ("tb", 3)):
                evs = make_events(tid, n)
                for ev in evs:
                    ev.recorded_ms = T0
                    row = {k: v for k, v in to_row(ev).items() if k in old_columns}
                    await conn.execute(sa.table("events", *[sa.column(c) for c in row]).insert().values(**row))
                # the writer of 0001 kept hourly rollups in the same transactions
                names = (*S.ROLLUP_KEY, *S.ROLLUP_SUMS)
                await conn.execute(S.rollups_hourly.insert(), [
                    dict(zip(names, r)) for r in _aggregate_rollups([to_values(e) for e in evs])])
        await s.migrate()
        assert await s.schema_revision() == HEAD_REVISION
        assert await s.verify_chain("ta") == (True, 7, (await s.chain_head("ta"))[1], None, "")
        assert (await s.verify_chain("tb")).count == 3
        # spend_daily was filled from the hourly rollups of the old events
        by_customer, _ = await s.query_spend("ta", None, ["customer"], source="daily")
        scanned, _ = await s.query_spend("ta", None, ["customer"], source="events")
        assert [r.to_dict() for r in by_customer] == [r.to_dict() for r in scanned]
        # and the writer continues each chain where the migration left it
        await s.create_tenant("x")  # any tenant row; events are not foreign-keyed
        w = GroupCommitWriter(s)
        await w.start()
        res = await w.write(make_events("ta", 1, prefix="new")[0])
        await w.stop()
        assert res.event.chain_index == 8
        assert (await s.verify_chain("ta")).count == 8
    finally:
        await s.close()


# -- contents, fingerprints, settled reservations ----------------------------------------


async def test_contents_are_written_with_their_event_only(store, writer, tenant):
    from p402_server.ledger.model import Content

    ev = make_events(tenant, 1)[0]
    ev.contents = (Content("prompt", "hello ünï", mode=3, expires_ms=T0 + HOUR),
                   Content("response", "world", mode=3))
    res = await writer.write(ev)
    got = await store.get_contents(tenant, ev.event_id)
    assert [(c.kind, c.text, c.mode, c.expires_ms, c.event_id) for c in got] == [
        ("prompt", "hello ünï", 3, T0 + HOUR, ev.event_id), ("response", "world", 3, 0, ev.event_id)]
    assert got[0].created_ms == res.event.recorded_ms
    assert "hello" not in json.dumps(res.event.to_dict()) and "hello" not in repr(res.event)
    # a duplicate's content is not stored (the first event's stays)
    dup = make_events(tenant, 1)[0]
    dup.contents = (Content("prompt", "other text"),)
    assert (await writer.write(dup)).duplicate
    assert [c.text for c in await store.get_contents(tenant, ev.event_id)] == ["hello ünï", "world"]
    # the content is in no event column and not in the chain's bytes
    assert await store.get_contents(await store.create_tenant("b"), ev.event_id) == []
    assert (await store.verify_chain(tenant)).ok


async def test_purge_removes_expired_content_only(store, writer, tenant):
    from p402_server.ledger.model import Content

    n = await store.put_contents([
        Content("prompt", "a", expires_ms=T0, tenant_id=tenant, event_id="e1"),
        Content("response", "b", expires_ms=T0 + 10, tenant_id=tenant, event_id="e1"),
        Content("prompt", "c", expires_ms=0, tenant_id=tenant, event_id="e2"),
    ])
    assert n == 3
    assert await store.purge_contents(T0) == 1
    assert [c.kind for c in await store.get_contents(tenant, "e1")] == ["response"]
    assert await store.purge_contents(T0 + 10) == 1
    assert await store.purge_contents(T0 + 10**9) == 0  # 0 = kept until deleted
    assert [c.text for c in await store.get_contents(tenant, "e2")] == ["c"]


async def test_content_validation_names_the_field(store, writer, tenant):
    from p402_server.ledger.model import Content

    ev = make_events(tenant, 1)[0]
    ev.contents = (Content("prompt", "x"), Content("thoughts", "y"))
    with pytest.raises(InvalidArgument) as err:
        await writer.write(ev)
    assert err.value.field == "contents[1].kind"
    ev.contents = (Content("prompt", "x"), Content("prompt", "y"))
    with pytest.raises(InvalidArgument) as err:
        await writer.write(ev)
    assert err.value.field == "contents"
    with pytest.raises(InvalidArgument) as err:
        await store.put_contents([Content("prompt", "x")])
    assert err.value.field == "rows[0].event_id"
    assert await store.count_events(tenant) == 0


async def test_find_duplicate_by_owner_and_window(store, writer, tenant):
    def ev(i, customer, fp, ms, resp=None):
        return LedgerEvent(tenant, f"d{i}", event_ms=ms, customer=customer, feature="chat",
                           prompt_fingerprint=fp, response_fingerprint=resp)

    await write_all(writer, [ev(1, "c1", "aa", T0 + 100, "r1"), ev(2, "c1", "aa", T0 + 200),
                             ev(3, "c2", "aa", T0 + 300), ev(4, "c1", "bb", T0 + 400)])
    owners = {"customer": "c1", "feature": "chat"}
    assert await store.find_duplicate(tenant, owners, "aa", T0) == "d1"  # the earliest
    assert await store.find_duplicate(tenant, owners, "aa", T0 + 150) == "d2"  # window
    assert await store.find_duplicate(tenant, owners, "aa", T0 + 250) is None
    assert await store.find_duplicate(tenant, {"customer": "c2", "feature": "chat"}, "aa", 0) == "d3"
    assert await store.find_duplicate(tenant, {"customer": "c1"}, "aa", 0) is None  # all owners
    assert await store.find_duplicate(tenant, ("c1", "chat", "", "", "", ""), "bb", 0) == "d4"
    assert await store.find_duplicate(tenant, owners, "r1", 0, field="response") == "d1"
    assert await store.find_duplicate(await store.create_tenant("o"), owners, "aa", 0) is None
    with pytest.raises(InvalidArgument) as err:
        await store.find_duplicate(tenant, {"colour": "x"}, "aa", 0)
    assert err.value.field == "owners"


async def test_settled_reservations_batch(store, writer, tenant):
    await write_all(writer, [
        LedgerEvent(tenant, "r1", reservation_id="r1", kind="record"),
        LedgerEvent(tenant, "caller-id", reservation_id="r2", kind="record"),  # own event id
        LedgerEvent(tenant, "r3", reservation_id="r3", kind="expired"),
        LedgerEvent(tenant, "meter-only"),
    ])
    other = await store.create_tenant("other")
    await writer.write(LedgerEvent(other, "r4", reservation_id="r4"))
    ids = ["r1", "r2", "r3", "r4", "open", ""] + [f"x{i}" for i in range(1200)]
    assert await store.settled_reservations(tenant, ids) == {
        "r1": "r1", "r2": "caller-id", "r3": "r3"}
    assert await store.settled_reservations(tenant, []) == {}


async def test_restart_skips_holds_settled_under_a_caller_event_id(tmp_path):
    """A hold recorded with the caller's own event_id, then a crash before the hold's
    delete was written: the restart must not hold (and later charge) it again, and
    a retry of that Record is still answered as a duplicate."""
    from service_harness import admin_pb2, common_pb2, meter_pb2, nanos, owners, start_service, usd

    s = await start_service(f"sqlite+aiosqlite:///{tmp_path}/p.db", holds_flush_interval_seconds=3600)
    try:
        await s.admin.PutBudget(admin_pb2.PutBudgetRequest(budget=admin_pb2.Budget(
            budget_id="all", limit=usd(10**9))), metadata=s.auth)
        holds = [await s.meter.Authorize(meter_pb2.AuthorizeRequest(
            model="gpt-4o-mini", owners=owners(customer="acme"), input_bytes=3000), metadata=s.auth)
            for _ in range(2)]
        await s.server.runtime.tenants[s.tenant_id].flush_holds()  # both holds on disk
        rec = meter_pb2.RecordRequest(event_id="caller-evt", reservation_id=holds[0].reservation_id,
                                      usage=common_pb2.Usage(input_tokens=10, output_tokens=1))
        first = await s.meter.Record(rec, metadata=s.auth)
        s.server.runtime.tenants[s.tenant_id]._hold_deletes.clear()  # the "crash"
        await s.restart()
        resp = await s.admin.ListBudgets(admin_pb2.ListBudgetsRequest(), metadata=s.auth)
        st = next(b.status for b in resp.budgets if b.budget_id == "all")
        assert nanos(st.committed) == nanos(first.cost)
        assert nanos(st.held) == nanos(holds[1].estimated_cost)  # only the open one
        retry = meter_pb2.RecordRequest(reservation_id=holds[0].reservation_id,
                                        usage=common_pb2.Usage(input_tokens=10, output_tokens=1))
        again = await s.meter.Record(retry, metadata=s.auth)
        assert again.duplicate and again.event_id == "caller-evt"
    finally:
        await s.close()


async def test_stream_record_batches_commits_each_batch_in_order(tmp_path):
    import grpc

    from service_harness import common_pb2, meter_pb2, start_service

    s = await start_service(f"sqlite+aiosqlite:///{tmp_path}/p.db")

    def rec(event_id: str, tokens: int = 100):
        return meter_pb2.RecordRequest(
            event_id=event_id, model="gpt-4o-mini", owners=common_pb2.Owners(customer="acme"),
            usage=common_pb2.Usage(input_tokens=tokens, output_tokens=10))

    try:
        batches = [meter_pb2.RecordBatchRequest(records=[rec(f"s{b}-{i}") for i in range(50)])
                   for b in range(6)]
        # a repeat inside a batch and one of an earlier batch: duplicates, counted once
        batches.append(meter_pb2.RecordBatchRequest(records=[rec("s0-3"), rec("new"), rec("new")]))

        async def gen():
            for b in batches:
                yield b

        out = [r async for r in s.meter.StreamRecordBatches(gen(), metadata=s.auth)]
        assert [len(r.results) for r in out] == [50] * 6 + [3]
        assert [r.event_id for r in out[2].results] == [f"s2-{i}" for i in range(50)]
        assert [r.duplicate for r in out[-1].results] == [True, False, True]
        assert out[-1].results[0].cost == out[0].results[3].cost
        assert await s.store.count_events(s.tenant_id) == 301
        assert (await s.store.verify_chain(s.tenant_id)).count == 301

        # a bad record fails the stream with the field named, before it settles
        async def bad():
            yield meter_pb2.RecordBatchRequest(records=[rec("ok-1"), meter_pb2.RecordRequest(
                event_id="no-model", usage=common_pb2.Usage(input_tokens=1))])

        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in s.meter.StreamRecordBatches(bad(), metadata=s.auth):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "records[1]." in err.value.details()
        assert await s.store.get_event(s.tenant_id, "ok-1") is None
    finally:
        await s.close()
