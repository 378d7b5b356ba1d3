"""Admin changes reach every process on the ledger: the tenant's config
version (store), the poll (Runtime.sync_config) and TenantRuntime.reload_config.

In process: a SQLite file shared by two "processes" (each its own store, writer,
LeaseManager and Runtime; the background poll is driven by calling sync_config, so
nothing waits on a timer). Then `p402 serve --lease on` replicas on one PostgreSQL,
with a short P402_CONFIG_POLL_SECONDS: waits poll the other replica's answers, bounded,
and never assert how long propagation took.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest
from p402.v1 import admin_pb2, admin_pb2_grpc, common_pb2, meter_pb2, meter_pb2_grpc

import p402core
from p402core import NotFound
from p402_server.wire import convert
from p402_server.privacy import modes as _privacy
from p402_server.runtime.config import ServerConfig
from p402_server.runtime.leases import LeaseConfig, LeaseManager
from p402_server.runtime.process import Runtime
from p402_server.server import init_tenant
from p402_server.ledger import GroupCommitWriter, open_store

from .test_replicas import _snapshot, nanos, usd
from .conftest import asyncpg_dsn

USD = 1_000_000_000
MODEL = "gpt-4o-mini"
DAY_MS = 86_400_000


def areq(customer: str = "c1", **kw) -> meter_pb2.AuthorizeRequest:
    return meter_pb2.AuthorizeRequest(model=MODEL, owners=common_pb2.Owners(customer=customer),
                                      input_bytes=4000, max_output_tokens=200, **kw)


async def until(check, what: str, timeout: float = 30.0):
    """Poll `check()` (sync or async) until it returns something truthy; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/p402.db"
    return request.getfixturevalue("pg_url")


# -- the store: the version moves with every config write, in its transaction ---------


async def test_every_config_write_bumps_the_tenant_config_version(db_url):
    store = await open_store(db_url)
    try:
        t = await store.create_tenant("t")
        other = await store.create_tenant("other")
        assert await store.config_versions([t, other, "t_missing"]) == {t: 0, other: 0}
        assert await store.config_versions([]) == {}
        expected = 0

        async def bumped(write, by: int = 1):
            nonlocal expected
            result = await write
            expected += by
            assert (await store.config_versions([t]))[t] == expected
            return result

        budget = {"budget_id": "b", "limit_nanos": USD, "enforcement": "HARD"}
        await bumped(store.put_budget(t, "b", budget))
        await bumped(store.put_budget(t, "b", {**budget, "limit_nanos": 2 * USD}))
        await bumped(store.put_policy(t, "r", {"rule_id": "r", "effect": "DENY"}))
        await bumped(store.put_price(t, "m", {"model": "m", "input_pico": 1}))
        await bumped(store.put_settings(t, {"hold_ttl_seconds": 60}))
        # An import: many prices, one transaction, one version.
        await bumped(store.put_prices(t, {f"m{i}": {"model": f"m{i}", "input_pico": i}
                                          for i in range(50)}))
        assert len(await store.list_prices(t)) == 51
        await bumped(store.put_prices(t, {}), by=0)  # nothing to write: no bump
        with pytest.raises(ValueError):
            await bumped(store.put_prices(t, {"ok": {"model": "ok"}, "": {}}), by=0)
        assert "ok" not in await store.list_prices(t)  # all or nothing
        for i in range(50):
            assert await bumped(store.delete_price(t, f"m{i}")) is True
        assert await bumped(store.delete_budget(t, "b")) is True
        assert await bumped(store.delete_policy(t, "r")) is True
        assert await bumped(store.delete_price(t, "m")) is True
        # A delete that found nothing changed nothing: its bump is rolled back.
        assert await bumped(store.delete_budget(t, "b"), by=0) is False
        assert await bumped(store.delete_price(t, "nope"), by=0) is False
        # Writes refused before anything is written move nothing either.
        with pytest.raises(NotFound):
            await store.put_budget("t_missing", "b", budget)
        with pytest.raises(ValueError):
            await bumped(store.put_policy(t, "r", {"bad": object()}), by=0)
        assert await store.config_versions([t, other]) == {t: expected, other: 0}
    finally:
        await store.close()


async def test_migration_0004_starts_existing_tenants_at_version_0(tmp_path):
    from alembic import command
    from alembic.config import Config

    from p402_server.ledger.engine import MIGRATIONS_DIR

    store = await open_store(f"sqlite+aiosqlite:///{tmp_path}/old.db", create=False)
    try:
        def upgrade(sync_conn, to):
            cfg = Config()
            cfg.set_main_option("script_location", MIGRATIONS_DIR)
            cfg.attributes["connection"] = sync_conn
            command.upgrade(cfg, to)

        async with store.engine.begin() as conn:
            await conn.run_sync(upgrade, "0003")
            await conn.exec_driver_sql(
                "INSERT INTO tenants (tenant_id, name, created_ms, settings) "
                "VALUES ('t_old', 'old', 1, '{}')")
        await store.migrate()
        assert await store.config_versions(["t_old"]) == {"t_old": 0}
        await store.put_budget("t_old", "b", {"budget_id": "b", "limit_nanos": 1})
        assert await store.config_versions(["t_old"]) == {"t_old": 1}
    finally:
        await store.close()


# -- two processes in one: Runtime objects with their own store, writer, leases ------


class Proc:
    """One process's share of the ledger: store pool, writer, LeaseManager, Runtime."""

    @classmethod
    async def open(cls, url: str, name: str, core=None) -> "Proc":
        self = cls()
        self.store = await open_store(url)
        self.writer = GroupCommitWriter(self.store)
        await self.writer.start()
        self.leases = LeaseManager(self.store, LeaseConfig(interval_seconds=0.01),
                                   holder_id=name)
        self.runtime = Runtime(self.store, self.writer, ServerConfig(), core=core,
                               leases=self.leases)
        return self

    async def close(self) -> None:
        await self.runtime.stop()
        await self.writer.stop()
        await self.leases.close()
        await self.store.close()


@pytest.fixture
async def procs(tmp_path):
    """(tenant_id, open(name, core=None) -> Proc) on one SQLite file; all closed after."""
    url = f"sqlite+aiosqlite:///{tmp_path}/ledger.db"
    setup = await open_store(url)
    tenant_id = await setup.create_tenant("sync")
    await setup.close()
    opened: list[Proc] = []

    async def open_(name: str, core=None) -> Proc:
        p = await Proc.open(url, name, core)
        opened.append(p)
        return p

    yield tenant_id, open_
    for p in reversed(opened):
        await p.close()


# What AdminService does for each change (admin_service.py): under the tenant's admin
# lock, persist, then swap this process's engine.

async def admin_put_budget(rt, budget) -> None:
    async with rt.admin_lock:
        await rt.store.put_budget(rt.tenant_id, budget.budget_id, budget.to_dict())
        rt.swap_budgets({**rt.budgets, budget.budget_id: budget})


async def admin_delete_budget(rt, budget_id: str) -> None:
    async with rt.admin_lock:
        assert await rt.store.delete_budget(rt.tenant_id, budget_id)
        rt.swap_budgets({k: v for k, v in rt.budgets.items() if k != budget_id})


async def admin_put_rule(rt, rule) -> None:
    async with rt.admin_lock:
        await rt.store.put_policy(rt.tenant_id, rule.rule_id, rule.to_dict())
        rt.swap_rules({**rt.rules, rule.rule_id: rule})


async def admin_put_price(rt, spec: dict) -> None:
    async with rt.admin_lock:
        await rt.store.put_price(rt.tenant_id, spec["model"], spec)
        rt.swap_prices({**rt.price_specs, spec["model"]: spec})


async def admin_update_settings(rt, **changes) -> None:
    async with rt.admin_lock:
        new = {**rt.settings, **changes}
        await rt.store.put_settings(rt.tenant_id, new)
        rt.swap_settings(new)


def count_swaps(rt) -> dict[str, int]:
    """Wrap the tenant runtime's swap_* methods with call counters."""
    counts = {"budgets": 0, "rules": 0, "prices": 0, "settings": 0}
    for kind in counts:
        method = getattr(rt, f"swap_{kind}")

        def counted(arg, _method=method, _kind=kind):
            counts[_kind] += 1
            return _method(arg)

        setattr(rt, f"swap_{kind}", counted)
    return counts


def estimate(rt) -> int:
    """The estimate of areq() on this engine (an Authorize, released at once)."""
    a = rt.engine.authorize(MODEL, owners={"customer": "probe"}, input_bytes=4000,
                            max_output_tokens=200)
    if a.reservation_id:
        rt.engine.release(a.reservation_id)
    return a.estimated_cost_nanos


def spent(rt, budget_id: str) -> int:
    """committed + held on `budget_id` in this process's engine."""
    st = next(s for s in rt.engine.budget_status() if s.budget_id == budget_id)
    return st.committed_nanos + st.held_nanos


async def test_hard_budget_created_through_one_process_is_enforced_by_the_other(procs):
    tenant_id, open_ = procs
    a, b = await open_("A"), await open_("B")
    rta, rtb = await a.runtime.get(tenant_id), await b.runtime.get(tenant_id)
    est = estimate(rtb)
    limit = 100 * est + est // 3  # slices (<= limit/20) hold several estimates
    await admin_put_budget(rta, rta.core.Budget("hard", limit, period="TOTAL",
                                                enforcement="HARD"))
    assert "hard" not in rtb.budgets  # B built before the budget existed
    assert await b.runtime.sync_config() == [tenant_id]
    assert rtb.budgets["hard"].to_dict() == rta.budgets["hard"].to_dict()
    # B learnt of a HARD budget: it starts at a zero lease, then leases slices.
    assert {d["budget_id"] for d in rtb.engine.lease_status()} == {"hard"}

    allowed, denied = 0, 0
    start = last_allow = time.monotonic()
    # Both processes spend (holds) until neither is allowed anything for a second
    # (bounded): the two engines' holds never pass the limit together, each
    # spending only its lease.
    while time.monotonic() - last_allow < 1.0 and time.monotonic() - start < 30:
        for rt in (rtb, rta):
            resp = rt.authorize(areq())
            if resp.decision == common_pb2.DECISION_DENY:
                assert "budget.exceeded" in resp.reasons, resp.reasons
                denied += rt is rtb
            else:
                allowed += rt is rtb
                last_allow = time.monotonic()
        assert spent(rta, "hard") + spent(rtb, "hard") <= limit
        await asyncio.sleep(0.002)
    # Filled (near the limit the slices shrink below one estimate: a few stay unused).
    assert spent(rta, "hard") + spent(rtb, "hard") >= 0.9 * limit
    assert allowed > 0 and denied > 0
    for _ in range(20):  # full: every further Authorize through B is denied
        resp = rtb.authorize(areq())
        assert resp.decision == common_pb2.DECISION_DENY and "budget.exceeded" in resp.reasons
    assert spent(rta, "hard") + spent(rtb, "hard") <= limit


async def test_own_change_reloads_as_a_noop_and_keeps_counters(procs):
    tenant_id, open_ = procs
    a = await open_("A")
    rt = await a.runtime.get(tenant_id)
    await admin_put_budget(rt, rt.core.Budget("soft", 1000 * USD, period="MONTH",
                                              enforcement="SOFT"))
    held = [rt.authorize(areq()) for _ in range(3)]
    assert all(r.decision == common_pb2.DECISION_ALLOW for r in held)
    counts = count_swaps(rt)
    await admin_put_rule(rt, rt.core.Rule("warn-x", "WARN", owners={"customer": "x"}))
    await admin_put_price(rt, {**rt.core.Catalog.default().lookup(MODEL).to_dict(),
                               "output_pico": 900_000})
    # As UpdateSettings builds them (repeated fields as lists), through the JSON store.
    new = convert.settings_update(rt.settings, admin_pb2.Settings(
        default_output_tokens=300, allowed_privacy_modes=[1, 2]),
        ["default_output_tokens", "allowed_privacy_modes"])
    async with rt.admin_lock:
        await rt.store.put_settings(tenant_id, new)
        rt.swap_settings(new)
    assert counts == {"budgets": 0, "rules": 1, "prices": 1, "settings": 1}
    engine, budgets, rules, catalog = rt.engine, rt.budgets, rt.rules, rt.catalog
    before = [(s.budget_id, s.committed_nanos, s.held_nanos) for s in engine.budget_status()]

    # The build's own secrets write and this change both moved the version: the
    # poll reloads, finds nothing different, swaps nothing.
    assert await a.runtime.sync_config() == [tenant_id]
    assert counts == {"budgets": 0, "rules": 1, "prices": 1, "settings": 1}
    assert rt.engine is engine and rt.budgets is budgets and rt.rules is rules
    assert rt.catalog is catalog
    assert [(s.budget_id, s.committed_nanos, s.held_nanos)
            for s in rt.engine.budget_status()] == before
    assert await rt.reload_config() == ()
    assert await a.runtime.sync_config() == []  # version unchanged: no reload at all
    assert counts == {"budgets": 0, "rules": 1, "prices": 1, "settings": 1}


async def test_every_kind_of_change_reaches_the_other_process(procs):
    tenant_id, open_ = procs
    a, b = await open_("A"), await open_("B")
    rta, rtb = await a.runtime.get(tenant_id), await b.runtime.get(tenant_id)
    await b.runtime.sync_config()  # A's build stored the tenant's secrets
    secrets = rtb.settings[_privacy.SECRETS]
    assert secrets == rta.settings[_privacy.SECRETS]
    counts = count_swaps(rtb)
    core = rta.core

    # A budget, then a lower limit: B's allowance follows (B's own spend is over it).
    await admin_put_budget(rta, core.Budget("b1", 1000 * USD, period="TOTAL",
                                            enforcement="HARD"))
    await b.runtime.sync_config()
    await until(lambda: rtb.authorize(areq()).decision == common_pb2.DECISION_ALLOW,
                "B leasing a slice of b1")
    assert spent(rtb, "b1") > 0
    await admin_put_budget(rta, core.Budget("b1", spent(rtb, "b1") // 2, period="TOTAL",
                                            enforcement="HARD"))
    assert await b.runtime.sync_config() == [tenant_id]
    assert rtb.budgets["b1"].limit_nanos == spent(rtb, "b1") // 2
    resp = rtb.authorize(areq())
    assert resp.decision == common_pb2.DECISION_DENY and "budget.exceeded" in resp.reasons
    # Deleted: B no longer charges or enforces it.
    await admin_delete_budget(rta, "b1")
    await b.runtime.sync_config()
    assert "b1" not in rtb.budgets
    assert rtb.authorize(areq()).decision == common_pb2.DECISION_ALLOW
    assert counts["budgets"] == 3

    # A DENY rule.
    await admin_put_rule(rta, core.Rule("no-blocked", "DENY", owners={"customer": "blocked"}))
    await b.runtime.sync_config()
    resp = rtb.authorize(areq("blocked"))
    assert resp.decision == common_pb2.DECISION_DENY and "no-blocked" in resp.rule_ids
    assert rtb.authorize(areq("fine")).decision == common_pb2.DECISION_ALLOW

    # A price: B estimates with A's catalog.
    price = {**core.Catalog.default().lookup(MODEL).to_dict(), "input_pico": 7_000_000}
    await admin_put_price(rta, price)
    assert estimate(rtb) != estimate(rta)
    await b.runtime.sync_config()
    assert rtb.catalog.version == rta.catalog.version
    assert estimate(rtb) == estimate(rta)

    # Settings: the new value arrives, the secrets come through unchanged.
    await admin_update_settings(rta, default_output_tokens=77, hold_ttl_seconds=120)
    await b.runtime.sync_config()
    assert (rtb.settings["default_output_tokens"], rtb.settings["hold_ttl_seconds"]) == (77, 120)
    assert rtb.settings[_privacy.SECRETS] == secrets
    assert rtb.privacy.fingerprint("x") == rta.privacy.fingerprint("x") is not None
    a_ = rtb.authorize(meter_pb2.AuthorizeRequest(model=MODEL, input_bytes=400))
    assert a_.output_token_cap == 77
    assert counts == {"budgets": 3, "rules": 1, "prices": 1, "settings": 1}
    # Nothing changed since: a poll reloads nothing.
    assert await b.runtime.sync_config() == []


async def test_failed_reload_keeps_serving_and_is_retried(procs, caplog):
    tenant_id, open_ = procs
    a, b = await open_("A"), await open_("B")
    rta, rtb = await a.runtime.get(tenant_id), await b.runtime.get(tenant_id)
    await b.runtime.sync_config()
    # A spec the core refuses (written around the admin API).
    await a.store.put_budget(tenant_id, "bad", {"budget_id": "bad", "limit_nanos": -1})
    engine = rtb.engine
    with caplog.at_level(logging.ERROR, logger="p402.server.runtime"):
        assert await b.runtime.sync_config() == []
        assert await b.runtime.sync_config() == []  # retried at every poll
    assert sum("reloading its config failed" in r.getMessage() for r in caplog.records) == 2
    assert rtb.engine is engine and "bad" not in rtb.budgets
    assert b.runtime.tenants[tenant_id] is rtb  # never dropped; still serving
    assert rtb.authorize(areq()).decision == common_pb2.DECISION_ALLOW
    await a.store.put_budget(tenant_id, "bad", {"budget_id": "bad", "limit_nanos": USD,
                                                "enforcement": "SOFT"})
    assert await b.runtime.sync_config() == [tenant_id]
    assert rtb.budgets["bad"].limit_nanos == USD


async def test_period_rollover_reopens_the_lease_on_the_new_period(procs, monkeypatch):
    from p402core import _engine_py
    from p402_server.runtime import leases as leases_mod
    from p402_server.runtime import shared as runtime_clock

    day1 = 20_000 * DAY_MS  # 2024-10-04 00:00 UTC
    clock = [day1 + DAY_MS - 5_000]  # five seconds to midnight
    now = lambda: clock[0]  # noqa: E731
    monkeypatch.setattr(_engine_py, "_default_clock", now)
    monkeypatch.setattr(leases_mod, "_now_ms", now)
    monkeypatch.setattr(runtime_clock, "_now_ms", now)
    tenant_id, open_ = procs
    a = await open_("A", core=p402core.load("python"))
    rt = await a.runtime.get(tenant_id)
    est = estimate(rt)
    limit = 40 * est
    await admin_put_budget(rt, rt.core.Budget("daily", limit, period="DAY",
                                              enforcement="HARD"))
    first = await until(lambda: (lambda r: r if r.decision == common_pb2.DECISION_ALLOW
                                 else None)(rt.authorize(areq())),
                        "a slice of day 1's allocation")
    rec = await rt.record(meter_pb2.RecordRequest(
        reservation_id=first.reservation_id, model=MODEL,
        usage=common_pb2.Usage(input_tokens=first.estimated_input_tokens,
                               output_tokens=first.output_token_cap),
        outcome=common_pb2.OUTCOME_SUCCESS))
    cost1 = nanos(rec.cost)
    assert cost1 > 0

    clock[0] = day1 + DAY_MS + 1_000  # past midnight: day 2
    second = await until(lambda: (lambda r: r if r.decision == common_pb2.DECISION_ALLOW
                                  else None)(rt.authorize(areq())),
                         "a slice of day 2's allocation")
    (st,) = [s for s in rt.engine.budget_status() if s.budget_id == "daily"]
    assert st.period_start_ms == day1 + DAY_MS
    assert st.committed_nanos == 0 and st.held_nanos == nanos(second.estimated_cost)

    import sqlalchemy as sa
    from p402_server.ledger import schema as S

    al, le = S.budget_allocations, S.budget_leases
    async with a.store.engine.connect() as conn:
        allocations = {r.period_start_ms: r for r in (await conn.execute(
            sa.select(al).where(al.c.tenant_id == tenant_id, al.c.budget_id == "daily"))).all()}
        leases = (await conn.execute(
            sa.select(le).where(le.c.tenant_id == tenant_id, le.c.budget_id == "daily",
                                le.c.period_start_ms == day1 + DAY_MS))).all()
    assert set(allocations) == {day1, day1 + DAY_MS}
    assert allocations[day1 + DAY_MS].leased_nanos > 0
    assert len(leases) == 1 and leases[0].granted_nanos > 0
    assert leases[0].holder_id.startswith("A/")
    rec2 = await rt.record(meter_pb2.RecordRequest(
        reservation_id=second.reservation_id, model=MODEL,
        usage=common_pb2.Usage(input_tokens=second.estimated_input_tokens,
                               output_tokens=second.output_token_cap),
        outcome=common_pb2.OUTCOME_SUCCESS))
    totals = await a.store.budget_totals(tenant_id)
    assert totals == {("daily", day1): cost1, ("daily", day1 + DAY_MS): nanos(rec2.cost)}


# -- replicas: `p402 serve --lease on` on one PostgreSQL -----------------------------

REPLICA_ENV = {"P402_CONFIG_POLL_SECONDS": "0.2",
               "P402_EXPIRE_INTERVAL_SECONDS": "0.1",
               "P402_HOLDS_FLUSH_INTERVAL_SECONDS": "0.05",
               "P402_LEASE_INTERVAL_SECONDS": "0.02"}


async def _tenant(pg_url: str) -> tuple[str, str]:
    store = await open_store(pg_url)
    try:
        return await init_tenant(store, "config-sync")
    finally:
        await store.close()


@pytest.mark.postgres
def test_replicas_hard_budget_through_a_is_enforced_by_b(pg_url, replicas):
    asyncio.run(_hard_budget_storm(pg_url, replicas))


async def _hard_budget_storm(pg_url, replicas):
    import asyncpg

    tenant_id, key = await _tenant(pg_url)
    md = (("authorization", f"Bearer {key}"),)
    ra, rb = await asyncio.to_thread(replicas, pg_url, 2, REPLICA_ENV)
    cha, chb = grpc.aio.insecure_channel(ra.target), grpc.aio.insecure_channel(rb.target)
    pg = await asyncpg.connect(asyncpg_dsn(pg_url))
    try:
        admin_a, admin_b = admin_pb2_grpc.AdminServiceStub(cha), admin_pb2_grpc.AdminServiceStub(chb)
        meter_b = meter_pb2_grpc.MeterServiceStub(chb)
        # Both replicas build the tenant's engine before the budget exists.
        est = 0
        for ch in (cha, chb):
            probe = await meter_pb2_grpc.MeterServiceStub(ch).Authorize(areq("probe"),
                                                                        metadata=md, timeout=30)
            assert probe.decision == common_pb2.DECISION_ALLOW
            est = nanos(probe.estimated_cost)
            await meter_pb2_grpc.MeterServiceStub(ch).Release(meter_pb2.ReleaseRequest(
                reservation_id=probe.reservation_id), metadata=md, timeout=30)
        limit = 100 * est + est // 3
        await admin_a.PutBudget(admin_pb2.PutBudgetRequest(budget=admin_pb2.Budget(
            budget_id="hard", limit=usd(limit), period=common_pb2.PERIOD_TOTAL,
            enforcement=common_pb2.ENFORCEMENT_HARD)), metadata=md, timeout=30)

        stats = {"allow": 0, "deny": 0, "samples": 0}
        violations: list = []
        done = asyncio.Event()
        last_allow = [time.monotonic()]

        async def sampler():
            while not done.is_set():
                snap = await _snapshot(pg, tenant_id)
                stats["samples"] += 1
                if snap.get("hard", 0) > limit:
                    violations.append(snap["hard"])
                await asyncio.sleep(0.02)

        async def client(c: int):
            n = 0
            while not done.is_set():
                n += 1
                a = await meter_b.Authorize(areq(f"c{c}", ttl_seconds=5), metadata=md,
                                            timeout=10)
                if a.decision == common_pb2.DECISION_DENY:
                    assert "budget.exceeded" in a.reasons, a.reasons
                    stats["deny"] += 1
                    await asyncio.sleep(0.01)
                    continue
                stats["allow"] += 1
                last_allow[0] = time.monotonic()
                await meter_b.Record(meter_pb2.RecordRequest(
                    reservation_id=a.reservation_id, event_id=f"e{c}_{n}", model=MODEL,
                    usage=common_pb2.Usage(input_tokens=a.estimated_input_tokens,
                                           output_tokens=a.output_token_cap),
                    outcome=common_pb2.OUTCOME_SUCCESS), metadata=md, timeout=10)

        sample_task = asyncio.create_task(sampler())
        tasks = [asyncio.create_task(client(c)) for c in range(8)]
        # Propagation: B lists the budget A created (bounded wait, not a timing).
        async def b_lists_it():
            got = await admin_b.ListBudgets(admin_pb2.ListBudgetsRequest(), metadata=md,
                                            timeout=10)
            return any(x.budget_id == "hard" for x in got.budgets)
        await until(b_lists_it, "replica B listing the budget made through A")
        # Then B must enforce it: the storm ends 2 s after B's last ALLOW (bounded).
        start = time.monotonic()
        while time.monotonic() - start < 60 and (
                not stats["deny"] or time.monotonic() - last_allow[0] < 2.0):
            await asyncio.sleep(0.1)
        done.set()
        await asyncio.gather(*tasks)
        await sample_task

        assert stats["deny"] > 0 and stats["samples"] > 5, stats
        assert not violations, violations[:5]
        final = await _snapshot(pg, tenant_id)
        assert final.get("hard", 0) <= limit
        # The storm through B really filled it (A's unused slice is at most limit/20).
        assert final.get("hard", 0) >= 0.6 * limit, (final, limit, stats)
    finally:
        await pg.close()
        await cha.close()
        await chb.close()


@pytest.mark.postgres
def test_replicas_update_delete_rule_price_settings_reach_the_other(pg_url, replicas):
    asyncio.run(_every_change(pg_url, replicas))


async def _every_change(pg_url, replicas):
    tenant_id, key = await _tenant(pg_url)
    md = (("authorization", f"Bearer {key}"),)
    ra, rb = await asyncio.to_thread(replicas, pg_url, 2, REPLICA_ENV)
    cha, chb = grpc.aio.insecure_channel(ra.target), grpc.aio.insecure_channel(rb.target)
    try:
        admin_a, admin_b = admin_pb2_grpc.AdminServiceStub(cha), admin_pb2_grpc.AdminServiceStub(chb)
        meter_a, meter_b = meter_pb2_grpc.MeterServiceStub(cha), meter_pb2_grpc.MeterServiceStub(chb)
        settings_b0 = await admin_b.GetSettings(admin_pb2.GetSettingsRequest(), metadata=md)

        async def authorize_b(customer="c1"):
            return await meter_b.Authorize(areq(customer), metadata=md, timeout=10)

        async def budgets_b():
            got = await admin_b.ListBudgets(admin_pb2.ListBudgetsRequest(), metadata=md)
            return {x.budget_id: x for x in got.budgets}

        async def put_budget(limit):
            await admin_a.PutBudget(admin_pb2.PutBudgetRequest(budget=admin_pb2.Budget(
                budget_id="b1", limit=usd(limit), period=common_pb2.PERIOD_TOTAL,
                enforcement=common_pb2.ENFORCEMENT_HARD)), metadata=md, timeout=10)

        # A budget; B spends on it (Records at the estimate).
        await put_budget(1000 * USD)
        await until(lambda: _has(budgets_b(), "b1"), "B listing b1")
        spent_b = 0
        for i in range(5):
            a = await until(lambda: _allowed(authorize_b()), "B allowing under b1")
            rec = await meter_b.Record(meter_pb2.RecordRequest(
                reservation_id=a.reservation_id, model=MODEL,
                usage=common_pb2.Usage(input_tokens=a.estimated_input_tokens,
                                       output_tokens=a.output_token_cap),
                outcome=common_pb2.OUTCOME_SUCCESS), metadata=md, timeout=10)
            spent_b += nanos(rec.cost)
        # Lower limit (below what B spent): B lists it and denies.
        await put_budget(spent_b // 2)

        async def lowered():
            b1 = (await budgets_b()).get("b1")
            return b1 is not None and nanos(b1.limit) == spent_b // 2
        await until(lowered, "B listing b1's lower limit")
        resp = await authorize_b()
        assert resp.decision == common_pb2.DECISION_DENY and "budget.exceeded" in resp.reasons

        # Deleted: B lists nothing and allows again.
        await admin_a.DeleteBudget(admin_pb2.DeleteBudgetRequest(budget_id="b1"), metadata=md)
        await until(lambda: _lacks(budgets_b(), "b1"), "B dropping b1")
        assert (await authorize_b()).decision == common_pb2.DECISION_ALLOW

        # A DENY rule.
        await admin_a.PutPolicyRule(admin_pb2.PutPolicyRuleRequest(rule=admin_pb2.PolicyRule(
            rule_id="no-blocked", effect=admin_pb2.EFFECT_DENY,
            owners={"customer": "blocked"})), metadata=md)

        async def rule_denies():
            r = await authorize_b("blocked")
            return r if r.decision == common_pb2.DECISION_DENY else None
        denied = await until(rule_denies, "B denying by A's rule")
        assert "no-blocked" in denied.rule_ids
        assert (await authorize_b("fine")).decision == common_pb2.DECISION_ALLOW

        # A price: B answers with A's catalog version and estimate.
        data = (b'{"%s": {"input_cost_per_token": 0.00004, "output_cost_per_token": '
                b'0.00008, "litellm_provider": "openai", "mode": "chat"}}' % MODEL.encode())
        imp = await admin_a.ImportPrices(admin_pb2.ImportPricesRequest(format="litellm",
                                                                       data=data), metadata=md)

        async def repriced():
            r = await authorize_b()
            return r if r.catalog_version == imp.catalog_version else None
        got_b = await until(repriced, "B pricing with A's import")
        got_a = await meter_a.Authorize(areq(), metadata=md, timeout=10)
        assert got_a.catalog_version == imp.catalog_version
        # At the imported prices (token estimates are each process's own calibration):
        # 40,000,000 and 80,000,000 pico-USD per input and output token.
        pico = got_b.estimated_input_tokens * 40_000_000 + got_b.output_token_cap * 80_000_000
        assert abs(nanos(got_b.estimated_cost) - pico // 1000) <= 1

        # Settings: the value arrives; the tenant's evidence key (a secret) is the same.
        await admin_a.UpdateSettings(admin_pb2.UpdateSettingsRequest(
            settings=admin_pb2.Settings(default_output_tokens=77),
            update_mask=["default_output_tokens"]), metadata=md)

        async def settings_b():
            s = await admin_b.GetSettings(admin_pb2.GetSettingsRequest(), metadata=md)
            return s if s.default_output_tokens == 77 else None
        s_b = await until(settings_b, "B reading A's settings")
        s_a = await admin_a.GetSettings(admin_pb2.GetSettingsRequest(), metadata=md)
        assert s_b.evidence_public_key == s_a.evidence_public_key
        assert s_b.evidence_public_key == settings_b0.evidence_public_key != ""
        r = await meter_b.Authorize(meter_pb2.AuthorizeRequest(model=MODEL, input_bytes=400),
                                    metadata=md, timeout=10)
        assert r.output_token_cap == 77
    finally:
        await cha.close()
        await chb.close()


async def _has(listing, budget_id):
    return budget_id in await listing


async def _lacks(listing, budget_id):
    return budget_id not in await listing


async def _allowed(call):
    r = await call
    return r if r.decision == common_pb2.DECISION_ALLOW else None
