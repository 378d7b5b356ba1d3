"""The very end of a leased budget: an Authorize that only a leased budget
denies takes exactly what it misses from the store and is decided again
(runtime.authorize_exact, LeaseManager.take_exact). So a process denies only when
the store itself has no room left for the request, and never allows past the limit.
"""
from __future__ import annotations

import asyncio
import dataclasses

from p402.v1 import admin_pb2, admin_pb2_grpc, common_pb2, meter_pb2

from .test_foreign_settle import MODEL, _money, _nanos, _Pair, ledger_url  # noqa: F401

N = 25


async def _authorize(p: _Pair, i: int, customer: str):
    return await p.meters[i].Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=common_pb2.Owners(customer=customer), input_bytes=4000,
        max_output_tokens=500), metadata=p.md)


def test_last_requests_are_taken_exactly_from_the_store(ledger_url):
    async def body(p: _Pair):
        probe = await p.authorize_until_allowed(0)  # the estimate of one request
        est = _nanos(probe.estimated_cost)
        assert est > 0
        limit = N * est + est // 2
        admin = admin_pb2_grpc.AdminServiceStub(p.channels[0])
        await admin.PutBudget(admin_pb2.PutBudgetRequest(budget=admin_pb2.Budget(
            budget_id="tight", scope={"customer": "tight"}, period=common_pb2.PERIOD_MONTH,
            limit=_money(limit), enforcement=common_pb2.ENFORCEMENT_HARD)), metadata=p.md)
        # B builds the tenant now (it knows "tight") and takes a slice of it. B keeps
        # its slice during the first phase, however slow the machine (idle return
        # off), so what A leaves is measured against a fixed store.
        b_leases = p.servers[1].runtime.leases
        idle_cfg = b_leases.config
        b_leases.config = dataclasses.replace(idle_cfg, idle_return_seconds=3600.0)
        allowed = {0: 0, 1: 0}
        for _ in range(100):
            r = await _authorize(p, 1, "tight")
            if r.decision != common_pb2.DECISION_DENY:
                allowed[1] += 1
                break
            await asyncio.sleep(0.02)
        assert allowed[1] == 1
        # A spends the rest, one Authorize at a time, without waiting for top-ups.
        async def spend():
            for _ in range(3 * N):
                r = await _authorize(p, 0, "tight")
                if r.decision == common_pb2.DECISION_DENY:
                    assert "budget.exceeded" in r.reasons
                    return
                assert _nanos(r.estimated_cost) == est
                allowed[0] += 1
            raise AssertionError("A never denied")
        await spend()
        # Never past the limit, and A denied only when the store had no room left
        # for one more request beyond what B's lease still holds unused.
        assert (allowed[0] + allowed[1]) * est <= limit
        from p402_server.runtime.leases import LeaseStore

        rt_a = p.servers[0].runtime.tenants[p.tenant]
        lease = rt_a.leases._tenants[p.tenant].leases["tight"]
        got = await LeaseStore(p.stores[0].engine).read(
            p.tenant, "tight", lease.period_start_ms, 2**62)
        lim, committed, leased, _holders = got
        assert lim == limit
        assert lim - committed - leased < est
        room = lim - committed - leased

        def unused(i):
            return [d["unused_nanos"] for d in
                    p.servers[i].runtime.tenants[p.tenant].engine.lease_status()
                    if d["budget_id"] == "tight"][0]
        # A's own slice and the store together could not cover one more request...
        assert unused(0) + room < est
        # ...and every nano is accounted for: held by the allowed requests, unused in
        # a lease, or still in the store.
        assert (allowed[0] + allowed[1]) * est + unused(0) + unused(1) + room == limit
        assert p.servers[0].runtime.leases.exact_takes > 0
        b_leases.config = idle_cfg  # idle return on again
        # B stays idle: near the limit it gives its unused part back, and A can then
        # spend the budget to the last request that fits.
        for _ in range(200):
            if unused(1) == 0:
                break
            await asyncio.sleep(0.05)
        assert unused(1) == 0
        # A's last take found no room: A denies locally for up to 2 intervals (see
        # the end of this test); the room B gave back is taken after that.
        await asyncio.sleep(3 * p.servers[0].runtime.leases.config.interval_seconds)
        await spend()
        assert allowed[0] + allowed[1] == N
        # At the limit, a burst of denied Authorizes does not become a burst of store
        # transactions: after a take that found no room, A denies locally a while.
        mgr = p.servers[0].runtime.leases
        before = mgr.exact_takes
        t0 = asyncio.get_running_loop().time()
        for _ in range(50):
            r = await _authorize(p, 0, "tight")
            assert r.decision == common_pb2.DECISION_DENY
        took = asyncio.get_running_loop().time() - t0
        # one take per 2 x interval_seconds (0.1 s) at most, plus the first
        assert mgr.exact_takes - before <= 1 + int(took / (2 * mgr.config.interval_seconds))
        assert mgr.exact_takes - before < 50
    from .test_foreign_settle import _run

    _run(ledger_url, body)


def test_lowered_limit_stops_the_old_slices(ledger_url):
    """A lowered HARD limit: the slices leased under the old one are given back and
    new ones taken under the new one, so the new limit holds across processes (each
    engine alone only sees its own holds against it)."""
    async def body(p: _Pair):
        probe = await p.authorize_until_allowed(0)
        est = _nanos(probe.estimated_cost)
        admin = admin_pb2_grpc.AdminServiceStub(p.channels[0])

        async def put(limit):
            await admin.PutBudget(admin_pb2.PutBudgetRequest(budget=admin_pb2.Budget(
                budget_id="tight", scope={"customer": "tight"},
                period=common_pb2.PERIOD_MONTH, limit=_money(limit),
                enforcement=common_pb2.ENFORCEMENT_HARD)), metadata=p.md)
        await put(200 * est)
        held = {0: 0, 1: 0}
        for _ in range(400):  # each process holds five requests
            i = 0 if held[0] < held[1] else 1
            if held[i] == 5:
                break
            r = await _authorize(p, i, "tight")
            if r.decision != common_pb2.DECISION_DENY:
                held[i] += 1
            else:
                await asyncio.sleep(0.02)
        assert held == {0: 5, 1: 5}
        new_limit = 12 * est + est // 2
        await put(new_limit)  # on A; B learns it at its next config poll
        rt_b = p.servers[1].runtime.tenants[p.tenant]
        for _ in range(300):
            if rt_b.budgets["tight"].limit_nanos == new_limit:
                break
            await asyncio.sleep(0.02)
        assert rt_b.budgets["tight"].limit_nanos == new_limit
        for _ in range(150):  # both keep asking; the new limit holds in total
            for i in (0, 1):
                r = await _authorize(p, i, "tight")
                if r.decision != common_pb2.DECISION_DENY:
                    held[i] += 1
                    assert (held[0] + held[1]) * est <= new_limit
            await asyncio.sleep(0.01)
        # What it left was usable, but for what a peer's slice may still hold unused
        # (less than one request per process: the known cost of leasing at the end).
        assert held[0] + held[1] >= 12 - 2
    from .test_foreign_settle import _run

    _run(ledger_url, body)
