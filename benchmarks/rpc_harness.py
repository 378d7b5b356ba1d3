"""Shared by the RPC benchmarks: a P402 server in a subprocess, timing helpers, and
the machine/version banner printed beside every number.

The server runs in its own process (its own GIL and event loop, uvloop when
installed) on 127.0.0.1 over a temporary SQLite ledger; the benchmark is the client.
Every result is a ratio against a baseline (Ping: an authenticated no-op through the
same server stack) measured in the same run.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "server"), os.path.join(ROOT, "clients", "python")):
    if p not in sys.path:
        sys.path.insert(0, p)

_SERVER = r"""
import asyncio, json, logging, sys
sys.path[:0] = {paths!r}
from p402_server.runtime.config import ServerConfig
from p402_server.server import create_server, init_tenant
from p402_server.ledger import open_store
from p402_server.gc_policy import tune_gc

async def main():
    store = await open_store({url!r})
    tenant, key = await init_tenant(store, "bench")
    server, port = create_server("127.0.0.1:0", store=store,
                                 config=ServerConfig.from_env(max_concurrent_rpcs=4096),
                                 leases={leases!r}, metrics={metrics!r})
    await server.start()
    tune_gc()  # as `p402 serve` does once started (P402_GC=default: Python's own)
    print(json.dumps({{"port": port, "api_key": key, "tenant": tenant}}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(1.0)
    await store.close()

try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""


@contextmanager
def server_process(leases: bool = False, metrics: bool = True):
    """Start a server subprocess -> {"port", "api_key", "tenant", "ledger" (the SQLite
    file)}; stops it at exit.
    `leases`: HARD budgets leased from the store (`p402 serve --lease on`);
    `metrics`: False serves without metrics (`p402 serve --no-metrics`)."""
    tmp = tempfile.mkdtemp(prefix="p402-bench-")
    url = f"sqlite+aiosqlite:///{tmp}/bench.db"
    paths = [ROOT, os.path.join(ROOT, "server"), os.path.join(ROOT, "clients", "python")]
    proc = subprocess.Popen([sys.executable, "-c",
                             _SERVER.format(paths=paths, url=url, leases=leases,
                                            metrics=metrics)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("benchmark server failed to start")
        yield {**json.loads(line), "ledger": f"{tmp}/bench.db"}
    finally:
        try:
            proc.stdin.close()
            proc.wait(10)
        except Exception:  # noqa: BLE001
            proc.kill()


def banner(title: str, implementation: str) -> None:
    import google.protobuf
    import grpc
    from google.protobuf.internal import api_implementation

    try:
        import uvloop
        loop = f"uvloop {uvloop.__version__} (server)"
    except ImportError:
        loop = "asyncio (server)"
    print(f"== {title}")
    print(f"machine: {platform.machine()} {platform.processor() or ''} "
          f"{os.cpu_count()} cpus, {platform.platform()}")
    print(f"python {platform.python_version()}, grpcio {grpc.__version__}, protobuf "
          f"{google.protobuf.__version__} ({api_implementation.Type()}), {loop}")
    print(f"p402core implementation (server): {implementation}")


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


async def sequential(call, n: int) -> list[float]:
    """Latencies (s) of n calls made one after another."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append(time.perf_counter() - t0)
    return out


async def in_flight(call, n: int, concurrency: int = 32) -> tuple[float, list[float]]:
    """(calls per second, latencies) of n calls with `concurrency` in flight."""
    lat: list[float] = []
    remaining = n

    async def worker():
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            await call()
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return n / (time.perf_counter() - t0), lat


def us(x: float) -> str:
    return f"{x * 1e6:8.0f} µs"


def median(xs):
    return statistics.median(xs)
