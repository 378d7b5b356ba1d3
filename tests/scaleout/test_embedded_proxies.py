"""Two `p402 proxy --db URL --lease on` on one PostgreSQL ledger: each runs P402's
runtime in its own process (here: its own runtime, store and lease holder), so the
two are two processes of the fleet. A HARD budget they share is never overspent,
and every call either proxy answered lands in the ledger exactly once."""
from __future__ import annotations

import asyncio

import openai

from p402_server.gateways.inprocess import EmbeddedP402
from p402_server.gateways.proxy import PROXY_KEY, ProxyConfig, start_proxy
from p402_server.server import init_tenant
from p402_server.ledger import open_store
from p402_server.ledger.model import EventFilter
from tests.support.openai_standin import OpenAIStandin

UPSTREAM_KEY = "sk-upstream-test"
LIMIT = 200_000  # nano-USD: room for about a dozen of the calls below
MESSAGES = [{"role": "user", "content": "Summarize the quarterly report in one line."}]


async def test_two_embedded_proxies_share_a_hard_budget(pg_url):
    stores = [await open_store(pg_url) for _ in range(2)]
    tenant, admin_key = await init_tenant(stores[0], "fleet")
    runtimes = [EmbeddedP402(s, leases=True) for s in stores]
    runners = []
    try:
        for rt in runtimes:
            await rt.start()
        admin = runtimes[0].client(admin_key)
        meter_key = (await admin.create_key("caller", ["meter"])).api_key
        await admin.put_budget("acme-cap", limit_nanos=LIMIT, period="TOTAL",
                               enforcement="HARD", scope={"customer": "acme"})
        async with OpenAIStandin(api_key=UPSTREAM_KEY) as up:
            config = ProxyConfig(upstream=up.base_url, upstream_key=UPSTREAM_KEY)
            clients = []
            for rt in runtimes:
                runner, port = await start_proxy(config, None, "127.0.0.1:0", embedded=rt)
                runners.append(runner)
                clients.append(openai.AsyncOpenAI(
                    base_url=f"http://127.0.0.1:{port}/v1", api_key=meter_key,
                    max_retries=0, timeout=30.0,
                    default_headers={"x-p402-customer": "acme"}))
            results = await asyncio.gather(*(clients[i % 2].chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=20)
                for i in range(80)), return_exceptions=True)
            for runner in runners:
                assert await runner.app[PROXY_KEY].meter.flush(20)
    finally:
        for runner in runners:
            await runner.cleanup()
        for rt in runtimes:
            await rt.stop()
    try:
        events, _ = await stores[0].query_events(tenant, EventFilter(), page_size=1000)
    finally:
        for s in stores:
            await s.close()
    ok = [r for r in results if not isinstance(r, Exception)]
    denied = [r for r in results if isinstance(r, openai.APIStatusError)
              and r.status_code == 402]
    assert len(ok) + len(denied) == 80, [r for r in results if isinstance(r, Exception)
                                         and r not in denied][:3]
    assert ok and denied
    records = [ev for ev in events if ev.kind == "record"]
    assert len(records) == len(ok) == len({ev.reservation_id for ev in records})
    assert sum(ev.cost_nanos for ev in records) <= LIMIT
