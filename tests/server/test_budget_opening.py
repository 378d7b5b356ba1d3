"""A budget created in the middle of a period starts from the spend already in the
ledger for its scope and period (owners and labels), on SQLite and PostgreSQL; a
replaced budget keeps what its period committed; the totals still recompute from the
ledger alone, and survive a restart."""
from __future__ import annotations

from p402.v1 import admin_pb2, common_pb2, meter_pb2

from tests.server.service_harness import nanos, owners, svc_any, usd  # noqa: F401


async def _record(svc, customer: str, tokens: int, env: str = "") -> int:
    r = await svc.meter.Record(meter_pb2.RecordRequest(
        model="gpt-4o", owners=owners(customer=customer),
        labels={"env": env} if env else {},
        usage=common_pb2.Usage(input_tokens=tokens, output_tokens=tokens // 10)),
        metadata=svc.auth)
    return nanos(r.cost)


async def _put(svc, budget_id: str, limit: int, scope: dict, hard: bool = True):
    return await svc.admin.PutBudget(admin_pb2.PutBudgetRequest(budget=admin_pb2.Budget(
        budget_id=budget_id, limit=usd(limit), period=common_pb2.PERIOD_MONTH,
        enforcement=common_pb2.ENFORCEMENT_HARD if hard else common_pb2.ENFORCEMENT_SOFT,
        scope=scope)), metadata=svc.auth)


async def _committed(svc, budget_id: str) -> int:
    resp = await svc.admin.ListBudgets(admin_pb2.ListBudgetsRequest(), metadata=svc.auth)
    [b] = [b for b in resp.budgets if b.budget_id == budget_id]
    return nanos(b.status.committed)


async def test_a_new_budget_starts_from_the_spend_of_its_scope(svc_any):
    svc = svc_any
    acme = [await _record(svc, "acme", n, env) for n, env in
            ((10_000, "prod"), (20_000, "dev"), (5_000, "prod"))]
    await _record(svc, "globex", 50_000, "prod")
    await _put(svc, "acme", sum(acme) + 10**9, {"customer": "acme"})
    assert await _committed(svc, "acme") == sum(acme)
    # a label scope counts only its events (the label condition is read per event)
    await _put(svc, "acme-prod", 10**12, {"customer": "acme", "label.env": "prod"})
    assert await _committed(svc, "acme-prod") == acme[0] + acme[2]
    await _put(svc, "everyone", 10**12, {})
    total = await _committed(svc, "everyone")
    assert total > sum(acme)

    # new spend is charged on top, once
    more = await _record(svc, "acme", 1_000, "prod")
    assert await _committed(svc, "acme") == sum(acme) + more
    # replacing the budget (a raise) keeps its period's total: no second opening
    await _put(svc, "acme", sum(acme) + 2 * 10**9, {"customer": "acme"})
    assert await _committed(svc, "acme") == sum(acme) + more

    # the totals recompute from the ledger (charges + openings) and survive a restart
    store = svc.store
    assert await store.recompute_budget_totals(svc.tenant_id) == \
        await store.budget_totals(svc.tenant_id)
    await svc.restart()
    assert await _committed(svc, "acme") == sum(acme) + more
    assert await _committed(svc, "acme-prod") == acme[0] + acme[2] + more


async def test_a_hard_budget_created_past_its_limit_denies_at_once(svc_any):
    svc = svc_any
    spent = await _record(svc, "acme", 100_000)
    await _put(svc, "acme-cap", spent // 2, {"customer": "acme"})
    a = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model="gpt-4o", owners=owners(customer="acme"), input_bytes=40,
        max_output_tokens=10), metadata=svc.auth)
    assert a.decision == common_pb2.DECISION_DENY and "budget.exceeded" in a.reasons
    # another customer is not held to it
    b = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model="gpt-4o", owners=owners(customer="globex"), input_bytes=40,
        max_output_tokens=10), metadata=svc.auth)
    assert b.decision == common_pb2.DECISION_ALLOW
