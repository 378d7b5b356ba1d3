"""Scale-out: Authorize throughput with 1 vs 2 workers of `p402 serve`, and
the cost of leasing (decisions per store round trip) far from a limit and near it.

Run: `python benchmarks/bench_workers.py [--quick] [--driver h2load|python]
[--h2load-grid 4x100,16x16,…] [--h2load-threads N]` (needs PostgreSQL; URL from
P402_BENCH_PG_URL, default postgresql+asyncpg://postgres@127.0.0.1:5432/postgres, the
database used to CREATE/DROP a fresh one per server run). About 2.5 minutes, --quick
under 1. Run it on an idle machine: it prints how busy the machine was before it
started, and per window the CPU of everything that is not the server, the load
generator or this benchmark's PostgreSQL ("rest": the kernel, other processes).

Part 1 — throughput. `p402 serve --workers N --lease on` (the real CLI, a subprocess on
a loopback port, PostgreSQL store) for N = 1 and N = 2, each on a fresh database with
a tenant from `p402 init --db URL --json` and one HARD budget far from its limit
(10^7 USD; each allowed Authorize holds its estimate until the hold TTL, 900 s by
default, longer than the run: holds pile up, by design). Figure: calls/s with 2
workers / calls/s with 1 (target >= 1.7). The script measures where the CPU went in
each window (/proc: the server processes and the split between workers, the load
generator, PostgreSQL — this database's backends and the background processes — and
the rest), because on a 2-core machine all of them share the cores the workers need;
it prints the ceiling that leaves: (cores - load generator - PostgreSQL - rest, with
2 workers) / cores used by 1 worker. One worker uses more than a core (its Python
thread and gRPC core's threads), so on 2 cores that ceiling is near 1.5x however
light the load generator.

Two load generators (`--driver`; default h2load when it is on PATH, else python, with
a note saying so; CI and the tests never need h2load):
- h2load (Debian: `apt-get install nghttp2-client`): one C process, about a tenth
  of a core at these rates, so the workers get the machine. It POSTs one framed gRPC
  message (0x00, big-endian uint32 length, the serialized AuthorizeRequest: the
  request of the `requests()` mix with the median input size; h2load repeats one
  body) over h2c to /p402.v1.MeterService/Authorize with content-type
  application/grpc, te: trailers and the tenant's bearer key. Both servers run at
  once (the one not measured is idle) and, for every setting of the grid
  (connections x streams per connection; >= 4 connections so SO_REUSEPORT spreads
  them over the workers), `pairs` pairs of windows run back to back, one on each
  server, order alternating: this VM's speed drifts by tens of percent over seconds
  (a fixed CPU loop alone varies so), and a pair sees the same machine. Each server
  first gets a `-D` warm-up (with the grid's most connections, so every worker has
  built the tenant's engine and leased); each window is `-n` requests sized to about
  `duration` seconds. A window where other processes took more than REST_LIMIT
  cores is measured again (at most twice). The figure is the median of every pair's
  2/1 ratio over all settings (the drift cancels within a pair; picking each side's
  best setting instead rewards one lucky window: printed too, with each setting's
  medians).
  Correctness, since h2load counts an HTTP 200 as a success and gRPC puts its status
  in trailers, which h2load does not read: Python-client Authorizes before and
  after must ALLOW on both servers, and each window's h2load successes must equal
  the new rows in the store's `holds` table (every allowed Authorize leaves one,
  written behind within holds_flush_interval_seconds; a DENY or a gRPC error leaves
  none). Caveats: one request body (the server's work barely depends on it); `-D`
  ends with calls in flight, so only the warm-up uses it; SO_REUSEPORT puts each
  connection on one worker for its life (a hash), so with 4-32 connections the
  workers' split (printed per window) is often 35/65 or worse, and a client with one
  channel (one connection) reaches one worker only; past ~1000 calls waiting
  in one process, gRPC core's pending-call backlog (`grpc.server.max_pending_requests`,
  soft 1000 / hard 3000; the server does not set it) sheds calls at random — an HTTP
  200 with grpc-status CANCELLED — below --max-concurrent-rpcs, so the default grid
  keeps <= 512 in flight (a window that loses calls is flagged MISMATCH and left
  out).
- python: several client processes (multiprocessing, spawned: no gRPC object
  crosses a fork), each with several grpc.aio channels (own subchannel pool, so each
  is its own TCP connection) and many calls in flight, for a bounded window after a
  warm-up, counting decisions as they come back. It needs about a core of its own at
  these rates: the ratio then measures the load generator as much as the server.

Part 2 — the cost of leasing. LeaseManager.round_trips (store transactions issued by
the lease code: open, read, take, reclaim) is read without touching the project:
the server runs through a 10-line probe that wraps `LeaseManager.__init__` before
calling the CLI's `main(["serve", ...])`, and writes each worker's counter to a file
every 20 ms (so a sample can be up to 20 ms stale). Two workers (two holders per
budget), two tenants:
- far: a HARD budget at 10^7 USD driven by part 1's load generator (h2load: at the
  setting best for 2 workers): decisions per round trip at full load (slices are
  limit / 20: round trips are then time-driven — renewals and the 1 s reclaim
  scan — not decision-driven);
- near: a HARD budget of K Authorize estimates, walked from empty to exhausted by
  Authorizes from the Python client whatever the driver (the walk needs each
  decision and estimate; each hold keeps its estimate: default hold TTL 900 s),
  then held at the limit: decisions per round trip over the first 90 % of the
  headroom, the last 10 % (slices shrink geometrically, the last nanos are taken
  exactly), and at the limit (every call denied; a DENY wakes the top-up task).
The near walk includes the far tenant's background trips (one reclaim scan per
second per tenant per worker): they are part of what a process pays.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = [str(ROOT), str(ROOT / "server"), str(ROOT / "clients" / "python")]
for _p in PATHS:
    if _p not in sys.path:
        sys.path.insert(0, _p)

PG_ADMIN_URL = os.environ.get("P402_BENCH_PG_URL",
                              "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
USD = 1_000_000_000
MODELS = ["gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5", "gemini-2.5-flash"]
TARGET_RATIO = 1.7

CLI = [sys.executable, "-c",
       "import sys; from p402_server.cli import main; sys.exit(main())"]
# The round-trip probe (part 2): the same CLI, with each LeaseManager's counter
# written to $P402_BENCH_RT_DIR/rt-<pid> every 20 ms by a daemon thread (an int read
# from another thread is safe under the GIL). Workers fork before building their
# LeaseManager, so each worker starts its own thread.
PROBE = [sys.executable, "-c", r"""
import os, sys, threading, time
from p402_server.runtime import leases
_orig = leases.LeaseManager.__init__
def _init(self, *a, **k):
    _orig(self, *a, **k)
    path = os.path.join(os.environ["P402_BENCH_RT_DIR"], f"rt-{os.getpid()}")
    def pump():
        while True:
            with open(path + ".tmp", "w") as f:
                f.write(str(self.round_trips))
            os.replace(path + ".tmp", path)
            time.sleep(0.02)
    threading.Thread(target=pump, daemon=True, name="bench-rt").start()
leases.LeaseManager.__init__ = _init
from p402_server.cli import main
sys.exit(main())
"""]


# ---------------------------------------------------------------- helpers


def usd(n_nanos: int):
    from google.type import money_pb2

    units, rest = divmod(n_nanos, USD)
    return money_pb2.Money(currency_code="USD", units=units, nanos=rest)


def nanos(m) -> int:
    return m.units * USD + m.nanos


def env_for(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(PATHS + [env.get("PYTHONPATH", "")])
    env["P402_LOG_LEVEL"] = "WARNING"
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL.replace("+asyncpg", "", 1), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


class FreshDB:
    """A fresh PostgreSQL database (created on enter, dropped on exit)."""

    def __enter__(self) -> str:
        from sqlalchemy.engine import make_url

        self.name = "p402_bench_workers_" + secrets.token_hex(5)
        asyncio.run(_pg_admin(f'CREATE DATABASE "{self.name}"'))
        return make_url(PG_ADMIN_URL).set(database=self.name).render_as_string(
            hide_password=False)

    def __exit__(self, *exc) -> None:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))


def p402_init(db_url: str, name: str) -> tuple[str, str]:
    """`p402 init --db URL --name NAME --json` -> (tenant, api_key)."""
    out = subprocess.run([*CLI, "init", "--db", db_url, "--name", name, "--json"],
                         env=env_for(), cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    doc = json.loads(out)
    return doc["tenant"], doc["api_key"]


class Serve:
    """`p402 serve --workers N --lease on` (or the probe) as a child process."""

    def __init__(self, db_url: str, workers: int, log: Path, probe_dir: str | None = None):
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log = log
        argv = (PROBE if probe_dir else CLI) + [
            "serve", "--db", db_url, "--listen", self.target, "--lease", "on",
            "--workers", str(workers), "--max-concurrent-rpcs", "4096",
            "--log-level", "WARNING"]
        extra = {"P402_BENCH_RT_DIR": probe_dir} if probe_dir else {}
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(argv, env=env_for(extra), cwd=ROOT, stdout=fh,
                                         stderr=fh)
        self.workers = workers

    def wait_ready(self, timeout: float = 60.0) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        # Every worker must answer: new connections until `workers` distinct pids are
        # SERVING is not observable, so wait until the parent has its N children and
        # a health check passes, then give the others a moment to bind.
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"p402 serve exited with {self.proc.returncode}:\n"
                                 + self.log.read_text()[-3000:])
            try:
                with grpc.insecure_channel(self.target) as ch:
                    r = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if (r.status == health_pb2.HealthCheckResponse.SERVING
                        and len(self.pids()) >= self.workers):
                    time.sleep(1.0)
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.target} not SERVING after {timeout}s")
            time.sleep(0.1)

    def pids(self) -> list[int]:
        """The serving processes: the children when forked, else the process itself."""
        kids = _children(self.proc.pid)
        return kids if self.workers > 1 else [self.proc.pid]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", encoding="ascii") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            pass
    return total / _TICK


async def _pg_pids(db_url: str) -> list[int]:
    import asyncpg

    conn = await asyncpg.connect(db_url.replace("+asyncpg", "", 1), timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND "
            "(datname = current_database() OR backend_type <> 'client backend')")
        return [r["pid"] for r in rows]
    finally:
        await conn.close()


def pg_snapshot(db_url: str) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL process that works for this benchmark:
    the backends connected to its database and the background processes (WAL
    writer, checkpointer, …); other databases' backends (another session's tests)
    count as "rest"."""
    return {pid: proc_cpu([pid]) for pid in asyncio.run(_pg_pids(db_url))}


def pg_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two snapshots (a backend that exited in between is lost;
    one that started is counted whole)."""
    return sum(max(0.0, c - before.get(pid, 0.0)) for pid, c in after.items())


def idle_check(seconds: float = 2.0) -> float:
    """The machine's busy share over `seconds` before the benchmark starts."""
    b0, a0 = machine_cpu()
    time.sleep(seconds)
    b1, a1 = machine_cpu()
    return (b1 - b0) / max(1e-9, a1 - a0)


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (/proc/stat)."""
    with open("/proc/stat", encoding="ascii") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    idle = f[3] + f[4]
    return (sum(f) - idle) / _TICK, sum(f) / _TICK


async def setup_budget(target: str, key: str, limit_nanos: int) -> None:
    import grpc
    from p402.v1 import admin_pb2, admin_pb2_grpc, common_pb2

    md = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(target) as ch:
        await admin_pb2_grpc.AdminServiceStub(ch).PutBudget(admin_pb2.PutBudgetRequest(
            budget=admin_pb2.Budget(budget_id="main", limit=usd(limit_nanos),
                                    period=common_pb2.PERIOD_TOTAL,
                                    enforcement=common_pb2.ENFORCEMENT_HARD)),
            metadata=md, timeout=30)


def requests(seed: int = 402):
    import random

    from p402.v1 import common_pb2, meter_pb2

    rng = random.Random(seed)
    return [meter_pb2.AuthorizeRequest(
        model=rng.choice(MODELS), input_bytes=rng.randint(200, 20000),
        max_output_tokens=rng.choice([256, 1024, 4096]),
        owners=common_pb2.Owners(customer=rng.choice(["acme", "globex", "initech"]),
                                 feature=rng.choice(["chat", "search"]), department="eng"),
        labels={"env": rng.choice(["prod", "dev"])}) for _ in range(256)]


# ---------------------------------------------------------------- load generator


def _client_proc(target, key, channels, in_flight, start_at, warmup, duration, q):
    """One load-generator process (spawned): `channels` connections, `in_flight`
    calls outstanding; counts the calls completed inside its measured window."""
    import grpc
    from p402.v1 import common_pb2, meter_pb2_grpc

    async def run():
        md = (("authorization", f"Bearer {key}"),)
        chans = [grpc.aio.insecure_channel(
            target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(channels)]
        stubs = [meter_pb2_grpc.MeterServiceStub(c) for c in chans]
        reqs = requests(os.getpid())
        for s in stubs:  # connect (and build the tenant's engine) before the window
            await s.Authorize(reqs[0], metadata=md, timeout=60)
        st = {"calls": 0, "deny": 0, "errors": 0, "measuring": False, "stop": False}

        async def worker(i):
            stub, n = stubs[i % len(stubs)], i
            while not st["stop"]:
                n += 1
                try:
                    r = await stub.Authorize(reqs[n % len(reqs)], metadata=md, timeout=30)
                except grpc.aio.AioRpcError:
                    st["errors"] += 1
                    await asyncio.sleep(0.001)
                    continue
                if st["measuring"]:
                    st["calls"] += 1
                    if r.decision == common_pb2.DECISION_DENY:
                        st["deny"] += 1

        await asyncio.sleep(max(0.0, start_at - time.time()))
        tasks = [asyncio.create_task(worker(i)) for i in range(in_flight)]
        await asyncio.sleep(warmup)
        st["measuring"] = True
        c0, t0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(duration)
        st["measuring"] = False
        c1, t1 = time.process_time(), time.perf_counter()
        st["stop"] = True
        await asyncio.gather(*tasks)
        for c in chans:
            await c.close()
        q.put({"calls": st["calls"], "deny": st["deny"], "errors": st["errors"],
               "seconds": t1 - t0, "cpu": c1 - c0})

    try:
        import uvloop
        uvloop.run(run())
    except ImportError:
        asyncio.run(run())


def drive(target, key, *, procs, channels, in_flight, warmup, duration, on_window=None):
    """Run the load generator; -> dict(calls/s, cpu shares…). `on_window(phase)` is
    called at the window's start ("start") and end ("end") in this process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 3.0  # spawn + import + connect before everyone starts
    ps = [ctx.Process(target=_client_proc, args=(target, key, channels, in_flight,
                                                 start_at, warmup, duration, q))
          for _ in range(procs)]
    for p in ps:
        p.start()
    time.sleep(max(0.0, start_at + warmup - time.time()))
    marks = {"start": on_window("start") if on_window else None}
    time.sleep(duration)
    marks["end"] = on_window("end") if on_window else None
    res = [q.get(timeout=120) for _ in ps]
    for p in ps:
        p.join(30)
    secs = statistics.mean(r["seconds"] for r in res)
    return {"calls": sum(r["calls"] for r in res), "deny": sum(r["deny"] for r in res),
            "errors": sum(r["errors"] for r in res), "seconds": secs,
            "rps": sum(r["calls"] / r["seconds"] for r in res),
            "client_cpu": sum(r["cpu"] for r in res), "marks": marks}


# ---------------------------------------------------------------- h2load driver


H2LOAD_MISSING = ("h2load not found on PATH (Debian: apt-get install nghttp2-client)")
# Connections x streams per connection. At most 512 in flight: past ~1000 calls
# waiting in one process, gRPC core sheds calls (see the module docstring).
H2LOAD_GRID = "4x100,8x32,16x16,16x32,32x16"
H2LOAD_GRID_QUICK = "8x32,16x16"
# A window where processes other than the server, the load generator and this
# benchmark's PostgreSQL used more than this many cores is measured again.
REST_LIMIT = 0.25


def representative_request():
    """The request of the mix with the median input size (h2load repeats one body)."""
    mix = sorted(requests(), key=lambda r: r.input_bytes)
    return mix[len(mix) // 2]


def grpc_frame(msg) -> bytes:
    """One gRPC length-prefixed message: flag 0 (uncompressed), big-endian uint32
    length, then the serialized protobuf."""
    body = msg.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def h2load_argv(target: str, key: str, body: Path, conns: int, streams: int, *,
                n: int | None = None, seconds: int | None = None,
                threads: int = 1) -> list[str]:
    """h2load POSTing `body` (a framed AuthorizeRequest) as gRPC over h2c (prior
    knowledge: h2load's default for http:// URIs)."""
    count = ["-n", str(n)] if n is not None else ["-D", str(seconds)]
    return ["h2load", *count, "-c", str(conns), "-m", str(streams), "-t", str(threads),
            "-d", str(body), "-H", "content-type: application/grpc",
            "-H", "te: trailers", "-H", f"authorization: Bearer {key}",
            f"http://{target}/p402.v1.MeterService/Authorize"]


def parse_h2load(out: str) -> dict:
    """The numbers of h2load's summary: req/s, requests by fate, HTTP status classes,
    mean time per request (µs). Raises if the summary is missing."""
    import re

    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    r = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    s = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not (m and r and s):
        raise RuntimeError("h2load printed no summary:\n" + out[-2000:])
    t = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\b", out)
    mean_us = None
    if t:
        mean_us = float(t.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[t.group(2)]
    secs = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    total, started, done, ok, failed, errored, timeout = map(int, r.groups())
    s2, s3, s4, s5 = map(int, s.groups())
    return {"seconds": secs, "rps": float(m.group(3)), "total": total, "done": done,
            "succeeded": ok, "failed": failed, "errored": errored, "timeout": timeout,
            "2xx": s2, "3xx": s3, "4xx": s4, "5xx": s5, "mean_us": mean_us}


def run_h2load(argv: list[str], log: Path, timeout: float) -> dict:
    """Run h2load; -> its parsed summary plus `cpu` (its own user + system seconds,
    from wait4's rusage) and `wall`. Killed past `timeout` seconds."""
    t0 = time.perf_counter()
    with open(log, "ab") as fh:
        fh.write(("\n$ " + " ".join(argv) + "\n").encode())
        fh.flush()
        start = fh.tell()
        p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            p.kill()
            pid, status, ru = os.wait4(p.pid, 0)
            break
        time.sleep(0.02)
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    wall = time.perf_counter() - t0
    with open(log, "rb") as fh:
        fh.seek(start)
        out = fh.read().decode("utf-8", "replace")
    if p.returncode != 0:
        raise RuntimeError(f"h2load exited with {p.returncode}:\n{out[-2000:]}")
    res = parse_h2load(out)
    res.update(cpu=ru.ru_utime + ru.ru_stime, wall=wall)
    return res


async def _count_holds(db_url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(db_url.replace("+asyncpg", "", 1), timeout=5)
    try:
        return await conn.fetchval("SELECT count(*) FROM holds")
    finally:
        await conn.close()


def flushed_holds(db_url: str, expected: int | None = None, cap_s: float = 20.0) -> int:
    """The number of holds rows once the workers' write-behind has caught up (holds
    are flushed every `holds_flush_interval_seconds`, 0.25 s): `expected` as soon as
    it is reached, else the count once it has not moved for three reads 0.3 s apart
    (or after `cap_s`)."""
    deadline = time.monotonic() + cap_s
    last, same, since = -1, 0, time.monotonic()
    while time.monotonic() < deadline:
        n = asyncio.run(_count_holds(db_url))
        if n == expected:
            return n
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= 0.9:
            return n
        time.sleep(0.1)
    return last


async def check_allows(target: str, key: str, n: int = 4, wait_s: float = 0.0) -> list[int]:
    """`n` Authorizes with the Python client (the representative request and the first
    of the mix), each on its own connection; raises unless every one is ALLOW (a DENY
    is retried for up to `wait_s` seconds: a HARD budget new to a worker denies until
    its first lease slice arrives). -> the estimates (nanos)."""
    import grpc
    from p402.v1 import common_pb2, meter_pb2_grpc

    md = (("authorization", f"Bearer {key}"),)
    reqs = [representative_request()] + requests()[:n - 1]
    ests = []
    deadline = time.monotonic() + wait_s
    for req in reqs:
        while True:
            async with grpc.aio.insecure_channel(
                    target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                r = await meter_pb2_grpc.MeterServiceStub(ch).Authorize(req, metadata=md,
                                                                        timeout=30)
            if r.decision == common_pb2.DECISION_ALLOW:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"check Authorize answered {r.decision} (expected "
                                   f"ALLOW): {r}")
            await asyncio.sleep(0.1)
        ests.append(nanos(r.estimated_cost))
    return ests


# ---------------------------------------------------------------- part 1


def throughput_point(workers: int, cfg: dict, logdir: Path) -> dict:
    with FreshDB() as url:
        _tenant, key = p402_init(url, "bench")
        srv = Serve(url, workers, logdir / f"serve-w{workers}-{time.time_ns()}.log")
        try:
            srv.wait_ready()
            asyncio.run(setup_budget(srv.target, key, 10**7 * USD))
            pids = srv.pids()

            def mark(_phase):
                return (time.perf_counter(), proc_cpu(pids), machine_cpu(),
                        pg_snapshot(url))

            r = drive(srv.target, key, procs=cfg["procs"], channels=cfg["channels"],
                      in_flight=cfg["in_flight"], warmup=cfg["warmup"],
                      duration=cfg["duration"], on_window=mark)
        finally:
            srv.stop()
    (t0, s0, (b0, a0), p0), (t1, s1, (b1, a1), p1) = (r["marks"]["start"],
                                                      r["marks"]["end"])
    wall = t1 - t0
    ncpu = os.cpu_count() or 1
    r.update(workers=workers, server_cores=(s1 - s0) / wall,
             client_cores=r["client_cpu"] / r["seconds"], machine_cores=(b1 - b0) / wall,
             machine_busy=(b1 - b0) / max(1e-9, a1 - a0), ncpu=ncpu,
             postgres_cores=pg_delta(p0, p1) / wall)
    r["other_cores"] = max(0.0, r["machine_cores"] - r["server_cores"] - r["client_cores"])
    r["rest_cores"] = max(0.0, r["other_cores"] - r["postgres_cores"])
    r.pop("marks")
    return r


class H2Server:
    """One `p402 serve --workers N` on its own fresh database, set up for h2load: a
    tenant, a HARD budget far from its limit, Python-client Authorizes that ALLOW,
    and a warm-up."""

    def __init__(self, workers: int, cfg: dict, logdir: Path, stack) -> None:
        self.workers = workers
        self.url = stack.enter_context(FreshDB())
        _tenant, self.key = p402_init(self.url, "bench")
        self.srv = Serve(self.url, workers, logdir / f"serve-w{workers}-{time.time_ns()}.log")
        stack.callback(self.srv.stop)
        self.log = logdir / f"h2load-w{workers}-{time.time_ns()}.log"
        self.srv.wait_ready()
        asyncio.run(setup_budget(self.srv.target, self.key, 10**7 * USD))
        self.pre = asyncio.run(check_allows(self.srv.target, self.key, wait_s=10.0))
        # Warm-up: connections made, the tenant's engine built and leases taken on
        # every worker (the most connections of the grid: with 16, the chance that
        # SO_REUSEPORT sends none to one of 2 workers is 2^-15); its rate sizes the
        # first -n.
        c, m = max(cfg["grid"])
        warm = run_h2load(h2load_argv(self.srv.target, self.key, cfg["body"], c, m,
                                      seconds=max(1, round(cfg["warmup"])),
                                      threads=cfg["h2load_threads"]), self.log,
                          cfg["timeout"])
        self.rate = warm["rps"]
        self.holds = flushed_holds(self.url)

    def window(self, c: int, m: int, cfg: dict, idle: list[int]) -> dict:
        """A measured window of about cfg["duration"] s, measured again (at most
        cfg["disturbed_retries"] times) when other processes took the cores."""
        tries = []
        while True:
            n = max(c * m * 4, int(self.rate * cfg["duration"]))
            r = h2load_window(self.srv, self.url, self.key, c, m, n, cfg, self.log,
                              cfg["timeout"], self.holds, idle)
            tries.append(r)
            self.holds, self.rate = r["holds_after"], r["rps"]
            if r["rest_cores"] <= REST_LIMIT or len(tries) > cfg["disturbed_retries"]:
                break
            time.sleep(1.0)
        r.update(workers=self.workers, tries=len(tries),
                 disturbed=r["rest_cores"] > REST_LIMIT,
                 n=sum(t["n"] for t in tries),  # every try counts in the store check
                 succeeded_all=sum(t["succeeded"] for t in tries),
                 new_holds=sum(t["new_holds"] for t in tries),
                 rest_tries=[round(t["rest_cores"], 2) for t in tries],
                 estimate_nanos=self.pre[0])
        return r


def throughput_points_h2load(cfg: dict, logdir: Path) -> list[dict]:
    """Both servers at once (1 worker and 2 workers, each on its own fresh database;
    the one not measured is idle), and for every setting of the grid `pairs` pairs
    of windows, one on each, back to back (order alternating): the host's speed
    drifts by tens of percent over seconds, so the two sides of a pair see the same
    machine. -> every window, in order.

    Each window is `-n` requests (about cfg["duration"] s at the rate last seen), so
    that h2load's count can be compared exactly with the store's: every allowed
    Authorize leaves one row in `holds` (written behind), and a gRPC error — an HTTP
    200 whose trailers carry grpc-status, which h2load does not read — leaves none.
    Python-client Authorizes before and after must all ALLOW."""
    import contextlib

    out = []
    with contextlib.ExitStack() as stack:
        servers = {w: H2Server(w, cfg, logdir, stack) for w in (1, 2)}
        for c, m in cfg["grid"]:
            for k in range(cfg["pairs"]):
                for w in ((1, 2) if k % 2 == 0 else (2, 1)):
                    idle = servers[3 - w].srv.pids()
                    r = servers[w].window(c, m, cfg, idle)
                    r["pair"] = k
                    out.append(r)
        for h in servers.values():
            asyncio.run(check_allows(h.srv.target, h.key))  # raises unless ALLOW
    return out


def h2load_window(srv: Serve, url: str, key: str, c: int, m: int, n: int, cfg: dict,
                  log: Path, timeout: float, holds0: int, idle: list[int]) -> dict:
    """One measured h2load run of `n` requests; -> its summary, the cores each party
    used (server per worker, h2load, this benchmark's PostgreSQL, the idle server
    `idle`, the rest) and the new rows in `holds`."""
    pids = srv.pids()
    argv = h2load_argv(srv.target, key, cfg["body"], c, m, n=n,
                       threads=cfg["h2load_threads"])
    per0, pg0, i0 = [proc_cpu([p]) for p in pids], pg_snapshot(url), proc_cpu(idle)
    b0, a0 = machine_cpu()
    t0 = time.perf_counter()
    r = run_h2load(argv, log, timeout)
    t1 = time.perf_counter()
    b1, a1 = machine_cpu()
    per1, pg1, i1 = [proc_cpu([p]) for p in pids], pg_snapshot(url), proc_cpu(idle)
    holds1 = flushed_holds(url, expected=holds0 + n)
    wall = t1 - t0
    per = [y - x for x, y in zip(per0, per1)]
    server = sum(per)
    r.update(conns=c, streams=m, n=n, new_holds=holds1 - holds0, holds_after=holds1,
             calls=r["succeeded"], server_cores=server / wall,
             client_cores=r["cpu"] / wall, machine_cores=(b1 - b0) / wall,
             machine_busy=(b1 - b0) / max(1e-9, a1 - a0),
             postgres_cores=pg_delta(pg0, pg1) / wall,
             worker_split=[x / server if server else 0.0 for x in per],
             argv=" ".join(argv).replace(key, "<key>"))
    r["other_cores"] = max(0.0, r["machine_cores"] - r["server_cores"]
                           - r["client_cores"])
    r["idle_server_cores"] = (i1 - i0) / wall
    r["rest_cores"] = max(0.0, r["other_cores"] - r["postgres_cores"]
                          - r["idle_server_cores"])
    return r


# ---------------------------------------------------------------- part 2


def read_trips(d: str) -> int:
    total = 0
    for name in os.listdir(d):
        if name.startswith("rt-") and not name.endswith(".tmp"):
            try:
                total += int(Path(d, name).read_text() or 0)
            except (OSError, ValueError):
                pass
    return total


async def near_walk(target: str, key: str, rtdir: str, limit: int, est_min: int,
                    at_limit_s: float, cap_s: float) -> list[tuple]:
    """Authorize until the near budget is exhausted, then `at_limit_s` more seconds.
    -> samples (t, allows, denies, allowed_nanos, trips) every 20 ms."""
    import grpc
    from p402.v1 import common_pb2, meter_pb2_grpc

    md = (("authorization", f"Bearer {key}"),)
    chans = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(8)]
    stubs = [meter_pb2_grpc.MeterServiceStub(c) for c in chans]
    reqs = requests(7)
    st = {"allow": 0, "deny": 0, "nanos": 0, "stop": False}
    samples = []

    async def worker(i):
        stub, n = stubs[i % len(stubs)], i
        while not st["stop"]:
            n += 1
            r = await stub.Authorize(reqs[n % len(reqs)], metadata=md, timeout=30)
            if r.decision == common_pb2.DECISION_DENY:
                st["deny"] += 1
            else:
                st["allow"] += 1
                st["nanos"] += nanos(r.estimated_cost)

    t0 = time.perf_counter()
    samples.append((0.0, 0, 0, 0, read_trips(rtdir)))  # the baseline of every window
    tasks = [asyncio.create_task(worker(i)) for i in range(32)]
    exhausted_at = None
    last = [0, 0.0]  # allows seen, when they last changed
    while True:
        await asyncio.sleep(0.02)
        now = time.perf_counter() - t0
        samples.append((now, st["allow"], st["deny"], st["nanos"], read_trips(rtdir)))
        # Exhausted: not even the smallest request of the mix fits any more, or no
        # allow for 1 s (headroom stranded in the holders' leases, each too small
        # for a request, is not pooled back while its holder lives).
        if st["allow"] != last[0]:
            last[:] = [st["allow"], now]
        if exhausted_at is None and (limit - st["nanos"] < est_min or now - last[1] > 1.0):
            exhausted_at = now
        if (exhausted_at is not None and now - exhausted_at >= at_limit_s) or now > cap_s:
            break
    st["stop"] = True
    await asyncio.gather(*tasks)
    for c in chans:
        await c.close()
    return samples


async def probe_estimates(target: str, key: str) -> tuple[int, int]:
    """(mean, min) Authorize estimate over the request mix (each hold released)."""
    import grpc
    from p402.v1 import meter_pb2, meter_pb2_grpc

    md = (("authorization", f"Bearer {key}"),)
    ests = []
    async with grpc.aio.insecure_channel(target) as ch:
        meter = meter_pb2_grpc.MeterServiceStub(ch)
        for req in requests(7):
            a = await meter.Authorize(req, metadata=md, timeout=30)
            ests.append(nanos(a.estimated_cost))
            await meter.Release(meter_pb2.ReleaseRequest(reservation_id=a.reservation_id),
                                metadata=md, timeout=30)
    return sum(ests) // len(ests), min(ests)


def leasing_cost(cfg: dict, logdir: Path) -> dict:
    rtdir = tempfile.mkdtemp(prefix="p402-bench-rt-")
    with FreshDB() as url:
        _t, far_key = p402_init(url, "far")
        _t, near_key = p402_init(url, "near")
        srv = Serve(url, 2, logdir / f"serve-probe-{time.time_ns()}.log", probe_dir=rtdir)
        try:
            srv.wait_ready()
            asyncio.run(setup_budget(srv.target, far_key, 10**7 * USD))
            # far: full load from the part-1 load generator.
            if cfg["driver"] == "h2load":
                far = far_h2load(srv.target, far_key, rtdir, cfg, logdir)
            else:
                far = drive(srv.target, far_key, procs=cfg["procs"],
                            channels=cfg["channels"], in_flight=cfg["in_flight"],
                            warmup=cfg["warmup"], duration=cfg["duration"],
                            on_window=lambda _p: (time.perf_counter(), read_trips(rtdir)))
                (t0, r0), (t1, r1) = far["marks"]["start"], far["marks"]["end"]
                far.update(trips=r1 - r0, trips_per_s=(r1 - r0) / (t1 - t0))
                far.pop("marks")
            # near: K estimates of headroom, walked to exhaustion, then held there.
            # Estimates probed on the far tenant (same catalog, same request mix), and
            # the near budget made before any worker builds the near tenant's engine,
            # so the walk measures leasing, not the config poll (a worker that built
            # it earlier learns of a later PutBudget within `config_poll_seconds`).
            mean_est, min_est = asyncio.run(probe_estimates(srv.target, far_key))
            limit = cfg["near_k"] * mean_est
            asyncio.run(setup_budget(srv.target, near_key, limit))
            samples = asyncio.run(near_walk(srv.target, near_key, rtdir, limit, min_est,
                                            cfg["at_limit"], cfg["near_cap"]))
        finally:
            srv.stop()
    return {"far": far, "near": windows(samples, limit, min_est), "limit_nanos": limit,
            "stranded_nanos": limit - samples[-1][3],
            "mean_est_nanos": mean_est, "near_k": cfg["near_k"]}


def far_h2load(target: str, key: str, rtdir: str, cfg: dict, logdir: Path) -> dict:
    """Part 2's full load with h2load (the setting part 1 found fastest): a warm-up,
    then about cfg["duration"] s of requests, round trips read around it."""
    c, m = cfg["far_setting"]
    log = logdir / f"h2load-far-{time.time_ns()}.log"
    timeout = cfg["timeout"]
    warm = run_h2load(h2load_argv(target, key, cfg["body"], c, m,
                                  seconds=max(1, round(cfg["warmup"])),
                                  threads=cfg["h2load_threads"]), log, timeout)
    n = max(c * m * 4, int(warm["rps"] * cfg["duration"]))
    t0, r0 = time.perf_counter(), read_trips(rtdir)
    r = run_h2load(h2load_argv(target, key, cfg["body"], c, m, n=n,
                               threads=cfg["h2load_threads"]), log, timeout)
    t1, r1 = time.perf_counter(), read_trips(rtdir)
    r.update(calls=r["succeeded"], trips=r1 - r0, trips_per_s=(r1 - r0) / (t1 - t0))
    return r


def windows(samples, limit, min_est) -> dict:
    """Split the walk at 90 % of the limit allowed and at exhaustion (not even the
    smallest estimate fits): decisions, allows, denies and round trips in each."""
    first90 = next((i for i, s in enumerate(samples) if s[3] >= 0.9 * limit),
                   len(samples) - 1)
    final = samples[-1][1]
    exhausted = next(i for i, s in enumerate(samples)
                     if limit - s[3] < min_est or s[1] == final)
    cuts = {"first 90% of headroom": (0, first90), "last 10% of headroom": (first90, exhausted),
            "at the limit (all denied)": (exhausted, len(samples) - 1)}
    out = {}
    for name, (a, b) in cuts.items():
        sa, sb = samples[a], samples[b]
        allows, denies = sb[1] - sa[1], sb[2] - sa[2]
        trips = sb[4] - sa[4]
        out[name] = {"seconds": sb[0] - sa[0], "allows": allows, "denies": denies,
                     "decisions": allows + denies, "trips": trips,
                     "decisions_per_trip": (allows + denies) / trips if trips else None,
                     "used_at_end": sb[3] / limit}
    return out


# ---------------------------------------------------------------- main


def banner() -> None:
    import google.protobuf
    import grpc
    import sqlalchemy
    from google.protobuf.internal import api_implementation

    import p402core

    try:
        import uvloop
        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio"
    try:
        import asyncpg
        apg = asyncpg.__version__
    except ImportError:
        apg = "not installed"
    pgv = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-Atc",
                          "SHOW server_version"], capture_output=True, text=True).stdout.strip()
    model = "?"
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    print("== p402 serve --workers: Authorize throughput 1 vs 2 workers; leasing cost")
    print(f"machine: {model}, {os.cpu_count()} cpus, {platform.platform()}")
    print(f"python {platform.python_version()}, grpcio {grpc.__version__}, protobuf "
          f"{google.protobuf.__version__} ({api_implementation.Type()}), {loop}, "
          f"SQLAlchemy {sqlalchemy.__version__}, asyncpg {apg}, PostgreSQL {pgv or '?'}, "
          f"p402core {getattr(p402core, 'IMPLEMENTATION', '?')}")


def parse_grid(text: str) -> list[tuple[int, int]]:
    """"4x32,16x100" -> [(4, 32), (16, 100)] (h2load connections x streams each)."""
    out = []
    for item in text.split(","):
        c, _, m = item.strip().partition("x")
        if not (c.isdigit() and m.isdigit() and int(c) > 0 and int(m) > 0):
            raise argparse.ArgumentTypeError(
                f"--h2load-grid: {item!r} is not CONNSxSTREAMS (e.g. 8x32)")
        out.append((int(c), int(m)))
    return out


def part1_python(cfg: dict, logdir: Path) -> tuple[dict, dict]:
    """Part 1 with the Python load generator -> (points by workers, summary)."""
    points = {1: [], 2: []}
    for rnd in range(cfg["rounds"]):
        for w in (1, 2):
            r = throughput_point(w, cfg, logdir)
            points[w].append(r)
            print(f"  round {rnd + 1}, {w} worker(s): {r['rps']:8.0f} calls/s "
                  f"({r['calls']} calls, {r['deny']} denied, {r['errors']} errors); cores "
                  f"used: server {r['server_cores']:.2f}, load generator "
                  f"{r['client_cores']:.2f}, PostgreSQL {r['postgres_cores']:.2f}, rest "
                  f"(kernel, other processes) {r['rest_cores']:.2f}; machine busy "
                  f"{r['machine_busy']:.0%}")
    return points, summarise(points)


def _held_all(p: dict) -> bool:
    """Every request of every try of this window succeeded and left a hold."""
    return p["new_holds"] == p["succeeded_all"] == p["n"]


def part1_h2load(cfg: dict, logdir: Path) -> tuple[dict, dict]:
    """Part 1 with h2load over every setting of the grid -> (points by workers, the
    summary: each worker count at its best setting)."""
    points = {1: [], 2: []}
    for r in throughput_points_h2load(cfg, logdir):
        w = r["workers"]
        points[w].append(r)
        split = "/".join(f"{x:.0%}" for x in r["worker_split"])
        ok = "" if _held_all(r) else "  MISMATCH"
        again = (f"; try {r['tries']}, rest in earlier tries "
                 + ", ".join(f"{x:.2f}" for x in r["rest_tries"][:-1])
                 if r["tries"] > 1 else "")
        print(f"  -c {r['conns']:2d} -m {r['streams']:3d} pair {r['pair'] + 1}, {w} "
              f"worker{'s' if w > 1 else ' '}: {r['rps']:5.0f} calls/s ({r['succeeded']} "
              f"ok, {r['failed'] + r['errored'] + r['timeout']} failed, {r['2xx']} 2xx; "
              f"store: {r['new_holds']} new holds for {r['succeeded_all']}{ok}); cores: "
              f"server {r['server_cores']:.2f} ({split}), h2load {r['client_cores']:.2f}"
              f", PostgreSQL {r['postgres_cores']:.2f}, rest {r['rest_cores']:.2f}"
              f"{' DISTURBED' if r['disturbed'] else ''}{again}")
    by_setting = {}
    for setting in cfg["grid"]:
        sub = {w: [p for p in points[w] if (p["conns"], p["streams"]) == setting]
               for w in points}
        clean = {w: [p for p in sub[w] if _held_all(p) and not p["disturbed"]]
                 for w in sub}
        # Paired ratios: windows k on each side ran back to back.
        pair = {w: {p["pair"]: p["rps"] for p in clean[w]} for w in clean}
        ratios = [pair[2][k] / pair[1][k] for k in pair[1] if k in pair[2]]
        by_setting[setting] = dict(
            summarise({w: clean[w] or sub[w] for w in sub}),
            clean={w: len(clean[w]) == len(sub[w]) for w in sub},
            paired_ratio=statistics.median(ratios) if ratios else None,
            pairs_used=len(ratios))
    print(f"Authorize throughput by h2load setting (median of {cfg['pairs']} window(s) "
          f"per side; paired = median of the pairs' 2/1 ratios; * = a window with a "
          f"call not ALLOWed and held, or disturbed by other processes: left out):")
    for (c, m), s in by_setting.items():
        mark = {w: " " if s["clean"][w] else "*" for w in (1, 2)}
        pr = f"{s['paired_ratio']:.2f}x" if s["paired_ratio"] else "-"
        print(f"  -c {c:2d} -m {m:3d} ({c * m:3d} in flight): 1 worker {s['rps'][1]:5.0f}"
              f"{mark[1]} 2 workers {s['rps'][2]:5.0f}{mark[2]} calls/s: "
              f"{s['ratio']:.2f}x, paired {pr}")
    # The figure: the median of every pair's 2/1 ratio, over all settings (the two
    # windows of a pair ran back to back, so the host's drift cancels); calls/s and
    # cores are medians and means over every clean window.
    clean = {w: [p for p in points[w] if _held_all(p) and not p["disturbed"]]
             or points[w] for w in points}
    pair = {w: {(p["conns"], p["streams"], p["pair"]): p["rps"] for p in clean[w]}
            for w in clean}
    ratios = [pair[2][k] / pair[1][k] for k in pair[1] if k in pair[2]]
    summary = dict(summarise(clean), ratio=statistics.median(ratios),
                   paired_ratios=ratios,
                   by_setting={f"{c}x{m}": v for (c, m), v in by_setting.items()})
    # Also each worker count at its own best setting (capacity vs capacity; the
    # setting that saturates 2 workers may overload 1): one lucky window moves it.
    best = {w: max(by_setting, key=lambda k: by_setting[k]["rps"][w]) for w in (1, 2)}
    cfg["far_setting"] = best[2]
    summary["best"] = {w: f"{best[w][0]}x{best[w][1]}" for w in (1, 2)}
    summary["best_rps"] = {w: by_setting[best[w]]["rps"][w] for w in (1, 2)}
    summary["best_ratio"] = summary["best_rps"][2] / summary["best_rps"][1]
    print(f"  each at its best setting: 1 worker {summary['best'][1]} "
          f"{summary['best_rps'][1]:.0f} calls/s, 2 workers {summary['best'][2]} "
          f"{summary['best_rps'][2]:.0f} calls/s: {summary['best_ratio']:.2f}x")
    allp = [p for w in points for p in points[w]]
    summary["mismatches"] = sum(not _held_all(p) for p in allp)
    summary["disturbed"] = sum(p["disturbed"] for p in allp)
    print(f"  checked: {sum(p['succeeded_all'] for p in allp)} h2load successes, "
          f"{sum(p['new_holds'] for p in allp)} new holds in the store; windows where "
          f"requests, successes and holds differ: {summary['mismatches']}; windows "
          f"still disturbed after {cfg['disturbed_retries']} re-run(s): "
          f"{summary['disturbed']}; Python-client Authorizes before and after, on "
          f"both servers: all ALLOW")
    return points, summary


def summarise(points: dict) -> dict:
    rps = {w: statistics.median(p["rps"] for p in points[w]) for w in points}
    mean = lambda key, w: statistics.mean(p[key] for p in points[w])  # noqa: E731
    return {"rps": rps, "ratio": rps[2] / rps[1],
            "server": {w: mean("server_cores", w) for w in points},
            "client": {w: mean("client_cores", w) for w in points},
            "other": {w: mean("other_cores", w) for w in points},
            "postgres": {w: mean("postgres_cores", w) for w in points},
            "rest": {w: mean("rest_cores", w) for w in points}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short windows (a smoke run)")
    have_h2load = shutil.which("h2load") is not None
    ap.add_argument("--driver", choices=["h2load", "python"],
                    default="h2load" if have_h2load else "python",
                    help="load generator (default: h2load when on PATH, else python)")
    ap.add_argument("--h2load-grid", type=parse_grid, default=None,
                    help="h2load settings to try, CONNSxSTREAMS,… (default "
                         f"{H2LOAD_GRID}; --quick: {H2LOAD_GRID_QUICK})")
    ap.add_argument("--h2load-threads", type=int, default=1)
    ns = ap.parse_args()
    if ns.driver == "h2load" and not have_h2load:
        raise SystemExit(f"--driver h2load: {H2LOAD_MISSING}; or use --driver python")
    cfg = {"procs": 3, "channels": 8, "in_flight": 64,
           "warmup": 1.0 if ns.quick else 2.0, "duration": 3.0 if ns.quick else 10.0,
           "rounds": 1 if ns.quick else 2, "near_k": 4000 if ns.quick else 20000,
           "at_limit": 1.0 if ns.quick else 2.0, "near_cap": 30.0 if ns.quick else 90.0,
           "driver": ns.driver}
    if ns.driver == "h2load":
        cfg.update(duration=2.0 if ns.quick else 2.5, h2load_threads=ns.h2load_threads,
                   disturbed_retries=1 if ns.quick else 2, pairs=1 if ns.quick else 4,
                   grid=ns.h2load_grid or parse_grid(
                       H2LOAD_GRID_QUICK if ns.quick else H2LOAD_GRID))
        cfg["timeout"] = cfg["duration"] * 6 + 30
    banner()
    logdir = Path(tempfile.mkdtemp(prefix="p402-bench-workers-"))
    if ns.driver == "h2load":
        req = representative_request()
        cfg["body"] = logdir / "authorize.grpc"
        cfg["body"].write_bytes(grpc_frame(req))
        h2v = subprocess.run(["h2load", "--version"], capture_output=True,
                             text=True).stdout.strip()
        print(f"load generator: {h2v}, {cfg['h2load_threads']} thread(s), one framed "
              f"AuthorizeRequest ({len(cfg['body'].read_bytes())} bytes: {req.model}, "
              f"input_bytes {req.input_bytes}, max_output_tokens {req.max_output_tokens})"
              f" repeated; settings (connections x streams each): "
              + ", ".join(f"{c}x{m}" for c, m in cfg["grid"])
              + f"; warm-up {round(cfg['warmup'])} s, then per setting {cfg['pairs']} "
              f"pair(s) of -n windows of ~{cfg['duration']} s, one on the 1-worker "
              f"server, one on the 2-worker server, back to back")
    else:
        if not have_h2load:
            print(f"note: {H2LOAD_MISSING}: using the Python load generator, which "
                  f"takes a large share of the cores the workers need")
        print(f"load generator: {cfg['procs']} processes x {cfg['channels']} connections, "
              f"{cfg['in_flight']} calls in flight each; warm-up {cfg['warmup']} s, window "
              f"{cfg['duration']} s; {cfg['rounds']} round(s) alternating 1 and 2 workers")
    print(f"server logs: {logdir}")
    busy = idle_check()
    cfg["idle_busy"] = busy
    print(f"machine busy before the run: {busy:.0%}"
          + ("" if busy < 0.10 else "  WARNING: something else is running: the "
             "numbers below share the cores with it (see 'rest')"))

    # Part 1.
    if ns.driver == "h2load":
        points, summ = part1_h2load(cfg, logdir)
        what = (f"h2load, every setting: calls/s the median of "
                f"{len(summ['paired_ratios'])} windows per side, 2 / 1 the median of "
                f"the {len(summ['paired_ratios'])} paired ratios")
    else:
        points, summ = part1_python(cfg, logdir)
        what = "median of rounds"
    rps, ratio = summ["rps"], summ["ratio"]
    srv1, srv2 = summ["server"][1], summ["server"][2]
    share2, other2 = summ["client"][2], summ["other"][2]
    print(f"Authorize throughput ({what}):")
    for w in (1, 2):
        print(f"  {w} worker{'s' if w > 1 else ' '}  {rps[w]:8.0f} calls/s  (cores: server "
              f"{summ['server'][w]:.2f}, load generator {summ['client'][w]:.2f}, "
              f"PostgreSQL {summ['postgres'][w]:.2f}, rest {summ['rest'][w]:.2f})")
    print(f"  2 / 1 workers: {ratio:.2f}x  (target >= {TARGET_RATIO})  "
          f"{'OK' if ratio >= TARGET_RATIO else 'MISS'}")
    ncpu = os.cpu_count() or 1
    eff = {w: rps[w] / max(summ["server"][w], 1e-9) for w in (1, 2)}
    # What 2 workers could reach here at 1 worker's cost per call: the cores left
    # to the server with 2 workers over the cores 1 worker uses (its Python thread
    # and gRPC core's threads: more than one core).
    ceiling = (ncpu - share2 - other2) / max(srv1, 1e-9)
    print(f"  server calls per server-core-second: 1 worker {eff[1]:.0f}, 2 workers "
          f"{eff[2]:.0f} ({eff[2] / eff[1]:.2f}x); the 2 workers got {srv2:.2f} of the "
          f"{ncpu} cores (load generator {share2:.2f}, PostgreSQL "
          f"{summ['postgres'][2]:.2f}, rest {summ['rest'][2]:.2f}); 1 worker alone used "
          f"{srv1:.2f}, so the ceiling here at equal cost per call is ({ncpu} - "
          f"{share2:.2f} load generator - {other2:.2f} all else) / {srv1:.2f} = "
          f"{ceiling:.2f}x")

    # Part 2.
    lc = leasing_cost(cfg, logdir)
    far = lc["far"]
    far_dpt = far["calls"] / far["trips"] if far["trips"] else None
    print(f"leasing cost (2 workers; LeaseManager.round_trips summed over workers):")
    print(f"  far from the limit (10^7 USD, full load): {far['calls']} decisions, "
          f"{far['trips']} round trips in {far['seconds']:.1f} s "
          f"({far['trips_per_s']:.1f} trips/s): "
          + (f"{far_dpt:.0f} decisions per round trip" if far_dpt else "no round trip"))
    print(f"  headroom left unallocated at the end of the walk (stranded in leases "
          f"smaller than a request, or never taken): {lc['stranded_nanos'] / USD:.6f} USD "
          f"= {lc['stranded_nanos'] / lc['mean_est_nanos']:.1f} mean estimates")
    print(f"  near the limit: budget of {lc['near_k']} mean estimates "
          f"({lc['limit_nanos'] / USD:.4f} USD), walked to exhaustion by Authorizes:")
    for name, w in lc["near"].items():
        dpt = w["decisions_per_trip"]
        print(f"    {name:27s} {w['decisions']:7d} decisions ({w['allows']} allowed, "
              f"{w['denies']} denied), {w['trips']:5d} round trips in {w['seconds']:.2f} s"
              f": {dpt:.1f} decisions per round trip" if dpt else
              f"    {name:27s} {w['decisions']:7d} decisions, 0 round trips")
    near = lc["near"]["last 10% of headroom"]
    at_limit = lc["near"]["at the limit (all denied)"]
    figures = [
        {"name": "Authorize calls/s, 2 workers / 1 worker ("
                 + ("h2load, median of paired windows" if ns.driver == "h2load"
                    else "Python load generator") + ")", "value": ratio,
         "target": f">= {TARGET_RATIO}", "met": ratio >= TARGET_RATIO,
         "measured": rps[2], "baseline": rps[1]},
    ]
    figures.append({"name": "server calls per server-core-second, 2 workers / 1 worker",
                    "value": eff[2] / eff[1], "target": "info", "met": True,
                    "measured": eff[2], "baseline": eff[1]})
    if far_dpt:
        figures.append({"name": "decisions per lease round trip, far from the limit",
                        "value": far_dpt, "target": "info", "met": True,
                        "measured": far["calls"], "baseline": far["trips"]})
    for key, w in (("last 10% of headroom", near), ("at the limit", at_limit)):
        if w["decisions_per_trip"]:
            figures.append({"name": f"decisions per lease round trip, {key}",
                            "value": w["decisions_per_trip"], "target": "info", "met": True,
                            "measured": w["decisions"], "baseline": w["trips"]})
    print("BENCH_JSON " + json.dumps({
        "bench": "workers", "figures": figures,
        "throughput": {str(w): points[w] for w in points}, "summary": summ,
        "leasing": lc, "config": cfg}, default=str))


if __name__ == "__main__":
    main()
