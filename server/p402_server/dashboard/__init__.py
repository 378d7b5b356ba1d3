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

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from p402_server.dashboard.app import PREFIX, Dashboard, DashboardConfig
from p402_server.httpconn import runner_class

log = logging.getLogger("p402.dashboard")


def parse_address(address: str) -> tuple[str, int]:
    """"HOST:PORT" -> (host, port); "[::1]:8080" for IPv6. ValueError naming --http."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"--http: {address!r} is not HOST:PORT (e.g. 127.0.0.1:4021)")
    return host, int(port)


class _RefusingHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, answering a request it cannot parse (a line or
    header too long, a byte HTTP does not allow in a header) with a short 4xx and one
    log line naming the kind of fault: no traceback, none of the request's bytes (a
    cookie may be in them)."""

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError) or status >= 500:
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, LineTooLong):
            status, text = 431, "a request line or header is too long"
        else:
            text = "the request is not valid HTTP/1.1"
        log.info("dashboard: refused a request from %s: %s (%s)", request.remote, text,
                 type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        resp = web.Response(status=status, text=f"{status}: {text}")
        resp.force_close()
        return resp


# The dashboard's AppRunner: its connections use `_RefusingHandler`.
_Runner = runner_class(_RefusingHandler)


class DashboardServer:
    """The dashboard's HTTP listener (aiohttp), started in the running event loop."""

    def __init__(self, dashboard: Dashboard, address: str):
        self.dashboard = dashboard
        self.host, self._port = parse_address(address)
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        """Listen; returns the bound port (port 0 picks a free one)."""
        runner = _Runner(self.dashboard.app(), access_log=None,
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
