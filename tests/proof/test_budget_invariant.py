"""Budget invariant under concurrency (DESIGN §6), through a live `p402 serve`.

Hundreds of concurrent clients Authorize against HARD budgets sized for a few dozen
holds, then Record (actual cost at most the estimate), Release, or walk away (the
hold expires after a 1 s TTL and is committed at its estimate). Meanwhile a sampler
reads every budget's status (ListBudgets) continuously, and every ALLOW answer's own
budget statuses are checked:

    committed + held <= limit   for every HARD budget, at every sample and answer.

Records here never overrun their estimate, so nothing but an Authorize could push a
budget over; a violation is a reservation bug. Once every hold has settled: held is 0,
the engine's committed equals the ledger (budget_periods == recomputed from events ==
ListBudgets), and each HARD budget's ledger sum is within its limit.
"""
from __future__ import annotations

import asyncio
import os
import random
import time

import grpc
import pytest
from p402.v1 import common_pb2, meter_pb2

from tests.proof.harness import (
    MODEL,
    ServerProcess,
    bearer,
    budget_statuses,
    create_key,
    init_tenant,
    ledger_facts,
    nanos,
    nonzero,
    put_budget,
    sqlite_url,
    stubs,
)

# One hold: ~1000 input tokens (4000 bytes) + 1000 output tokens of gpt-4o-mini =
# 150_000 + 600_000 nanos. The budgets below fit a few dozen such holds.
HOLD_BYTES, HOLD_OUT = 4000, 1000
CUSTOMERS = 4
HARD = {"tenant-total": 60_000_000, **{f"c{i}-day": 12_000_000 for i in range(CUSTOMERS)},
        "feat-x-total": 20_000_000}


class Violation(AssertionError):
    pass


def _check(statuses, where: str) -> None:
    for bid, (limit, committed, held, _p) in statuses.items():
        if bid in HARD and committed + held > limit:
            raise Violation(f"{where}: {bid} committed {committed} + held {held} "
                            f"> limit {limit}")


async def _invariant_run(tmp_path, clients: int, rounds: int, seed: int) -> dict:
    url = sqlite_url(tmp_path / "ledger.db")
    tenant, admin_key = await init_tenant(url)
    srv = ServerProcess(url, log_path=tmp_path / "serve.log",
                        env={"P402_EXPIRE_INTERVAL_SECONDS": "0.1",
                             "P402_HOLDS_FLUSH_INTERVAL_SECONDS": "0.1",
                             "P402_MAX_CONCURRENT_RPCS": "4096"})
    await asyncio.to_thread(srv.start)
    ch = grpc.aio.insecure_channel(srv.target)
    meter, admin = stubs(ch)
    try:
        await put_budget(admin, admin_key, "tenant-total", HARD["tenant-total"])
        for i in range(CUSTOMERS):
            await put_budget(admin, admin_key, f"c{i}-day", HARD[f"c{i}-day"],
                             scope={"customer": f"c{i}"}, period="DAY")
        await put_budget(admin, admin_key, "feat-x-total", HARD["feat-x-total"],
                         scope={"feature": "x"})
        # A SOFT budget far below the traffic: it warns, never denies, never blocks.
        await put_budget(admin, admin_key, "soft-tiny", 1_000_000, hard=False)
        # Clamping on: where the input fits but the full output cap does not, ALLOW
        # with a smaller cap — the path where an off-by-one would overshoot.
        from p402.v1 import admin_pb2

        await admin.UpdateSettings(admin_pb2.UpdateSettingsRequest(
            settings=admin_pb2.Settings(allow_clamp=True), update_mask=["allow_clamp"]),
            metadata=bearer(admin_key))
        key = await create_key(admin, admin_key, "meter")
        md = bearer(key)
        rng = random.Random(seed)
        stats = {"allow": 0, "deny": 0, "record": 0, "release": 0, "abandon": 0,
                 "samples": 0, "clamped": 0}
        done = asyncio.Event()

        async def sampler():
            while not done.is_set():
                _check(await budget_statuses(admin, admin_key), "ListBudgets sample")
                stats["samples"] += 1
                await asyncio.sleep(0.01)

        async def client(c: int):
            r = random.Random(rng.random())
            for n in range(rounds):
                customer = f"c{r.randrange(CUSTOMERS)}"
                feature = "x" if r.random() < 0.5 else "y"
                a = await meter.Authorize(meter_pb2.AuthorizeRequest(
                    model=MODEL, owners=common_pb2.Owners(customer=customer, feature=feature),
                    input_bytes=HOLD_BYTES, max_output_tokens=HOLD_OUT, ttl_seconds=1),
                    metadata=md, timeout=30)
                if a.decision == common_pb2.DECISION_DENY:
                    stats["deny"] += 1
                    assert "budget.exceeded" in a.reasons, a.reasons
                    await asyncio.sleep(r.uniform(0.01, 0.05))
                    continue
                stats["allow"] += 1
                stats["clamped"] += a.output_token_cap < HOLD_OUT
                _check({s.budget_id: (nanos(s.limit), nanos(s.committed), nanos(s.held), 0)
                        for s in a.budgets}, f"Authorize answer {a.reservation_id}")
                await asyncio.sleep(r.uniform(0.0, 0.05))  # the provider call
                roll = r.random()
                if roll < 0.6:  # Record at most the estimate
                    out = r.randrange(0, a.output_token_cap + 1)
                    inp = r.randrange(1, a.estimated_input_tokens + 1)
                    rec = await meter.Record(meter_pb2.RecordRequest(
                        reservation_id=a.reservation_id, model=MODEL,
                        usage=common_pb2.Usage(input_tokens=inp, output_tokens=out),
                        outcome=common_pb2.OUTCOME_SUCCESS), metadata=md, timeout=30)
                    assert nanos(rec.cost) <= nanos(a.estimated_cost)
                    stats["record"] += 1
                elif roll < 0.85:
                    await meter.Release(meter_pb2.ReleaseRequest(
                        reservation_id=a.reservation_id), metadata=md, timeout=30)
                    stats["release"] += 1
                else:
                    stats["abandon"] += 1  # expires after its TTL at its estimate

        sample_task = asyncio.create_task(sampler())
        try:
            await asyncio.gather(*(client(c) for c in range(clients)))
            # Wait for every abandoned hold to expire (TTL 1 s, sweep every 0.1 s).
            deadline = time.monotonic() + 15
            while True:
                statuses = await budget_statuses(admin, admin_key)
                if all(st[2] == 0 for st in statuses.values()) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
        finally:
            done.set()
            await sample_task  # re-raises a Violation the sampler saw
        _check(statuses, "after settlement")
        assert all(st[2] == 0 for st in statuses.values()), f"holds never settled: {statuses}"
    finally:
        await ch.close()
        await asyncio.to_thread(srv.stop)

    facts = await ledger_facts(url, tenant)
    assert nonzero(facts.budget_totals) == nonzero(facts.recomputed_totals)
    committed = {bid: st[1] for bid, st in statuses.items()}
    period = {bid: facts.recomputed_totals.get((bid, st[3]), 0) for bid, st in statuses.items()}
    assert committed == period
    for bid, limit in HARD.items():
        assert period[bid] <= limit, (bid, period[bid], limit)
    kinds = sorted(set(facts.kinds.values()))
    # The load really pressed on the limits, and every path ran.
    assert stats["deny"] > 0 and stats["allow"] > 0, stats
    assert stats["record"] and stats["release"] and stats["abandon"], stats
    assert stats["clamped"] > 0, stats
    assert {"record", "released", "expired", "denied"} <= set(kinds), kinds
    assert period["tenant-total"] > HARD["tenant-total"] // 2, (period, stats)
    assert facts.chain_ok, facts.chain_reason
    print(f"\nbudget invariant: {clients} clients x {rounds} rounds: {stats}; "
          f"committed {committed}")
    return stats


async def test_hard_budgets_never_exceeded_by_authorize(tmp_path):
    await _invariant_run(tmp_path, clients=200, rounds=4, seed=7)


@pytest.mark.slow
async def test_hard_budgets_long(tmp_path):
    await _invariant_run(tmp_path, clients=int(os.environ.get("P402_PROOF_CLIENTS", "500")),
                         rounds=20, seed=77)
