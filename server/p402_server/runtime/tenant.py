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
- Scale-out (leases on: several processes on one store): every admin write bumps the
  tenant's config version in the store, in its own transaction. A process remembers
  the version each engine's config was read at (read before the config) and polls
  the versions of its tenants every `config_poll_seconds` (one query); a tenant whose
  version moved is reloaded (`TenantRuntime.reload_config`: re-read as at build,
  swap only what differs). So an admin change made through one process reaches the
  others within about one poll; a new HARD budget starts there at a zero lease
  (deny until leased, never overspend).

Decisions and events
- `authorize` never awaits: a decision is made in memory and answered. A DENY is
  written behind as a ledger event (kind "denied", outcome DENIED, cost 0).
- `record` settles the engine, builds the LedgerEvent from the Settlement and awaits
  the group-commit writer: the answer goes out only after the commit. A reserved
  event's owners and labels are the hold's, whose budgets were charged; a Record
  naming others adds the reason reservation.owners_differ. A Record without a
  reservation is attributed to its own owners. Each event keeps the catalog version
  it was priced with.
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
- Scale-out (leases on; SCALEOUT.md states the contract): a hold's money stays in
  its maker's lease. A Record or Release of a reservation another process made
  settles the maker's saved hold here without this engine (`_settle_foreign`,
  waiting a few flush intervals for a hold not saved yet) and leaves the maker a
  notice, which the maker books (`book_notice`). Every settling event claims its
  reservation in the writer's transaction (LedgerEvent.claim, table hold_claims):
  the first event wins, a later one with another event_id is not written and its
  caller gets the first (`_lost_claim`); a maker whose own copy lost books the
  winner's cost (`_rebook`). A Record racing its hold's expiry gets the EXPIRED
  event (duplicate=True) on every process. Survivors expire a dead process's saved
  holds (`Runtime.sweep_dead_holds`). Budget status is the store's
  (`budget_status`).
  An Authorize that only a leased budget denies takes the missing nanos from the
  store and is decided again (`authorize_exact`).

Background (one task per server): every `expire_interval_seconds` `engine.expire()`
for every tenant (EXPIRED events written behind); every
`holds_flush_interval_seconds` the changed open holds are written behind
(`store.save_holds`, batched upserts and deletes), and all of them at shutdown; with
leases on, every tick the notices left for this process (`take_notices`), every
`config_poll_seconds` the config poll (`Runtime.sync_config`) and the store-level
budget status, and every `DEAD_SWEEP_SECONDS` the dead processes' expired holds.
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
from p402.v1 import meter_pb2
from p402_server.ledger.evidence import evidence_for
from p402_server.ledger.model import Content, LedgerEvent
from p402_server.privacy import modes as _privacy
from p402_server.runtime.config import ServerConfig
from p402_server.wire import convert
from p402_server.wire.errors import ServiceError
from p402core import (
    BUDGET_EXCEEDED,
    POLICY_PRIVACY_MODE_NOT_ALLOWED,
    Conflict,
    Decision,
    Evidence,
    InvalidArgument,
    NotFound,
    Outcome,
    PrivacyMode,
    UnknownModel,
)

log = logging.getLogger("p402.server.runtime")

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

# A Record named a reservation this server does not hold and the ledger never
# settled: metered without a hold (see TenantRuntime.record).
RESERVATION_UNKNOWN = "reservation.unknown"
# A Record named another model than its reservation's (a fallback): priced at the
# model called, charged to the budgets the reservation held.
MODEL_SUBSTITUTED = "model.substituted"
# Scale-out: a Record or Release settled here a hold another process made, from its
# saved hold (TenantRuntime._settle_foreign); the maker's lease keeps the money.
RESERVATION_ADOPTED = "reservation.adopted"
# A reserved Record named other owners or labels than its Authorize: the event keeps
# the hold's (the owners whose budgets were charged) and says so.
RESERVATION_OWNERS_DIFFER = "reservation.owners_differ"
# A Record that overtakes its maker's hold write-behind waits this many flush
# intervals for the saved hold (TenantRuntime._saved_hold).
FOREIGN_HOLD_WAITS = 8

# Reservation-id prefixes of the engines this process built: an id carrying one was
# issued here, so if no engine of its tenant holds it, it was not lost in a crash.
_ISSUED_PREFIXES: set[str] = set()


def _issue_prefix() -> str:
    # Unique per engine instance so reservation ids never repeat across restarts
    # or rebuilds (they double as default event ids).
    prefix = f"rsv_{new_ulid()}_"
    _ISSUED_PREFIXES.add(prefix)
    return prefix


def _issued_here(reservation_id: str) -> bool:
    head, sep, _ = reservation_id.rpartition("_")
    return bool(sep) and head + "_" in _ISSUED_PREFIXES

# Scale-out: how often a process looks for dead processes' expired holds.
DEAD_SWEEP_SECONDS = 1.0

# TenantRuntime._begin_record's outcomes.
_EVENT, _KNOWN, _UNSETTLED = "event", "known", "unsettled"


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


class _Settled:
    """A Settlement made without this process's engine: another process's saved
    hold, settled here (TenantRuntime._foreign_settlement); the fields the event
    needs, as p402core's Settlement names them."""

    __slots__ = ("reservation_id", "model", "provider", "owners", "labels",
                 "input_tokens", "cached_input_tokens", "cache_write_tokens",
                 "output_tokens", "reasoning_tokens", "cost_nanos",
                 "estimated_cost_nanos", "overrun_nanos", "outcome", "evidence",
                 "budget_ids", "catalog_version", "settled_ms")

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields[name])


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
        self._prefixes: set[str] = set()  # reservation-id prefixes of our engines
        self._signer = None  # receipts.Signer of the active evidence key (receipt_signer)
        self._price_book = None  # (document, pricebook.PriceBook) of settings["price_book"]
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
        # Privacy and evidence (privacy.py): the tenant's modes, salt and
        # duplicate memory; per open hold, what its Authorize left for the Record
        # (mode, prompt fingerprint, prompt text when the mode keeps it).
        self.privacy = _privacy.TenantPrivacy(tenant_id, settings, core)
        self.privacy.set_rules(rules)
        self._hold_privacy: dict[str, tuple] = {}
        # Scale-out: holds expired here whose EXPIRED event (which claims the
        # reservation) is still to be written (reservation id -> the engine's
        # Settlement; `_expire_claimed`).
        self._expiring: dict[str, object] = {}
        # Scale-out (leases.py): the process's LeaseManager when leasing is on
        # (Runtime._build attaches it), else None: the engine owns whole budgets.
        self.leases = None
        # Scale-out: budget status as the store sees it across processes, refreshed
        # every config poll (refresh_store_status): budget_id -> (period_start_ms,
        # store committed, store held, this engine's committed, held at that time).
        self._status_base: dict[str, tuple] = {}
        # One writer of pending EXPIRED events at a time (_expire_claimed): a Record
        # racing its hold's expiry waits for it, then answers with the event.
        self._expire_lock = asyncio.Lock()

    # --- engine construction -----------------------------------------------------

    def _new_prefix(self) -> str:
        prefix = _issue_prefix()
        self._prefixes.add(prefix)
        return prefix

    def _issued_here(self, reservation_id: str) -> bool:
        """Was `reservation_id` issued by this process? With leases, by this tenant's
        engines in this server only: another server (a peer process, or in tests one
        in the same process) may have made it, and then it can be adopted."""
        if self.leases is None:
            return _issued_here(reservation_id)
        head, sep, _ = reservation_id.rpartition("_")
        return bool(sep) and head + "_" in self._prefixes

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
            reservation_prefix=self._new_prefix(),
        )

    async def restore(self) -> None:
        """Open holds from the store, then committed totals from the ledger."""
        # Scale-out (leases.py): the holds table is shared by every process on the
        # ledger and says nothing of which one made a hold, so a leased engine
        # adopts none (another process would settle or expire it a second time).
        rows = [] if self.leases is not None else await self.store.load_holds(self.tenant_id)
        # A hold settled just before a crash can still be in the holds table (they are
        # written behind): drop those the ledger already has an event for (one batch
        # query), or they would be held, and then charged at expiry, a second time.
        settled = await self.store.settled_reservations(self.tenant_id, [r[0] for r in rows])
        self._hold_deletes.update(settled)
        rows = [row for row in rows if row[0] not in settled]
        if rows:
            # Each stored hold's data is {"hold": <an Engine.hold_records() record>,
            # "meta": [...] | null}; restore_holds re-holds the amounts on the budgets
            # that still exist (all or nothing).
            n = self._restore_hold_records([data["hold"] for _rid, _exp, data in rows])
            for rid, _exp, data in rows:
                if data.get("meta"):
                    self._hold_meta[rid] = tuple(data["meta"])
            log.info("tenant %s: restored %d open holds", self.tenant_id, n)
        totals = await self.store.budget_totals(self.tenant_id)
        now = _now_ms()
        for (budget_id, period_start_ms), nanos in totals.items():
            # Only the current period counts (older ones, and those of a budget
            # since deleted or re-created with another period, stay in the ledger).
            if (budget_id in self.budgets
                    and self._period_start(budget_id, now) == period_start_ms):
                self.engine.set_committed(budget_id, period_start_ms, nanos)

    # --- decisions ---------------------------------------------------------------

    async def authorize_exact(self, req):
        """`authorize`, and with leases, at the very end of a budget: when only a
        leased budget denied (its local slice is spent), take exactly what this
        request needs from the store (LeaseManager.take_exact: one conditional
        statement that cannot pass the limit) and decide again. Awaits the store only
        on such a DENY; otherwise the same as `authorize`."""
        leases = self.leases
        if leases is None:
            return self.authorize(req)
        denied: list = []
        resp = self.authorize(req, exact=denied)
        if resp is not None:
            return resp
        await leases.take_exact(self, denied[0])
        return self.authorize(req)

    def authorize(self, req, exact: list | None = None):
        """AuthorizeRequest -> AuthorizeResponse, in memory (never awaits).

        `exact` (a list; `authorize_exact`): when a leased budget alone denies, the
        engine's Authorization is appended to it and None returned, with no side
        effect (nothing held, nothing written): the caller may take exactly what
        is missing from the store and call again."""
        args = convert.authorize_args(req, self.settings["default_privacy_mode"])
        mode = self.privacy.resolve(req.privacy_mode)
        if not self.privacy.allowed(mode):
            return self._deny_privacy(req, args, mode)
        rid = args["reservation_id"]
        # A retried Authorize (same caller reservation id, or same request_id) gets
        # the first answer back instead of a second hold.
        if rid or req.request_id:
            prior = self._authorizations.get(rid or "\0" + req.request_id)
            if prior is not None:
                return prior
            if rid and rid in self._by_reservation:
                raise Conflict(f"reservation {rid!r} was already settled")
        leases = self.leases
        if leases is not None:  # scale-out: past a lease deadline, spend nothing
            leases.check(self)
        a = self.engine.authorize(req.model, **args)
        if leases is not None and a.decision == Decision.DENY:
            leases.denied(self)  # top the lease up now, not at the next tick
            if exact is not None and BUDGET_EXCEEDED in a.reasons:
                exact.append(a)
                return None
        resp = convert.authorization_to_proto(a)
        if self._status_base and a.budgets:  # scale-out: the store's status
            del resp.budgets[:]
            for st in self._store_level(list(a.budgets)):
                convert.budget_status_to_proto(st, resp.budgets.add())
        if mode != _privacy.METADATA_ONLY and a.reservation_id and req.content:
            # Hashed (and, where the mode keeps text, held) in memory for the Record;
            # metadata_only keeps nothing, the content was only measured.
            kept = self.privacy.keep(mode, req.content, None)
            self._hold_privacy[a.reservation_id] = (
                kept.prompt_fingerprint, req.content if kept.texts else None)
        if a.decision == Decision.DENY:
            self._write_denied(req, a, args)
        else:
            rid = a.reservation_id
            # The hold keeps the prompt's size, never the prompt: content sent with
            # Authorize is measured here and not kept until the holds' flush.
            content = args["content"]
            input_bytes = (args["input_bytes"] if content is None
                           else len(content.encode("utf-8", "surrogatepass")))
            self._hold_upserts[rid] = (a, args["owners"], args["labels"], input_bytes,
                                       self.catalog, self.engine)
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

    def _deny_privacy(self, req, args, mode: int):
        """Authorize under a privacy mode the tenant does not allow: DENY (data, not
        an error), written behind as a denied event like any other DENY."""
        resp = meter_pb2.AuthorizeResponse(
            decision=int(Decision.DENY), reasons=[POLICY_PRIVACY_MODE_NOT_ALLOWED],
            model=req.model, provider=req.provider)
        convert.set_money(resp.estimated_cost, 0)
        ev = LedgerEvent(
            tenant_id=self.tenant_id, event_id="den_" + new_ulid(), event_ms=_now_ms(),
            kind="denied",
            **dict(zip(("customer", "feature", "workflow", "task", "department",
                        "employee"), args["owners"])),
            labels=args["labels"] or {}, provider=req.provider, model=req.model,
            decision=int(Decision.DENY), reasons=(POLICY_PRIVACY_MODE_NOT_ALLOWED,),
            outcome=int(Outcome.DENIED), evidence=int(Evidence.ESTIMATED),
            privacy_mode=mode, attempt=req.attempt, retry_of=req.retry_of)
        self.writer.write_behind(ev)
        return resp

    def _check_record_privacy(self, req, mode: int, field: str) -> None:
        """Refuse a Record whose mode the tenant does not allow (before settling)."""
        if not self.privacy.allowed(mode):
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED, "PRIVACY_MODE_NOT_ALLOWED",
                f"privacy mode {PrivacyMode(mode).name.lower()} is not allowed for this "
                f"tenant ({POLICY_PRIVACY_MODE_NOT_ALLOWED})", field=field + "privacy_mode",
                metadata={"reason_code": POLICY_PRIVACY_MODE_NOT_ALLOWED})
        for name in ("prompt", "response"):
            if len(getattr(req, name)) > _privacy.MAX_CONTENT_CHARS:
                raise InvalidArgument(field + name, "larger than 64 MiB")

    def _apply_privacy(self, ev: LedgerEvent, req, mode: int, attested: bool) -> None:
        """Fingerprints, duplicate_of, kept content and evidence of a Record's event
        (privacy.py, evidence.py). The Record's text is dropped here for
        metadata_only: it never reaches the store or a log line."""
        ev.privacy_mode = mode
        held = self._hold_privacy.pop(ev.reservation_id, None) if ev.reservation_id else None
        prompt = req.prompt or (held[1] if held else None)
        kept = self.privacy.keep(mode, prompt, req.response or None,
                                 prompt_fp=held[0] if held else None)
        ev.prompt_fingerprint = kept.prompt_fingerprint
        ev.response_fingerprint = kept.response_fingerprint
        if kept.texts:
            expires = ev.event_ms + self.privacy.retention_ms
            ev.contents = tuple(Content(kind=k, text=t, mode=mode, expires_ms=expires)
                                for k, t in kept.texts)
        ev.evidence = evidence_for(ev.evidence, attested=attested,
                                   fingerprinted=kept.prompt_fingerprint is not None
                                   or kept.response_fingerprint is not None)

    async def _mark_duplicate(self, ev: LedgerEvent) -> None:
        """duplicate_of: the earlier event with this prompt fingerprint and owner
        within the tenant's window (memory first, then the store)."""
        fp = ev.prompt_fingerprint
        if not fp:
            return
        owners = (ev.customer, ev.feature, ev.workflow, ev.task, ev.department,
                  ev.employee)
        key = self.privacy.owner_key(owners)
        now = ev.event_ms or _now_ms()
        first = self.privacy.recent_duplicate(key, fp, now)
        find = getattr(self.store, "find_duplicate", None)
        if first is None and find is not None:
            first = await find(self.tenant_id, owners, fp,
                               max(0, now - self.privacy.window_ms))
        if first is not None and first != ev.event_id:
            ev.duplicate_of = first
        else:
            self.privacy.remember(key, fp, ev.event_id, now)

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
        mode = self.privacy.resolve(req.privacy_mode)
        self._check_record_privacy(req, mode, field)
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
        mode = self.privacy.resolve(req.privacy_mode)
        s = self._settle(req, field, "", owners, labels, usage)
        ev = self._record_event(req, s, event_id, owners, labels, revenue, mode,
                                attested, True, usage)
        self._remember(ev)
        if ev.prompt_fingerprint:
            await self._mark_duplicate(ev)
        return await self._commit(ev, s)

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
            settled_ms=_now_ms())

    async def _settle_foreign(self, req, field: str, hold: dict, event_id: str, owners,
                              labels, usage, revenue: int, attested: bool):
        """Scale-out: a Record of a reservation another process made, from its saved
        hold. This engine and its lease are not touched: the hold's money is in the
        maker's lease, and the maker books the settlement (a notice now, or the
        claim when its own copy expires). The event claims the reservation: if
        another event settled it first, that event answers (duplicate=True)."""
        rid = req.reservation_id
        mode = self.privacy.resolve(req.privacy_mode)
        self._check_record_privacy(req, mode, field)
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
        self._remember(ev)  # also deletes the saved hold at the next flush
        res = await self._write_settled(ev)
        if not res.claimed_by:
            self._remember(res.event)
            if maker and (self.leases is None or maker != self.leases.holder_id):
                try:
                    await self.store.leave_notices(
                        [(self.tenant_id, ev.reservation_id, maker, ev.event_id,
                          ev.cost_nanos)], _now_ms())
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

    def _adjust_committed(self, budget_ids, delta: int, at_ms: int) -> None:
        """Add `delta` nanos to the engine's committed of `budget_ids` (their period
        at `at_ms`, if still current)."""
        if not delta or not budget_ids:
            return
        now = _now_ms()
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
            if ev.reservation_id and self._by_reservation.get(ev.reservation_id) is ev:
                self._by_reservation.pop(ev.reservation_id, None)
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
        self._events.put(ev.event_id, ev)
        if ev.reservation_id:
            self._by_reservation.put(ev.reservation_id, ev)
            rid = ev.reservation_id
            self._hold_meta.pop(rid, None)
            if self._hold_upserts.pop(rid, None) is None:
                self._hold_deletes.add(rid)  # (else never written: nothing to delete)

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

    # --- background --------------------------------------------------------------

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
        if everything:
            metas = self._hold_meta
            rows = []
            for rec in self.engine.hold_records():
                rid = rec["reservation_id"]
                meta = metas.get(rid)
                rows.append((rid, rec["expires_ms"],
                             {"hold": rec, "meta": list(meta) if meta else None}))
            self._hold_upserts = {}
        else:
            pending, self._hold_upserts = self._hold_upserts, {}
            rows = [_captured_row(rid, h, self._hold_meta.get(rid))
                    for rid, h in pending.items()]
        deletes, self._hold_deletes = self._hold_deletes, set()
        if not rows and not deletes:
            return
        try:
            await self.store.save_holds(
                self.tenant_id, rows, list(deletes),
                maker=self.leases.holder_id if self.leases is not None else "")
        except Exception:
            # Keep them for the next round (the flush loop logs). A hold settled
            # meanwhile is in _hold_deletes already and is not re-added.
            if not everything:
                for rid, h in pending.items():
                    if rid not in self._hold_deletes:
                        self._hold_upserts.setdefault(rid, h)
            self._hold_deletes |= deletes
            raise

    # --- receipts and evidence keys (receipts.py) ---------------------------------

    def receipt_signer(self):
        """The active evidence key as a receipts.Signer (unsealed once per key)."""
        sealed = (self.settings.get(_privacy.SECRETS) or {}).get("evidence_key")
        if sealed is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "NO_EVIDENCE_KEY",
                               "the tenant has no evidence key")
        if self._signer is None or self._signer[0] != sealed:
            from p402_server.ledger import receipts
            from p402_server.privacy import signing

            self._signer = (sealed, receipts.Signer(signing.unseal(sealed)))
        return self._signer[1]

    async def receipt(self, event_id: str) -> str:
        """The signed receipt of a committed event of this tenant (NotFound if none):
        from memory when this process committed it (the writer set its chain
        position), else from the store."""
        ev = self._events.get(event_id)
        if ev is None or not ev.seq or not ev.chain_index:
            ev = await self.store.get_event(self.tenant_id, event_id)
            if ev is None:
                raise NotFound("event", event_id)
        return self.receipt_signer().sign(ev)

    # --- statements (statements.py) ----------------------------------------------

    async def close_statement(self, period: str, customer: str) -> str | None:
        """Close `period` for `customer` (statements.py: what it covers): the stored
        statement when it was closed before, else a new one, signed and stored; None
        when there is nothing to state (no spend in the period, no late events)."""
        from p402_server.ledger import statements as st

        start, end = st.period_bounds(period)
        store, tid = self.store, self.tenant_id
        stored = await store.get_statement(tid, period, customer)
        if stored is not None:
            return stored
        if end > _now_ms():
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "PERIOD_OPEN",
                               f"period {period} has not ended: it can be closed from "
                               f"{st.period_of(end)}-01 00:00 UTC")
        closes = await store.list_statements(tid, customer)
        after = max((t for *_x, t in closes), default=0)
        closed = {p for p, *_x in closes}
        through, head = await store.chain_head(tid)
        regular, late = st.select(
            {"customer": customer, "period_start_ms": start, "period_end_ms": end,
             "through_index": through, "after_index": after,
             "closed_before": closed - {period}},
            await self._statement_candidates(customer, start, end, through, after))
        book = self.price_book()
        doc = st.body(tenant_id=tid, period=period, customer=customer, closed_ms=_now_ms(),
                      through=through, after=after, head_hash=head, regular=regular,
                      late=late, closed_before=closed - {period},
                      price_book_version=book.version if book else "")
        if not doc["totals"]["events"]:
            return None
        return await store.put_statement(tid, period, customer, doc["closed_ms"], through,
                                         st.sign(doc, self.receipt_signer()))

    async def _statement_candidates(self, customer: str, start: int, end: int,
                                    through: int, after: int) -> list:
        """The events a statement can cover (statements.select picks): the customer's
        events of [start, end) up to `through`, and those committed in (after,
        through] whatever their month."""
        rows = await self.store.statement_rows(self.tenant_id, customer, max_index=through,
                                               since_ms=start, until_ms=end)
        rows += await self.store.statement_rows(self.tenant_id, customer,
                                                max_index=through, min_index=after)
        return list({e.event_id: e for e in rows}.values())

    async def statement_customers(self, period: str) -> list[str]:
        """Every customer with spend in `period` or a statement before (late events)."""
        from p402_server.ledger import statements as st

        start, end = st.period_bounds(period)
        through, _head = await self.store.chain_head(self.tenant_id)
        rows = await self.store.statement_rows(self.tenant_id, None, max_index=through,
                                               since_ms=start, until_ms=end)
        known = {c for _p, c, *_x in await self.store.list_statements(self.tenant_id)}
        return sorted({e.customer for e in rows if e.cost_nanos or e.revenue_nanos} | known)

    async def verify_statement(self, text: str) -> tuple[bool, str, list[str]]:
        """A statement checked against the ledger: its signature with this tenant's
        keys, and its lines, adjustments, totals and range recomputed from the events
        it claims to cover."""
        from p402_server.ledger import receipts
        from p402_server.ledger import statements as st

        keys = receipts.keys_from_set(self.evidence_keys())
        ok, why, doc = st.verify_document(text, keys)
        if not ok:
            return False, why, []
        if doc["tenant_id"] != self.tenant_id:
            return False, "a statement of another tenant", []
        start, end = doc["period_start_ms"], doc["period_end_ms"]
        through, after = int(doc["through_index"]), int(doc["after_index"])
        again = st.recompute(doc, await self._statement_candidates(
            doc["customer"], start, end, through, after))
        head = (await self.store.statement_rows(self.tenant_id, None, max_index=through,
                                                min_index=through - 1)) if through else []
        again["head_hash"] = head[0].chain_hash if head else ""
        diff = st.differences(doc, again)
        if diff:
            return False, "the statement differs from the ledger: " + ", ".join(diff), diff
        return True, "", []

    def price_book(self):
        """The tenant's price book (pricebook.PriceBook), or None (parsed once per
        document)."""
        doc = self.settings.get("price_book")
        if not doc:
            return None
        if self._price_book is None or self._price_book[0] is not doc:
            from p402_server.ledger.pricebook import PriceBook

            self._price_book = (doc, PriceBook(doc, self.core))
        return self._price_book[1]

    def evidence_keys(self) -> dict:
        """The published key set (receipts.key_set): the active key, then the retired."""
        from p402_server.ledger import receipts

        retired = (self.settings.get(_privacy.SECRETS) or {}).get("evidence_keys_retired") or ()
        return receipts.key_set(self.tenant_id, self.receipt_signer().public_hex, retired)

    # --- admin swaps (callers hold admin_lock and have persisted first) -----------

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
        now = _now_ms()
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
        now = _now_ms()
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

    # --- config sync (scale-out: another process on the store changed the config) ---

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


def _canonical(config: dict) -> str:
    """A config dict (id -> core object, or plain JSON values) as comparable text:
    objects by their to_dict(), the form the store keeps; tuples equal lists."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"),
                      default=lambda o: o.to_dict() if hasattr(o, "to_dict") else repr(o))


# --- hold persistence: open holds <-> store rows ----------------------------------
#
# A stored hold's data is {"hold": <a hold record, p402core/_holdrec.py: what
# Engine.hold_records() returns and Engine.restore_holds() takes>, "meta": [decision,
# reasons, rule_ids, privacy_mode, attempt, retry_of] or null}. Holds are captured
# from the Authorization when they are made (so the periodic write-behind never walks
# the engine's holds; _captured_row builds the same record), written whole from
# Engine.hold_records() at shutdown, and put back with Engine.restore_holds at start.

# id(ModelPrice) -> (the price, its to_dict()), so the hold write-behind converts
# each price once (the entry keeps the price alive, so its id is not reused).
_PRICE_DICTS: dict = {}


def _captured_row(rid: str, captured: tuple, meta) -> tuple:
    a, owners, labels, input_bytes, catalog, engine = captured
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
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
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
        rows = await self.store.dead_holds(_now_ms())
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
            n = await purge(_now_ms())
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


__all__ = ["Runtime", "TenantRuntime", "new_ulid"]

