"""Store fixtures: every store test runs against SQLite (a file in tmp_path) and
PostgreSQL (one database per session, created fresh and dropped at the end; each test
starts from empty tables; migration tests get a database of their own).

PostgreSQL comes from ``P402_TEST_PG_URL`` (default
postgresql+asyncpg://postgres@127.0.0.1:5432/test: the database used to CREATE and
DROP the per-test databases). When it is unreachable the PostgreSQL half is skipped
with the reason, unless ``CI=true``: then it fails, because CI must test both.
"""
from __future__ import annotations

import asyncio
import os
import secrets

import pytest

PG_ADMIN_URL = os.environ.get(
    "P402_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_pg_state: dict[str, str | None] = {}


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _with_database(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_dsn(PG_ADMIN_URL), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _pg_unreachable() -> str | None:
    """None when PostgreSQL answers, else why not (checked once per session)."""
    if "reason" not in _pg_state:
        try:
            asyncio.run(_pg_admin("SELECT 1"))
            _pg_state["reason"] = None
        except Exception as exc:  # any failure to connect means "not available here"
            _pg_state["reason"] = f"PostgreSQL at {PG_ADMIN_URL} unreachable: {exc!r}"
    return _pg_state["reason"]


def require_postgres() -> None:
    reason = _pg_unreachable()
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true requires PostgreSQL: {reason}")
        pytest.skip(reason)


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def pg_session_url():
    """One migrated PostgreSQL database for the whole session (dropped at the end);
    tests share it and start from empty tables (see ``store_url``)."""
    require_postgres()
    name = "p402_test_" + secrets.token_hex(6)
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    url = _with_database(PG_ADMIN_URL, name)
    try:
        from p402_server.ledger import open_store

        async def migrate():
            s = await open_store(url)
            await s.close()

        asyncio.run(migrate())
        yield url
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _truncate_all(url: str) -> None:
    import asyncpg

    from p402_server.ledger import schema as S

    tables = ", ".join(t.name for t in S.metadata.sorted_tables)
    conn = await asyncpg.connect(_asyncpg_dsn(url), timeout=5)
    try:
        await conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path):
    """A migrated database with empty tables, for each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'p402.db'}"
        return
    url = request.getfixturevalue("pg_session_url")
    asyncio.run(_truncate_all(url))
    yield url


@pytest.fixture(params=BACKENDS)
def empty_store_url(request, tmp_path):
    """A database with nothing in it, not even the schema (migration tests)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    require_postgres()
    name = "p402_test_" + secrets.token_hex(6)
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(PG_ADMIN_URL, name)
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def backend(store_url) -> str:
    return "sqlite" if store_url.startswith("sqlite") else "postgresql"


@pytest.fixture
async def store(store_url):
    from p402_server.ledger import open_store

    s = await open_store(store_url)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def writer(store):
    from p402_server.ledger import GroupCommitWriter

    w = GroupCommitWriter(store)
    await w.start()
    try:
        yield w
    finally:
        await w.stop()


@pytest.fixture
async def tenant(store) -> str:
    return await store.create_tenant("acme")
