"""Expiry and hold persistence: holds past their TTL become EXPIRED events
(committed at their estimate, evidence ESTIMATED, written behind), and open holds are
saved to the store (changed ones every flush interval, all of them at shutdown) so
another process, or this one after a restart, can settle them.

A stored hold's data is {"hold": <a hold record, p402core/_holdrec.py: what
Engine.hold_records() returns and Engine.restore_holds() takes>, "meta": [decision,
reasons, rule_ids, privacy_mode, attempt, retry_of] or null}. Holds are captured from
the Authorization when they are made (so the periodic write-behind never walks the
engine's holds; `_captured_row` builds the same record), written whole from
Engine.hold_records() at shutdown, and put back with Engine.restore_holds at start.
They are written through the writer (`GroupCommitWriter.save_holds`: on SQLite, on
its own thread and connection)."""
from __future__ import annotations

import json
import logging

from p402_server.ledger.model import hold_row
from p402core import InvalidArgument

log = logging.getLogger("p402.server.runtime")


# id(ModelPrice) -> (the price, its to_dict() as JSON text), so the hold write-behind
# encodes each price once (the entry keeps the price alive, so its id is not reused).
# The price is most of a stored hold's bytes.
_PRICE_JSON: dict = {}


def _captured_row(tenant_id: str, maker: str, rid: str, captured: tuple, meta) -> tuple:
    """The holds row of a hold captured at Authorize: its data is the JSON text of
    {"hold": <hold record>, "meta": meta}, the price's part encoded once per price."""
    a, owners, labels, input_bytes, catalog, engine = captured
    try:
        price = catalog.lookup(a.model, a.provider)
    except LookupError:  # unknown model allowed at the fallback price
        price = engine.fallback_price
    entry = _PRICE_JSON.get(id(price))
    if entry is None or entry[0] is not price:
        if len(_PRICE_JSON) > 10_000:
            _PRICE_JSON.clear()
        entry = _PRICE_JSON[id(price)] = (price, json.dumps(price.to_dict(), sort_keys=True))
    hold = {
        "reservation_id": rid,
        "model": a.model,
        "provider": a.provider,
        "owners": list(owners),
        "labels": dict(labels) if labels else None,
        "amount_nanos": a.estimated_cost_nanos,
        "input_tokens": a.estimated_input_tokens,
        "output_tokens": a.estimated_output_tokens,
        "input_bytes": input_bytes,
        "expires_ms": a.expires_ms,
        "budget_ids": [s.budget_id for s in a.budgets],
        "catalog_version": a.catalog_version,
    }
    data = ('{"hold": ' + json.dumps(hold, sort_keys=True)[:-1] + ', "price": '
            + entry[1] + '}, "meta": ' + json.dumps(list(meta) if meta else None) + "}")
    return hold_row(tenant_id, rid, a.expires_ms, data, maker, hold)


class Expiring:
    """TenantRuntime's expiry, and open holds saved to the store (module docstring)."""

    def expire(self, now_ms: int | None = None) -> int:
        """Settle every hold past its expiry at its estimate; events written behind."""
        settled = self.engine.expire(now_ms)
        for s in settled:
            prior = self._by_reservation.get(s.reservation_id)
            if prior is not None:  # already settled by an event (cannot normally happen)
                continue
            if self.leases is not None:
                # Scale-out: another process may have settled this hold (a Record
                # retried there): the writer's claim decides, at the next
                # flush (`_expire_claimed`).
                self._expiring[s.reservation_id] = s
                continue
            self._write_expired(s)
        return len(settled)

    def _write_expired(self, s) -> None:
        self._hold_privacy.pop(s.reservation_id, None)  # content dies with the hold
        ev = self._event_from_settlement(s, s.reservation_id, "expired")
        self._remember(ev)
        self.writer.write_behind(ev)

    async def _expire_claimed(self) -> None:
        """Scale-out: write the EXPIRED events of the holds that expired here, each
        claiming its reservation (LedgerEvent.claim), awaited together. One that
        another process settled first (a Record retried there) is not written: the
        winner's settlement is booked instead (_rebook). On a store error they
        stay pending, retried at the next flush (the engine counted them:
        conservative)."""
        async with self._expire_lock:
            await self._write_expired_claims()

    async def _write_expired_claims(self) -> None:
        pending, self._expiring = self._expiring, {}
        if not pending:
            return
        events = [self._event_from_settlement(s, rid, "expired")
                  for rid, s in pending.items()]
        try:
            results = await self.writer.write_many(events, return_exceptions=True)
        except BaseException:
            for rid, s in pending.items():
                self._expiring.setdefault(rid, s)
            raise
        failed = None
        for (rid, s), ev, res in zip(pending.items(), events, results):
            self._hold_privacy.pop(rid, None)  # content dies with the hold
            if isinstance(res, BaseException):
                self._expiring.setdefault(rid, s)
                failed = res
            elif res.claimed_by:
                await self._lost_claim(ev, s, res.claimed_by)
            else:
                self._remember(res.event)
                # Acknowledged: the estimate is in the ledger now, so the lease
                # reports it as used (else it would count it twice, for good).
                self.leases.committed(self, res.event)
        if failed is not None:
            raise failed

    def _restore_hold_records(self, records: list) -> int:
        try:
            return self.engine.restore_holds(records)
        except InvalidArgument:
            # All or nothing refused the lot: keep every good hold, drop (loudly) the
            # unreadable ones rather than refuse to serve the tenant.
            n = 0
            for rec in records:
                try:
                    n += self.engine.restore_holds([rec])
                except InvalidArgument as exc:
                    log.error("tenant %s: stored hold %r not restored (%s)", self.tenant_id,
                              rec.get("reservation_id") if isinstance(rec, dict) else rec, exc)
            return n

    async def flush_holds(self, *, everything: bool = False) -> None:
        """Write behind the open holds that changed since the last flush
        (`everything`: all open holds, from an engine snapshot; for shutdown), and,
        with leases, settle the holds that expired (`_expire_claimed`)."""
        if self._expiring:
            try:
                await self._expire_claimed()
            except Exception:
                log.exception("tenant %s: claiming expired holds failed; will retry",
                              self.tenant_id)
        if everything and self.leases is not None:
            # Scale-out: nobody restores a leased engine's holds wholesale, and a hold
            # another process settled would be written back: the pending changes
            # (every hold not yet written) are enough for adoption elsewhere.
            everything = False
        maker = self.leases.holder_id if self.leases is not None else ""
        tenant_id = self.tenant_id
        if everything:
            metas = self._hold_meta
            rows = []
            for rec in self.engine.hold_records():
                rid = rec["reservation_id"]
                meta = metas.get(rid)
                data = {"hold": rec, "meta": list(meta) if meta else None}
                rows.append(hold_row(tenant_id, rid, rec["expires_ms"],
                                     json.dumps(data, sort_keys=True), maker, rec))
            self._hold_upserts = {}
        else:
            pending, self._hold_upserts = self._hold_upserts, {}
            metas = self._hold_meta
            rows = [_captured_row(tenant_id, maker, rid, h, metas.get(rid))
                    for rid, h in pending.items()]
        deletes, self._hold_deletes = self._hold_deletes, set()
        settled = self._hold_settled
        if settled:
            # (An event read from the ledger, a claim's winner, has its seq.)
            for rid in [rid for rid, ev in settled.items() if ev.in_ledger or ev.seq]:
                del settled[rid]
                deletes.add(rid)
        if not rows and not deletes:
            return
        try:
            await self.writer.save_holds(tenant_id, rows, deletes)
        except Exception:
            # Keep them for the next round (the flush loop logs). A hold settled
            # meanwhile is in _hold_deletes or _hold_settled and is not re-added.
            if not everything:
                for rid, h in pending.items():
                    if rid not in self._hold_deletes and rid not in self._hold_settled:
                        self._hold_upserts.setdefault(rid, h)
            self._hold_deletes |= deletes
            raise
