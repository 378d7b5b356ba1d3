"""The tenant runtime: one p402core Engine per tenant, and what keeps it honest.

Owns `TenantRuntime`: a tenant's engine, settings and its memory of recent ids,
built and restored here, and put together from one module per idea: deciding.py
(Authorize, privacy rules), settling.py (Record, Release, idempotency), status.py
(budget status), foreign.py (settling another process's reservations), expiring.py
(expiry, saved holds), documents.py (receipts, statements, price book, evidence
keys) and config_sync.py (admin swaps, config reloads). Every part works on the
state `__init__` sets up; this docstring is the contract they share. `Runtime`
(process.py) holds every tenant of a process and runs the background task. The
servicers call into it; it calls the core (microseconds, no I/O) and the store.

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
(`store.save_holds`, batched upserts and deletes; a settled hold's row is deleted
only once the event that settled it has committed, so a crash never finds neither),
and all of them at shutdown; with
leases on, every tick the notices left for this process (`take_notices`), every
`config_poll_seconds` the config poll (`Runtime.sync_config`) and the store-level
budget status, and every `DEAD_SWEEP_SECONDS` the dead processes' expired holds."""
from __future__ import annotations

import asyncio
import logging

from p402_server.ledger.model import LedgerEvent
from p402_server.privacy import modes as _privacy
from p402_server.runtime import shared
from p402_server.runtime.config import ServerConfig
from p402_server.runtime.config_sync import ConfigSync
from p402_server.runtime.deciding import Deciding
from p402_server.runtime.documents import Documents
from p402_server.runtime.expiring import Expiring
from p402_server.runtime.foreign import ForeignSettling
from p402_server.runtime.settling import Settling
from p402_server.runtime.shared import (
    _LRU,
    HeldPrompts,
    _authorization_bytes,
    _catalog_for,
    _issue_prefix,
    _issued_here,
    event_bytes,
)
from p402_server.runtime.status import BudgetStatus

log = logging.getLogger("p402.server.runtime")


class TenantRuntime(Deciding, Settling, BudgetStatus, ForeignSettling, Expiring, Documents,
                    ConfigSync):
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
        cap = int(config.recent_ids_mib * 1024 * 1024)
        self._events = _LRU(config.recent_ids, max_bytes=cap, weigh=event_bytes)
        self._by_reservation = _LRU(config.recent_ids, max_bytes=cap, weigh=event_bytes)
        # Caller-chosen reservation ids (or "\0" + request_id) -> the AuthorizeResponse,
        # for Authorize retries.
        self._authorizations = _LRU(config.recent_ids, max_bytes=cap,
                                    weigh=_authorization_bytes)
        # What a Record needs from its Authorize beyond the engine's hold (decision,
        # reasons, rule ids, privacy mode, attempt, retry_of), only when not default.
        self._hold_meta: dict[str, tuple] = {}
        # Open-hold write-behind: holds to upsert (rid -> what the engine reserved,
        # captured from the Authorization) and reservation ids to delete at next flush.
        self._hold_upserts: dict[str, tuple] = {}
        self._hold_deletes: set[str] = set()
        # Saved holds settled by an event the writer has not committed yet (rid ->
        # that event): deleted at the first flush after its commit, never before, so
        # a crash in between leaves the hold to charge the call at its estimate.
        self._hold_settled: dict[str, LedgerEvent] = {}
        self.admin_lock = asyncio.Lock()
        # Privacy and evidence (privacy.py): the tenant's modes, salt and
        # duplicate memory; per open hold, what its Authorize left for the Record
        # (prompt fingerprint, prompt text when the mode keeps it, within
        # held_prompts_mib: HeldPrompts).
        self.privacy = _privacy.TenantPrivacy(tenant_id, settings, core)
        self.privacy.set_rules(rules)
        self._hold_privacy = HeldPrompts(int(config.held_prompts_mib * 1024 * 1024))
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
        now = shared._now_ms()
        for (budget_id, period_start_ms), nanos in totals.items():
            # Only the current period counts (older ones, and those of a budget
            # since deleted or re-created with another period, stay in the ledger).
            if (budget_id in self.budgets
                    and self._period_start(budget_id, now) == period_start_ms):
                self.engine.set_committed(budget_id, period_start_ms, nanos)
