"""The Store: one async SQLAlchemy engine and every read/write the server needs except
the event write path (which is ``writer.GroupCommitWriter``'s).

Owns URL handling (``open_store``), connection setup (SQLite pragmas on every
connection), migrations (``migrate``), tenants, API keys, per-tenant config (budgets,
policies, prices, settings, and the tenant's config version that every write of them
bumps in its own transaction), write-behind holds, budget totals and the ledger queries.

One room, though long: `Store` is the ledger's one object for every read and write
besides the event path; several of its transactions touch tenants, config and holds
together, which a split by table would scatter.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import string
import time
from typing import Any, AsyncIterator, Callable, Iterable, Mapping

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from p402_server.ledger import queries as Q
from p402_server.ledger import schema as S
from p402_server.ledger.canonical import GENESIS, ChainVerifier, VerifyResult
from p402_server.ledger.model import (
    HOLD_COLUMNS,
    Content,
    EventFilter,
    KeyInfo,
    LedgerEvent,
    SpendRow,
    Tenant,
    from_row,
    hold_row,
)
from p402core._enums import OWNER_KEYS, InvalidArgument, NotFound

MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "migrations")

KEY_PREFIX = "p402_"
KEY_RANDOM_CHARS = 40
KEY_PREFIX_LEN = 12  # what is stored in clear and shown in listings
SCOPES = ("meter", "read", "admin")
SQLITE_BUSY_TIMEOUT_MS = 5000

_BASE62 = string.digits + string.ascii_letters


def _random_base62(n: int) -> str:
    return "".join(secrets.choice(_BASE62) for _ in range(n))


def hash_key(plaintext: str) -> str:
    """SHA-256 hex of an API key: what the store keeps instead of the key."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def normalize_url(url: str) -> str:
    """The async-driver form of a database URL, or InvalidArgument naming ``db``.

    ``sqlite:///x.db`` → ``sqlite+aiosqlite:///x.db``; ``postgresql://…`` (and
    ``postgres://``, ``postgresql+psycopg2://``) → ``postgresql+asyncpg://…``."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidArgument("db", "a database URL is required (sqlite:///p402.db or postgresql://…)")
    url = url.strip()
    if url.startswith("postgres://"):  # Heroku-style alias
        url = "postgresql://" + url[len("postgres://"):]
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidArgument("db", f"not a database URL: {url!r}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif backend == "postgresql":
        parsed = parsed.set(drivername="postgresql+asyncpg")
    else:
        raise InvalidArgument(
            "db", f"unsupported database {backend!r}: use sqlite:///FILE or postgresql://…"
        )
    return parsed.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # Durability contract: a write acknowledged by the writer is on disk (FULL fsyncs
    # the WAL at every commit). WAL lets readers run beside the writer.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.close()


def _default_clock() -> int:
    return time.time_ns() // 1_000_000


async def open_store(
    url: str,
    *,
    create: bool = True,
    clock: Callable[[], int] | None = None,
    echo: bool = False,
) -> "Store":
    """Open the database at ``url``; with ``create`` (default) migrate it to head."""
    real = normalize_url(url)
    parsed = make_url(real)
    kw: dict[str, Any] = {"echo": echo}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            # One shared connection, or every pooled connection sees its own empty db.
            kw["poolclass"] = StaticPool
        else:
            directory = os.path.dirname(os.path.abspath(parsed.database))
            if not os.path.isdir(directory):
                raise InvalidArgument("db", f"directory {directory!r} does not exist")
    else:
        kw["pool_pre_ping"] = True
    engine = create_async_engine(real, **kw)
    if engine.dialect.name == "sqlite":
        sa_event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    store = Store(engine, clock=clock)
    if create:
        try:
            await store.migrate()
        except BaseException:
            await engine.dispose()
            raise
    return store


class Store:
    """Async access to one P402 database. Create with ``open_store``; all methods are
    coroutines and scope everything by ``tenant_id``."""

    def __init__(self, engine: AsyncEngine, *, clock: Callable[[], int] | None = None):
        self.engine = engine
        self.dialect = engine.dialect.name
        self.now_ms = clock or _default_clock
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        self._insert = insert
        # SQLite lets one connection write at a time, and its busy handler is not fair:
        # a connection polling for the lock (sleeps of up to 100 ms) can starve behind
        # the group-commit writer's back-to-back transactions past busy_timeout
        # ("database is locked"). In this process every write therefore takes its turn
        # here first (an asyncio.Lock: first come, first served), the writer's
        # transactions included (GroupCommitWriter), and SQLite's lock is free when
        # it is reached. Other processes on the same file still wait on SQLite's.
        self.write_turn: asyncio.Lock | None = (
            asyncio.Lock() if self.dialect == "sqlite" else None)

    @contextlib.asynccontextmanager
    async def _begin(self):
        """``engine.begin()``, after this process's turn to write (`write_turn`)."""
        async with self.write_turn or contextlib.nullcontext():
            async with self.engine.begin() as conn:
                yield conn

    # -- lifecycle -------------------------------------------------------------------

    async def migrate(self) -> None:
        """Alembic ``upgrade head`` on this database (idempotent)."""

        def upgrade(sync_conn) -> None:
            from alembic import command
            from alembic.config import Config

            cfg = Config()
            cfg.set_main_option("script_location", MIGRATIONS_DIR)
            cfg.attributes["connection"] = sync_conn
            command.upgrade(cfg, "head")

        async with self._begin() as conn:
            await conn.run_sync(upgrade)

    async def schema_revision(self) -> str | None:
        """The Alembic revision the database is at (None before any migration)."""

        def current(sync_conn):
            from alembic.runtime.migration import MigrationContext

            return MigrationContext.configure(sync_conn).get_current_revision()

        async with self.engine.connect() as conn:
            return await conn.run_sync(current)

    async def close(self) -> None:
        """Close every pooled connection. Stop any GroupCommitWriter first."""
        await self.engine.dispose()

    # -- tenants ---------------------------------------------------------------------

    async def create_tenant(self, name: str, *, settings: Mapping[str, Any] | None = None) -> str:
        """Create a tenant; returns its id (``t_`` + 16 base62 characters)."""
        if not isinstance(name, str) or not name.strip():
            raise InvalidArgument("name", "a tenant needs a name")
        tenant_id = "t_" + _random_base62(16)
        async with self._begin() as conn:
            await conn.execute(
                S.tenants.insert().values(
                    tenant_id=tenant_id,
                    name=name,
                    created_ms=self.now_ms(),
                    settings=json.dumps(dict(settings or {}), sort_keys=True),
                )
            )
        return tenant_id

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(sa.select(S.tenants).where(S.tenants.c.tenant_id == tenant_id))
            ).mappings().first()
        if row is None:
            return None
        return Tenant(row["tenant_id"], row["name"], int(row["created_ms"]), json.loads(row["settings"]))

    async def list_tenants(self) -> list[Tenant]:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(sa.select(S.tenants).order_by(S.tenants.c.created_ms, S.tenants.c.tenant_id))
            ).mappings().all()
        return [Tenant(r["tenant_id"], r["name"], int(r["created_ms"]), json.loads(r["settings"])) for r in rows]

    async def get_settings(self, tenant_id: str) -> dict[str, Any]:
        """The tenant's settings dict; NotFound for an unknown tenant."""
        tenant = await self.get_tenant(tenant_id)
        if tenant is None:
            raise NotFound("tenant", tenant_id)
        return tenant.settings

    async def put_settings(self, tenant_id: str, settings: Mapping[str, Any]) -> None:
        """Replace the tenant's settings (a JSON-serialisable mapping); bumps the
        tenant's config version in the same statement."""
        if not isinstance(settings, Mapping):
            raise InvalidArgument("settings", "must be a mapping")
        text = json.dumps(dict(settings), sort_keys=True)
        t = S.tenants
        async with self._begin() as conn:
            res = await conn.execute(
                t.update().where(t.c.tenant_id == tenant_id)
                .values(settings=text, config_version=t.c.config_version + 1)
            )
        if res.rowcount != 1:
            raise NotFound("tenant", tenant_id)

    async def config_versions(self, tenant_ids: Iterable[str]) -> dict[str, int]:
        """{tenant_id: config version} for those of ``tenant_ids`` that exist. The
        version moves with every committed write of the tenant's budgets, policies,
        prices or settings (scale-out: how a process learns its engine is stale).
        One primary-key query per 500 ids."""
        ids = sorted(set(tenant_ids))
        t = S.tenants
        out: dict[str, int] = {}
        async with self.engine.connect() as conn:
            for i in range(0, len(ids), 500):
                rows = (
                    await conn.execute(
                        sa.select(t.c.tenant_id, t.c.config_version)
                        .where(t.c.tenant_id.in_(ids[i : i + 500]))
                    )
                ).all()
                out.update((tid, int(v)) for tid, v in rows)
        return out

    # -- API keys --------------------------------------------------------------------

    async def create_key(
        self, tenant_id: str, scopes: Iterable[str] | str, name: str = ""
    ) -> tuple[KeyInfo, str]:
        """A new key for the tenant: (its KeyInfo, the plaintext). The plaintext is
        returned once and never stored: only its first 12 characters and SHA-256."""
        scope_set = _check_scopes(scopes)
        if not isinstance(name, str):
            raise InvalidArgument("name", "must be a str")
        plaintext = KEY_PREFIX + _random_base62(KEY_RANDOM_CHARS)
        info = KeyInfo(
            key_id="k_" + _random_base62(16),
            tenant_id=tenant_id,
            name=name,
            prefix=plaintext[:KEY_PREFIX_LEN],
            scopes=scope_set,
            created_ms=self.now_ms(),
        )
        async with self._begin() as conn:
            await self._require_tenant(conn, tenant_id)
            await conn.execute(
                S.api_keys.insert().values(
                    key_id=info.key_id,
                    tenant_id=tenant_id,
                    name=name,
                    prefix=info.prefix,
                    key_hash=hash_key(plaintext),
                    scopes=",".join(sorted(scope_set)),
                    created_ms=info.created_ms,
                )
            )
        return info, plaintext

    async def find_key(self, plaintext: str, *, include_revoked: bool = False) -> KeyInfo | None:
        """The key with this plaintext, or None. Revoked keys are None unless
        ``include_revoked`` (revocation takes effect at once)."""
        if not isinstance(plaintext, str) or not plaintext.startswith(KEY_PREFIX):
            return None
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(S.api_keys).where(S.api_keys.c.key_hash == hash_key(plaintext))
                )
            ).mappings().first()
        if row is None:
            return None
        info = _key_info(row)
        if info.revoked and not include_revoked:
            return None
        return info

    async def list_keys(self, tenant_id: str, *, include_revoked: bool = True) -> list[KeyInfo]:
        k = S.api_keys
        stmt = sa.select(k).where(k.c.tenant_id == tenant_id)
        if not include_revoked:
            stmt = stmt.where(k.c.revoked_ms.is_(None))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt.order_by(k.c.created_ms, k.c.key_id))).mappings().all()
        return [_key_info(r) for r in rows]

    async def revoke_key(self, tenant_id: str, key_id: str) -> bool:
        """Revoke the tenant's key; False when this tenant has no such key. Revoking
        twice keeps the first revocation time and returns True."""
        k = S.api_keys
        async with self._begin() as conn:
            res = await conn.execute(
                k.update()
                .where(k.c.tenant_id == tenant_id, k.c.key_id == key_id)
                .values(revoked_ms=sa.func.coalesce(k.c.revoked_ms, self.now_ms()))
            )
        return res.rowcount == 1

    async def touch_key(self, key_id: str, now_ms: int | None = None) -> None:
        """Record that the key was used (best effort, for listings)."""
        k = S.api_keys
        async with self._begin() as conn:
            await conn.execute(
                k.update().where(k.c.key_id == key_id).values(
                    last_used_ms=self.now_ms() if now_ms is None else now_ms
                )
            )

    # -- per-tenant config: budgets, policies, prices ----------------------------------

    async def put_budget(self, tenant_id: str, budget_id: str, spec: Mapping[str, Any]) -> None:
        await self._put_spec(S.budgets, "budget_id", tenant_id, budget_id, spec)

    async def get_budget(self, tenant_id: str, budget_id: str) -> dict[str, Any] | None:
        return await self._get_spec(S.budgets, tenant_id, budget_id)

    async def delete_budget(self, tenant_id: str, budget_id: str) -> bool:
        return await self._delete_spec(S.budgets, tenant_id, budget_id)

    async def list_budgets(self, tenant_id: str) -> dict[str, dict[str, Any]]:
        return await self._list_specs(S.budgets, tenant_id)

    async def put_policy(self, tenant_id: str, policy_id: str, spec: Mapping[str, Any]) -> None:
        await self._put_spec(S.policies, "policy_id", tenant_id, policy_id, spec)

    async def get_policy(self, tenant_id: str, policy_id: str) -> dict[str, Any] | None:
        return await self._get_spec(S.policies, tenant_id, policy_id)

    async def delete_policy(self, tenant_id: str, policy_id: str) -> bool:
        return await self._delete_spec(S.policies, tenant_id, policy_id)

    async def list_policies(self, tenant_id: str) -> dict[str, dict[str, Any]]:
        return await self._list_specs(S.policies, tenant_id)

    async def put_price(self, tenant_id: str, model: str, spec: Mapping[str, Any]) -> None:
        await self._put_spec(S.prices, "model", tenant_id, model, spec)

    async def put_prices(self, tenant_id: str, specs: Mapping[str, Mapping[str, Any]]) -> None:
        """Upsert many prices ({model: spec}) in one transaction and one config
        version (an import: other processes never reload half of it)."""
        await self._put_specs(S.prices, "model", tenant_id, specs)

    async def get_price(self, tenant_id: str, model: str) -> dict[str, Any] | None:
        return await self._get_spec(S.prices, tenant_id, model)

    async def delete_price(self, tenant_id: str, model: str) -> bool:
        return await self._delete_spec(S.prices, tenant_id, model)

    async def list_prices(self, tenant_id: str) -> dict[str, dict[str, Any]]:
        return await self._list_specs(S.prices, tenant_id)

    async def _put_spec(self, table, id_field: str, tenant_id: str, ident: str, spec) -> None:
        await self._put_specs(table, id_field, tenant_id, {ident: spec})

    async def _put_specs(self, table, id_field: str, tenant_id: str, specs) -> None:
        now = self.now_ms()
        rows = []
        for ident, spec in specs.items():
            if not isinstance(ident, str) or not ident:
                raise InvalidArgument(id_field, "must be a non-empty str")
            if not isinstance(spec, Mapping):
                raise InvalidArgument("spec", "must be a mapping (the object's to_dict())")
            try:
                text = json.dumps(dict(spec), sort_keys=True)
            except (TypeError, ValueError) as exc:
                raise InvalidArgument("spec", f"not JSON-serialisable: {exc}") from None
            rows.append({"tenant_id": tenant_id, "id": ident, "spec": text,
                         "updated_ms": now})
        if not rows:
            return
        ins = self._insert(table)
        stmt = ins.on_conflict_do_update(
            index_elements=[table.c.tenant_id, table.c.id],
            set_={"spec": ins.excluded.spec, "updated_ms": ins.excluded.updated_ms},
        )
        async with self._begin() as conn:
            if not await self._bump_config_version(conn, tenant_id):
                raise NotFound("tenant", tenant_id)
            await conn.execute(stmt, rows)

    async def _get_spec(self, table, tenant_id: str, ident: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            text = (
                await conn.execute(
                    sa.select(table.c.spec).where(table.c.tenant_id == tenant_id, table.c.id == ident)
                )
            ).scalar()
        return None if text is None else json.loads(text)

    async def _delete_spec(self, table, tenant_id: str, ident: str) -> bool:
        try:
            async with self._begin() as conn:
                await self._bump_config_version(conn, tenant_id)
                res = await conn.execute(
                    table.delete().where(table.c.tenant_id == tenant_id, table.c.id == ident)
                )
                if res.rowcount != 1:
                    raise _Unchanged  # rolls the bump back: nothing was deleted
        except _Unchanged:
            return False
        return True

    async def _bump_config_version(self, conn, tenant_id: str) -> bool:
        """config_version + 1 in the caller's transaction; False for an unknown tenant.
        Every config write bumps FIRST, so on PostgreSQL concurrent writers of one
        tenant lock its tenants row before any config row (one order, no deadlock)."""
        t = S.tenants
        res = await conn.execute(
            t.update().where(t.c.tenant_id == tenant_id)
            .values(config_version=t.c.config_version + 1)
        )
        return res.rowcount == 1

    async def _list_specs(self, table, tenant_id: str) -> dict[str, dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(table.c.id, table.c.spec)
                    .where(table.c.tenant_id == tenant_id)
                    .order_by(table.c.id)
                )
            ).all()
        return {ident: json.loads(text) for ident, text in rows}

    async def _require_tenant(self, conn, tenant_id: str) -> None:
        found = (
            await conn.execute(
                sa.select(S.tenants.c.tenant_id).where(S.tenants.c.tenant_id == tenant_id)
            )
        ).first()
        if found is None:
            raise NotFound("tenant", tenant_id)

    # -- holds (write-behind of open reservations) -----------------------------------

    async def save_holds(
        self,
        tenant_id: str,
        upserts: Iterable[tuple[str, int, Mapping[str, Any]]] = (),
        deletes: Iterable[str] = (),
        maker: str = "",
    ) -> None:
        """Upsert ``(reservation_id, expires_ms, data)`` and delete reservation ids, in
        one transaction. ``data`` is the engine's hold snapshot (opaque JSON);
        ``maker`` the process that made the holds (leases on; "" otherwise)."""
        rows = [hold_row(tenant_id, rid, expires_ms, json.dumps(data, sort_keys=True),
                         maker, (data.get("hold") or {}))
                for rid, expires_ms, data in upserts]
        await self.save_hold_rows(tenant_id, rows, deletes)

    async def save_hold_rows(self, tenant_id: str, rows: list[tuple],
                             deletes: Iterable[str] = ()) -> None:
        """`save_holds` with the rows already made (`hold_row`: HOLD_COLUMNS' values,
        the data as JSON text), deletes first, in one transaction."""
        h = S.holds
        deletes = list(deletes)
        if not rows and not deletes:
            return
        async with self._begin() as conn:
            if deletes:
                for i in range(0, len(deletes), 500):
                    await conn.execute(
                        h.delete().where(
                            h.c.tenant_id == tenant_id, h.c.reservation_id.in_(deletes[i : i + 500])
                        )
                    )
            if rows:
                ins = self._insert(h)
                await conn.execute(
                    ins.on_conflict_do_update(
                        index_elements=[h.c.tenant_id, h.c.reservation_id],
                        set_={name: ins.excluded[name] for name in HOLD_COLUMNS[2:]},
                    ),
                    [dict(zip(HOLD_COLUMNS, row)) for row in rows],
                )

    async def hold_tenants(self) -> list[str]:
        """The tenants that have saved holds."""
        h = S.holds
        async with self.engine.connect() as conn:
            rows = (await conn.execute(
                sa.select(h.c.tenant_id).distinct().order_by(h.c.tenant_id))).all()
        return [t for (t,) in rows]

    async def load_holds(self, tenant_id: str) -> list[tuple[str, int, dict[str, Any]]]:
        """Every saved hold of the tenant: ``(reservation_id, expires_ms, data)``."""
        h = S.holds
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(h.c.reservation_id, h.c.expires_ms, h.c.data)
                    .where(h.c.tenant_id == tenant_id)
                    .order_by(h.c.reservation_id)
                )
            ).all()
        return [(rid, int(exp), json.loads(data)) for rid, exp, data in rows]

    async def get_hold(self, tenant_id: str, reservation_id: str) -> dict[str, Any] | None:
        """The saved hold ``reservation_id`` (its data, as ``save_holds`` took it, with
        the process that made it under the key "maker"), or None."""
        h = S.holds
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(h.c.data, h.c.maker).where(
                        h.c.tenant_id == tenant_id, h.c.reservation_id == reservation_id
                    )
                )
            ).first()
        if row is None:
            return None
        data = json.loads(row[0])
        data["maker"] = row[1]
        return data

    # -- processes and settlement notices (several processes on one ledger) ----------

    async def heartbeat(self, process_id: str, expires_ms: int, now_ms: int) -> None:
        """Register process ``process_id`` as alive until ``expires_ms`` (upsert)."""
        p = S.processes
        ins = self._insert(p).values(process_id=process_id, started_ms=int(now_ms),
                                     expires_ms=int(expires_ms))
        async with self._begin() as conn:
            await conn.execute(ins.on_conflict_do_update(
                index_elements=[p.c.process_id], set_={"expires_ms": ins.excluded.expires_ms}))

    async def process_alive(self, process_id: str, now_ms: int) -> bool:
        """Is ``process_id`` registered and not past its expiry?"""
        p = S.processes
        async with self.engine.connect() as conn:
            exp = (await conn.execute(
                sa.select(p.c.expires_ms).where(p.c.process_id == process_id))).scalar()
        return exp is not None and int(exp) > now_ms

    async def dead_holds(self, now_ms: int, limit: int = 500
                         ) -> list[tuple[str, str, int, dict[str, Any], str]]:
        """Saved holds past their expiry whose maker is a process that stopped
        renewing (dead): ``(tenant_id, reservation_id, expires_ms, data, maker)``,
        oldest first, at most ``limit``."""
        h, p = S.holds, S.processes
        q = (sa.select(h.c.tenant_id, h.c.reservation_id, h.c.expires_ms, h.c.data, h.c.maker)
             .select_from(h.join(p, p.c.process_id == h.c.maker))
             .where(h.c.maker != "", h.c.expires_ms <= now_ms, p.c.expires_ms <= now_ms)
             .order_by(h.c.expires_ms).limit(limit))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [(t, r, int(e), json.loads(d), m) for t, r, e, d, m in rows]

    async def holds_of(self, tenant_id: str, maker: str) -> int:
        """How many saved holds of the tenant process ``maker`` made (still open)."""
        h = S.holds
        async with self.engine.connect() as conn:
            return int((await conn.execute(
                sa.select(sa.func.count()).select_from(h)
                .where(h.c.tenant_id == tenant_id, h.c.maker == maker))).scalar() or 0)

    async def prune_processes(self, before_ms: int) -> int:
        """Forget processes dead since before ``before_ms`` that have no saved hold
        left, and the notices nobody will take for them."""
        p, h, n = S.processes, S.holds, S.settle_notices
        async with self._begin() as conn:
            gone = [r[0] for r in (await conn.execute(
                sa.select(p.c.process_id).where(
                    p.c.expires_ms < before_ms,
                    ~sa.exists().where(h.c.maker == p.c.process_id)))).all()]
            for i in range(0, len(gone), 500):
                chunk = gone[i : i + 500]
                await conn.execute(n.delete().where(n.c.maker.in_(chunk)))
                await conn.execute(p.delete().where(p.c.process_id.in_(chunk)))
        return len(gone)

    async def leave_notices(self, rows: Iterable[tuple[str, str, str, str, int]],
                            now_ms: int) -> None:
        """Notices ``(tenant_id, reservation_id, maker, event_id, cost_nanos)``: the
        reservation, made by ``maker``, was settled by event ``event_id`` elsewhere."""
        n = S.settle_notices
        values = [{"tenant_id": t, "reservation_id": r, "maker": m, "event_id": e,
                   "cost_nanos": int(c), "created_ms": int(now_ms)} for t, r, m, e, c in rows]
        if not values:
            return
        async with self._begin() as conn:
            await conn.execute(self._insert(n).on_conflict_do_nothing(), values)

    async def take_notices(self, maker: str) -> list[tuple[str, str, str, int]]:
        """Remove and return the notices left for process ``maker``:
        ``(tenant_id, reservation_id, event_id, cost_nanos)``."""
        n = S.settle_notices
        async with self.engine.connect() as conn:  # a read first: usually none
            if (await conn.execute(sa.select(n.c.reservation_id)
                                   .where(n.c.maker == maker).limit(1))).first() is None:
                return []
        async with self._begin() as conn:
            rows = (await conn.execute(
                n.delete().where(n.c.maker == maker)
                .returning(n.c.tenant_id, n.c.reservation_id, n.c.event_id,
                           n.c.cost_nanos))).all()
        return [(t, r, e, int(c)) for t, r, e, c in rows]

    async def store_budget_status(self, tenant_id: str
                                  ) -> tuple[dict[tuple[str, int], int], dict[str, int]]:
        """The store-level truth for budget status across processes: committed
        nano-USD per (budget_id, period_start_ms) from the ledger, and the nano-USD
        held per budget by every saved open hold (each process writes its holds
        behind)."""
        committed = await self.budget_totals(tenant_id)
        h = S.holds
        held: dict[str, int] = {}
        async with self.engine.connect() as conn:
            rows = (await conn.execute(
                sa.select(h.c.budget_ids, sa.func.sum(h.c.amount_nanos))
                .where(h.c.tenant_id == tenant_id).group_by(h.c.budget_ids))).all()
        for ids, amount in rows:
            for bid in json.loads(ids or "[]"):
                held[bid] = held.get(bid, 0) + int(amount or 0)
        return committed, held

    async def prune_hold_claims(self, before_ms: int) -> int:
        """Delete settlement claims (hold_claims, written by the group-commit writer)
        made before ``before_ms``: their events are long in the ledger, where a later
        Record or Release finds them first."""
        c = S.hold_claims
        async with self._begin() as conn:
            res = await conn.execute(c.delete().where(c.c.claimed_ms < int(before_ms)))
        return int(res.rowcount or 0)

    # -- budget totals -----------------------------------------------------------------

    async def budget_totals(self, tenant_id: str) -> dict[tuple[str, int], int]:
        """Committed nano-USD per (budget_id, period_start_ms), from budget_periods
        (written in the same transactions as the events, so consistent with them)."""
        bp = S.budget_periods
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(bp.c.budget_id, bp.c.period_start_ms, bp.c.committed_nanos).where(
                        bp.c.tenant_id == tenant_id
                    )
                )
            ).all()
        return {(b, int(p)): int(c) for b, p, c in rows}

    async def recompute_budget_totals(self, tenant_id: str) -> dict[tuple[str, int], int]:
        """The same totals recomputed from the events' budget_charges and the budgets'
        openings (verification)."""
        ev, bo = S.events, S.budget_openings
        totals: dict[tuple[str, int], int] = {}
        async with self.engine.connect() as conn:
            for b, p, n in (await conn.execute(
                    sa.select(bo.c.budget_id, bo.c.period_start_ms, bo.c.opening_nanos)
                    .where(bo.c.tenant_id == tenant_id))).all():
                totals[(b, int(p))] = int(n)
        after = 0
        while True:
            async with self.engine.connect() as conn:
                rows = (
                    await conn.execute(
                        sa.select(ev.c.seq, ev.c.cost_nanos, ev.c.budget_charges)
                        .where(
                            ev.c.tenant_id == tenant_id,
                            ev.c.seq > after,
                            ev.c.budget_charges != "[]",
                            ev.c.cost_nanos != 0,
                        )
                        .order_by(ev.c.seq)
                        .limit(5000)
                    )
                ).all()
            if not rows:
                return totals
            for seq, cost, charges in rows:
                for budget_id, period_start_ms in json.loads(charges):
                    key = (budget_id, int(period_start_ms))
                    totals[key] = totals.get(key, 0) + int(cost)
            after = rows[-1][0]

    async def open_budget_period(self, tenant_id: str, budget_id: str, period_start_ms: int,
                                 until_ms: int, owners: Mapping[str, str],
                                 matches: Callable[[Mapping[str, str], dict], bool] | None
                                 ) -> int | None:
        """Start a budget's period from the spend already in the ledger, when the
        budget has no total for that period yet (it is new, or new to the period).

        Sums the cost of the tenant's events with ``period_start_ms <= event_ms <=
        until_ms`` whose owners equal ``owners`` (and, when ``matches`` is given, for
        which ``matches(owners, labels)`` holds: label conditions), writes it as the
        period's budget_periods total and as a budget_openings row, in one
        transaction, and returns it. Returns None, changing nothing, when the period
        already has a total: its events were charged to the budget as they came."""
        ev, bp, bo = S.events, S.budget_periods, S.budget_openings
        key = (bp.c.tenant_id == tenant_id, bp.c.budget_id == budget_id,
               bp.c.period_start_ms == period_start_ms)
        conds = [ev.c.tenant_id == tenant_id, ev.c.event_ms >= period_start_ms,
                 ev.c.event_ms <= until_ms, ev.c.cost_nanos != 0]
        conds += [ev.c[dim] == value for dim, value in owners.items()]
        try:
            async with self._begin() as conn:
                if (await conn.execute(sa.select(bp.c.committed_nanos).where(*key))).first():
                    return None
                if matches is None:
                    total, through = (await conn.execute(
                        sa.select(sa.func.coalesce(sa.func.sum(ev.c.cost_nanos), 0),
                                  sa.func.coalesce(sa.func.max(ev.c.seq), 0))
                        .where(*conds))).one()
                    total, through = int(total), int(through)
                else:
                    total = through = 0
                    rows = await conn.stream(
                        sa.select(ev.c.seq, ev.c.cost_nanos, ev.c.labels,
                                  *[ev.c[d] for d in OWNER_KEYS]).where(*conds))
                    async for row in rows:
                        who = {d: row[3 + i] for i, d in enumerate(OWNER_KEYS) if row[3 + i]}
                        if matches(who, json.loads(row[2]) if row[2] else {}):
                            total += int(row[1])
                            through = max(through, int(row[0]))
                await conn.execute(bp.insert().values(
                    tenant_id=tenant_id, budget_id=budget_id, period_start_ms=period_start_ms,
                    committed_nanos=total))
                await conn.execute(bo.insert().values(
                    tenant_id=tenant_id, budget_id=budget_id, period_start_ms=period_start_ms,
                    opening_nanos=total, through_seq=through,
                    created_ms=int(time.time() * 1000)))
        except sa.exc.IntegrityError:
            return None  # the writer (or another process) started the period meanwhile
        return total

    async def settled_reservations(
        self, tenant_id: str, reservation_ids: Iterable[str]
    ) -> dict[str, str]:
        """{reservation_id: event_id} for those of ``reservation_ids`` an event in the
        ledger settled (record, release or expiry): at restart, a hold whose event
        committed just before a crash must not be restored and charged again. One
        indexed query per 500 ids; the first event (lowest seq) wins."""
        ids = sorted({r for r in reservation_ids if r})
        ev = S.events
        out: dict[str, str] = {}
        async with self.engine.connect() as conn:
            for i in range(0, len(ids), 500):
                rows = (
                    await conn.execute(
                        sa.select(ev.c.reservation_id, ev.c.event_id)
                        .where(ev.c.tenant_id == tenant_id,
                               ev.c.reservation_id.in_(ids[i : i + 500]))
                        .order_by(ev.c.seq.desc())
                    )
                ).all()
                for rid, event_id in rows:  # descending: the first event is set last
                    out[rid] = event_id
        return out

    # -- hash chain (canonical.py) ------------------------------------------------------

    # --- statements (statements.py) ------------------------------------------------

    async def statement_rows(self, tenant_id: str, customer: str | None, *,
                             max_index: int, min_index: int = 0, since_ms: int = 0,
                             until_ms: int = 0) -> list[LedgerEvent]:
        """The tenant's chained events with min_index < chain_index <= max_index (and
        since_ms <= event_ms < until_ms when given) of one customer (None: every
        customer), in chain order: what a statement covers."""
        ev = S.events
        conds = [ev.c.tenant_id == tenant_id, ev.c.chain_index > min_index,
                 ev.c.chain_index <= max_index]
        if customer is not None:
            conds.append(ev.c.customer == customer)
        if since_ms:
            conds.append(ev.c.event_ms >= since_ms)
        if until_ms:
            conds.append(ev.c.event_ms < until_ms)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(ev).where(*conds)
                                       .order_by(ev.c.chain_index))).mappings().all()
        return [from_row(r) for r in rows]

    async def get_statement(self, tenant_id: str, period: str, customer: str) -> str | None:
        st = S.statements
        async with self.engine.connect() as conn:
            return (await conn.execute(sa.select(st.c.document).where(
                st.c.tenant_id == tenant_id, st.c.period == period,
                st.c.customer == customer))).scalar()

    async def list_statements(self, tenant_id: str, customer: str | None = None
                              ) -> list[tuple[str, str, int, int]]:
        """(period, customer, closed_ms, through_index) of the tenant's statements, in
        the order they were closed."""
        st = S.statements
        q = sa.select(st.c.period, st.c.customer, st.c.closed_ms, st.c.through_index).where(
            st.c.tenant_id == tenant_id)
        if customer is not None:
            q = q.where(st.c.customer == customer)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q.order_by(st.c.through_index, st.c.closed_ms,
                                                  st.c.period))).all()
        return [(p, c, int(ms), int(t)) for p, c, ms, t in rows]

    async def put_statement(self, tenant_id: str, period: str, customer: str, closed_ms: int,
                            through_index: int, document: str) -> str:
        """Write a statement unless one exists; returns the stored document (a
        statement is immutable: closing twice gives the first one)."""
        st = S.statements
        try:
            async with self._begin() as conn:
                await conn.execute(st.insert().values(
                    tenant_id=tenant_id, period=period, customer=customer,
                    closed_ms=closed_ms, through_index=through_index, document=document))
        except sa.exc.IntegrityError:
            pass
        return await self.get_statement(tenant_id, period, customer)

    async def chain_head(self, tenant_id: str) -> tuple[int, str]:
        """(chain_index, chain_hash) of the tenant's last chained event; (0, GENESIS)
        for a tenant with no events."""
        ev = S.events
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(ev.c.chain_index, ev.c.chain_hash)
                    .where(ev.c.tenant_id == tenant_id, ev.c.chain_index.is_not(None))
                    .order_by(ev.c.chain_index.desc())
                    .limit(1)
                )
            ).first()
        return (0, GENESIS) if row is None else (int(row[0]), row[1])

    async def verify_chain(self, tenant_id: str, *, batch: int = 5000) -> VerifyResult:
        """Walk the tenant's events by chain_index and recompute every link; names the
        first bad position (a modified, deleted, inserted or reordered event). Events
        without a chain position (written around the writer) fail it too."""
        ev = S.events
        async with self.engine.connect() as conn:
            unchained = (
                await conn.execute(
                    sa.select(ev.c.event_id, ev.c.seq)
                    .where(ev.c.tenant_id == tenant_id, ev.c.chain_index.is_(None))
                    .order_by(ev.c.seq)
                    .limit(1)
                )
            ).first()

        walker = ChainVerifier()
        after = 0
        while True:
            async with self.engine.connect() as conn:
                page = (
                    await conn.execute(
                        sa.select(ev)
                        .where(ev.c.tenant_id == tenant_id, ev.c.chain_index > after)
                        .order_by(ev.c.chain_index)
                        .limit(batch)
                    )
                ).mappings().all()
            for row in page:
                if not walker.feed(from_row(row)):
                    return walker.result()
            if len(page) < batch:
                break
            after = int(page[-1]["chain_index"])
        result = walker.result()
        if result.ok and unchained is not None:
            event_id, _seq = unchained
            return VerifyResult(False, result.count, result.head, result.count + 1,
                                f"event {event_id!r} has no chain position (inserted "
                                "outside the ledger's writer)")
        return result

    # -- contents (redacted_trace / full_trace) -------------------------------------------

    async def put_contents(self, rows: Iterable[Content]) -> int:
        """Upsert content rows (``Content`` with tenant_id and event_id set); returns how
        many. The writer does this itself for ``LedgerEvent.contents``, in the event's
        transaction; this is for content that arrives later (a streamed response)."""
        values = []
        for i, c in enumerate(rows):
            if not isinstance(c, Content):
                raise InvalidArgument(f"rows[{i}]", "must be a Content")
            c.validate(f"rows[{i}]")
            if not c.tenant_id or not c.event_id:
                raise InvalidArgument(f"rows[{i}].event_id", "tenant_id and event_id are required")
            values.append({
                "tenant_id": c.tenant_id, "event_id": c.event_id, "kind": c.kind,
                "mode": int(c.mode), "text": c.text,
                "created_ms": c.created_ms or self.now_ms(), "expires_ms": c.expires_ms,
            })
        if not values:
            return 0
        ct = S.contents
        ins = self._insert(ct)
        stmt = ins.on_conflict_do_update(
            index_elements=[ct.c.tenant_id, ct.c.event_id, ct.c.kind],
            set_={c: ins.excluded[c] for c in ("mode", "text", "created_ms", "expires_ms")},
        )
        async with self._begin() as conn:
            await conn.execute(stmt, values)
        return len(values)

    async def get_contents(self, tenant_id: str, event_id: str) -> list[Content]:
        """The event's content rows (prompt before response); [] when none is kept."""
        ct = S.contents
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(ct).where(ct.c.tenant_id == tenant_id, ct.c.event_id == event_id)
                )
            ).mappings().all()
        out = [
            Content(kind=r["kind"], text=r["text"], mode=int(r["mode"]),
                    expires_ms=int(r["expires_ms"]), created_ms=int(r["created_ms"]),
                    tenant_id=r["tenant_id"], event_id=r["event_id"])
            for r in rows
        ]
        return sorted(out, key=lambda c: S.CONTENT_KINDS.index(c.kind))

    async def purge_contents(self, now_ms: int | None = None) -> int:
        """Delete every content row whose retention ended (0 < expires_ms <= now);
        returns how many. The ledger and its hash chain are untouched."""
        now = self.now_ms() if now_ms is None else now_ms
        ct = S.contents
        async with self._begin() as conn:
            res = await conn.execute(
                ct.delete().where(ct.c.expires_ms > 0, ct.c.expires_ms <= now)
            )
        return int(res.rowcount)

    async def find_duplicate(
        self,
        tenant_id: str,
        owners: Mapping[str, str] | tuple,
        fingerprint: str,
        since_ms: int,
        *,
        field: str = "prompt",
    ) -> str | None:
        """The event_id of the earliest event of the same owners (all six dimensions
        equal; absent = "") with this prompt (or ``field="response"``) fingerprint at
        or after ``since_ms``, or None. Reads the (tenant_id, prompt_fingerprint) index."""
        if field not in ("prompt", "response"):
            raise InvalidArgument("field", "must be 'prompt' or 'response'")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise InvalidArgument("fingerprint", "must be a non-empty str")
        if not isinstance(since_ms, int) or since_ms < 0:
            raise InvalidArgument("since_ms", "must be an int >= 0")
        owner_values = _owner_tuple(owners)
        ev = S.events
        col = ev.c.prompt_fingerprint if field == "prompt" else ev.c.response_fingerprint
        where = [ev.c.tenant_id == tenant_id, col == fingerprint, ev.c.event_ms >= since_ms]
        where += [ev.c[dim] == value for dim, value in zip(OWNER_KEYS, owner_values)]
        async with self.engine.connect() as conn:
            return (
                await conn.execute(
                    sa.select(ev.c.event_id).where(*where)
                    .order_by(ev.c.event_ms, ev.c.seq).limit(1)
                )
            ).scalar()

    # -- ledger queries ------------------------------------------------------------------

    async def get_event(self, tenant_id: str, event_id: str) -> LedgerEvent | None:
        ev = S.events
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(ev).where(ev.c.tenant_id == tenant_id, ev.c.event_id == event_id)
                )
            ).mappings().first()
        return None if row is None else from_row(row)

    async def query_events(
        self,
        tenant_id: str,
        flt: EventFilter | None = None,
        *,
        page_size: int = 0,
        page_token: str = "",
        order: str = "desc",
    ) -> tuple[list[LedgerEvent], str]:
        """One page of the tenant's events matching ``flt``, newest first by default.

        Keyset pagination on ``seq`` (stable while events are added); the token is
        opaque; ``next_page_token`` is "" on the last page."""
        flt = flt or EventFilter()
        if order not in ("asc", "desc"):
            raise InvalidArgument("order", "must be 'asc' or 'desc'")
        size = Q.page_size_of(page_size)
        kind = "ea" if order == "asc" else "ed"
        after = Q.decode_token(page_token, kind)
        ev = S.events
        where = Q.event_conditions(self.dialect, tenant_id, flt)
        if after is not None:
            where.append(ev.c.seq > after if order == "asc" else ev.c.seq < after)
        stmt = (
            sa.select(ev)
            .where(*where)
            .order_by(ev.c.seq.asc() if order == "asc" else ev.c.seq.desc())
            .limit(size + 1)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        events = [from_row(r) for r in rows[:size]]
        token = Q.encode_token(kind, events[-1].seq) if len(rows) > size else ""
        return events, token

    async def iter_events(
        self, tenant_id: str, flt: EventFilter | None = None, *, batch: int = 1000
    ) -> AsyncIterator[LedgerEvent]:
        """Every matching event in seq order (export); one query per ``batch`` rows,
        no connection held between batches."""
        if batch < 1:
            raise InvalidArgument("batch", "must be >= 1")
        flt = flt or EventFilter()
        ev = S.events
        base = Q.event_conditions(self.dialect, tenant_id, flt)
        after = 0
        while True:
            stmt = sa.select(ev).where(*base, ev.c.seq > after).order_by(ev.c.seq).limit(batch)
            async with self.engine.connect() as conn:
                rows = (await conn.execute(stmt)).mappings().all()
            for row in rows:
                yield from_row(row)
            if len(rows) < batch:
                return
            after = int(rows[-1]["seq"])

    async def count_events(self, tenant_id: str, flt: EventFilter | None = None) -> int:
        flt = flt or EventFilter()
        stmt = sa.select(sa.func.count()).select_from(S.events).where(
            *Q.event_conditions(self.dialect, tenant_id, flt)
        )
        async with self.engine.connect() as conn:
            return int((await conn.execute(stmt)).scalar_one())

    async def query_spend(
        self,
        tenant_id: str,
        flt: EventFilter | None = None,
        group_by: Iterable[str] = (),
        *,
        page_size: int = 0,
        page_token: str = "",
        source: str = "auto",
    ) -> tuple[list[SpendRow], str]:
        """Spend grouped by ``group_by``, most expensive group first.

        Reads the smallest table that answers exactly: spend_daily for customer /
        day / month groups with at most a customer filter and day-aligned bounds,
        else rollups_hourly (no label or kind condition, hour-aligned bounds), else
        events; ``source`` ("auto", "daily", "rollups", "events") forces one for tests
        and verification (InvalidArgument "source" when it cannot answer). Pages by
        offset."""
        flt = flt or EventFilter()
        groups = Q.check_group_by(group_by)
        size = Q.page_size_of(page_size)
        offset = Q.decode_token(page_token, "s") or 0
        if source == "auto":
            if Q.daily_can_answer(flt, groups):
                source = "daily"
            elif Q.rollups_can_answer(flt):
                source = "rollups"
            else:
                source = "events"
        elif source == "rollups":
            if not Q.rollups_can_answer(flt):
                raise InvalidArgument(
                    "source", "rollups cannot answer label/kind filters or unaligned hours"
                )
        elif source == "daily":
            if not Q.daily_can_answer(flt, groups):
                raise InvalidArgument(
                    "source", "spend_daily answers customer/day/month groups and "
                    "customer filters on whole UTC days only")
        elif source != "events":
            raise InvalidArgument("source", "must be 'auto', 'daily', 'rollups' or 'events'")
        stmt = Q.spend_select(
            self.dialect, tenant_id, flt, groups, source=source,
            limit=size + 1, offset=offset,
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        more = len(rows) > size
        out = Q.spend_rows(rows[:size], groups)
        return out, Q.encode_token("s", offset + size) if more else ""


class _Unchanged(Exception):
    """A config delete found nothing to delete (internal: rolls its transaction back)."""


def _owner_tuple(owners) -> tuple[str, ...]:
    if isinstance(owners, Mapping):
        unknown = [k for k in owners if k not in OWNER_KEYS]
        if unknown:
            raise InvalidArgument("owners", f"unknown owner dimension {unknown[0]!r}")
        values = tuple(owners.get(dim) or "" for dim in OWNER_KEYS)
    elif isinstance(owners, (tuple, list)) and len(owners) == len(OWNER_KEYS):
        values = tuple(v or "" for v in owners)
    else:
        raise InvalidArgument("owners", "a mapping of owner dimensions or a 6-tuple")
    if any(type(v) is not str for v in values):
        raise InvalidArgument("owners", "values must be str")
    return values


def _check_scopes(scopes) -> frozenset[str]:
    if isinstance(scopes, str):
        scopes = [s.strip() for s in scopes.split(",") if s.strip()]
    try:
        scope_set = frozenset(scopes)
    except TypeError:
        raise InvalidArgument("scopes", "must be a list of scope names") from None
    if not scope_set:
        raise InvalidArgument("scopes", f"at least one of {', '.join(SCOPES)}")
    unknown = sorted(s for s in scope_set if s not in SCOPES)
    if unknown:
        raise InvalidArgument("scopes", f"unknown scope(s) {', '.join(map(repr, unknown))}")
    return scope_set


def _key_info(row) -> KeyInfo:
    return KeyInfo(
        key_id=row["key_id"],
        tenant_id=row["tenant_id"],
        name=row["name"],
        prefix=row["prefix"],
        scopes=frozenset(s for s in row["scopes"].split(",") if s),
        created_ms=int(row["created_ms"]),
        revoked_ms=None if row["revoked_ms"] is None else int(row["revoked_ms"]),
        last_used_ms=None if row["last_used_ms"] is None else int(row["last_used_ms"]),
    )


__all__ = ["Store", "open_store", "normalize_url", "hash_key", "SCOPES"]
