"""Settling: Record and Release of this process's reservations (and of none, as
meter-only events). The engine settles, the event is built from the Settlement and
committed through the group-commit writer before the answer; the idempotency memory
answers retries, and a duplicate the ledger reports is undone in the engine at once
(`_compensate`), so budget counters always equal the ledger."""
from __future__ import annotations

import asyncio
import logging

import grpc

from p402_server.ledger.model import LedgerEvent
from p402_server.privacy import modes as _privacy
from p402_server.runtime import shared
from p402_server.runtime.shared import (
    _EVENT,
    _KNOWN,
    _UNSETTLED,
    MODEL_SUBSTITUTED,
    RESERVATION_OWNERS_DIFFER,
    RESERVATION_UNKNOWN,
    event_bytes,
    new_ulid,
)
from p402_server.wire import convert
from p402_server.wire.errors import ServiceError
from p402core import (
    POLICY_PRIVACY_MODE_NOT_ALLOWED,
    Conflict,
    Decision,
    Evidence,
    InvalidArgument,
    NotFound,
    Outcome,
    UnknownModel,
)

log = logging.getLogger("p402.server.runtime")


class Settling:
    """TenantRuntime's Record and Release of this process's reservations, and idempotency (module docstring)."""

    async def record(self, req, field: str = "", parsed: tuple | None = None, *,
                     attested: bool = False):
        """RecordRequest -> RecordResponse, after the event's commit. `parsed` is
        convert.validate_record's result when the caller validated already;
        `attested`: the call's signature was verified (meter_service)."""
        step, a, b = self._begin_record(req, field, parsed, attested)
        if step is _KNOWN:
            resp = await self._replay(a)
        elif step is _UNSETTLED:
            resp = await self._record_unsettled(req, field, parsed, attested, a, b)
        else:
            if a.prompt_fingerprint:
                await self._mark_duplicate(a)
            resp = await self._commit(a, b)
        if req.want_receipt:
            resp.receipt = await self.receipt(resp.event_id)
        return resp

    async def record_batch(self, records, parsed: list, *, attested: bool = False) -> list:
        """Every Record of a batch (RecordBatch, StreamRecordBatches), responses in
        request order, each after its commit; `parsed` is convert.validate_record's
        result per record.

        The engine settles every record synchronously, in request order, and the
        batch's events go to the writer in ONE `write_many` call (one future for the
        batch, not a task and a future per record): the same results as `record` per
        record, at a fraction of the event-loop work. A record that needs the store
        before it can settle (a reservation the engine no longer holds) or that
        repeats an event not yet acknowledged goes through the per-record path, as
        its own task. A failure is raised once every record has finished (the first
        in request order); cancelling the call cancels them all."""
        n = len(records)
        out: list = [None] * n
        failures: list = []  # (index, exception)
        events: list = []
        settled: list = []
        slots: list[int] = []
        tasks: list = []  # (index, task)
        create = asyncio.get_running_loop().create_task
        begin = self._begin_record
        for i, req in enumerate(records):
            field = f"records[{i}]."
            try:
                step, a, b = begin(req, field, parsed[i], attested)
            except Exception as exc:
                failures.append((i, exc))
                continue
            if step is _EVENT:
                events.append(a)
                settled.append(b)
                slots.append(i)
            elif step is _KNOWN and a.seq:  # acknowledged: answered from memory
                out[i] = convert.record_response(a, True, self._statuses(a.budget_ids))
            elif step is _KNOWN:
                tasks.append((i, create(self._replay(a))))
            else:
                tasks.append((i, create(self._record_unsettled(
                    req, field, parsed[i], attested, a, b))))
        try:
            for i, ev in zip(slots, events):  # duplicate_of, in request order
                if ev.prompt_fingerprint:
                    try:
                        await self._mark_duplicate(ev)  # may read the store
                    except Exception as exc:
                        # Settled all the same: committed, so the ledger matches the
                        # engine; the call fails and a retry is answered from it.
                        failures.append((i, exc))
            if events:
                failures.extend(await self._commit_many(events, settled, slots, out))
            for i, task in tasks:
                try:
                    out[i] = await task
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failures.append((i, exc))
        except BaseException:
            for _i, task in tasks:
                task.cancel()
            raise
        if failures:
            raise min(failures, key=lambda f: f[0])[1]
        for req, resp in zip(records, out):
            if req.want_receipt:
                resp.receipt = await self.receipt(resp.event_id)
        return out

    def _begin_record(self, req, field: str, parsed, attested: bool) -> tuple:
        """The part of a Record that never awaits: checks, idempotency memory, the
        engine's settlement and the event. Returns (_EVENT, event, settlement): to
        commit (its duplicate_of still to mark when it has a prompt fingerprint);
        (_KNOWN, event, None): an event_id or reservation already settled; or
        (_UNSETTLED, exception, event_id): the engine does not hold the named
        reservation, the ledger decides (`_record_unsettled`)."""
        owners, labels, usage, revenue = parsed or convert.validate_record(req, field)
        mode = self._record_mode(req, field)
        rid = req.reservation_id
        event_id = req.event_id or rid or "evt_" + new_ulid()
        known = self._events.get(event_id)
        if known is None and rid:
            known = self._by_reservation.get(rid)
        if known is not None:
            return _KNOWN, known, None
        # The model reserved, when the Record names one (a gateway's fallback route
        # may have called another: it is priced at the model called).
        reserved = self.engine.hold_model(rid) if rid and req.model else ""
        try:
            s = self._settle(req, field, rid, owners, labels, usage)
        except (NotFound, Conflict) as exc:
            if not rid:
                raise
            return _UNSETTLED, exc, event_id
        ev = self._record_event(req, s, event_id, owners, labels, revenue, mode,
                                attested, False, usage)
        if reserved and ev.model != reserved:
            ev.reasons = (*ev.reasons, MODEL_SUBSTITUTED)
        # Remembered now, so a repeat later in the same batch is answered from it.
        self._remember(ev)
        return _EVENT, ev, s

    async def _record_unsettled(self, req, field: str, parsed, attested: bool,
                                exc: Exception, event_id: str):
        """A Record of a reservation the engine does not hold (NotFound/Conflict)."""
        rid = req.reservation_id
        if rid in self._expiring or self._expire_lock.locked():
            # Expired here; its EXPIRED event is pending, or being written right now
            # (the lock is held while a batch of them commits): write it / wait for
            # it, then answer with it as every process does (duplicate=True).
            await self._expire_claimed()
        first = await self._settled_in_ledger(rid)
        if first is not None:
            return await self._replay(first)
        # Not for an id this process issued: such a hold is open, settled, or
        # another tenant's — never lost in a crash.
        if not isinstance(exc, NotFound) or self._issued_here(rid):
            raise exc
        owners, labels, usage, revenue = parsed or convert.validate_record(req, field)
        if self.leases is not None:
            # Scale-out: another process made it (a gateway that retried its Record
            # elsewhere): settle its saved hold here, for the maker (_settle_foreign).
            hold = await self._saved_hold(rid)
            if hold is not None:
                return await self._settle_foreign(req, field, hold, event_id, owners,
                                                  labels, usage, revenue, attested)
        if not req.model or not (owners and any(owners)):
            raise exc
        # A reservation nobody here knows and the ledger never settled: its hold
        # was authorized inside the write-behind window before a crash (or by a
        # process whose holds are gone). The call happened and the provider
        # charged it, so it is metered without a hold — never lost — and the
        # event says so (reason reservation.unknown, the caller's reservation id).
        mode = self._record_mode(req, field)
        s = self._settle(req, field, "", owners, labels, usage)
        ev = self._record_event(req, s, event_id, owners, labels, revenue, mode,
                                attested, True, usage)
        self._remember(ev)
        if ev.prompt_fingerprint:
            await self._mark_duplicate(ev)
        return await self._commit(ev, s)

    def _adjust_committed(self, budget_ids, delta: int, at_ms: int) -> None:
        """Add `delta` nanos to the engine's committed of `budget_ids` (their period
        at `at_ms`, if still current)."""
        if not delta or not budget_ids:
            return
        now = shared._now_ms()
        for st in self.engine.budget_status():
            if st.budget_id in budget_ids:
                start = self._period_start(st.budget_id, at_ms or now)
                if start == st.period_start_ms:
                    self.engine.set_committed(st.budget_id, start,
                                              max(0, st.committed_nanos + delta))

    def _settle(self, req, field: str, reservation_id: str, owners, labels, usage):
        """engine.record for a Record; errors name the request's field."""
        try:
            return self.engine.record(
                reservation_id, model=req.model, provider=req.provider,
                owners=owners, labels=labels, input_tokens=usage[0],
                cached_input_tokens=usage[1], cache_write_tokens=usage[2],
                output_tokens=usage[3], reasoning_tokens=usage[4],
                outcome=req.outcome or Outcome.SUCCESS,
                input_bytes=req.input_bytes if req.input_bytes else -1,
                units=usage[5] or None, service_tier=usage[6],
            )
        except InvalidArgument as exc:
            raise InvalidArgument(field + exc.field, exc.message) from None
        except UnknownModel as exc:
            raise InvalidArgument(field + "model", str(exc)) from None

    def _record_event(self, req, s, event_id: str, owners, labels, revenue: int,
                      mode: int, attested: bool, unknown_hold: bool,
                      usage: tuple) -> LedgerEvent:
        """A Record's LedgerEvent from its settlement, privacy applied (all but
        duplicate_of, which `_mark_duplicate` sets); `usage` as validated
        (convert.usage_from_proto) gives its units and service tier."""
        ev = self._event_from_settlement(s, event_id, "record", req, owners, labels,
                                         revenue)
        if usage[5] or usage[6]:
            ev.units, ev.service_tier = dict(usage[5]), usage[6]
        if not revenue and not req.HasField("revenue"):
            book = self.price_book()
            if book is not None:
                ev.revenue_nanos = book.revenue(
                    customer=ev.customer, model=ev.model, cost_nanos=ev.cost_nanos,
                    usage=usage[:5], units=usage[5], service_tier=usage[6])
        if unknown_hold:
            ev.reservation_id = req.reservation_id
            ev.reasons = (*ev.reasons, RESERVATION_UNKNOWN)
        if mode != self.privacy.resolve(req.privacy_mode):  # not allowed (_record_mode)
            ev.privacy_mode = mode
            ev.reasons = (*ev.reasons, POLICY_PRIVACY_MODE_NOT_ALLOWED)
        if mode != _privacy.METADATA_ONLY or attested:
            self._apply_privacy(ev, req, mode, attested)
        elif ev.reservation_id:
            self._hold_privacy.pop(ev.reservation_id, None)
        if req.usage_estimated:
            # The caller's estimate, not the provider's report (meter.proto): a
            # signature or a fingerprint vouches for who sent it, not for the usage.
            ev.evidence = int(Evidence.ESTIMATED)
        return ev

    async def _write_settled(self, ev: LedgerEvent, s=None):
        """The writer's result for a settled event; on failure it is queued behind
        (the engine, or the maker's, counted it) and the caller told to retry —
        unless the ledger refused the event's data (`_not_committed`)."""
        try:
            return await self.writer.write(ev)
        except asyncio.CancelledError:
            # The caller went away; the engine already counted it: make sure the ledger
            # does too (a retry then finds it and answers duplicate=True).
            self.writer.write_behind(ev)
            raise
        except Exception as exc:
            raise self._not_committed(ev, exc, s) from exc

    async def _commit(self, ev: LedgerEvent, s):
        # (ev is remembered already: _begin_record, _record_unsettled)
        res = await self._write_settled(ev, s)
        if res.claimed_by:  # scale-out: another process settled the reservation first
            first = await self._lost_claim(ev, s, res.claimed_by)
            return convert.record_response(first, True, self._statuses(first.budget_ids))
        return self._committed(res, s)

    async def _commit_many(self, events: list, settled: list, slots: list[int],
                           out: list) -> list:
        """`_commit` for a batch's events in one `write_many`: each response into
        out[slot]; returns the failures as (slot, exception)."""
        try:
            results = await self.writer.write_many(events, return_exceptions=True)
        except asyncio.CancelledError:
            for ev in events:  # as _commit: the engine counted them, the ledger must
                self.writer.write_behind(ev)
            raise
        except Exception as exc:  # refused before anything was queued
            return [(i, self._not_committed(ev, exc, s))
                    for i, ev, s in zip(slots, events, settled)]
        failures = []
        lost = []
        committed = self._committed
        for i, ev, s, res in zip(slots, events, settled, results):
            if isinstance(res, BaseException):
                failures.append((i, self._not_committed(ev, res, s)))
            elif res.claimed_by:  # scale-out: settled first by another process
                lost.append((i, ev, s, res.claimed_by))
            else:
                out[i] = committed(res, s)
        for i, ev, s, winner in lost:
            try:
                first = await self._lost_claim(ev, s, winner)
                out[i] = convert.record_response(first, True,
                                                 self._statuses(first.budget_ids))
            except Exception as exc:
                failures.append((i, exc))
        return failures

    def _not_committed(self, ev: LedgerEvent, exc: BaseException, s=None) -> Exception:
        """The write of a settled event failed: queue it behind (the engine counted
        it) and tell the caller to retry. When the ledger refused the event's own
        data (EventRejected, or bad input found by the writer's check), a retry
        cannot succeed: the engine's count of it (settlement `s`) is undone, it is
        forgotten, and the caller gets that error (INVALID_ARGUMENT); the engine
        never counts an event the ledger does not have."""
        if isinstance(exc, InvalidArgument):
            self._compensate(s, "could not be written (the ledger refused the event)")
            if self._events.get(ev.event_id) is ev:
                self._events.pop(ev.event_id, None)
            rid = ev.reservation_id
            if rid and self._by_reservation.get(rid) is ev:
                self._by_reservation.pop(rid, None)
            if rid and self._hold_settled.get(rid) is ev:
                # The engine let the hold go and the caller is told: its saved row
                # goes too, as it would once the event had committed.
                del self._hold_settled[rid]
                self._hold_deletes.add(rid)
            log.error("tenant %s: event %s refused by the ledger: %s", self.tenant_id,
                      ev.event_id, exc)
            return exc
        self.writer.write_behind(ev)
        log.warning("tenant %s: event %s not committed (%s); queued behind",
                    self.tenant_id, ev.event_id, exc)
        err = ServiceError(grpc.StatusCode.UNAVAILABLE, "LEDGER_UNAVAILABLE",
                           "the ledger did not commit the event; retry with the "
                           "same event_id")
        err.__cause__ = exc
        return err

    def _committed(self, res, s):
        """The response to a committed Record (undoing the engine's second count of
        an event_id the ledger already had)."""
        first = res.event
        if res.duplicate:
            # The ledger already had this event_id (a retry the memory had forgotten,
            # e.g. after a restart): undo the engine's second count.
            self._compensate(s)
        elif self.leases is not None:  # scale-out: acked cost may be reported as used
            self.leases.committed(self, first)
        self._remember(first)
        return convert.record_response(first, res.duplicate, self._statuses(first.budget_ids))

    async def _replay(self, ev: LedgerEvent):
        """The first result of an already settled event, duplicate=True."""
        if not ev.seq:  # not acknowledged yet: make sure it is committed, then answer
            res = await self.writer.write(ev)
            if res.claimed_by:  # scale-out: another process settled it first
                ev = await self._lost_claim(ev, None, res.claimed_by)
            else:
                ev = res.event
                self._remember(ev)
        return convert.record_response(ev, True, self._statuses(ev.budget_ids))

    async def _settled_in_ledger(self, rid: str):
        """The ledger's event that settled reservation `rid`, beyond memory.

        Releases, expiries and reserved Records without an event_id all use the
        reservation id as event_id, so one primary-key read finds them.
        """
        ev = await self.store.get_event(self.tenant_id, rid)
        if ev is None or ev.reservation_id != rid:
            # Settled by a Record that brought its own event_id: find it by reservation.
            first = (await self.store.settled_reservations(self.tenant_id, [rid])).get(rid)
            ev = None if first is None else await self.store.get_event(self.tenant_id, first)
        if ev is not None and ev.reservation_id == rid:
            self._remember(ev)
            return ev
        return None

    def _remember(self, ev: LedgerEvent) -> None:
        rid = ev.reservation_id
        if self._events.get(ev.event_id) is ev and (
                not rid or self._by_reservation.get(rid) is ev):
            return  # remembered as it is already (an event settled, then committed)
        weight = event_bytes(ev)
        self._events.put(ev.event_id, ev, weight)
        if rid:
            prior = self._by_reservation.get(rid)
            self._by_reservation.put(rid, ev, weight)
            if prior is not None and prior.event_id == ev.event_id:
                # Remembered again once committed: its hold was dealt with the first
                # time (a delete for every Record would go to the ledger otherwise).
                return
            self._hold_meta.pop(rid, None)
            if self._hold_upserts.pop(rid, None) is None:
                # Saved (or being saved): delete it once `ev` is committed (flush_holds).
                self._hold_settled[rid] = ev  # (else never written: nothing to delete)

    def _compensate(self, s, why: str = "settled an event_id already in the ledger") -> None:
        if s is None:  # replayed from memory: the engine's count was undone already
            return
        if not s.cost_nanos or not s.budget_ids:
            return
        self._adjust_committed(s.budget_ids, -s.cost_nanos, s.settled_ms)
        log.warning("tenant %s: reservation %r %s; engine counters corrected",
                    self.tenant_id, s.reservation_id, why)

    def _period_start(self, budget_id: str, at_ms: int) -> int:
        b = self.budgets.get(budget_id)
        if b is None:
            return 0
        return self.core.period_bounds(b.period, at_ms)[0]

    def _event_from_settlement(self, s, event_id: str, kind: str, req=None,
                               owners=None, labels=None, revenue: int = 0) -> LedgerEvent:
        ev = self._event_fields(s, event_id, kind, req, owners, labels, revenue)
        if self.leases is not None:
            # Scale-out: several processes may settle one reservation (a Record
            # retried elsewhere, an expiry): the writer keeps the first.
            ev.claim = True
        return ev

    def _event_fields(self, s, event_id: str, kind: str, req, owners, labels,
                      revenue: int) -> LedgerEvent:
        differ = False
        if s.reservation_id:
            # The hold's owners and labels, whose budgets were charged (one
            # attribution): a Record naming others is recorded with the hold's and
            # the reason reservation.owners_differ.
            o = s.owners if isinstance(s.owners, tuple) else convert.owners_from_mapping(
                s.owners or {})
            if owners is not None:  # an owner the Record names, and names otherwise
                differ = any(r and r != h for r, h in zip(owners, o))
            if labels:
                held = s.labels or {}
                differ = differ or any(held.get(k) != v for k, v in labels.items())
            labels = None
        else:
            o = owners if owners is not None else s.owners
            if not isinstance(o, tuple):
                o = convert.owners_from_mapping(o or {})
        meta = self._hold_meta.get(s.reservation_id) if s.reservation_id else None
        decision, reasons, rule_ids = int(Decision.ALLOW), (), ()
        privacy = self.settings["default_privacy_mode"]
        attempt, retry_of = 0, ""
        if meta is not None:
            decision, reasons, rule_ids, privacy, attempt, retry_of = meta
        if differ:
            reasons = (*reasons, RESERVATION_OWNERS_DIFFER)
        if req is not None:
            privacy = req.privacy_mode or privacy
            attempt = req.attempt or attempt
            retry_of = req.retry_of or retry_of
        at = s.settled_ms or shared._now_ms()
        event_ms = req.event_time_ms if (req is not None and req.event_time_ms) else at
        charges = ()
        if s.cost_nanos and s.budget_ids:
            charges = tuple((bid, self._period_start(bid, at)) for bid in s.budget_ids
                            if bid in self.budgets)
        return LedgerEvent(
            tenant_id=self.tenant_id,
            event_id=event_id,
            event_ms=event_ms,
            kind=kind,
            reservation_id=s.reservation_id,
            customer=o[0], feature=o[1], workflow=o[2], task=o[3], department=o[4],
            employee=o[5],
            labels=dict(labels if labels is not None else (s.labels or {})),
            provider=s.provider,
            model=s.model,
            input_tokens=s.input_tokens,
            cached_input_tokens=s.cached_input_tokens,
            cache_write_tokens=s.cache_write_tokens,
            output_tokens=s.output_tokens,
            reasoning_tokens=s.reasoning_tokens,
            cost_nanos=s.cost_nanos,
            estimated_cost_nanos=s.estimated_cost_nanos,
            overrun_nanos=s.overrun_nanos,
            revenue_nanos=revenue,
            decision=decision,
            reasons=reasons,
            rule_ids=rule_ids,
            budget_ids=tuple(s.budget_ids),
            outcome=int(s.outcome),
            evidence=int(s.evidence),
            privacy_mode=int(privacy),
            attempt=attempt,
            retry_of=retry_of,
            catalog_version=s.catalog_version,
            budget_charges=charges,
        )

    async def release(self, reservation_id: str):
        """Void a hold; returns (event_id, statuses). Idempotent by reservation id."""
        convert.check_str(reservation_id, "reservation_id", required=True)
        rid = reservation_id
        known = self._by_reservation.get(rid)
        if known is None:
            try:
                s = self.engine.release(rid)
            except (NotFound, Conflict) as exc:
                if rid in self._expiring:  # expired here, event pending: write it
                    await self._expire_claimed()
                known = await self._settled_in_ledger(rid)
                if known is None:
                    known = await self._release_foreign(rid, exc)
            if known is None:
                self._hold_privacy.pop(rid, None)
                ev = self._event_from_settlement(s, rid, "released")
                self._remember(ev)
                res = await self.writer.write(ev)
                if not res.claimed_by:
                    self._remember(res.event)
                    return res.event.event_id, self._statuses(s.budget_ids)
                # Scale-out: another process settled it first: that event answers.
                known = await self._lost_claim(ev, s, res.claimed_by)
        if known.kind != "released":
            raise Conflict(f"reservation {rid!r} was already settled by "
                           f"event {known.event_id!r} ({known.kind})")
        if not known.seq:
            known = (await self.writer.write(known)).event
        return known.event_id, self._statuses(known.budget_ids)
