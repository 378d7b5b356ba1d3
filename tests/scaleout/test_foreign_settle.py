"""A Record or Release for a reservation another process made: a gateway
that authorized on replica A and records on replica B. Settled correctly and exactly
once: B claims the settlement in the store (hold_claims, migration 0005) and settles
A's saved hold; A, at expiry, finds the claim and charges nothing.

Two servers with leases on, in this process, on one ledger: a SQLite file (always)
and PostgreSQL (the `postgres` mark; skipped with the reason when unreachable, except
in CI).
"""
from __future__ import annotations

import asyncio

import grpc
import pytest
from google.type import money_pb2
from p402.v1 import admin_pb2, admin_pb2_grpc, common_pb2, meter_pb2, meter_pb2_grpc

USD = 1_000_000_000
MODEL = "gpt-4o-mini"
LIMIT = 2 * USD


def _money(n: int) -> money_pb2.Money:
    units, rest = divmod(n, USD)
    return money_pb2.Money(currency_code="USD", units=units, nanos=rest)


def _nanos(m) -> int:
    return m.units * USD + m.nanos


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("pg_url")


class _Pair:
    """Two leased servers (A, B) on one ledger, one admin key, stubs for each."""

    async def start(self, url: str):
        from p402_server.runtime.config import ServerConfig
        from p402_server.server import create_server, init_tenant
        from p402_server.ledger import open_store

        cfg = ServerConfig(holds_flush_interval_seconds=0.05, expire_interval_seconds=0.05)
        self.stores = [await open_store(url) for _ in range(2)]
        self.tenant, key = await init_tenant(self.stores[0], "foreign")
        self.md = (("authorization", f"Bearer {key}"),)
        self.servers, self.channels, self.meters = [], [], []
        for store in self.stores:
            server, port = create_server("127.0.0.1:0", store=store, config=cfg, leases=True)
            await server.start()
            ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            self.servers.append(server)
            self.channels.append(ch)
            self.meters.append(meter_pb2_grpc.MeterServiceStub(ch))
        admin = admin_pb2_grpc.AdminServiceStub(self.channels[0])
        await admin.PutBudget(admin_pb2.PutBudgetRequest(budget=admin_pb2.Budget(
            budget_id="team", scope={"customer": "acme"}, period=common_pb2.PERIOD_MONTH,
            limit=_money(LIMIT), enforcement=common_pb2.ENFORCEMENT_HARD)), metadata=self.md)
        return self

    async def close(self):
        for ch in self.channels:
            await ch.close()
        for server in self.servers:
            await server.stop(0)
        for store in self.stores:
            await store.close()

    async def authorize(self, i: int, ttl: int = 60):
        return await self.meters[i].Authorize(meter_pb2.AuthorizeRequest(
            model=MODEL, owners=common_pb2.Owners(customer="acme"), input_bytes=4000,
            max_output_tokens=500, ttl_seconds=ttl), metadata=self.md)

    async def authorize_until_allowed(self, i: int, ttl: int = 60):
        """Authorize on server i; a fresh process denies until its first slice lands."""
        for _ in range(200):
            a = await self.authorize(i, ttl)
            if a.decision != common_pb2.DECISION_DENY:
                return a
            await asyncio.sleep(0.02)
        raise AssertionError(f"server {i} never allowed: {a}")

    def record(self, i: int, rid: str, event_id: str = "", output_tokens: int = 300):
        return self.meters[i].Record(meter_pb2.RecordRequest(
            event_id=event_id, reservation_id=rid, model=MODEL,
            usage=common_pb2.Usage(input_tokens=1000, output_tokens=output_tokens)),
            metadata=self.md)

    async def wait_hold_saved(self, rid: str):
        for _ in range(200):
            if await self.stores[0].get_hold(self.tenant, rid) is not None:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"hold {rid} never written behind")

    async def maker_expired(self):
        """Wait until A's expiry sweep settled every hold it made -> A's runtime."""
        rt_a = self.servers[0].runtime.tenants[self.tenant]
        for _ in range(300):
            if rt_a.engine.open_holds() == 0 and not rt_a._expiring:
                break
            await asyncio.sleep(0.02)
        assert rt_a.engine.open_holds() == 0 and not rt_a._expiring
        await asyncio.sleep(0.2)  # an EXPIRED event, were one written, is behind
        return rt_a

    async def ledger(self, rid: str) -> list:
        """Every ledger event that names reservation `rid`, across the tenant."""
        from p402_server.ledger.model import EventFilter

        events = []
        async for ev in self.stores[0].iter_events(self.tenant, EventFilter()):
            if ev.reservation_id == rid:
                events.append(ev)
        return events


def _run(url, body):
    async def go():
        pair = await _Pair().start(url)
        try:
            await body(pair)
        finally:
            await pair.close()
    asyncio.run(go())


def test_record_on_another_process_settles_the_hold_once(ledger_url):
    async def body(p: _Pair):
        a = await p.authorize_until_allowed(0)
        rid = a.reservation_id
        await p.wait_hold_saved(rid)
        # The gateway records on B: B settles A's hold (its owners, its budgets).
        r = await p.record(1, rid, event_id="evt-1")
        assert not r.duplicate and r.event_id == "evt-1"
        assert _nanos(r.cost) > 0
        # A retry on A (same event id): the first result, not a second charge.
        again = await p.record(0, rid, event_id="evt-1")
        assert again.duplicate and again.event_id == "evt-1"
        assert _nanos(again.cost) == _nanos(r.cost)
        # A retry on B without the event id: the ledger's first event.
        third = await p.record(1, rid)
        assert third.duplicate and third.event_id == "evt-1"
        evs = await p.ledger(rid)
        assert [e.kind for e in evs] == ["record"]
        assert evs[0].owners["customer"] == "acme"  # the hold's owners
        assert "team" in evs[0].budget_ids
        assert "reservation.adopted" in evs[0].reasons
        totals = await p.stores[0].budget_totals(p.tenant)
        assert sum(totals.values()) == _nanos(r.cost)
        assert totals == await p.stores[0].recompute_budget_totals(p.tenant)
    _run(ledger_url, body)


def test_maker_books_a_settlement_made_elsewhere(ledger_url):
    async def body(p: _Pair):
        a = await p.authorize_until_allowed(0, ttl=2)  # time to adopt before expiry
        rid = a.reservation_id
        await p.wait_hold_saved(rid)
        r = await p.record(1, rid, event_id="evt-x")  # caller's own event id
        assert not r.duplicate
        # A still holds it; after its TTL A's expiry sweep finds B's claim.
        rt_a = await p.maker_expired()
        evs = await p.ledger(rid)
        assert [e.kind for e in evs] == ["record"]  # no EXPIRED event beside it
        # The hold's money was in A's lease: A's engine counts B's cost, not its
        # estimate, and holds nothing (B's engine never counted it).
        a_team = [s for s in rt_a.engine.budget_status() if s.budget_id == "team"][0]
        assert a_team.committed_nanos == _nanos(r.cost) and a_team.held_nanos == 0
        rt_b = p.servers[1].runtime.tenants[p.tenant]
        b_team = [s for s in rt_b.engine.budget_status() if s.budget_id == "team"][0]
        assert b_team.committed_nanos == 0 and b_team.held_nanos == 0
        totals = await p.stores[0].budget_totals(p.tenant)
        assert sum(totals.values()) == _nanos(r.cost)
    _run(ledger_url, body)


def test_expired_on_the_maker_first_then_record_elsewhere_replays_it(ledger_url):
    async def body(p: _Pair):
        a = await p.authorize_until_allowed(0, ttl=1)
        rid = a.reservation_id
        await p.wait_hold_saved(rid)
        for _ in range(300):
            evs = await p.ledger(rid)
            if evs:
                break
            await asyncio.sleep(0.02)
        assert [e.kind for e in evs] == ["expired"]
        r = await p.record(1, rid, event_id="late")
        assert r.duplicate and r.event_id == rid  # the expiry's event, once
        assert [e.kind for e in await p.ledger(rid)] == ["expired"]
    _run(ledger_url, body)


def test_release_on_another_process(ledger_url):
    async def body(p: _Pair):
        a = await p.authorize_until_allowed(0)
        rid = a.reservation_id
        await p.wait_hold_saved(rid)
        rel = await p.meters[1].Release(meter_pb2.ReleaseRequest(reservation_id=rid),
                                        metadata=p.md)
        assert rel.event_id == rid
        # A Record afterwards, on either (on A, the maker, with A's copy of the hold
        # still open there): the release is the first result, no charge.
        for i in (1, 0):
            r = await p.record(i, rid, event_id="after")
            assert r.duplicate and r.event_id == rid and _nanos(r.cost) == 0
        evs = await p.ledger(rid)
        assert [e.kind for e in evs] == ["released"]
        assert sum((await p.stores[0].budget_totals(p.tenant)).values()) == 0
        rt_a = p.servers[0].runtime.tenants[p.tenant]
        assert rt_a.engine.open_holds() == 0  # A's copy is settled, and not charged
        team = [st for st in rt_a.engine.budget_status() if st.budget_id == "team"][0]
        assert team.committed_nanos == 0 and team.held_nanos == 0
    _run(ledger_url, body)


def test_record_before_the_maker_saved_its_hold_is_metered_once(ledger_url):
    """The Record reaches B before A wrote the hold behind: B meters it without the
    hold (reason reservation.unknown) and claims it, so A's expiry charges nothing."""
    async def body(p: _Pair):
        # The TTL leaves room for the steps below before A's expiry (about 1.1 s on an
        # idle 2-core machine; a loaded CI machine took over 2 s, and A expired the
        # hold first).
        a = await p.authorize_until_allowed(0, ttl=5)
        rid = a.reservation_id
        # Simulate "not yet written behind": take it out of A's pending writes, let
        # a flush already under way finish, then drop it from the store.
        p.servers[0].runtime.tenants[p.tenant]._hold_upserts.pop(rid, None)
        await asyncio.sleep(0.3)
        await p.stores[0].save_holds(p.tenant, (), [rid])
        assert await p.stores[0].get_hold(p.tenant, rid) is None
        # Without owners there is nothing to meter it by: NOT_FOUND, and unclaimed.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await p.record(1, rid, event_id="early")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        r = await p.meters[1].Record(meter_pb2.RecordRequest(
            event_id="early", reservation_id=rid, model=MODEL,
            owners=common_pb2.Owners(customer="acme"),
            usage=common_pb2.Usage(input_tokens=1000, output_tokens=300)), metadata=p.md)
        assert not r.duplicate
        ev = (await p.ledger(rid))[0]
        assert "reservation.unknown" in ev.reasons
        await p.maker_expired()
        assert [e.kind for e in await p.ledger(rid)] == ["record"]
        assert sum((await p.stores[0].budget_totals(p.tenant)).values()) == _nanos(r.cost)
    _run(ledger_url, body)




def test_writer_keeps_one_settling_event_per_reservation(ledger_url):
    """The claim in the writer's transaction (LedgerEvent.claim): two writers on one
    ledger settle the same reservations with different event ids at the same time:
    exactly one event per reservation is written, the other is told which won; a
    retry of the winner's event_id is a plain duplicate; events without the claim
    flag are untouched by it."""
    async def go():
        from p402_server.ledger import LedgerEvent, open_store
        from p402_server.ledger.writer import GroupCommitWriter

        stores = [await open_store(ledger_url) for _ in range(2)]
        writers = [GroupCommitWriter(st) for st in stores]
        for w in writers:
            await w.start()
        try:
            t = await stores[0].create_tenant("claims")

            def ev(eid, rid, cost, claim=True):
                e = LedgerEvent(t, eid, reservation_id=rid, cost_nanos=cost,
                                customer="c", budget_charges=(("b", 0),))
                e.claim = claim
                return e
            n = 60
            res = await asyncio.gather(
                writers[0].write_many([ev(f"a{i}", f"r{i}", 10) for i in range(n)]),
                writers[1].write_many([ev(f"b{i}", f"r{i}", 1000) for i in range(n)]))
            for i in range(n):
                ra, rb = res[0][i], res[1][i]
                assert bool(ra.claimed_by) != bool(rb.claimed_by)  # exactly one lost
                winner, loser = (ra, rb) if rb.claimed_by else (rb, ra)
                assert loser.claimed_by == winner.event.event_id and loser.seq == 0
                assert winner.seq and not winner.duplicate
            # A retry of each reservation's first event from the other writer: a plain
            # duplicate when it won, the winner named again when it lost.
            for i in (0, 1, 2):
                again = await writers[1].write(ev(f"a{i}", f"r{i}", 10))
                if res[0][i].claimed_by:
                    assert again.claimed_by == f"b{i}" and not again.duplicate
                else:
                    assert again.duplicate and again.claimed_by == ""
                    assert again.seq == res[0][i].seq
            events = [e async for e in stores[0].iter_events(t)]
            assert len(events) == n and len({e.reservation_id for e in events}) == n
            totals = await stores[0].budget_totals(t)
            assert totals == {("b", 0): sum(e.cost_nanos for e in events)}
            assert totals == await stores[0].recompute_budget_totals(t)
            assert (await stores[0].verify_chain(t))[0]
            # Without the flag (one process, leases off): both are kept, as before.
            plain = await writers[0].write_many([ev("p1", "rp", 5, False),
                                                 ev("p2", "rp", 5, False)])
            assert all(r.seq and not r.claimed_by for r in plain)
        finally:
            for w in writers:
                await w.stop()
            for st in stores:
                await st.close()
    asyncio.run(go())


def test_two_claims_in_one_batch_keep_the_first(ledger_url):
    async def go():
        from p402_server.ledger import LedgerEvent, open_store
        from p402_server.ledger.writer import GroupCommitWriter

        store = await open_store(ledger_url)
        writer = GroupCommitWriter(store)
        await writer.start()
        try:
            t = await store.create_tenant("batch")
            evs = []
            for eid in ("x1", "x2"):
                e = LedgerEvent(t, eid, reservation_id="same", cost_nanos=7, customer="c",
                                budget_charges=(("b", 0),))
                e.claim = True
                evs.append(e)
            first, second = await writer.write_many(evs)
            assert first.seq and not first.claimed_by
            assert second.claimed_by == "x1" and second.seq == 0
            assert await store.budget_totals(t) == {("b", 0): 7}
        finally:
            await writer.stop()
            await store.close()
    asyncio.run(go())
