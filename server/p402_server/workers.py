"""`p402 serve --workers N`: N server processes sharing one port.

Owns `run_workers`. One Python process uses one core (grpc.aio runs best on one
thread); several cores need several processes. The parent migrates the ledger once,
then forks N children BEFORE creating any gRPC object (gRPC's core does not survive a
fork with live channels or servers); each child runs its own `server.serve` on the
same HOST:PORT with SO_REUSEPORT, so the kernel spreads connections over them. Each
child is a full server with its own engine per tenant and its own leases
(leases.py): budgets are shared through leased slices, never by owning them.

The parent only supervises: SIGTERM/SIGINT are forwarded to every child (each drains
and returns its leases); a child that dies unexpectedly is started again (its lease
is reclaimed after it expires, leases.py), at most `MAX_RESTARTS` times in a row
within `RESTART_WINDOW_SECONDS`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time

log = logging.getLogger("p402.server.workers")

MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 60.0


def _migrate(db_url: str) -> None:
    from p402_server.ledger import open_store

    async def go():
        store = await open_store(db_url)  # migrates to head
        await store.close()

    asyncio.run(go())


def _child(db_url: str, listen: str, kwargs: dict) -> None:
    from p402_server import server

    try:
        server.run(db_url, listen, reuse_port=True, **kwargs)
    except BaseException:  # noqa: BLE001 - a child reports and exits, never returns
        log.exception("worker %d failed", os.getpid())
        os._exit(1)
    os._exit(0)


def run_workers(n: int, db_url: str, listen: str, **kwargs) -> int:
    """Fork `n` workers serving `listen` (a fixed port) with leases; wait for them."""
    if listen.rsplit(":", 1)[-1] == "0":
        raise ValueError("--workers needs a fixed port (port 0 would give each worker "
                         "its own)")
    kwargs["leases"] = True
    _migrate(db_url)  # once, before forking: workers must not race the migration
    children: dict[int, int] = {}  # pid -> slot
    stopping = False
    restarts: list[float] = []

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _child(db_url, listen, kwargs)
        children[pid] = slot

    def forward(sig, _frame):
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for slot in range(n):
        spawn(slot)
    log.info("p402 serve: %d workers on %s (SO_REUSEPORT, leases on)", n, listen)
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        slot = children.pop(pid, None)
        if slot is None:
            continue
        rc = os.waitstatus_to_exitcode(code)
        if stopping:
            continue
        log.error("worker %d (slot %d) exited with %d; restarting", pid, slot, rc)
        now = time.monotonic()
        restarts[:] = [t for t in restarts if now - t < RESTART_WINDOW_SECONDS] + [now]
        if len(restarts) > MAX_RESTARTS:
            log.error("workers keep failing; stopping")
            status = 1
            forward(signal.SIGTERM, None)
            continue
        spawn(slot)
    sys.stdout.flush()
    return status


__all__ = ["run_workers"]
