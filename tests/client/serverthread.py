"""A real P402 server on its own thread and event loop, for client and CLI tests.

The sync client and the in-process CLI block their thread, so the server cannot
share it: `ServerThread` runs open_store + create_server in a private loop and
exposes `target`, `new_tenant()` (a fresh tenant and admin key, so tests sharing a
server never see each other's ledger) and `stop()`.
"""
from __future__ import annotations

import asyncio
import socket
import threading
from concurrent.futures import Future
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    def __init__(self, db_url: str, *, port: int = 0, start_delay: float = 0.0,
                 **server_kw: Any):
        self.db_url = db_url
        self._port = port
        self._delay = start_delay
        self._server_kw = server_kw
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="p402-test-server")
        self._ready: Future = Future()
        self.store: Any = None
        self.server: Any = None
        self.port = port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        from p402_server.server import create_server
        from p402_server.ledger import open_store

        if self._delay:
            await asyncio.sleep(self._delay)
        self.store = await open_store(self.db_url)
        self.server, self.port = create_server(f"127.0.0.1:{self._port}",
                                                     store=self.store, **self._server_kw)
        await self.server.start()

    def start(self, wait: bool = True) -> "ServerThread":
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        if wait:
            fut.result(60)
        else:
            self._start_future = fut
        return self

    def wait_started(self, timeout: float = 30.0) -> None:
        self._start_future.result(timeout)

    def new_tenant(self, name: str = "test") -> tuple[str, str]:
        from p402_server.server import init_tenant

        return self.run(init_tenant(self.store, name))

    async def _stop(self) -> None:
        if self.server is not None:
            await self.server.stop(1.0)
        if self.store is not None:
            await self.store.close()

    def stop(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
