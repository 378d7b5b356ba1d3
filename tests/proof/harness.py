"""The proof harness: a real `p402 serve` subprocess and what the proofs read back.

Owns `ServerProcess` (start `p402 serve` on a SQLite file and a loopback port, wait
until it answers health checks, SIGKILL / SIGTERM it, restart it on the same ledger,
read its RSS from /proc), `init_tenant_sync` / `ledger_facts` (in-process store reads
done while the server is down or through a separate connection), `run_cli` (any `p402`
command as a subprocess) and small wire helpers (`usd`, `nanos`, `bearer`).

Everything binds 127.0.0.1 only; every loop in the proofs is bounded in count and
time. The server subprocess gets `P402_*` settings through its environment
(ServerConfig.from_env), so a proof can shorten the expiry sweep or the hold flush.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.type import money_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
USD = 1_000_000_000
MODEL = "gpt-4o-mini"

# `p402 …` without relying on an installed console script (the venv may run the tree).
CLI = [sys.executable, "-c", "import sys; from p402_server.cli import main; sys.exit(main())"]


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "server"), str(ROOT / "clients" / "python")]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    env.setdefault("P402_LOG_LEVEL", "WARNING")
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What `p402 serve` and `p402 proxy` print when their port is taken (listen.py). A port
# from free_port() can be taken again before the child binds it (by another test's
# server, or as the ephemeral port of an outgoing connection): the harness then starts
# the child again on another port rather than fail a test for a race of its own.
PORT_TAKEN = b"is already in use"
PORT_TRIES = 5


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on 127.0.0.1:`port` (Linux /proc):
    a connection alone may reach whoever took the port."""
    inodes = set()
    with open("/proc/net/tcp", encoding="ascii") as fh:
        next(fh)
        for line in fh:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{f[9]}]")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:  # exited
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:  # closed meanwhile
            pass
    return False


def lost_port_race(log_path: Path | None, offset: int) -> bool:
    """Whether the child whose log starts at `offset` of `log_path` exited because
    its port had been taken."""
    if not log_path:
        return False
    with open(log_path, "rb") as fh:
        fh.seek(offset)
        return PORT_TAKEN in fh.read()


def bearer(key: str) -> tuple:
    return (("authorization", f"Bearer {key}"),)


def usd(n: int) -> money_pb2.Money:
    units, rest = divmod(n, USD)
    return money_pb2.Money(currency_code="USD", units=units, nanos=rest)


def nanos(m) -> int:
    return m.units * USD + m.nanos


def run_cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 60.0
            ) -> subprocess.CompletedProcess:
    """`p402 ARGV…` as a subprocess -> CompletedProcess (text stdout/stderr)."""
    return subprocess.run([*CLI, *argv], env=subprocess_env(env), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def sqlite_url(path: Path | str) -> str:
    return f"sqlite+aiosqlite:///{path}"


class ServerProcess:
    """`p402 serve --db URL --listen 127.0.0.1:PORT` as a child process."""

    def __init__(self, db_url: str, *, env: dict[str, str] | None = None,
                 log_path: Path | None = None, extra_args: tuple = ()):
        self.db_url = db_url
        self.extra_args = tuple(extra_args)  # more `p402 serve` flags
        self.env = env or {}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0
        self._chose_port = False  # this spawn's port came from free_port()
        self._log_offset = 0      # where this spawn's lines start in the log

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0, *, same_port: bool = False) -> "ServerProcess":
        """spawn(), then wait_ready()."""
        self.spawn(same_port=same_port)
        self.wait_ready(timeout)
        return self

    def spawn(self, *, same_port: bool = False) -> "ServerProcess":
        """Start the process, without waiting for it: on a free port, or with
        `same_port` on the previous one (a restart its clients reconnect to)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._chose_port = not (same_port and self.port)
        if self._chose_port:
            self.port = free_port()
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self._log_offset = log.tell() if self.log_path else 0
            self.proc = subprocess.Popen(
                [*CLI, "serve", "--db", self.db_url, "--listen", self.target,
                 *self.extra_args],
                env=subprocess_env(self.env), stdout=log, stderr=log, cwd=ROOT)
        finally:
            if self.log_path:
                log.close()
        self.starts += 1
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll grpc.health.v1 until SERVING (the store is migrated and holds restored)."""
        deadline = time.monotonic() + timeout
        for attempt in range(PORT_TRIES):
            if self._ready_or_exited(deadline, timeout):
                return
            if (attempt + 1 == PORT_TRIES or not self._chose_port
                    or not lost_port_race(self.log_path, self._log_offset)):
                break
            self.starts -= 1  # the same start, on another port
            self.spawn()
        tail = Path(self.log_path).read_text()[-3000:] if self.log_path else ""
        raise RuntimeError(f"p402 serve exited with {self.proc.returncode} before it was "
                           f"ready (log: {self.log_path}):\n" + tail)

    def _ready_or_exited(self, deadline: float, timeout: float) -> bool:
        """Poll until SERVING (True) or the process exited (False); TimeoutError at
        `deadline`."""
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                if self.proc.poll() is not None:
                    return False
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return True
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"p402 serve not SERVING after {timeout}s")
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no flush, no graceful anything — the crash under test."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful: drain, write holds, flush the writer) -> exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kb(self) -> int:
        """VmRSS of the server process, in KiB (Linux /proc)."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS line")


def run_async(coro):
    """Run a coroutine to completion on a fresh loop (store reads between phases)."""
    return asyncio.run(coro)


async def _init_tenant(db_url: str, name: str) -> tuple[str, str]:
    from p402_server.ledger import open_store
    from p402_server.server import init_tenant

    store = await open_store(db_url)
    try:
        return await init_tenant(store, name)
    finally:
        await store.close()


async def init_tenant(db_url: str, name: str = "proof") -> tuple[str, str]:
    """A new tenant and its first admin key -> (tenant_id, api_key)."""
    return await _init_tenant(db_url, name)


@dataclass
class LedgerFacts:
    """What the ledger says about one tenant (read through a separate store)."""
    event_ids: list[str]            # in ledger (seq) order, with repeats if any
    kinds: dict[str, str]           # event_id -> kind
    costs: dict[str, int]           # event_id -> cost_nanos
    reservations: dict[str, list[str]]  # reservation_id -> event ids that settled it
    count: int
    chain_head: tuple[int, str]
    budget_totals: dict
    recomputed_totals: dict
    chain_ok: bool
    chain_reason: str


async def _ledger_facts(db_url: str, tenant_id: str) -> LedgerFacts:
    from p402_server.ledger import open_store

    store = await open_store(db_url, create=False)
    try:
        ids, kinds, costs, res = [], {}, {}, {}
        async for ev in store.iter_events(tenant_id):
            ids.append(ev.event_id)
            kinds[ev.event_id] = ev.kind
            costs[ev.event_id] = ev.cost_nanos
            if ev.reservation_id:
                res.setdefault(ev.reservation_id, []).append(ev.event_id)
        v = await store.verify_chain(tenant_id)
        return LedgerFacts(
            event_ids=ids, kinds=kinds, costs=costs, reservations=res,
            count=await store.count_events(tenant_id),
            chain_head=await store.chain_head(tenant_id),
            budget_totals=await store.budget_totals(tenant_id),
            recomputed_totals=await store.recompute_budget_totals(tenant_id),
            chain_ok=v.ok, chain_reason=v.reason or "")
    finally:
        await store.close()


async def ledger_facts(db_url: str, tenant_id: str) -> LedgerFacts:
    return await _ledger_facts(db_url, tenant_id)


def nonzero(totals: dict) -> dict:
    """Budget totals without zero entries (a period row at 0 and a missing one agree)."""
    return {k: v for k, v in totals.items() if v}


# ---------------------------------------------------------------- wire helpers

def stubs(channel):
    """(MeterServiceStub, AdminServiceStub) on one channel."""
    from p402.v1 import admin_pb2_grpc, meter_pb2_grpc

    return meter_pb2_grpc.MeterServiceStub(channel), admin_pb2_grpc.AdminServiceStub(channel)


async def put_budget(admin, key: str, budget_id: str, limit_nanos: int, *,
                     scope: dict[str, str] | None = None, period: str = "TOTAL",
                     hard: bool = True):
    from p402.v1 import admin_pb2, common_pb2

    b = admin_pb2.Budget(
        budget_id=budget_id, scope=scope or {}, limit=usd(limit_nanos),
        period=getattr(common_pb2, f"PERIOD_{period}"),
        enforcement=common_pb2.ENFORCEMENT_HARD if hard else common_pb2.ENFORCEMENT_SOFT)
    return await admin.PutBudget(admin_pb2.PutBudgetRequest(budget=b), metadata=bearer(key))


async def create_key(admin, admin_key: str, *scopes: str) -> str:
    from p402.v1 import admin_pb2

    r = await admin.CreateKey(admin_pb2.CreateKeyRequest(
        name="proof", scopes=[getattr(admin_pb2, f"SCOPE_{s.upper()}") for s in scopes]),
        metadata=bearer(admin_key))
    return r.api_key


async def budget_statuses(admin, key: str) -> dict[str, tuple[int, int, int, int]]:
    """budget_id -> (limit, committed, held, period_start_ms), every page."""
    from p402.v1 import admin_pb2

    out, token = {}, ""
    while True:
        r = await admin.ListBudgets(admin_pb2.ListBudgetsRequest(page_token=token),
                                    metadata=bearer(key))
        for b in r.budgets:
            s = b.status
            out[b.budget_id] = (nanos(b.limit), nanos(s.committed), nanos(s.held),
                                s.period_start_time_ms)
        token = r.next_page_token
        if not token:
            return out
