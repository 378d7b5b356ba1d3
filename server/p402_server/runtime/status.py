"""Budget status as callers see it: the engine's counters, or with leases on the
store's totals across every process."""
from __future__ import annotations


class BudgetStatus:
    """TenantRuntime's budget status, the engine's or the store's (module docstring)."""

    def _statuses(self, budget_ids) -> list:
        if not budget_ids:
            return []
        return self.budget_status(budget_ids)

    def budget_status(self, budget_ids=None) -> list:
        """Budget statuses (of `budget_ids`, default all). One process: the engine's.
        Scale-out: the store's truth across processes (the ledger's committed and
        every process's saved open holds, read every config poll) moved by what
        this engine committed and held since that read."""
        out = [st for st in self.engine.budget_status()
               if budget_ids is None or st.budget_id in budget_ids]
        return self._store_level(out) if self._status_base else out

    def _store_level(self, out: list) -> list:
        """Engine statuses -> the store-level ones (`budget_status`), in place."""
        base = self._status_base
        make = self.core.BudgetStatus
        for n, st in enumerate(out):
            b = base.get(st.budget_id)
            if b is None or b[0] != st.period_start_ms:
                continue
            _start, committed, held, local_committed, local_held = b
            out[n] = make(st.budget_id, st.limit_nanos,
                          max(0, committed + st.committed_nanos - local_committed),
                          max(0, held + st.held_nanos - local_held),
                          st.period_start_ms, st.enforcement)
        return out

    async def refresh_store_status(self) -> None:
        """Scale-out: read the store-level budget status (`budget_status`)."""
        committed, held = await self.store.store_budget_status(self.tenant_id)
        base = {}
        for st in self.engine.budget_status():
            base[st.budget_id] = (
                st.period_start_ms, committed.get((st.budget_id, st.period_start_ms), 0),
                held.get(st.budget_id, 0), st.committed_nanos, st.held_nanos)
        self._status_base = base
