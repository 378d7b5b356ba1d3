"""LeaseStore / LeaseManager on PostgreSQL: the conditional take, fencing, reclaim."""
from __future__ import annotations

import asyncio

import pytest

from p402_server.runtime.leases import Fenced, LeaseStore

LIMIT = 1_000_000


async def _open(url):
    from p402_server.ledger import open_store

    return await open_store(url, create=False)


@pytest.mark.postgres
def test_concurrent_takers_never_lease_past_the_limit(pg_url):
    async def go():
        stores = [await _open(pg_url) for _ in range(4)]
        try:
            dbs = [LeaseStore(s.engine) for s in stores]
            now = 1_000
            epochs = [await db.open("t", "b", 0, LIMIT, f"h{i}", now + 60_000)
                      for i, db in enumerate(dbs)]
            # 4 holders x 40 takes of 7,001 nanos = 1,120,160 asked > LIMIT.
            async def taker(i):
                got = 0
                for _ in range(40):
                    if await dbs[i].take("t", "b", 0, LIMIT, f"h{i}", epochs[i], 7_001, 0,
                                         now + 60_000, now):
                        got += 7_001
                return got
            granted = await asyncio.gather(*(taker(i) for i in range(4)))
            assert sum(granted) <= LIMIT
            assert sum(granted) > LIMIT - 7_001  # filled, not merely cautious
            limit, committed, leased, holders = await dbs[0].read("t", "b", 0, now)
            assert (limit, committed, leased, holders) == (LIMIT, 0, sum(granted), 4)
        finally:
            for s in stores:
                await s.close()

    asyncio.run(go())


@pytest.mark.postgres
def test_reclaimed_lease_is_fenced_and_its_share_returns(pg_url):
    async def go():
        store = await _open(pg_url)
        try:
            db = LeaseStore(store.engine)
            e = await db.open("t", "b", 0, LIMIT, "slow", 2_000)
            assert await db.take("t", "b", 0, LIMIT, "slow", e, 600_000, 0, 2_000, 1_000)
            # Acknowledged spend reported: used 100,000 of the 600,000 grant.
            assert not await db.take("t", "b", 0, LIMIT, "slow", e, 0, 100_000, 2_000, 1_500)
            assert (await db.read("t", "b", 0, 1_500))[2] == 500_000
            # Expired at 2,000; reclaimed after the grace: the unused share returns.
            assert await db.reclaim("t", before_ms=2_500) == 1
            assert (await db.read("t", "b", 0, 2_600))[2] == 0
            # The slow holder wakes up: its renewal (and its slice) is refused.
            with pytest.raises(Fenced):
                await db.take("t", "b", 0, LIMIT, "slow", e, 1_000, 0, 9_000, 2_600)
            assert (await db.read("t", "b", 0, 2_600))[2] == 0
            # A new lease starts at the next epoch.
            assert await db.open("t", "b", 0, LIMIT, "slow/2", 9_000) == e + 1
            # Returning: the unused part goes back, the rest waits for reclaim.
            e2 = e + 1
            assert await db.take("t", "b", 0, LIMIT, "slow/2", e2, 300_000, 0, 9_000, 2_700)
            await db.give_back("t", "b", 0, "slow/2", e2, 250_000, 0, 2_800)
            assert (await db.read("t", "b", 0, 2_800))[2] == 50_000
        finally:
            await store.close()

    asyncio.run(go())
