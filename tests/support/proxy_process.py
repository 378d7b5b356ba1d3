"""`p402 proxy` as a child process, and callers that keep it busy: shared by the tests
that SIGKILL a proxy, or the server behind one, in the middle of its answers."""
from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from typing import Callable

import aiohttp

from tests.proof.harness import (
    CLI,
    PORT_TRIES,
    ROOT,
    free_port,
    listens_on,
    lost_port_race,
    subprocess_env,
)

UPSTREAM_KEY = "sk-upstream-test"  # the key the proxies send to the stand-in upstream
CALLERS = 24


def tenant_with_hold_ttl(url: str, hold_ttl_seconds: int, name: str = "killed"
                         ) -> tuple[str, str]:
    """A new tenant on the ledger at `url` whose holds expire `hold_ttl_seconds` after
    their call -> (tenant id, its admin key)."""
    from p402_server.ledger import open_store
    from p402_server.server import init_tenant

    async def init():
        store = await open_store(url)
        try:
            tenant, key = await init_tenant(store, name)
            await store.put_settings(tenant, {**await store.get_settings(tenant),
                                              "hold_ttl_seconds": hold_ttl_seconds})
            return tenant, key
        finally:
            await store.close()

    return asyncio.run(init())


def proxy_process(p402: tuple[str, str], upstream: str, log_path, env: dict | None = None
                  ) -> tuple[subprocess.Popen, int]:
    """`p402 proxy` with `p402` = ("--db", URL) or ("--target", HOST:PORT), listening
    (started again on another port if its port was taken before it bound it)."""
    for attempt in range(PORT_TRIES):
        port = free_port()
        with open(log_path, "ab") as log:
            offset = log.tell()
            proc = subprocess.Popen(
                [*CLI, "proxy", *p402, "--listen", f"127.0.0.1:{port}",
                 "--upstream", upstream],
                env=subprocess_env({"OPENAI_API_KEY": UPSTREAM_KEY, **(env or {})}),
                stdout=log, stderr=log, cwd=ROOT)
        deadline = time.monotonic() + 60
        while proc.poll() is None:
            if listens_on(proc.pid, port):
                socket.create_connection(("127.0.0.1", port), 5).close()
                return proc, port
            assert time.monotonic() < deadline, "the proxy never listened"
            time.sleep(0.05)
        if attempt + 1 == PORT_TRIES or not lost_port_race(log_path, offset):
            break
    raise AssertionError(open(log_path).read()[-3000:])


async def storm(port: int, key: str, answered: list, stop: asyncio.Event,
                refused: list | None = None, *, callers: int = CALLERS,
                pause: float = 0.0, stagger: float = 0.0) -> None:
    """`callers` callers in a loop until `stop` or the proxy is gone; the reservation
    id of each answered (200) call goes into `answered`, other statuses into `refused`
    (and that caller waits `pause` seconds before its next call). Caller i starts
    `i * stagger` seconds late: with a slow upstream, its callers then answer spread
    over time instead of in waves, so some call is always at the upstream."""
    body = {"model": "gpt-4o-mini", "max_tokens": 20,
            "messages": [{"role": "user", "content": "Summarize the report."}]}

    async def caller(session, index: int):
        await asyncio.sleep(index * stagger)
        while not stop.is_set():
            try:
                async with session.post(
                        f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                        headers={"Authorization": f"Bearer {key}",
                                 "x-p402-customer": "acme"}) as r:
                    await r.read()
                    if r.status == 200:
                        answered.append(r.headers["x-p402-reservation-id"])
                    else:
                        if refused is not None:
                            refused.append(r.status)
                        await asyncio.sleep(pause)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return  # the proxy is gone

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(caller(session, i) for i in range(callers)))


def wait_until_settled(read: Callable[[], dict], calls: list[str],
                       timeout: float = 30.0) -> dict:
    """Poll `read()` (reservation id -> the events that settled it) until every
    reservation in `calls` is there -> that last read."""
    deadline = time.monotonic() + timeout
    while True:
        settled = read()
        missing = [rid for rid in calls if rid not in settled]
        if not missing:
            return settled
        assert time.monotonic() < deadline, (
            f"{len(missing)} of {len(calls)} answered calls never reached the ledger")
        time.sleep(0.1)
