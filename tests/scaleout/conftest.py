"""Scale-out fixtures: a fresh PostgreSQL database per test, and `p402 serve --lease on`
replicas as subprocesses on loopback ports (issue 7).

PostgreSQL comes from P402_TEST_PG_URL (default postgresql+asyncpg://postgres@
127.0.0.1:5432/test, the database used to CREATE/DROP the per-test ones). Unreachable:
the test is skipped with the reason, unless CI=true (then it fails).
"""
from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("P402_TEST_PG_URL",
                              "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CLI = [sys.executable, "-c", "import sys; from p402_server.cli import main; sys.exit(main())"]


def asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(PG_ADMIN_URL), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def pg_url():
    """A fresh, migrated PostgreSQL database for this test (dropped afterwards)."""
    try:
        asyncio.run(_admin("SELECT 1"))
    except Exception as exc:  # any failure to connect: not available here
        reason = f"PostgreSQL at {PG_ADMIN_URL} unreachable: {exc!r}"
        if IN_CI:
            pytest.fail(f"CI=true requires PostgreSQL: {reason}")
        pytest.skip(reason)
    from sqlalchemy.engine import make_url

    name = "p402_scaleout_" + secrets.token_hex(6)
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    async def migrate():
        from p402_server.store import open_store

        s = await open_store(url)
        await s.close()

    try:
        asyncio.run(migrate())
        yield url
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "server"), str(ROOT / "clients" / "python")]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    env["P402_LOG_LEVEL"] = "WARNING"
    env.update(extra)
    return env


class Replica:
    """`p402 serve --db URL --listen 127.0.0.1:PORT --lease on` as a child process."""

    def __init__(self, db_url: str, env: dict[str, str], log_path: Path, port: int = 0,
                 extra_args: tuple = ()):
        self.port = port or free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*CLI, "serve", "--db", db_url, "--listen", self.target, "--lease", "on",
                 *extra_args],
                env=subprocess_env(env), stdout=log, stderr=log, cwd=ROOT)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"p402 serve exited with {self.proc.returncode} "
                                       f"(log {self.log_path}):\n"
                                       + self.log_path.read_text()[-3000:])
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.target} not SERVING after {timeout}s")
                time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture
def replicas(tmp_path):
    """Start replicas with `start(db_url, n, env)`; all are stopped at the end."""
    started: list[Replica] = []

    def start(db_url: str, n: int, env: dict[str, str]) -> list[Replica]:
        new = [Replica(db_url, env, tmp_path / f"replica{i}.log") for i in range(n)]
        started.extend(new)
        for r in new:
            r.wait_ready()
        return new

    yield start
    for r in started:
        r.stop()
