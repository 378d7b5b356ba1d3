"""The tenant runtime: one p402core Engine per tenant, and what keeps it honest.

Owns `TenantRuntime` (a tenant's engine, settings and its memory of recent ids) and
`Runtime` (every tenant of one server, plus the background task). The servicers
call into it; it calls the core (microseconds, no I/O) and the store.

Engine life cycle
- Built lazily on a tenant's first call, from the store: budgets, policy rules, the
  tenant's prices merged over `Catalog.default()`, settings. Restored at once:
  committed totals from `store.budget_totals` (`engine.set_committed`), open holds
  from `store.load_holds`.
- Admin changes persist to the store first, then swap the engine's budgets, rules or
  catalog atomically (`set_budgets`/`set_rules`/`set_catalog`; counters kept by id).
  A settings change builds a new engine from the old one's snapshot (counters,
  holds and calibration carry over; rate-limit buckets start full).

Decisions and events
- `authorize` never awaits: a decision is made in memory and answered. A DENY is
  written behind as a ledger event (kind "denied", outcome DENIED, cost 0).
- `record` settles the engine, builds the LedgerEvent from the Settlement and awaits
  the group-commit writer: the answer goes out only after the commit. The event's
  owners and labels are the Record's when it sends them, else the hold's (budgets
  are always charged by the hold's, as authorized). Each event keeps the catalog
  version it was priced with.
- Every settled reservation becomes exactly one event: a Record ("record"), a
  Release ("released") or the expiry sweep ("expired"; committed at its estimate,
  evidence ESTIMATED, written behind).

Idempotency (DESIGN §3: a repeated Record returns the first result)
- The event_id of a Record is the caller's, else the reservation id for a reserved
  Record (so a retry without an event_id is idempotent too), else a new ULID.
- Recent events are remembered by event_id and by reservation id (bounded LRU). A
  retry answers from there with duplicate=True and never touches the engine; an
  event not yet acknowledged (its write failed, or is in flight) is written again,
  and the writer's (tenant, event_id) de-duplication makes that safe.
- Beyond memory (e.g. after a restart), the writer reports the duplicate and the
  engine's double count is undone at once (`_compensate`), so budget counters always
  equal the ledger.
- A Record of a reservation that was already settled by an earlier event (a record
  with another event_id, a release, an expiry) returns that first event,
  duplicate=True.

Background (one task per server): every `expire_interval_seconds` `engine.expire()`
for every tenant (EXPIRED events written behind); every
`holds_flush_interval_seconds` the changed open holds are written behind
(`store.save_holds`, batched upserts and deletes), and all of them at shutdown.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict

import grpc

import p402core
from p402core import (
    Conflict,
    Decision,
    Evidence,
    InvalidArgument,
    NotFound,
    Outcome,
    UnknownModel,
)

from . import convert
from .config import ServerConfig
from .errors import ServiceError
from .store.model import LedgerEvent

log = logging.getLogger("p402.server.runtime")

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_ulid() -> str:
    """A ULID: 48-bit Unix ms + 80 random bits, 26 Crockford base32 chars; sortable."""
    n = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    out = []
    for _ in range(26):
        out.append(_CROCKFORD[n & 31])
        n >>= 5
    return "".join(reversed(out))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _LRU(OrderedDict):
    """A bounded dict: the oldest entries go when it is full."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def put(self, key, value) -> None:
        self[key] = value
        if len(self) > self.limit:
            self.popitem(last=False)


def _catalog_for(core, specs: list[dict]):
    """The tenant's catalog: Catalog.default() with the tenant's prices merged over."""
    base = core.Catalog.default()
    if not specs:
        return base
    prices = [core.ModelPrice.from_dict(s) for s in specs]
    digest = hashlib.sha256(
        json.dumps(sorted(specs, key=lambda s: s.get("model", "")), sort_keys=True,
                   separators=(",", ":")).encode()).hexdigest()[:12]
    tenant = core.Catalog(prices, version=f"tenant-{digest}", taken=base.taken)
    return base.merged(tenant)


class TenantRuntime:
    """One tenant's engine and idempotency memory (module docstring)."""

    def __init__(self, tenant_id: str, *, core, store, writer, config: ServerConfig,
                 settings: dict, budgets: list, rules: list, price_specs: list[dict]):
        self.tenant_id = tenant_id
        self.core = core
        self.store = store
        self.writer = writer
        self.config = config
        self.settings = settings
        self.budgets = {b.budget_id: b for b in budgets}
        self.rules = {r.rule_id: r for r in rules}
        self.price_specs = {s["model"]: s for s in price_specs}
        self.catalog = _catalog_for(core, list(self.price_specs.values()))
        self.engine = self._new_engine()
        # Idempotency memory: event_id -> LedgerEvent (seq 0 until acknowledged) and
        # reservation_id -> the event that settled it.
        self._events = _LRU(config.recent_ids)
        self._by_reservation = _LRU(config.recent_ids)
        # Caller-chosen reservation ids (or "\0" + request_id) -> the AuthorizeResponse,
        # for Authorize retries.
        self._authorizations = _LRU(config.recent_ids)
        # What a Record needs from its Authorize beyond the engine's hold (decision,
        # reasons, rule ids, privacy mode, attempt, retry_of), only when not default.
        self._hold_meta: dict[str, tuple] = {}
        # Open-hold write-behind: holds to upsert (rid -> what the engine reserved,
        # captured from the Authorization) and reservation ids to delete at next flush.
        self._hold_upserts: dict[str, tuple] = {}
        self._hold_deletes: set[str] = set()
        self.admin_lock = asyncio.Lock()

    # --- engine construction -----------------------------------------------------

    def _new_engine(self):
        s = self.settings
        core = self.core
        fallback = None
        if s["allow_unknown_models"]:
            fallback = core.ModelPrice(
                "unknown", "", input_pico=s["fallback_input_pico_per_token"],
                output_pico=s["fallback_output_pico_per_token"])
        return core.Engine(
            self.catalog,
            budgets=tuple(self.budgets.values()),
            rules=tuple(self.rules.values()),
            estimator=core.Estimator(default_output_cap=s["default_output_tokens"]),
            hold_ttl_seconds=s["hold_ttl_seconds"],
            allow_clamp=s["allow_clamp"],
            fallback_price=fallback,
            # Unique per engine instance so reservation ids never repeat across
            # restarts or rebuilds (they double as default event ids).
            reservation_prefix=f"rsv_{new_ulid()}_",
        )

    async def restore(self) -> None:
        """Open holds from the store, then committed totals from the ledger."""
        rows = await self.store.load_holds(self.tenant_id)
        # A hold settled just before a crash can still be in the holds table (they are
        # written behind): drop those the ledger already has an event for.
        live = []
        for row in rows:
            if await self._settled_in_ledger(row[0]) is None:
                live.append(row)
            else:
                self._hold_deletes.add(row[0])
        rows = live
        if rows:
            restored = _restore_holds(self.engine, rows)
            for rid, meta in restored.items():
                if meta:
                    self._hold_meta[rid] = meta
            log.info("tenant %s: restored %d open holds", self.tenant_id, len(restored))
        totals = await self.store.budget_totals(self.tenant_id)
        now = _now_ms()
        for (budget_id, period_start_ms), nanos in totals.items():
            # Only the current period counts (older ones, and those of a budget
            # since deleted or re-created with another period, stay in the ledger).
            if (budget_id in self.budgets
                    and self._period_start(budget_id, now) == period_start_ms):
                self.engine.set_committed(budget_id, period_start_ms, nanos)

    # --- decisions ---------------------------------------------------------------

    def authorize(self, req):
        """AuthorizeRequest -> AuthorizeResponse, in memory (never awaits)."""
        args = convert.authorize_args(req, self.settings["default_privacy_mode"])
        rid = args["reservation_id"]
        # A retried Authorize (same caller reservation id, or same request_id) gets
        # the first answer back instead of a second hold.
        if rid or req.request_id:
            prior = self._authorizations.get(rid or "\0" + req.request_id)
            if prior is not None:
                return prior
            if rid and rid in self._by_reservation:
                raise Conflict(f"reservation {rid!r} was already settled")
        a = self.engine.authorize(req.model, **args)
        resp = convert.authorization_to_proto(a)
        if a.decision == Decision.DENY:
            self._write_denied(req, a, args)
        else:
            rid = a.reservation_id
            self._hold_upserts[rid] = (a, args["owners"], args["labels"],
                                       args["input_bytes"], args["content"], self.catalog,
                                       self.engine)
            if (a.decision != Decision.ALLOW or req.attempt or req.retry_of
                    or args["privacy_mode"] != self.settings["default_privacy_mode"]):
                self._hold_meta[rid] = (int(a.decision), tuple(a.reasons),
                                        tuple(a.rule_ids), int(args["privacy_mode"]),
                                        req.attempt, req.retry_of)
        if args["reservation_id"]:
            self._authorizations.put(args["reservation_id"], resp)
        elif req.request_id:
            self._authorizations.put("\0" + req.request_id, resp)
        return resp

    def _write_denied(self, req, a, args) -> None:
        owners = args["owners"]
        ev = LedgerEvent(
            tenant_id=self.tenant_id,
            event_id=args["reservation_id"] or "den_" + new_ulid(),
            event_ms=_now_ms(),
            kind="denied",
            customer=owners[0], feature=owners[1], workflow=owners[2],
            task=owners[3], department=owners[4], employee=owners[5],
            labels=args["labels"] or {},
            provider=a.provider or req.provider,
            model=a.model or req.model,
            estimated_cost_nanos=a.estimated_cost_nanos,
            decision=int(Decision.DENY),
            reasons=tuple(a.reasons),
            rule_ids=tuple(a.rule_ids),
            outcome=int(Outcome.DENIED),
            evidence=int(Evidence.ESTIMATED),
            privacy_mode=int(args["privacy_mode"]),
            attempt=req.attempt,
            retry_of=req.retry_of,
            catalog_version=a.catalog_version,
        )
        self.writer.write_behind(ev)

    async def record(self, req, field: str = "", parsed: tuple | None = None):
        """RecordRequest -> RecordResponse, after the event's commit. `parsed` is
        convert.validate_record's result when the caller validated already."""
        owners, labels, usage, revenue = parsed or convert.validate_record(req, field)
        rid = req.reservation_id
        event_id = req.event_id or rid or "evt_" + new_ulid()
        known = self._events.get(event_id)
        if known is None and rid:
            known = self._by_reservation.get(rid)
        if known is not None:
            return await self._replay(known)
        outcome = req.outcome or Outcome.SUCCESS
        try:
            s = self.engine.record(
                rid, model=req.model, provider=req.provider, owners=owners, labels=labels,
                input_tokens=usage[0], cached_input_tokens=usage[1],
                cache_write_tokens=usage[2], output_tokens=usage[3],
                reasoning_tokens=usage[4], outcome=outcome,
                input_bytes=req.input_bytes if req.input_bytes else -1,
            )
        except InvalidArgument as exc:
            raise InvalidArgument(field + exc.field, exc.message) from None
        except UnknownModel as exc:
            raise InvalidArgument(field + "model", str(exc)) from None
        except (NotFound, Conflict):
            if rid:
                first = await self._settled_in_ledger(rid)
                if first is not None:
                    return await self._replay(first)
            raise
        ev = self._event_from_settlement(s, event_id, "record", req, owners, labels,
                                         revenue)
        return await self._commit(ev, s)

    async def _commit(self, ev: LedgerEvent, s):
        self._remember(ev)
        try:
            res = await self.writer.write(ev)
        except asyncio.CancelledError:
            # The caller went away; the engine already counted it: make sure the ledger
            # does too (a retry then finds it and answers duplicate=True).
            self.writer.write_behind(ev)
            raise
        except Exception as exc:
            self.writer.write_behind(ev)
            log.warning("tenant %s: event %s not committed (%s); queued behind",
                        self.tenant_id, ev.event_id, exc)
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "LEDGER_UNAVAILABLE",
                               "the ledger did not commit the event; retry with the "
                               "same event_id") from exc
        first = res.event
        if res.duplicate:
            # The ledger already had this event_id (a retry the memory had forgotten,
            # e.g. after a restart): undo the engine's second count.
            self._compensate(s)
        self._remember(first)
        return convert.record_response(first, res.duplicate, self._statuses(first.budget_ids))

    async def _replay(self, ev: LedgerEvent):
        """The first result of an already settled event, duplicate=True."""
        if not ev.seq:  # not acknowledged yet: make sure it is committed, then answer
            res = await self.writer.write(ev)
            ev = res.event
            self._remember(ev)
        return convert.record_response(ev, True, self._statuses(ev.budget_ids))

    async def _settled_in_ledger(self, rid: str):
        """The ledger's event that settled reservation `rid`, beyond memory.

        Releases, expiries and reserved Records without an event_id all use the
        reservation id as event_id, so one primary-key read finds them.
        """
        ev = await self.store.get_event(self.tenant_id, rid)
        if ev is not None and ev.reservation_id == rid:
            self._remember(ev)
            return ev
        return None

    def _remember(self, ev: LedgerEvent) -> None:
        self._events.put(ev.event_id, ev)
        if ev.reservation_id:
            self._by_reservation.put(ev.reservation_id, ev)
            rid = ev.reservation_id
            self._hold_meta.pop(rid, None)
            if self._hold_upserts.pop(rid, None) is None:
                self._hold_deletes.add(rid)  # (else never written: nothing to delete)

    def _compensate(self, s) -> None:
        cost = s.cost_nanos
        if not cost or not s.budget_ids:
            return
        now = _now_ms()
        for st in self.engine.budget_status():
            if st.budget_id in s.budget_ids:
                start = self._period_start(st.budget_id, s.settled_ms or now)
                if start == st.period_start_ms:
                    self.engine.set_committed(st.budget_id, start,
                                              max(0, st.committed_nanos - cost))
        log.warning("tenant %s: reservation %r settled an event_id already in the ledger; "
                    "engine counters corrected", self.tenant_id, s.reservation_id)

    def _period_start(self, budget_id: str, at_ms: int) -> int:
        b = self.budgets.get(budget_id)
        if b is None:
            return 0
        return self.core.period_bounds(b.period, at_ms)[0]

    def _event_from_settlement(self, s, event_id: str, kind: str, req=None,
                               owners=None, labels=None, revenue: int = 0) -> LedgerEvent:
        o = owners if owners is not None else s.owners
        if not isinstance(o, tuple):
            o = convert.owners_from_mapping(o or {})
        meta = self._hold_meta.get(s.reservation_id) if s.reservation_id else None
        decision, reasons, rule_ids = int(Decision.ALLOW), (), ()
        privacy = self.settings["default_privacy_mode"]
        attempt, retry_of = 0, ""
        if meta is not None:
            decision, reasons, rule_ids, privacy, attempt, retry_of = meta
        if req is not None:
            privacy = req.privacy_mode or privacy
            attempt = req.attempt or attempt
            retry_of = req.retry_of or retry_of
        at = s.settled_ms or _now_ms()
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

    def _statuses(self, budget_ids) -> list:
        if not budget_ids:
            return []
        return [st for st in self.engine.budget_status() if st.budget_id in budget_ids]

    async def release(self, reservation_id: str):
        """Void a hold; returns (event_id, statuses). Idempotent by reservation id."""
        convert.check_str(reservation_id, "reservation_id", required=True)
        known = self._by_reservation.get(reservation_id)
        if known is None:
            try:
                s = self.engine.release(reservation_id)
            except (NotFound, Conflict):
                known = await self._settled_in_ledger(reservation_id)
                if known is None:
                    raise
            else:
                ev = self._event_from_settlement(s, reservation_id, "released")
                self._remember(ev)
                res = await self.writer.write(ev)
                self._remember(res.event)
                return res.event.event_id, self._statuses(s.budget_ids)
        if known.kind != "released":
            raise Conflict(f"reservation {reservation_id!r} was already settled by "
                           f"event {known.event_id!r} ({known.kind})")
        if not known.seq:
            known = (await self.writer.write(known)).event
        return known.event_id, self._statuses(known.budget_ids)

    # --- background --------------------------------------------------------------

    def expire(self, now_ms: int | None = None) -> int:
        """Settle every hold past its expiry at its estimate; events written behind."""
        settled = self.engine.expire(now_ms)
        for s in settled:
            prior = self._by_reservation.get(s.reservation_id)
            if prior is not None:  # already settled by an event (cannot normally happen)
                continue
            ev = self._event_from_settlement(s, s.reservation_id, "expired")
            self._remember(ev)
            self.writer.write_behind(ev)
        return len(settled)

    async def flush_holds(self, *, everything: bool = False) -> None:
        """Write behind the open holds that changed since the last flush
        (`everything`: all open holds, from an engine snapshot; for shutdown)."""
        if everything:
            rows = _snapshot_rows(self.engine.snapshot(), self._hold_meta)
            self._hold_upserts = {}
        else:
            pending, self._hold_upserts = self._hold_upserts, {}
            rows = [_captured_row(rid, h, self._hold_meta.get(rid))
                    for rid, h in pending.items()]
        deletes, self._hold_deletes = self._hold_deletes, set()
        if not rows and not deletes:
            return
        try:
            await self.store.save_holds(self.tenant_id, rows, list(deletes))
        except Exception:
            # Keep them for the next round (the flush loop logs). A hold settled
            # meanwhile is in _hold_deletes already and is not re-added.
            if not everything:
                for rid, h in pending.items():
                    if rid not in self._hold_deletes:
                        self._hold_upserts.setdefault(rid, h)
            self._hold_deletes |= deletes
            raise

    # --- admin swaps (callers hold admin_lock and have persisted first) -----------

    def swap_budgets(self, budgets: dict) -> None:
        self.engine.set_budgets(tuple(budgets.values()))
        self.budgets = budgets

    def swap_rules(self, rules: dict) -> None:
        self.engine.set_rules(tuple(rules.values()))
        self.rules = rules

    def swap_prices(self, price_specs: dict) -> None:
        catalog = _catalog_for(self.core, list(price_specs.values()))
        self.engine.set_catalog(catalog)
        self.catalog = catalog
        self.price_specs = price_specs

    def swap_settings(self, settings: dict) -> None:
        old = self.engine
        self.settings = settings
        engine = self._new_engine()
        engine.restore(old.snapshot())
        self.engine = engine


# --- hold persistence: open holds <-> store rows ----------------------------------
#
# A stored hold's data is {"hold": <one entry of Engine.snapshot()["holds"], with
# "price" the ModelPrice.to_dict() itself instead of an index>, "meta": [decision,
# reasons, rule_ids, privacy_mode, attempt, retry_of] or null}. Holds are captured
# from the Authorization when they are made (so the write-behind never walks the
# engine's holds) and put back with Engine.restore at start.

# id(ModelPrice) -> (the price, its to_dict()), so the hold write-behind converts
# each price once (the entry keeps the price alive, so its id is not reused).
_PRICE_DICTS: dict = {}


def _captured_row(rid: str, captured: tuple, meta) -> tuple:
    a, owners, labels, input_bytes, content, catalog, engine = captured
    try:
        price = catalog.lookup(a.model, a.provider)
    except LookupError:  # unknown model allowed at the fallback price
        price = engine.fallback_price
    entry = _PRICE_DICTS.get(id(price))
    if entry is None or entry[0] is not price:
        if len(_PRICE_DICTS) > 10_000:
            _PRICE_DICTS.clear()
        entry = _PRICE_DICTS[id(price)] = (price, price.to_dict())
    price_dict = entry[1]
    if content is not None:
        input_bytes = len(content.encode("utf-8", "surrogatepass"))
    hold = {
        "reservation_id": rid,
        "model": a.model,
        "provider": a.provider,
        "price": price_dict,
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
    return rid, a.expires_ms, {"hold": hold, "meta": list(meta) if meta else None}


def _snapshot_rows(snap: dict, metas: dict) -> list[tuple]:
    prices = snap.get("prices", [])
    rows = []
    for h in snap.get("holds", ()):
        h = dict(h)
        h["price"] = prices[h["price"]]
        meta = metas.get(h["reservation_id"])
        rows.append((h["reservation_id"], int(h["expires_ms"]),
                     {"hold": h, "meta": list(meta) if meta else None}))
    return rows


def _restore_holds(engine, rows) -> dict:
    """Put stored holds back into a fresh engine; returns {rid: meta or None}."""
    snap = engine.snapshot()
    prices: dict[str, int] = {}
    price_list = []
    holds = []
    out = {}
    for rid, _expires, data in rows:
        h = dict(data["hold"])
        key = _json_key(h["price"])
        if key not in prices:
            prices[key] = len(price_list)
            price_list.append(h["price"])
        h["price"] = prices[key]
        holds.append(h)
        m = data.get("meta")
        out[rid] = tuple(m) if m else None
    # The holds' amounts are held on their budgets again (those that still exist).
    counters = snap["budgets"]["counters"]
    for h in holds:
        h["budget_ids"] = [b for b in h["budget_ids"] if b in counters]
        for b in h["budget_ids"]:
            counters[b]["held_nanos"] += h["amount_nanos"]
    snap["prices"] = price_list
    snap["holds"] = holds
    engine.restore(snap)
    return out


def _json_key(d: dict) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


class Runtime:
    """Every tenant's runtime of one server, and the background task."""

    def __init__(self, store, writer, config: ServerConfig, core=None):
        self.store = store
        self.writer = writer
        self.config = config
        self.core = core or p402core.load(p402core.IMPLEMENTATION)
        self._tenants: dict[str, TenantRuntime] = {}
        self._building: dict[str, asyncio.Future] = {}
        self._task: asyncio.Task | None = None

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
        settings = convert.settings_with_defaults(await store.get_settings(tenant_id))
        budgets = [core.Budget.from_dict(spec)
                   for spec in (await store.list_budgets(tenant_id)).values()]
        rules = [core.Rule.from_dict(spec)
                 for spec in (await store.list_policies(tenant_id)).values()]
        prices = list((await store.list_prices(tenant_id)).values())
        rt = TenantRuntime(tenant_id, core=core, store=store, writer=self.writer,
                           config=self.config, settings=settings, budgets=budgets,
                           rules=rules, price_specs=prices)
        await rt.restore()
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
        while True:
            await asyncio.sleep(min(cfg.holds_flush_interval_seconds,
                                    cfg.expire_interval_seconds))
            now = time.monotonic()
            if now >= next_expire:
                next_expire = now + cfg.expire_interval_seconds
                for rt in list(self._tenants.values()):
                    try:
                        rt.expire()
                    except Exception:
                        log.exception("tenant %s: expiry sweep failed", rt.tenant_id)
            for rt in list(self._tenants.values()):
                try:
                    await rt.flush_holds()
                except Exception:
                    log.exception("tenant %s: writing open holds failed; will retry",
                                  rt.tenant_id)

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


__all__ = ["Runtime", "TenantRuntime", "new_ulid"]

