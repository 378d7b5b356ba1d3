"""The ledger dashboard: finance and engineering read the ledger in a browser.

Served by `p402 serve --http HOST:PORT` in the same process and event loop as the
gRPC server, over the same store (read-only) and the same key cache. Pages live
under /dashboard: sign-in, the ledger (/dashboard/meter/events, live), an event's
detail, spend (charts drawn server-side as SVG) and exports. No CDN, no script
but P402's own small poller: it works offline.

Modules: ``app`` (routes, sign-in, pages; the security model is its docstring),
``sessions`` (server-side sessions, CSRF tokens), ``filters`` (query string ->
store filter), ``svg`` (charts), ``fmt`` (exact money and time text),
``exports`` (CSV / JSONL rows), ``templates/`` (Jinja2, autoescaped) and
``static/`` (CSS, the poller), shipped as package data.

    site = DashboardServer(Dashboard(store=…, runtime=…, auth=…), "127.0.0.1:4021")
    await site.start(); site.port; …; await site.stop()
"""
from __future__ import annotations

import logging

from aiohttp import web

from p402_server.dashboard.app import PREFIX, Dashboard, DashboardConfig

log = logging.getLogger("p402.dashboard")


def parse_address(address: str) -> tuple[str, int]:
    """"HOST:PORT" -> (host, port); "[::1]:8080" for IPv6. ValueError naming --http."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--http: {address!r} is not HOST:PORT (e.g. 127.0.0.1:4021)")
    return host, int(port)


class DashboardServer:
    """The dashboard's HTTP listener (aiohttp), started in the running event loop."""

    def __init__(self, dashboard: Dashboard, address: str):
        self.dashboard = dashboard
        self.host, self._port = parse_address(address)
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        """Listen; returns the bound port (port 0 picks a free one)."""
        runner = web.AppRunner(self.dashboard.app(), access_log=None,
                               handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            from p402_server.listen import listen_error

            raise listen_error(f"{self.host}:{self._port}", flag="--http", env="P402_HTTP",
                               cause=exc) from None
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info("p402 dashboard on http://%s:%d%s/", self.host, self.port, PREFIX)
        return self.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{PREFIX}/"

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


__all__ = ["Dashboard", "DashboardConfig", "DashboardServer", "parse_address", "PREFIX"]
