"""The proxy test rig, all in the test's event loop on 127.0.0.1: a P402 server over a
tmp SQLite ledger, the OpenAI stand-in upstream, the proxy between them, a meter key
of a fresh tenant, and helpers to read the ledger."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.openai_standin import OpenAIStandin

UPSTREAM_KEY = "sk-upstream-test"


@dataclass
class Rig:
    upstream: OpenAIStandin
    admin: Any  # AsyncP402Client with the tenant's admin key
    meter_key: str
    proxy_port: int
    p402_target: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}/v1"

    def openai(self, **headers: str):
        """An AsyncOpenAI client of the proxy, with the meter key and these headers
        (keyword names use _ for -: x_p402_customer="acme")."""
        import openai

        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.meter_key, max_retries=0, timeout=20.0,
            default_headers={k.replace("_", "-"): v for k, v in headers.items()})

    async def events(self, n: int = 1, timeout: float = 5.0, **filters: Any) -> list:
        """The ledger's events (oldest first) once at least `n` are there: Records
        of streams and denied events are committed behind the HTTP answer."""
        deadline = time.monotonic() + timeout
        while True:
            page = await self.admin.query(page_size=100, **filters)
            if len(page.items) >= n or time.monotonic() > deadline:
                return list(reversed(page.items))
            await asyncio.sleep(0.02)


async def start_rig(tmp_path, *, upstream_timeout: float = 20.0, **standin_kw: Any):
    from p402_client import AsyncP402Client
    from p402_server.gateways.proxy import ProxyConfig, start_proxy
    from p402_server.server import create_server, init_tenant
    from p402_server.ledger import open_store

    store = await open_store(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    server, port = create_server("127.0.0.1:0", store=store)
    await server.start()
    target = f"127.0.0.1:{port}"
    _tenant, admin_key = await init_tenant(store, "proxy-test")
    admin = AsyncP402Client(target, api_key=admin_key, timeout=10.0)
    meter = await admin.create_key("proxy-caller", ["meter"])
    upstream = await OpenAIStandin(api_key=UPSTREAM_KEY, **standin_kw).start()
    config = ProxyConfig(upstream=upstream.base_url, upstream_key=UPSTREAM_KEY,
                         upstream_timeout=upstream_timeout)
    runner, proxy_port = await start_proxy(config, target, "127.0.0.1:0")

    async def stop():
        await runner.cleanup()
        await upstream.stop()
        await admin.close()
        await server.stop(1.0)
        await store.close()

    return Rig(upstream, admin, meter.api_key, proxy_port, target), stop


@pytest.fixture(autouse=True)
async def _close_openai_clients(monkeypatch):
    """Every AsyncOpenAI client a test makes is closed at its end, on its own loop:
    one left to the garbage collector closes itself on a loop that is gone, and the
    traceback lands in whichever later test is reading the log."""
    import openai

    made = []
    real = openai.AsyncOpenAI.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(openai.AsyncOpenAI, "__init__", init)
    yield
    for client in made:
        await client.close()


@pytest.fixture
async def rig(tmp_path):
    r, stop = await start_rig(tmp_path)
    try:
        yield r
    finally:
        await stop()
