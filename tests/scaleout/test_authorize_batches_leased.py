"""Authorize in batches (StreamAuthorizeBatches, the proxy's --target mode) on two
`p402 serve --lease on` replicas of one PostgreSQL: a HARD budget is never overspent
by decisions made many to a message on both at once, and every allowed call
recorded on the *other* replica is in the ledger once, at its cost."""
from __future__ import annotations

import asyncio

import pytest

from .test_replicas import IN_BYTES, MODEL, OUT_TOKENS, _init

ENV = {"P402_EXPIRE_INTERVAL_SECONDS": "0.1", "P402_HOLDS_FLUSH_INTERVAL_SECONDS": "0.05",
       "P402_LEASE_TTL_SECONDS": "3", "P402_LEASE_SAFETY_SECONDS": "1",
       "P402_LEASE_INTERVAL_SECONDS": "0.02"}


@pytest.mark.postgres
def test_batched_decisions_on_two_replicas_never_overspend(pg_url, replicas):
    asyncio.run(_run(pg_url, replicas))


async def _run(pg_url, replicas):
    from p402_client import AsyncP402Client, AuthorizePipeline

    _tenant, key = await _init(pg_url)
    reps = await asyncio.to_thread(replicas, pg_url, 2, ENV)
    clients = [AsyncP402Client(r.target, api_key=key, timeout=30.0) for r in reps]
    pipes = [AuthorizePipeline(c) for c in clients]
    try:
        probe = await clients[0].authorize(MODEL, owners={"customer": "probe"},
                                           input_bytes=IN_BYTES,
                                           max_output_tokens=OUT_TOKENS)
        est = probe.estimated_cost_nanos
        await clients[0].release(probe.reservation_id)
        limit = 40 * est + est // 2  # room for 40 calls, not 41
        await clients[0].put_budget("cap", limit_nanos=limit, period="TOTAL",
                                    enforcement="HARD", scope={"customer": "acme"})

        async def ask(i: int):
            return i % 2, await pipes[i % 2].authorize(
                MODEL, owners={"customer": "acme"}, input_bytes=IN_BYTES,
                max_output_tokens=OUT_TOKENS)

        got = await asyncio.gather(*(ask(i) for i in range(160)))
        allowed = [(side, a) for side, a in got if a.allowed]
        assert 0 < len(allowed) <= 40
        assert len(allowed) < len(got)  # the limit was reached: the proof means something
        # Each allowed call is recorded on the replica that did not authorize it.
        recorded = await asyncio.gather(*(
            clients[1 - side].record(a.reservation_id, input_tokens=10, output_tokens=5)
            for side, a in allowed))
        assert len({r.event_id for r in recorded}) == len(allowed)
        cost = recorded[0].cost_nanos
        assert all(r.cost_nanos == cost for r in recorded)
        for _ in range(100):  # both replicas' writers committed
            events = (await clients[0].query(owners={"customer": "acme"},
                                             outcomes=["SUCCESS"], page_size=1000)).items
            if len(events) >= len(allowed):
                break
            await asyncio.sleep(0.1)
        assert sorted(e.reservation_id for e in events) == sorted(
            a.reservation_id for _side, a in allowed)
        [row] = (await clients[1].query(owners={"customer": "acme"},
                                        group_by=["customer"])).items
        assert row.cost_nanos == cost * len(allowed) <= limit
    finally:
        for p in pipes:
            await p.aclose()
        for c in clients:
            await c.close()
