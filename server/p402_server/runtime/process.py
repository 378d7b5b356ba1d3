"""Every tenant of one process (`Runtime`): built on first use (and, for a process alone
on its ledger, at start every tenant with saved holds, so they settle), and the
background task that expires holds, saves them, books notices, polls config versions
and sweeps the holds of dead processes."""
from __future__ import annotations

import asyncio
import logging
import time

import p402core
from p402_server.privacy import modes as _privacy
from p402_server.runtime import shared
from p402_server.runtime.config import ServerConfig
from p402_server.runtime.shared import DEAD_SWEEP_SECONDS
from p402_server.runtime.tenant import TenantRuntime
from p402_server.wire import convert

log = logging.getLogger("p402.server.runtime")


class Runtime:
    """Every tenant's runtime of one server, and the background task."""

    def __init__(self, store, writer, config: ServerConfig, core=None, leases=None):
        self.store = store
        self.writer = writer
        self.config = config
        # Scale-out: a leases.LeaseManager, or None (single process).
        self.leases = leases
        self.core = core or p402core.load(p402core.IMPLEMENTATION)
        self._tenants: dict[str, TenantRuntime] = {}
        self._building: dict[str, asyncio.Future] = {}
        self._task: asyncio.Task | None = None
        # Per built tenant, the store's config version its engine's config was read
        # at (read before the config, so a change racing a build or a reload is seen
        # by the next poll; sync_config).
        self._config_versions: dict[str, int] = {}

    @property
    def tenants(self) -> dict[str, TenantRuntime]:
        return self._tenants

    async def get(self, tenant_id: str) -> TenantRuntime:
        rt = self._tenants.get(tenant_id)
        if rt is not None:
            return rt
        fut = self._building.get(tenant_id)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._building[tenant_id] = fut
        try:
            rt = await self._build(tenant_id)
            self._tenants[tenant_id] = rt
            fut.set_result(rt)
            return rt
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()
            raise
        finally:
            del self._building[tenant_id]

    async def _build(self, tenant_id: str) -> TenantRuntime:
        core, store = self.core, self.store
        # Before the config: a change committed while we load is newer than this.
        version = (await store.config_versions([tenant_id])).get(tenant_id, 0)
        settings = convert.settings_with_defaults(await store.get_settings(tenant_id))
        if _privacy.SECRETS not in settings:
            # A tenant's secrets are made on its first use (privacy.py): fingerprint
            # salt and evidence key, persisted before anything can use them.
            stored = await store.get_settings(tenant_id)
            stored[_privacy.SECRETS] = settings[_privacy.SECRETS] = _privacy.new_secrets()
            await store.put_settings(tenant_id, stored)
        budgets = [core.Budget.from_dict(spec)
                   for spec in (await store.list_budgets(tenant_id)).values()]
        rules = [core.Rule.from_dict(spec)
                 for spec in (await store.list_policies(tenant_id)).values()]
        prices = list((await store.list_prices(tenant_id)).values())
        rt = TenantRuntime(tenant_id, core=core, store=store, writer=self.writer,
                           config=self.config, settings=settings, budgets=budgets,
                           rules=rules, price_specs=prices)
        if self.leases is not None:  # scale-out: budgets are leased, never owned
            rt.leases = self.leases
        await rt.restore()
        if self.leases is not None:
            await self.leases.attach(rt)
        self._config_versions[tenant_id] = version
        log.info("tenant %s: engine ready (%s core, %d budgets, %d rules, catalog %s)",
                 tenant_id, core.IMPLEMENTATION, len(budgets), len(rules),
                 rt.catalog.version)
        return rt

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._background(), name="p402-runtime")

    async def _background(self) -> None:
        cfg = self.config
        next_expire = time.monotonic() + cfg.expire_interval_seconds
        next_flush = time.monotonic() + cfg.holds_flush_interval_seconds
        # Processes share a store's config (and its admin changes) only with leases
        # on (several workers or replicas); a lone process applied every change itself.
        poll = self.leases is not None
        next_poll = time.monotonic() + cfg.config_poll_seconds
        tick = min(cfg.holds_flush_interval_seconds, cfg.expire_interval_seconds,
                   cfg.config_poll_seconds if poll else float("inf"))
        restored = poll  # leased: dead processes' holds are swept (sweep_dead_holds)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if not restored:
                restored = await self._build_tenants_with_holds()
            if now >= next_expire:
                next_expire = now + cfg.expire_interval_seconds
                for rt in list(self._tenants.values()):
                    try:
                        rt.expire()
                    except Exception:
                        log.exception("tenant %s: expiry sweep failed", rt.tenant_id)
            if now >= next_flush:  # at its own interval, not every tick
                next_flush = now + cfg.holds_flush_interval_seconds
                for rt in list(self._tenants.values()):
                    try:
                        await rt.flush_holds()
                    except Exception:
                        log.exception("tenant %s: writing open holds failed; will retry",
                                      rt.tenant_id)
            if poll:
                await self._settle_across_processes()
            if poll and now >= next_poll:
                next_poll = now + cfg.config_poll_seconds
                try:
                    await self.sync_config()
                except Exception:
                    log.exception("reading config versions failed; will retry")
                for rt in list(self._tenants.values()):
                    try:
                        await rt.refresh_store_status()
                    except Exception:
                        log.exception("tenant %s: reading budget status failed",
                                      rt.tenant_id)
                if now >= self._next_sweep:
                    self._next_sweep = now + DEAD_SWEEP_SECONDS
                    try:
                        await self.sweep_dead_holds()
                    except Exception:
                        log.exception("settling dead processes' holds failed; will retry")
            if now >= self._next_purge:
                await self._purge_contents(now)

    async def _build_tenants_with_holds(self) -> bool:
        """One process alone on its ledger, started again (after a stop, or a crash):
        build every tenant that has saved holds, so that they settle (expire into the
        ledger at their estimate, or by their Records) without waiting for the
        tenant's next call. True once done (a tenant that fails to build is logged
        and left to its next call); False to try again at the next tick."""
        try:
            tenants = await self.store.hold_tenants()
        except Exception:
            log.exception("reading which tenants have saved holds failed; will retry")
            return False
        for tenant_id in tenants:
            try:
                await self.get(tenant_id)
            except Exception:
                log.exception("tenant %s: building it to settle its saved holds failed; "
                              "they wait for its next call", tenant_id)
        return True

    async def sync_config(self) -> list[str]:
        """One config poll (scale-out; `_background` runs it every
        `config_poll_seconds` when leases are on): read the config versions of every
        built tenant in one query and reload (TenantRuntime.reload_config) each whose
        version moved since its engine's config was read. Returns the tenants
        reloaded. A reload that fails is logged and retried at the next poll; the
        tenant keeps serving with the config it has (never dropped)."""
        tenants = dict(self._tenants)
        if not tenants:
            return []
        versions = await self.store.config_versions(tenants)
        reloaded = []
        for tenant_id, rt in tenants.items():
            version = versions.get(tenant_id)
            if version is None or version == self._config_versions.get(tenant_id):
                continue  # unchanged (or the tenant row is gone: keep what we have)
            try:
                await rt.reload_config()
            except Exception:
                log.exception("tenant %s: reloading its config failed; will retry",
                              tenant_id)
                continue
            if self._tenants.get(tenant_id) is rt:  # not rebuilt meanwhile
                self._config_versions[tenant_id] = version
            reloaded.append(tenant_id)
        return reloaded

    _next_sweep = 0.0

    async def _settle_across_processes(self) -> None:
        """Scale-out, every tick: book the settlements other processes made of this
        process's holds (their notices)."""
        try:
            notices = await self.store.take_notices(self.leases.holder_id)
        except Exception:
            log.exception("reading settlement notices failed; will retry")
            return
        for tenant_id, rid, _event_id, cost in notices:
            rt = self._tenants.get(tenant_id)
            if rt is not None:
                rt.book_notice(rid, cost)

    async def sweep_dead_holds(self) -> int:
        """Scale-out: settle into the ledger the saved holds of dead processes (their
        registration lapsed) once past their expiry, at their estimate (EXPIRED,
        ESTIMATED), as their maker would have; each event claims its reservation,
        so a Record that reached the ledger first wins and a second sweeper writes
        nothing. Then their rows go, and the dead leases can be reclaimed. Returns
        how many holds were settled."""
        rows = await self.store.dead_holds(shared._now_ms())
        by_tenant: dict[str, list] = {}
        for tenant_id, rid, _exp, data, maker in rows:
            by_tenant.setdefault(tenant_id, []).append((rid, data, maker))
        n = 0
        for tenant_id, holds in by_tenant.items():
            rt = await self.get(tenant_id)
            events = []
            for rid, data, _maker in holds:
                try:
                    events.append(rt.expire_foreign(rid, data))
                except Exception:
                    log.exception("tenant %s: saved hold %r of a dead process is "
                                  "unreadable; dropped", tenant_id, rid)
            results = await self.writer.write_many(events, return_exceptions=True)
            failed = [ev.reservation_id for ev, res in zip(events, results)
                      if isinstance(res, BaseException)]
            done = [rid for rid, _d, _m in holds if rid not in failed]
            n += sum(1 for res in results
                     if not isinstance(res, BaseException) and not res.claimed_by)
            await self.store.save_holds(tenant_id, (), done)
            if n:
                log.warning("tenant %s: settled %d expired hold(s) of dead process(es) "
                            "%s", tenant_id, n, ", ".join(sorted({m for _r, _d, m in holds})))
        return n

    # Kept content past its retention (privacy.py) is purged every this many seconds.
    CONTENT_PURGE_INTERVAL_SECONDS = 60.0
    _next_purge = 0.0

    async def _purge_contents(self, now: float) -> None:
        self._next_purge = now + self.CONTENT_PURGE_INTERVAL_SECONDS
        purge = getattr(self.store, "purge_contents", None)
        if purge is None:
            return
        try:
            n = await purge(shared._now_ms())
        except Exception:
            log.exception("purging expired content failed; will retry")
            return
        if n:
            log.info("purged %d expired content row(s)", n)

    async def stop(self) -> None:
        """Stop the background task and write every open hold (shutdown)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for rt in list(self._tenants.values()):
            try:
                await rt.flush_holds(everything=True)
            except Exception:
                log.exception("tenant %s: writing open holds at shutdown failed",
                              rt.tenant_id)

    def forget(self, tenant_id: str) -> None:
        self._tenants.pop(tenant_id, None)
