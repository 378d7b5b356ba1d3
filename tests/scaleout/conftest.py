"""Scale-out fixtures: a fresh PostgreSQL database per test, and `p402 serve --lease on`
replicas as subprocesses on loopback ports.

PostgreSQL comes from P402_TEST_PG_URL (default postgresql+asyncpg://postgres@
127.0.0.1:5432/test, the database used to CREATE/DROP the per-test ones). Unreachable:
the test is skipped with the reason, unless CI=true (then it fails).
"""
from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import pytest

from tests.proof.harness import ServerProcess

PG_ADMIN_URL = os.environ.get("P402_TEST_PG_URL",
                              "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


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
        from p402_server.ledger import open_store

        s = await open_store(url)
        await s.close()

    try:
        asyncio.run(migrate())
        yield url
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class Replica(ServerProcess):
    """`p402 serve --db URL --listen 127.0.0.1:PORT --lease on` as a child process,
    started at once (`wait_ready()` to wait for it)."""

    def __init__(self, db_url: str, env: dict[str, str], log_path: Path,
                 extra_args: tuple = ()):
        super().__init__(db_url, env=env, log_path=log_path,
                         extra_args=("--lease", "on", *extra_args))
        self.spawn()


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
