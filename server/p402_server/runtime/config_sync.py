"""Config changes: admin writes swap budgets, rules, prices and settings in the
engine after persisting them; with several processes on one store, a tenant whose
config version moved is reloaded (`reload_config`), swapping only what differs."""
from __future__ import annotations

import logging

from p402_server.privacy import modes as _privacy
from p402_server.runtime import shared
from p402_server.runtime.shared import _canonical, _catalog_for
from p402_server.wire import convert

log = logging.getLogger("p402.server.runtime")


class ConfigSync:
    """TenantRuntime's admin swaps and config reloads (module docstring)."""

    def swap_budgets(self, budgets: dict) -> None:
        self.engine.set_budgets(tuple(budgets.values()))
        self.budgets = budgets
        if self.leases is not None:  # scale-out: new HARD budgets start unleased (0)
            self.leases.budgets_changed(self)

    async def open_budget(self, budget) -> int | None:
        """Before `budget` (created or replaced) is swapped in: when it has no total
        for its current period yet, start the period from the spend already in the
        ledger for its scope (Store.open_budget_period) and return that opening;
        None when the period has a total (its events were charged as they came).
        Events committed while this runs, and not yet charged to the budget, are
        the only ones it can miss."""
        now = shared._now_ms()
        start = self.core.period_bounds(budget.period, now)[0]
        scope = budget.scope
        owners = {k: v for k, v in scope.items() if not k.startswith("label.")}
        matches = budget.matches if len(owners) < len(scope) else None
        return await self.store.open_budget_period(self.tenant_id, budget.budget_id, start,
                                                   now, owners, matches)

    async def ledger_committed(self, budgets) -> dict:
        """{(budget_id, period_start_ms): nanos} of the current period of `budgets`
        (Budget objects) from the ledger: read before they are swapped in, so the
        engine gets them with no await in between (no commit of its own is lost)."""
        if not budgets:
            return {}
        totals = await self.store.budget_totals(self.tenant_id)
        now = shared._now_ms()
        out = {}
        for b in budgets:
            key = (b.budget_id, self.core.period_bounds(b.period, now)[0])
            if totals.get(key):
                out[key] = totals[key]
        return out

    def set_ledger_committed(self, committed: dict) -> None:
        """Apply `ledger_committed` to the engine (budgets new to it start there)."""
        for (budget_id, start), nanos in committed.items():
            if budget_id in self.budgets:
                self.engine.set_committed(budget_id, start, nanos)

    def swap_rules(self, rules: dict) -> None:
        self.engine.set_rules(tuple(rules.values()))
        self.rules = rules
        self.privacy.set_rules(rules.values())

    def swap_prices(self, price_specs: dict) -> None:
        catalog = _catalog_for(self.core, list(price_specs.values()))
        self.engine.set_catalog(catalog)
        self.catalog = catalog
        self.price_specs = price_specs

    def swap_settings(self, settings: dict) -> None:
        old = self.engine
        self.settings = settings
        self.privacy.reconfigure(settings, self.rules.values())
        engine = self._new_engine()
        engine.restore(old.snapshot())
        self.engine = engine

    async def reload_config(self) -> tuple[str, ...]:
        """Re-read budgets, policy rules, prices and settings from the store, as
        Runtime._build does, and swap in (with the swap_* methods above) only what
        differs from what the engine runs. Returns what was swapped, of "budgets",
        "rules", "prices", "settings": () when nothing differed (e.g. this process's
        own admin change, already applied). Everything is read and loaded before
        anything is swapped: on an error (store unreachable, a spec that does not
        load) it raises with nothing changed, and the caller retries later."""
        core, store, tenant_id = self.core, self.store, self.tenant_id
        async with self.admin_lock:
            settings = convert.settings_with_defaults(await store.get_settings(tenant_id))
            budgets = [core.Budget.from_dict(spec)
                       for spec in (await store.list_budgets(tenant_id)).values()]
            rules = [core.Rule.from_dict(spec)
                     for spec in (await store.list_policies(tenant_id)).values()]
            prices = list((await store.list_prices(tenant_id)).values())
            if _privacy.SECRETS not in settings and _privacy.SECRETS in self.settings:
                # Never drop a salt or key this engine uses (_build stores them first,
                # so this is only a store written around the runtime).
                settings[_privacy.SECRETS] = self.settings[_privacy.SECRETS]
            swapped = []
            budgets = {b.budget_id: b for b in budgets}
            if _canonical(budgets) != _canonical(self.budgets):
                committed = await self.ledger_committed(
                    [b for k, b in budgets.items() if k not in self.budgets])
                self.swap_budgets(budgets)
                self.set_ledger_committed(committed)
                swapped.append("budgets")
            rules = {r.rule_id: r for r in rules}
            if _canonical(rules) != _canonical(self.rules):
                self.swap_rules(rules)
                swapped.append("rules")
            price_specs = {spec["model"]: spec for spec in prices}
            if _canonical(price_specs) != _canonical(self.price_specs):
                self.swap_prices(price_specs)
                swapped.append("prices")
            # Last: swap_settings rebuilds the engine from the one above (its budgets,
            # rules, catalog, counters, holds and leases all carry over).
            if _canonical(settings) != _canonical(self.settings):
                self.swap_settings(settings)
                swapped.append("settings")
        if swapped:
            log.info("tenant %s: config reloaded from the store (%s)", tenant_id,
                     ", ".join(swapped))
        return tuple(swapped)
