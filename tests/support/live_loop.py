"""A rig served from its own event loop on a thread, for synchronous hypothesis tests
that send it many requests, with every log record of the process captured."""
from __future__ import annotations

import asyncio
import gc
import logging
import threading
from contextlib import contextmanager
from typing import Any, Awaitable, Callable, Iterator


class Captured(logging.Handler):
    """Keeps every log record."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@contextmanager
def on_a_loop(start: Callable[[], Awaitable[tuple[Any, Callable[[], Awaitable]]]]
              ) -> Iterator[tuple[asyncio.AbstractEventLoop, Any, Captured]]:
    """`start()` -> (rig, stop) run on a new loop on a thread: yields (loop, rig, the
    captured log records from then on); `stop()` and the loop end on exit."""
    # Earlier tests' unclosed OpenAI clients close themselves on whatever loop runs
    # when they are collected; collected here, with no loop running, they cannot log
    # into this capture of every log line ("Event loop is closed" from an httpx
    # client, nothing of P402's).
    gc.collect()
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    rig, stop = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    logs = Captured()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(logs)
    root.setLevel(logging.DEBUG)
    try:
        yield loop, rig, logs
    finally:
        root.removeHandler(logs)
        root.setLevel(old_level)
        asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
