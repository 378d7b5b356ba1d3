"""Alembic environment for the P402 store (SQLite and PostgreSQL, one code path).

``Store.migrate()`` runs ``upgrade head`` programmatically and hands its own
connection over in ``config.attributes["connection"]``. From the command line
(``alembic -c server/p402_server/alembic.ini -x db=URL upgrade head``) this file
opens an async engine itself.
"""
from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.ext.asyncio import create_async_engine

from p402_server.ledger.schema import metadata

config = context.config


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def _run_sync(connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    from p402_server.ledger.engine import normalize_url

    url = context.get_x_argument(as_dictionary=True).get("db") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit("p402 migrations: pass the database as -x db=URL")
    return normalize_url(url)


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    engine = create_async_engine(_url())
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run_sync)
    finally:
        await engine.dispose()


connection = config.attributes.get("connection")
if connection is not None:
    _run_sync(connection)
elif context.is_offline_mode():
    run_offline()
else:
    asyncio.run(run_online())
