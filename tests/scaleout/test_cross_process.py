"""The contract across processes (server/p402_server/SCALEOUT.md, I1–I6), each case
as a gateway behaves: Authorize on one process, Record or Release on another, retries
elsewhere, holds left to expire, a process that dies with holds open.

Two servers with leases on, in this process, on one ledger: a SQLite file (always)
and PostgreSQL (the `postgres` mark). Every case failed before reservations were
settled for their maker (the 2x overspend, the blocked budget after a foreign
Release, stranded expiries, a dead process's holds, NOT_FOUND without a model,
per-process status, split attribution, two answers to the expiry race).
"""
from __future__ import annotations

import asyncio

import pytest
from p402.v1 import admin_pb2, admin_pb2_grpc, common_pb2, meter_pb2

from tests.scaleout.test_foreign_settle import MODEL, USD, _money, _nanos, _Pair

LIMIT = USD // 100  # 0.01 USD: about 22 holds of the requests below


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("pg_url")


def _run(url, body, **env):
    async def go():
        pair = await _Pair().start(url)
        admin = admin_pb2_grpc.AdminServiceStub(pair.channels[0])
        await admin.PutBudget(admin_pb2.PutBudgetRequest(budget=admin_pb2.Budget(
            budget_id="team", scope={"customer": "acme"}, period=common_pb2.PERIOD_MONTH,
            limit=_money(LIMIT), enforcement=common_pb2.ENFORCEMENT_HARD)), metadata=pair.md)
        await _wait_limit(pair)
        try:
            await body(pair)
        finally:
            await pair.close()
    asyncio.run(go())


async def _wait_limit(p: _Pair):
    """Until both processes run the lowered limit (config poll)."""
    for _ in range(200):
        if all(rt.budgets["team"].limit_nanos == LIMIT
               for rt in (s.runtime.tenants.get(p.tenant) for s in p.servers) if rt):
            if all(p.tenant in s.runtime.tenants for s in p.servers):
                return
        for ch in p.channels:  # builds the tenant on both, holding nothing
            await admin_pb2_grpc.AdminServiceStub(ch).ListBudgets(
                admin_pb2.ListBudgetsRequest(), metadata=p.md)
        await asyncio.sleep(0.05)
    raise AssertionError("limit never reached both processes")


async def _ledger_total(p: _Pair) -> int:
    return sum(v for (bid, _start), v in
               (await p.stores[0].budget_totals(p.tenant)).items() if bid == "team")


async def _open_saved(p: _Pair) -> int:
    return sum(1 for _ in await p.stores[0].load_holds(p.tenant))


async def _hold_until_denied(p: _Pair, i: int, ttl: int = 60, settle: float = 1.5) -> list:
    """Authorize on server i until it denies for `settle` seconds straight (its lease
    and exact takes exhausted) -> the reservation ids held."""
    held = []
    deadline = None
    loop = asyncio.get_running_loop()
    while True:
        a = await p.authorize(i, ttl)
        if a.decision != common_pb2.DECISION_DENY:
            held.append(a.reservation_id)
            deadline = None
            continue
        deadline = deadline or loop.time() + settle
        if loop.time() >= deadline:
            return held
        await asyncio.sleep(0.02)


async def _spend_until_denied(p: _Pair, settle: float = 2.0) -> int:
    """Authorize + Record on both processes, alternating, until both deny for `settle`
    seconds -> the number of calls made."""
    n = 0
    loop = asyncio.get_running_loop()
    deadline = None
    while True:
        progressed = False
        for i in (0, 1):
            a = await p.authorize(i)
            if a.decision != common_pb2.DECISION_DENY:
                await p.record(i, a.reservation_id, output_tokens=500)
                n += 1
                progressed = True
        if progressed:
            deadline = None
            continue
        deadline = deadline or loop.time() + settle
        if loop.time() >= deadline:
            return n
        await asyncio.sleep(0.05)


def test_records_on_the_other_process_never_overspend(ledger_url):
    """Hold to the limit on A, Record every hold on B, let A's copies expire, then
    spend on both until both deny: the ledger never passes the HARD limit."""
    async def body(p: _Pair):
        started = asyncio.get_running_loop().time()
        held = await _hold_until_denied(p, 0, ttl=5, settle=1.0)
        assert len(held) >= 5
        for rid in held:
            await p.wait_hold_saved(rid)
            r = await p.record(1, rid, output_tokens=500)
            assert "reservation.adopted" in (await p.ledger(rid))[0].reasons
            assert _nanos(r.overrun) == 0
        # Past the TTL: A's copies expire and find the claims (or took the notices).
        await asyncio.sleep(max(0.0, started + 6.5 - asyncio.get_running_loop().time()))
        await _spend_until_denied(p)
        total = await _ledger_total(p)
        assert total <= LIMIT, f"ledger {total} > limit {LIMIT}"
        for rid in held:  # one settling event each
            assert [e.kind for e in await p.ledger(rid)] == ["record"]
    _run(ledger_url, body)


def test_release_on_the_other_process_frees_the_budget(ledger_url):
    """Hold the whole budget (on both processes), Release every hold on the other
    process: the budget is free again on both (after a short settle interval), long
    before the holds' TTL, and nothing is in the ledger."""
    async def body(p: _Pair):
        held = await _hold_everywhere(p)
        assert len(held) >= 10
        for i, rid in held:
            await p.wait_hold_saved(rid)
            await p.meters[1 - i].Release(meter_pb2.ReleaseRequest(reservation_id=rid),
                                          metadata=p.md)
        assert await _ledger_total(p) == 0
        again = await _hold_everywhere(p)
        assert len(again) >= len(held) - 2, (len(again), len(held))
    _run(ledger_url, body)


async def _hold_everywhere(p: _Pair, settle: float = 2.0) -> list:
    """Authorize (TTL 60 s) on both processes until both deny for `settle` seconds
    -> [(process, reservation id)]."""
    held = []
    loop = asyncio.get_running_loop()
    quiet = loop.time()
    while loop.time() - quiet < settle:
        for i in (0, 1):
            a = await p.authorize(i, 60)
            if a.decision != common_pb2.DECISION_DENY:
                held.append((i, a.reservation_id))
                quiet = loop.time()
        await asyncio.sleep(0.01)
    return held


def test_expired_holds_leave_no_stranded_headroom(ledger_url):
    """Holds that expire are charged at their estimate, and what is left of the limit
    stays spendable from either process (to within a request or two)."""
    async def body(p: _Pair):
        rids = []
        for _ in range(8):
            rids.append((await p.authorize_until_allowed(0, ttl=1)).reservation_id)
        estimate = _nanos((await p.authorize_until_allowed(1, ttl=1)).estimated_cost)
        await asyncio.sleep(3.0)  # expired on both and written
        expired = await _ledger_total(p)
        assert expired >= 8 * estimate
        held = await _hold_until_denied(p, 0, settle=2.0) + await _hold_until_denied(p, 1)
        assert len(held) * estimate >= LIMIT - expired - 2 * estimate, \
            (len(held), estimate, LIMIT, expired)
    _run(ledger_url, body)


def test_record_without_model_on_the_other_process(ledger_url):
    """The README's record() sends no model: the other process settles it at the
    hold's price, not NOT_FOUND and not the estimate later."""
    async def body(p: _Pair):
        rid = (await p.authorize_until_allowed(0)).reservation_id
        r = await p.meters[1].Record(meter_pb2.RecordRequest(
            reservation_id=rid, usage=common_pb2.Usage(input_tokens=1000, output_tokens=300)),
            metadata=p.md)
        assert not r.duplicate and _nanos(r.cost) > 0
        ev = (await p.ledger(rid))[0]
        assert ev.kind == "record" and ev.model == MODEL and ev.input_tokens == 1000
    _run(ledger_url, body)


def test_status_is_the_store_truth_on_every_process(ledger_url):
    """Spend recorded on both processes: ListBudgets on either reports the ledger's
    committed (within a config poll), not its own share."""
    async def body(p: _Pair):
        for i in (0, 1, 0):
            rid = (await p.authorize_until_allowed(i)).reservation_id
            await p.record(i, rid)
        total = await _ledger_total(p)
        await asyncio.sleep(1.3)  # one config poll
        for i in (0, 1):
            admin = admin_pb2_grpc.AdminServiceStub(p.channels[i])
            resp = await admin.ListBudgets(admin_pb2.ListBudgetsRequest(), metadata=p.md)
            team = [b for b in resp.budgets if b.budget_id == "team"][0]
            assert _nanos(team.status.committed) == total, (i, team.status)
            # An Authorize's budgets too: the ledger's committed, and its own hold.
            a = await p.authorize_until_allowed(i)
            st = [b for b in a.budgets if b.budget_id == "team"][0]
            assert _nanos(st.committed) == total, (i, st)
            assert _nanos(st.held) >= _nanos(a.estimated_cost)
            await p.meters[i].Release(meter_pb2.ReleaseRequest(
                reservation_id=a.reservation_id), metadata=p.md)
    _run(ledger_url, body)


def test_the_event_keeps_the_owners_whose_budgets_were_charged(ledger_url):
    """A Record naming another customer than its Authorize: the event says the hold's
    customer (whose budget was charged) and why, on the maker and elsewhere."""
    async def body(p: _Pair):
        for i in (0, 1):
            rid = (await p.authorize_until_allowed(0)).reservation_id
            await p.wait_hold_saved(rid)
            await p.meters[i].Record(meter_pb2.RecordRequest(
                reservation_id=rid, model=MODEL, owners=common_pb2.Owners(customer="bolt"),
                usage=common_pb2.Usage(input_tokens=1000, output_tokens=300)),
                metadata=p.md)
            ev = (await p.ledger(rid))[0]
            assert ev.owners["customer"] == "acme"
            assert "team" in ev.budget_ids
            assert "reservation.owners_differ" in ev.reasons
    _run(ledger_url, body)


def test_a_record_under_a_mode_not_allowed_is_metered_on_either_process(ledger_url):
    """full_trace is not allowed (the default): a Record asking for it, on the maker or
    on the other process, settles its hold at the call's cost under metadata_only and
    says why; nothing of its text is kept."""
    async def body(p: _Pair):
        for i in (0, 1):
            rid = (await p.authorize_until_allowed(0)).reservation_id
            await p.wait_hold_saved(rid)
            r = await p.meters[i].Record(meter_pb2.RecordRequest(
                reservation_id=rid, prompt="the secret plan", response="the answer",
                usage=common_pb2.Usage(input_tokens=1000, output_tokens=300),
                privacy_mode=common_pb2.PRIVACY_MODE_FULL_TRACE), metadata=p.md)
            assert "policy.privacy_mode_not_allowed" in r.reasons, (i, r)
            assert 0 < _nanos(r.cost) < _nanos(r.estimated_cost)
            [ev] = await p.ledger(rid)
            assert ev.kind == "record" and ev.cost_nanos == _nanos(r.cost)
            assert ev.privacy_mode == common_pb2.PRIVACY_MODE_METADATA_ONLY
            assert "policy.privacy_mode_not_allowed" in ev.reasons
            assert ev.prompt_fingerprint is None
            assert await p.stores[0].get_contents(p.tenant, ev.event_id) == []
    _run(ledger_url, body)


def test_record_racing_expiry_gets_one_answer_everywhere(ledger_url):
    """A Record that arrives after its hold expired gets the EXPIRED event
    (duplicate=True), from the maker and from the other process alike."""
    async def body(p: _Pair):
        answers = []
        for i in (0, 1):
            rid = (await p.authorize_until_allowed(0, ttl=1)).reservation_id
            await p.wait_hold_saved(rid)
            await asyncio.sleep(1.2)  # expired on A; its EXPIRED event may be pending
            r = await p.record(i, rid)
            answers.append((r.duplicate, r.event_id == rid, _nanos(r.cost)))
            assert [e.kind for e in await p.ledger(rid)] == ["expired"]
        assert answers[0] == answers[1] and answers[0][:2] == (True, True)
    _run(ledger_url, body)


def test_a_dead_process_holds_are_settled_by_a_survivor(ledger_url, monkeypatch):
    """A process dies with holds open (no shutdown: its tasks stop, its registration
    lapses): the survivor expires each saved hold into the ledger once past its
    expiry, once, and the dead lease is then reclaimed."""
    monkeypatch.setenv("P402_LEASE_TTL_SECONDS", "2")
    monkeypatch.setenv("P402_LEASE_SAFETY_SECONDS", "1")
    monkeypatch.setenv("P402_LEASE_RECLAIM_GRACE_SECONDS", "1")

    async def body(p: _Pair):
        held = [(await p.authorize_until_allowed(0, ttl=2)).reservation_id
                for _ in range(4)]
        for rid in held:
            await p.wait_hold_saved(rid)
        dead = p.servers[0]
        # "SIGKILL": stop answering and every background task, write nothing more.
        for task in (dead.runtime._task, dead.runtime.leases._task):
            task.cancel()
        await dead.grpc_server.stop(0)
        for _ in range(150):
            if await _open_saved(p) == 0:
                break
            await asyncio.sleep(0.1)
        assert await _open_saved(p) == 0
        for rid in held:
            evs = await p.ledger(rid)
            assert [e.kind for e in evs] == ["expired"], evs
            assert evs[0].evidence == common_pb2.EVIDENCE_ESTIMATED
        total = await _ledger_total(p)
        # The dead lease is reclaimed once its holds are settled: the rest of the
        # limit is spendable from the survivor.
        est = _nanos((await p.authorize_until_allowed(1, ttl=1)).estimated_cost)
        more = await _hold_until_denied(p, 1, settle=4.0)
        assert (len(more) + 1) * est >= LIMIT - total - 2 * est, (len(more), est, total)
    _run(ledger_url, body)


def test_a_fallback_model_recorded_on_the_other_process_is_priced_as_called(ledger_url):
    """A gateway reserves one model, falls back to another, and its Record lands on
    the other process: priced at the model called (as the maker's engine would), on
    the reserved budgets, with reasons reservation.adopted and model.substituted."""
    import p402core

    async def body(p: _Pair):
        rid = (await p.authorize_until_allowed(0)).reservation_id
        await p.wait_hold_saved(rid)
        called = "gpt-4o" if MODEL != "gpt-4o" else "gpt-4o-mini"
        r = await p.meters[1].Record(meter_pb2.RecordRequest(
            reservation_id=rid, model=called,
            usage=common_pb2.Usage(input_tokens=1000, output_tokens=300)), metadata=p.md)
        want = p402core.Catalog.default().cost_nanos(called, input_tokens=1000,
                                                    output_tokens=300)
        assert _nanos(r.cost) == want
        ev = (await p.ledger(rid))[0]
        assert ev.model == called
        assert {"reservation.adopted", "model.substituted"} <= set(ev.reasons)
    _run(ledger_url, body)
