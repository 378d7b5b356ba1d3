"""Settling across processes (leases on; SCALEOUT.md states the contract): a Record
or Release of a reservation another process made settles the maker's saved hold
here, leaves the maker a notice, and claims the reservation in the writer's
transaction so exactly one event settles it; the maker books what others settled."""
from __future__ import annotations

import asyncio
import logging

import grpc

from p402_server.ledger.model import LedgerEvent
from p402_server.runtime import shared
from p402_server.runtime.shared import (
    FOREIGN_HOLD_WAITS,
    MODEL_SUBSTITUTED,
    RESERVATION_ADOPTED,
    RESERVATION_UNKNOWN,
    _Settled,
)
from p402_server.wire import convert
from p402_server.wire.errors import ServiceError
from p402core import Conflict, Evidence, NotFound, Outcome, UnknownModel

log = logging.getLogger("p402.server.runtime")


class ForeignSettling:
    """TenantRuntime's settling reservations another process made (module docstring)."""

    async def _saved_hold(self, rid: str) -> dict | None:
        """Scale-out: the saved hold `rid` (another process's), waiting a few
        write-behind intervals for its maker to save it (a Record can overtake the
        maker's flush); None if it never appears."""
        wait = self.config.holds_flush_interval_seconds
        for attempt in range(FOREIGN_HOLD_WAITS):
            hold = await self.store.get_hold(self.tenant_id, rid)
            if hold is not None or attempt == FOREIGN_HOLD_WAITS - 1:
                return hold
            await asyncio.sleep(wait)
        return None

    def _foreign_settlement(self, rid: str, rec: dict, usage=None, outcome: int = 0,
                            called: tuple[str, str] = ("", "")):
        """The Settlement of another process's saved hold `rec` (a hold record), made
        without this engine: for a Record (`usage` given: priced at the hold's price,
        as the maker's engine prices it), else for a Release (cost 0) or, with
        `outcome` EXPIRED, an expiry at the estimate."""
        amount = int(rec["amount_nanos"])
        model, provider, version = rec["model"], rec["provider"], rec["catalog_version"]
        i = o = c = w = r = 0
        if usage is not None:
            price = self.core.ModelPrice.from_dict(rec["price"])
            if called[0] and called[0] != model:
                # Another model than reserved was called (a gateway's fallback): priced
                # at it, as the maker's engine would (Engine.record).
                try:
                    other = self.catalog.lookup(called[0], called[1] or provider)
                except UnknownModel:
                    other = None  # no price for it: the reserved model's price stands
                if other is not None and other.model != model:
                    price, version = other, self.catalog.version
                    model, provider = other.model, other.provider
            i, c, w, o, r, units, tier = usage
            cost = price.cost_units_nanos(i, o, c, w, r, units, tier)
            outcome = outcome or int(Outcome.SUCCESS)
            evidence = int(Evidence.REPORTED)
        elif outcome == int(Outcome.EXPIRED):
            i, o = int(rec.get("input_tokens") or 0), int(rec.get("output_tokens") or 0)
            cost = amount
            evidence = int(Evidence.ESTIMATED)
        else:
            cost, outcome, evidence = 0, int(Outcome.CANCELLED), int(Evidence.ESTIMATED)
        return _Settled(
            reservation_id=rid, model=model, provider=provider,
            owners=tuple(rec["owners"]), labels=dict(rec.get("labels") or {}),
            input_tokens=i, cached_input_tokens=c, cache_write_tokens=w, output_tokens=o,
            reasoning_tokens=r, cost_nanos=cost, estimated_cost_nanos=amount,
            overrun_nanos=max(0, cost - amount), outcome=outcome, evidence=evidence,
            budget_ids=tuple(rec["budget_ids"]), catalog_version=version,
            settled_ms=shared._now_ms())

    async def _settle_foreign(self, req, field: str, hold: dict, event_id: str, owners,
                              labels, usage, revenue: int, attested: bool):
        """Scale-out: a Record of a reservation another process made, from its saved
        hold. This engine and its lease are not touched: the hold's money is in the
        maker's lease, and the maker books the settlement (a notice now, or the
        claim when its own copy expires). The event claims the reservation: if
        another event settled it first, that event answers (duplicate=True)."""
        rid = req.reservation_id
        mode = self._record_mode(req, field)
        s = self._foreign_settlement(rid, hold["hold"], usage, req.outcome,
                                     (req.model, req.provider))
        meta = hold.get("meta")
        if meta:
            self._hold_meta[rid] = tuple(meta)
        ev = self._record_event(req, s, event_id, owners, labels, revenue, mode,
                                attested, False, usage)
        ev.reasons = (*ev.reasons, RESERVATION_ADOPTED)
        if ev.model != hold["hold"]["model"]:
            ev.reasons = (*ev.reasons, MODEL_SUBSTITUTED)
        if ev.prompt_fingerprint:
            await self._mark_duplicate(ev)
        res = await self._write_foreign(ev, hold.get("maker", ""))
        if res.claimed_by:
            first = await self._lost_claim(ev, None, res.claimed_by)
            return convert.record_response(first, True, self._statuses(first.budget_ids))
        return convert.record_response(res.event, res.duplicate,
                                       self._statuses(res.event.budget_ids))

    async def _write_foreign(self, ev: LedgerEvent, maker: str):
        """Commit a settling event of another process's hold; when it wins, leave its
        maker a notice (best effort: a lost notice only delays the maker's booking
        until its own copy of the hold expires and finds the claim)."""
        self._remember(ev)  # also deletes the saved hold once `ev` is committed
        res = await self._write_settled(ev)
        if not res.claimed_by:
            self._remember(res.event)
            if maker and (self.leases is None or maker != self.leases.holder_id):
                try:
                    await self.store.leave_notices(
                        [(self.tenant_id, ev.reservation_id, maker, ev.event_id,
                          ev.cost_nanos)], shared._now_ms())
                except Exception:
                    log.warning("tenant %s: notice for %s to its maker not written; it "
                                "books the settlement when its hold expires",
                                self.tenant_id, ev.reservation_id, exc_info=True)
        return res

    async def _lost_claim(self, ev: LedgerEvent, s, winner: str):
        """Scale-out: the writer refused `ev` because event `winner` settled its
        reservation first (on another process). When this engine settled its own
        hold (`s`), it books the winner's settlement instead of its own (_rebook);
        the answer is the winner (committed: its claim and its event are one
        transaction), duplicate=True."""
        if self._events.get(ev.event_id) is ev:
            self._events.pop(ev.event_id, None)
        if self._by_reservation.get(ev.reservation_id) is ev:
            self._by_reservation.pop(ev.reservation_id, None)
        first = await self.store.get_event(self.tenant_id, winner)
        if first is None:  # cannot happen (claim and event commit together)
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "RESERVATION_SETTLING",
                               f"reservation {ev.reservation_id!r} was settled by event "
                               f"{winner!r}, not readable yet; retry")
        if s is not None:
            self._rebook(s, first)
        self._remember(first)
        return first

    def _rebook(self, s, winner: LedgerEvent) -> None:
        """This engine settled its hold as `s` (committed s.cost_nanos), but event
        `winner`, written elsewhere, settled the reservation: the hold's money is in
        this process's lease, so the engine and the lease count the winner's cost
        instead — unless the winner was metered without the hold (reason
        reservation.unknown: another engine and lease counted it), then nothing."""
        cost = 0 if RESERVATION_UNKNOWN in winner.reasons else winner.cost_nanos
        self._adjust_committed(s.budget_ids, cost - s.cost_nanos, s.settled_ms)
        if cost and self.leases is not None:
            self.leases.used(self, s.budget_ids, cost)
        log.info("tenant %s: reservation %r was settled first by event %r (another "
                 "process); booked its cost here", self.tenant_id, s.reservation_id,
                 winner.event_id)

    def book_notice(self, rid: str, cost: int) -> bool:
        """Scale-out: another process settled reservation `rid`, made here, from its
        saved hold (cost `cost`): take the hold out of the engine and count the cost
        as committed here, in this lease (as if settled here). False when the engine
        no longer holds it (settled or expired here meanwhile: the claim decided)."""
        try:
            s = self.engine.release(rid)
        except (NotFound, Conflict):
            return False
        self._hold_privacy.pop(rid, None)
        self._hold_meta.pop(rid, None)
        if self._hold_upserts.pop(rid, None) is None:
            self._hold_deletes.add(rid)
        self._adjust_committed(s.budget_ids, cost, s.settled_ms)
        if cost and self.leases is not None:
            self.leases.used(self, s.budget_ids, cost)
        return True

    async def _release_foreign(self, rid: str, exc: Exception) -> LedgerEvent:
        """Scale-out: Release of a hold another process made, from its saved hold
        (as `_settle_foreign`; this engine untouched) -> the settling event (this
        one, or the one that settled it first). Anything else re-raises `exc`."""
        if self.leases is None or not isinstance(exc, NotFound) or self._issued_here(rid):
            raise exc
        hold = await self._saved_hold(rid)
        if hold is None:
            raise exc
        s = self._foreign_settlement(rid, hold["hold"])
        if hold.get("meta"):
            self._hold_meta[rid] = tuple(hold["meta"])
        ev = self._event_from_settlement(s, rid, "released")
        ev.reasons = (*ev.reasons, RESERVATION_ADOPTED)
        res = await self._write_foreign(ev, hold.get("maker", ""))
        if res.claimed_by:
            return await self._lost_claim(ev, None, res.claimed_by)
        return res.event

    def expire_foreign(self, rid: str, hold: dict) -> LedgerEvent:
        """Scale-out: the EXPIRED event of a dead process's saved hold (at its
        estimate, evidence ESTIMATED; Runtime.sweep_dead_holds writes it)."""
        s = self._foreign_settlement(rid, hold["hold"], outcome=int(Outcome.EXPIRED))
        s.settled_ms = min(s.settled_ms, int(hold["hold"]["expires_ms"]))
        meta = hold.get("meta")
        if meta:
            self._hold_meta[rid] = tuple(meta)
        try:
            ev = self._event_from_settlement(s, rid, "expired")
        finally:
            self._hold_meta.pop(rid, None)
        ev.claim = True
        return ev
