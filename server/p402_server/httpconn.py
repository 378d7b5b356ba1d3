"""aiohttp runners whose connections answer, in the application's own way, what
aiohttp refuses before any handler runs (a request line or header too long, a byte
HTTP does not allow, a body framed other than its headers say).

`runner_class(handler)` -> an AppRunner class whose every connection is served by
`handler`, a subclass of aiohttp's RequestHandler that overrides `handle_error`
(the proxy answers OpenAI-style JSON, the dashboard a short text): without it
aiohttp logs such a request with a traceback and its bytes, cookies included.
"""
from __future__ import annotations

from aiohttp import web, web_protocol, web_server


def runner_class(handler: type[web_protocol.RequestHandler]) -> type[web.AppRunner]:
    """An AppRunner class whose connections use `handler` (module docstring)."""

    class Server(web_server.Server):
        def __call__(self) -> web_protocol.RequestHandler:
            return handler(self, loop=self._loop, **self._kwargs)

    class Runner(web.AppRunner):
        async def _make_server(self) -> web_server.Server:
            server = await super()._make_server()
            # aiohttp builds its Server inside Application; only the class of the
            # handler a new connection gets changes.
            server.__class__ = Server
            return server

    Runner.__name__ = Runner.__qualname__ = f"{handler.__name__}Runner"
    return Runner
