"""Leased budget slices: several processes, one HARD limit, no overspend.

Owns `LeaseConfig` (the knobs), `LeaseStore` (every SQL statement on the two lease
tables, through the store's SQLAlchemy engine) and `LeaseManager` (one per server
process: its holder id, the per-tenant lease state, the background top-up / reclaim
task). runtime/tenant.py calls it at four points only: after a tenant's engine is restored
(`attach`), on every Authorize (`check`, a couple of integer compares), after a Record
commit is acknowledged (`committed`) and after a budget swap (`budgets_changed`).
server.py returns the unused slices on shutdown (`close`), after the writer drained.

Model (DESIGN §6 "Scale-out"; REFERENCES "Distributed budgets")
- A process never owns a whole HARD budget: it owns a lease, a slice of the
  budget's headroom, spent locally through the core's `Engine.set_lease` (the
  core's check becomes committed + held + amount <= base + lease, in microseconds,
  no I/O). SOFT budgets are not leased (they never deny).
- Tables (migration 0003): `budget_allocations` (tenant_id, budget_id,
  period_start_ms) -> limit_nanos, committed_nanos, leased_nanos, epoch; and
  `budget_leases` (tenant_id, budget_id, period_start_ms, holder_id) -> epoch,
  granted_nanos (cumulative grants of this lease), used_nanos (of those, what the
  holder reported as committed AND acknowledged by the ledger), expires_ms.
- Invariant: leased_nanos = Σ over lease rows (granted − used). committed_nanos is
  refreshed from the ledger's `budget_periods` (what the writer commits in the same
  transaction as every event) on every lease statement. A slice is taken with ONE
  conditional statement:
      UPDATE budget_allocations SET leased = leased − :acked + :slice, committed = L
      WHERE … AND L + leased − :acked + :slice <= limit_nanos RETURNING …
  (L: the budget_periods subquery). PostgreSQL rechecks the condition after the row
  lock (read committed), so concurrent takers can never pass the limit together;
  SQLite serialises writers (one writer at a time, WAL) the same way.
  Why it is safe: a holder's spend not yet acknowledged by the ledger (held, in
  flight) is inside its (granted − used); an acknowledged cost is in L, and is
  removed from (granted − used) only after that acknowledgement ("used" is reported
  only from acked commits). A cost reported late is counted twice for a while:
  conservative, never optimistic. So L + leased bounds every process's committed +
  held + in-flight, and a take keeps it <= limit.
- Slice size: min(max_slice, headroom // (2 × live holders)), at least 1 nano
  while headroom remains: slices shrink geometrically as the budget nears its
  limit, and the last nanos are taken exactly. The background task (every
  `interval_seconds`) tops a lease up when its unused part falls under half a
  slice, and renews its expiry; a DENY for budget.exceeded wakes it at once.
- The very end (`take_exact`, from runtime.authorize_exact): an Authorize that only
  a leased budget denies takes exactly what it misses from the store (the same
  conditional statement) and is decided again: the last nanos of a budget are
  spent request by request, one store round trip each, and an Authorize awaits
  the store only then. A take that finds no room makes the process deny locally
  for the next 2 × `interval_seconds` (at the limit, a flood of Authorizes does
  not become a flood of store transactions). A lease whose engine spent nothing for
  `idle_return_seconds` looks at the store (one read); near the limit (the store
  cannot give every holder a full slice any more) it gives its unused part back
  (`LeaseStore.shrink`; the lease goes on) and takes no more slices until a DENY
  there takes exactly again: the last nanos go to whoever spends them.
  Until then a process can deny while a peer holds unused headroom; it never
  allows past the limit.
- Epochs and expiry: a lease row carries the allocation's epoch when it was
  created; every renewal is `… WHERE holder_id = :me AND epoch = :e` (a row past its
  expiry that nobody reclaimed yet is renewed: its holds stay counted in it). A lease
  that expired is reclaimed by any live process `reclaim_grace_seconds` after its
  expiry, and only once its process has no saved hold left (a dead process's holds
  are first expired into the ledger by a survivor: runtime.process.Runtime.sweep_dead_holds):
  its row deleted, its granted − used removed from leased, allocation epoch + 1. A
  process whose row is gone finds its renewal fenced (0 rows) and starts a new lease;
  locally it stops spending at its own deadline (expiry − `safety_seconds`, on the
  monotonic clock), checked on every Authorize, and between rows every Authorize
  fences the budget to zero.
- A new row while holds of the old one are open (a new period, a fenced row): the new
  row is granted their amount at once (`take(carry=True)`, whatever the limit says:
  they were authorized already), because their settlements report used to it.
- Crash: a SIGKILLed process's lease stays counted in leased until its saved holds
  are settled and it is reclaimed: a crash delays headroom, never creates it. Its
  in-flight ledger transactions either committed (in L) or died with the connection.
  Every process registers in `processes` (renewed every second) so survivors know
  when it is gone.
- Shutdown (`close`, after the writer has drained): the unused part of every lease
  is returned, the row is set to expire now and the process deregisters; what stays
  (open holds, saved in the holds table) is settled by the survivors as it expires.
- Every acknowledged cost is reported as used: Records, and the expiry's EXPIRED
  events (awaited with leases on).
- A lowered limit: the unused part of the lease goes back (`shrink`, the row stays)
  and slices are taken under the new limit.
- Period rollover: the core re-bases a lease on the new period keeping its size;
  `check` fences every lease to 0 at the first Authorize past the period end and the
  background task takes fresh slices from the new period's allocation.

Settling another process's reservation (SCALEOUT.md; migrations 0005, 0006): the
hold's money stays in its maker's lease. A Record or Release for a reservation this
process did not make settles the maker's saved hold here without this engine or
lease, and leaves the maker a notice; the maker books the settlement (`used`). Every
settling event claims its reservation in the writer's own transaction (hold_claims):
the first event_id wins; a later settling event is not written and answers with the
winner, and a maker whose own copy lost books the winner's cost. With leases on, an
engine restores no stored holds at start-up: a restarted process is a new process,
and the holds of its previous life are settled like any dead process's.

Not implemented (documented): rate limits and other policy state are per process
(each process enforces its rules' limits on its own traffic: a rate of R per
process is N×R across N processes; slicing them like budgets would need a store
round trip per window).

One room, though long: the lease protocol's statements (LeaseStore) and the process's
use of them (LeaseManager) carry one invariant between them (a HARD limit is never
passed across processes) and are read together as its argument (SCALEOUT.md).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from dataclasses import dataclass

import sqlalchemy as sa

from p402_server.ledger import schema as S
from p402_server.runtime.config import env_values
from p402core import Enforcement, InvalidArgument

log = logging.getLogger("p402.server.leases")

ENV_PREFIX = "P402_LEASE_"
# Settlement claims (hold_claims) and dead processes' registrations are kept this long.
CLAIMS_KEPT_SECONDS = 86_400.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    """Lease knobs; `from_env` reads P402_LEASE_<FIELD> (e.g. P402_LEASE_TTL_SECONDS)."""

    # A lease lives this long without renewal (renewed every tick).
    ttl_seconds: float = 10.0
    # The holder stops spending this long before the store would let it expire.
    safety_seconds: float = 2.0
    # An expired lease is reclaimed this long after its expiry (>= the longest
    # hold TTL in use, so the dead holder's holds have expired by then).
    reclaim_grace_seconds: float = 300.0
    # Background tick: top-ups, renewals, reclaims.
    interval_seconds: float = 0.05
    # Largest slice, as a fraction (1/N) of the limit: limit // max_slice_divisor.
    max_slice_divisor: int = 20
    # A lease unused for this long, near a limit (the store cannot give every holder
    # a full slice), gives its unused part back, so a busier peer can take it.
    idle_return_seconds: float = 1.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise InvalidArgument(f.name, f"must be a number > 0, not {v!r}")
        if self.safety_seconds >= self.ttl_seconds:
            raise InvalidArgument("safety_seconds", "must be < ttl_seconds")

    @classmethod
    def from_env(cls, environ=None) -> "LeaseConfig":
        return cls(**env_values(cls, ENV_PREFIX, environ))


class _NoRoom(Exception):
    """The conditional take found no room (internal: rolls the transaction back)."""


class Fenced(Exception):
    """This holder's lease row is gone or of another epoch (reclaimed)."""


class LeaseStore:
    """The lease SQL (module docstring), on the store's AsyncEngine."""

    def __init__(self, engine):
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"

    def _insert(self, table):
        if self.postgres:
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table)

    @staticmethod
    def _ledger_committed(tenant_id, budget_id, period_start_ms):
        bp = S.budget_periods
        return sa.func.coalesce(
            sa.select(bp.c.committed_nanos)
            .where(bp.c.tenant_id == tenant_id, bp.c.budget_id == budget_id,
                   bp.c.period_start_ms == period_start_ms)
            .scalar_subquery(), 0)

    async def read(self, tenant_id, budget_id, period_start_ms, now_ms):
        """(limit, ledger committed, leased, live holders) for sizing a slice."""
        a, l = S.budget_allocations, S.budget_leases
        async with self.engine.connect() as conn:
            row = (await conn.execute(
                sa.select(a.c.limit_nanos, a.c.leased_nanos,
                          self._ledger_committed(tenant_id, budget_id, period_start_ms))
                .where(a.c.tenant_id == tenant_id, a.c.budget_id == budget_id,
                       a.c.period_start_ms == period_start_ms))).first()
            holders = (await conn.execute(
                sa.select(sa.func.count()).select_from(l)
                .where(l.c.tenant_id == tenant_id, l.c.budget_id == budget_id,
                       l.c.period_start_ms == period_start_ms,
                       l.c.expires_ms > now_ms))).scalar()
        if row is None:
            return None
        return int(row[0]), int(row[2]), int(row[1]), int(holders or 0)

    async def open(self, tenant_id, budget_id, period_start_ms, limit_nanos, holder_id,
                   expires_ms) -> int:
        """Create the allocation (if new) and this holder's empty lease -> its epoch."""
        a, l = S.budget_allocations, S.budget_leases
        async with self.engine.begin() as conn:
            await conn.execute(self._insert(a).values(
                tenant_id=tenant_id, budget_id=budget_id, period_start_ms=period_start_ms,
                limit_nanos=limit_nanos, committed_nanos=0, leased_nanos=0, epoch=0,
            ).on_conflict_do_nothing())
            epoch = (await conn.execute(
                sa.select(a.c.epoch).where(a.c.tenant_id == tenant_id,
                                           a.c.budget_id == budget_id,
                                           a.c.period_start_ms == period_start_ms))).scalar()
            await conn.execute(self._insert(l).values(
                tenant_id=tenant_id, budget_id=budget_id, period_start_ms=period_start_ms,
                holder_id=holder_id, epoch=epoch, granted_nanos=0, used_nanos=0,
                expires_ms=expires_ms))
        return int(epoch)

    async def take(self, tenant_id, budget_id, period_start_ms, limit_nanos, holder_id,
                   epoch, slice_nanos, acked_nanos, expires_ms, now_ms,
                   renew: bool = True, carry: bool = False) -> bool:
        """Renew this lease (epoch-fenced), report `acked_nanos` as used and take
        `slice_nanos` if it fits under the limit. True: taken; False: renewed and
        reported, but no room for the slice (`renew` False: nothing done then, one
        transaction instead of two). `carry`: grant `slice_nanos` whatever the
        limit says (holds already authorized, carried into a new lease row).
        Raises Fenced."""
        a, l = S.budget_allocations, S.budget_leases
        key = (a.c.tenant_id == tenant_id, a.c.budget_id == budget_id,
               a.c.period_start_ms == period_start_ms)
        lkey = (l.c.tenant_id == tenant_id, l.c.budget_id == budget_id,
                l.c.period_start_ms == period_start_ms, l.c.holder_id == holder_id)
        ledger = self._ledger_committed(tenant_id, budget_id, period_start_ms)
        for grant in ((slice_nanos, 0) if slice_nanos and renew else (slice_nanos,)):
            try:
                async with self.engine.begin() as conn:
                    # The lease row first: it is the fence (and, on PostgreSQL, locks it).
                    # A row past its expiry that nobody reclaimed yet is renewed
                    # (a reclaim deletes it under the same condition, so only one
                    # of the two happens): its holds stay counted in it.
                    got = (await conn.execute(
                        l.update().where(*lkey, l.c.epoch == epoch)
                        .values(granted_nanos=l.c.granted_nanos + grant,
                                used_nanos=l.c.used_nanos + acked_nanos,
                                expires_ms=expires_ms)
                        .returning(l.c.epoch))).first()
                    if got is None:
                        raise Fenced(budget_id)
                    new_leased = a.c.leased_nanos - acked_nanos + grant
                    # The one conditional statement: the condition is rechecked after
                    # the row lock, so two takers can never both pass the limit.
                    cond = [*key]
                    if grant and not carry:
                        cond.append(ledger + new_leased <= limit_nanos)
                    done = (await conn.execute(
                        a.update().where(*cond)
                        .values(leased_nanos=new_leased, committed_nanos=ledger,
                                limit_nanos=limit_nanos)
                        .returning(a.c.leased_nanos))).first()
                    if done is None:
                        raise _NoRoom  # rolls the lease row's update back too
                return bool(grant)
            except _NoRoom:
                continue  # no room for the slice: retry as a pure renewal
        return False

    async def shrink(self, tenant_id, budget_id, period_start_ms, holder_id, epoch,
                     nanos) -> bool:
        """Give `nanos` of this lease's unused grant back; the lease stays. False:
        fenced (the lease was reclaimed; its share is already back)."""
        return await self._hand_back(tenant_id, budget_id, period_start_ms, holder_id,
                                     epoch, nanos, 0, None)

    async def give_back(self, tenant_id, budget_id, period_start_ms, holder_id, epoch,
                        unused_nanos, acked_nanos, now_ms) -> None:
        """Return `unused_nanos`, report `acked_nanos`, and let the row expire now."""
        await self._hand_back(tenant_id, budget_id, period_start_ms, holder_id, epoch,
                              unused_nanos, acked_nanos, now_ms)

    async def _hand_back(self, tenant_id, budget_id, period_start_ms, holder_id, epoch,
                         unused_nanos, acked_nanos, expires_ms) -> bool:
        """The lease row (epoch-fenced) gives `unused_nanos` back and reports
        `acked_nanos` as used (and expires at `expires_ms` unless None); the
        allocation's leased total drops by both. False: fenced, nothing changed."""
        a, l = S.budget_allocations, S.budget_leases
        values = {"granted_nanos": l.c.granted_nanos - unused_nanos,
                  "used_nanos": l.c.used_nanos + acked_nanos}
        if expires_ms is not None:
            values["expires_ms"] = expires_ms
        async with self.engine.begin() as conn:
            got = (await conn.execute(
                l.update().where(l.c.tenant_id == tenant_id, l.c.budget_id == budget_id,
                                 l.c.period_start_ms == period_start_ms,
                                 l.c.holder_id == holder_id, l.c.epoch == epoch)
                .values(**values)
                .returning(l.c.epoch))).first()
            if got is None:
                return False  # reclaimed meanwhile: its whole share is already gone
            await conn.execute(
                a.update().where(a.c.tenant_id == tenant_id, a.c.budget_id == budget_id,
                                 a.c.period_start_ms == period_start_ms)
                .values(leased_nanos=a.c.leased_nanos - unused_nanos - acked_nanos))
        return True

    async def reclaim(self, tenant_id, before_ms) -> int:
        """Reclaim every lease of the tenant that expired before `before_ms`."""
        a, l = S.budget_allocations, S.budget_leases
        n = 0
        async with self.engine.connect() as conn:
            rows = (await conn.execute(
                sa.select(l.c.budget_id, l.c.period_start_ms, l.c.holder_id, l.c.epoch)
                .where(l.c.tenant_id == tenant_id, l.c.expires_ms < before_ms))).all()
        h = S.holds
        for budget_id, period_start_ms, holder_id, epoch in rows:
            async with self.engine.begin() as conn:
                # A dead holder's saved holds are open until settled (expired by a
                # survivor): its lease keeps their money counted until then.
                process = holder_id.rsplit("/", 1)[0]
                if (await conn.execute(sa.select(h.c.reservation_id).where(
                        h.c.tenant_id == tenant_id, h.c.maker == process).limit(1))).first():
                    continue
                gone = (await conn.execute(
                    l.delete().where(l.c.tenant_id == tenant_id, l.c.budget_id == budget_id,
                                     l.c.period_start_ms == period_start_ms,
                                     l.c.holder_id == holder_id, l.c.epoch == epoch,
                                     l.c.expires_ms < before_ms)
                    .returning(l.c.granted_nanos, l.c.used_nanos))).first()
                if gone is None:
                    continue  # renewed or reclaimed by another process meanwhile
                await conn.execute(
                    a.update().where(a.c.tenant_id == tenant_id, a.c.budget_id == budget_id,
                                     a.c.period_start_ms == period_start_ms)
                    .values(leased_nanos=a.c.leased_nanos - (gone[0] - gone[1]),
                            epoch=a.c.epoch + 1))
                n += 1
        return n


class _Lease:
    """This process's lease on one budget of one tenant."""

    __slots__ = ("budget_id", "period_start_ms", "period_end_ms", "limit_nanos", "epoch",
                 "acked", "slice", "open", "deadline", "parked", "row", "returning",
                 "spent_mark", "idle_since", "dormant", "no_room_until")

    def __init__(self, budget_id):
        self.budget_id = budget_id
        self.period_start_ms = -1
        self.period_end_ms = -1
        self.limit_nanos = 0
        self.epoch = -1
        self.acked = 0          # acknowledged committed cost not yet reported
        self.slice = 0          # the last slice size asked for (low-water mark / 2)
        self.open = False       # a lease row exists in the store
        self.deadline = 0.0     # monotonic: stop spending past this
        self.parked = 0         # unused grant set aside while fenced locally
        self.row = ""           # holder_id/<n>: each new lease row has its own key
        self.returning = -1     # >= 0: limit lowered; give this unused grant back
        self.spent_mark = 0     # the engine's used_nanos at the last tick
        self.idle_since = 0.0   # monotonic: when used_nanos last moved
        self.dormant = False    # gave its idle slice back: no top-up until a DENY
        self.no_room_until = 0.0  # monotonic: an exact take found no room; wait


class _TenantLeases:
    def __init__(self, rt):
        self.rt = rt
        self.leases: dict[str, _Lease] = {}
        # Cheapest possible Authorize check: the earliest local deadline and period end.
        self.deadline = 0.0
        self.boundary_ms = 0
        # budget_id -> asyncio.Lock: one exact take at a time (take_exact).
        self.locks: dict[str, asyncio.Lock] = {}


class LeaseManager:
    """This process's leases, for every tenant it serves (module docstring)."""

    def __init__(self, store, config: LeaseConfig | None = None, holder_id: str | None = None):
        self.config = config or LeaseConfig.from_env()
        self.db = LeaseStore(store.engine)
        self.store = store
        self.holder_id = holder_id or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._tenants: dict[str, _TenantLeases] = {}
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.round_trips = 0   # store transactions issued (benchmarks: decisions per trip)
        self.exact_takes = 0   # of those, per-request takes at the very end (take_exact)
        self._rows = 0
        self._registered = False

    async def heartbeat(self) -> None:
        """Register this process as alive for `ttl_seconds` (table processes)."""
        now = _now_ms()
        await self.store.heartbeat(self.holder_id, now + int(self.config.ttl_seconds * 1000),
                                   now)
        self._registered = True

    # --- runtime hooks --------------------------------------------------------------

    async def attach(self, rt) -> None:
        """A tenant's engine was just built: fence every HARD budget to a zero lease,
        then take the first slices (the engine never owns a whole budget)."""
        if not self._registered:
            # Alive before any hold is made: survivors settle the expired holds of a
            # process whose registration lapses (runtime.process.Runtime.sweep_dead_holds).
            await self.heartbeat()
        tl = _TenantLeases(rt)
        self._tenants[rt.tenant_id] = tl
        self._sync_budgets(tl)
        await self._tick_tenant(tl)
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="p402-leases")

    def check(self, rt) -> None:
        """Every Authorize: past a local deadline or a period end, spend nothing more
        until the background task has renewed (two compares when all is well)."""
        tl = self._tenants.get(rt.tenant_id)
        if tl is None:
            return
        if time.monotonic() >= tl.deadline or _now_ms() >= tl.boundary_ms:
            self._fence_expired(tl)

    def denied(self, rt) -> None:
        """A budget DENY: top up now rather than at the next tick."""
        self._wake.set()

    async def take_exact(self, rt, a) -> bool:
        """The very end of a budget (runtime.authorize_exact): Authorization `a` was
        denied because a leased budget's local slice cannot cover it. For each such
        budget take exactly the missing nanos from the store (the one conditional
        statement: never past the limit) and add them to the lease. One take per
        budget at a time (concurrent Authorizes queue, then re-check what is
        missing). True if anything was granted."""
        tl = self._tenants.get(rt.tenant_id)
        if tl is None:
            return False
        need_total = a.estimated_cost_nanos
        granted = False
        for st in a.budgets:
            lease = tl.leases.get(st.budget_id)
            if lease is None or not lease.open:
                continue
            lock = tl.locks.get(st.budget_id)
            if lock is None:
                lock = tl.locks[st.budget_id] = asyncio.Lock()
            async with lock:
                mono = time.monotonic()
                if (not lease.open or lease.returning >= 0 or mono >= lease.deadline
                        or mono < lease.no_room_until):
                    continue
                missing = need_total - self._unused(rt, st.budget_id)
                if missing <= 0:
                    granted = True  # a queued take before us covered it
                    continue
                b = rt.budgets.get(lease.budget_id)
                if b is None:
                    continue
                now = _now_ms()
                row = lease.row
                try:
                    # acked_nanos=0: only the background tick reports use (never
                    # reported twice); this renews and grants.
                    taken = await self.db.take(
                        rt.tenant_id, lease.budget_id, lease.period_start_ms,
                        b.limit_nanos, lease.row, lease.epoch, missing, 0,
                        now + int(self.config.ttl_seconds * 1000), now, renew=False)
                except Fenced:
                    self._wake.set()  # the tick starts a new lease
                    continue
                finally:
                    self.round_trips += 1
                    self.exact_takes += 1
                if not taken:
                    # At the limit: DENY locally for a while rather than send every
                    # denied Authorize to the store (the tick still tops up when
                    # Records free headroom).
                    lease.no_room_until = time.monotonic() + self.config.interval_seconds * 2
                if taken and lease.open and lease.row == row:
                    lease.dormant = False  # demand is back: slices may resume
                    lease.idle_since = time.monotonic()
                    # Re-read after the await: grant on top of what is unused now.
                    rt.engine.set_lease(lease.budget_id,
                                        max(0, self._unused(rt, lease.budget_id)) + missing)
                    granted = True
        return granted

    async def _return_idle(self, rt, tl: _TenantLeases, lease: _Lease) -> None:
        """Near the limit, an idle lease gives its unused part back (the lease and
        its renewals go on) and takes no slice until a DENY here asks for one: the
        last nanos go to the process that spends them. (Called by the tick, under
        the budget's lock.)"""
        bid = lease.budget_id
        back = self._unused(rt, bid)
        if back <= 0 or not lease.open:
            return
        rt.engine.set_lease(bid, 0)  # nothing of it is spent while it goes back
        try:
            ok = await self.db.shrink(rt.tenant_id, bid, lease.period_start_ms,
                                      lease.row, lease.epoch, back)
        except BaseException:
            # Still ours in the store: spendable again here.
            rt.engine.set_lease(bid, max(0, self._unused(rt, bid)) + back)
            raise
        finally:
            self.round_trips += 1
        if not ok:  # fenced: reclaimed meanwhile; the tick starts a new lease
            lease.open = False
            self._recompute(tl)
            return
        lease.dormant = True

    @staticmethod
    def _status(rt, budget_id: str) -> dict | None:
        for d in rt.engine.lease_status():
            if d["budget_id"] == budget_id:
                return d
        return None

    @staticmethod
    def _unused(rt, budget_id: str) -> int:
        for d in rt.engine.lease_status():
            if d["budget_id"] == budget_id:
                return d["unused_nanos"]
        return 0

    def committed(self, rt, ev) -> None:
        """A Record's event was acknowledged by the ledger: its cost may now be
        reported as used (module docstring)."""
        tl = self._tenants.get(rt.tenant_id)
        if tl is None or not ev.cost_nanos:
            return
        for budget_id, period_start_ms in ev.budget_charges:
            lease = tl.leases.get(budget_id)
            if lease is not None and lease.period_start_ms == period_start_ms:
                lease.acked += ev.cost_nanos

    def used(self, rt, budget_ids, cost_nanos: int) -> None:
        """A settlement of a hold this process made, written elsewhere, was booked
        here (runtime._rebook, book_notice): its cost, in the ledger, is reported
        as used by this process's leases on `budget_ids` (current period)."""
        tl = self._tenants.get(rt.tenant_id)
        if tl is None or not cost_nanos:
            return
        now = _now_ms()
        for budget_id in budget_ids:
            lease = tl.leases.get(budget_id)
            if lease is not None and lease.period_start_ms <= now < lease.period_end_ms:
                lease.acked += cost_nanos

    def budgets_changed(self, rt) -> None:
        """After an admin budget swap: new HARD budgets start at a zero lease."""
        tl = self._tenants.get(rt.tenant_id)
        if tl is not None:
            self._sync_budgets(tl)
            self._wake.set()

    async def close(self) -> None:
        """Stop the task; return every unused slice (call after the writer drained)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        now = _now_ms()
        for tl in list(self._tenants.values()):
            engine = tl.rt.engine
            status = {d["budget_id"]: d for d in engine.lease_status()}
            for lease in tl.leases.values():
                if not lease.open:
                    continue
                unused = max(0, status.get(lease.budget_id, {}).get("unused_nanos", 0))
                engine.set_lease(lease.budget_id, 0)
                try:
                    await self.db.give_back(tl.rt.tenant_id, lease.budget_id,
                                            lease.period_start_ms, lease.row,
                                            lease.epoch, unused, lease.acked, now)
                    lease.acked = 0
                    lease.open = False
                except Exception:
                    log.exception("tenant %s: returning lease on %s failed (it will be "
                                  "reclaimed after it expires)", tl.rt.tenant_id,
                                  lease.budget_id)
        if self._registered:
            # Gone: the holds left open here are settled by the survivors as they
            # expire (their money stays leased until then).
            try:
                await self.store.heartbeat(self.holder_id, now, now)
            except Exception:
                log.exception("deregistering process %s failed (it lapses in %.0f s)",
                              self.holder_id, self.config.ttl_seconds)

    # --- internals ------------------------------------------------------------------

    def _sync_budgets(self, tl: _TenantLeases) -> None:
        engine = tl.rt.engine
        hard = {bid for bid, b in tl.rt.budgets.items()
                if int(b.enforcement) == int(Enforcement.HARD)}
        for bid in hard - tl.leases.keys():
            engine.set_lease(bid, 0)
            tl.leases[bid] = _Lease(bid)
        status = None
        for bid in hard & tl.leases.keys():
            lease = tl.leases[bid]
            if lease.open and tl.rt.budgets[bid].limit_nanos < lease.limit_nanos:
                # A lowered limit: stop spending the slice leased under the old one;
                # the tick gives its unused part back and leases anew under the new.
                if status is None:
                    status = {d["budget_id"]: d for d in engine.lease_status()}
                st = status.get(bid)
                lease.returning = max(0, st["unused_nanos"] if st else 0) + lease.parked
                lease.parked = 0
                engine.set_lease(bid, 0)
        for bid in tl.leases.keys() - hard:
            del tl.leases[bid]  # deleted or now SOFT: its row expires and is reclaimed
        self._recompute(tl)

    def _fence_expired(self, tl: _TenantLeases) -> None:
        mono, now = time.monotonic(), _now_ms()
        engine = tl.rt.engine
        status = {d["budget_id"]: d for d in engine.lease_status()}
        for lease in tl.leases.values():
            if not lease.open:
                if status.get(lease.budget_id, {}).get("unused_nanos", 0) > 0:
                    engine.set_lease(lease.budget_id, 0)
                continue
            if now >= lease.period_end_ms:
                engine.set_lease(lease.budget_id, 0)  # that period's grant is over
                lease.open = False
            elif mono >= lease.deadline:
                # Set the unused part aside: spendable again only once renewed under
                # the same epoch (it is still counted as leased in the store).
                st = status.get(lease.budget_id)
                lease.parked += max(0, st["unused_nanos"]) if st else 0
                engine.set_lease(lease.budget_id, 0)
                lease.deadline = float("inf")
        self._recompute(tl)
        self._wake.set()

    def _recompute(self, tl: _TenantLeases) -> None:
        live = [l for l in tl.leases.values() if l.open]
        tl.deadline = min((l.deadline for l in live), default=float("inf"))
        if len(live) < len(tl.leases):
            # A budget between lease rows: every Authorize fences it to zero (a hold
            # of the old row settling meanwhile must not free money to spend).
            tl.deadline = 0.0
        tl.boundary_ms = min((l.period_end_ms for l in live), default=2**62)

    async def _loop(self) -> None:
        cfg = self.config
        next_reclaim = next_prune = 0.0
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), cfg.interval_seconds)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            for tl in list(self._tenants.values()):
                try:
                    await self._tick_tenant(tl)
                except Exception:
                    log.exception("tenant %s: lease top-up failed; will retry",
                                  tl.rt.tenant_id)
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + 60.0
                try:  # settlement claims outlive their events by far
                    await self.store.prune_hold_claims(
                        _now_ms() - int(CLAIMS_KEPT_SECONDS * 1000))
                    await self.store.prune_processes(
                        _now_ms() - int(CLAIMS_KEPT_SECONDS * 1000))
                except Exception:
                    log.exception("pruning old hold claims failed; will retry")
            if time.monotonic() >= next_reclaim:
                next_reclaim = time.monotonic() + 1.0
                try:
                    await self.heartbeat()
                except Exception:
                    log.exception("renewing this process's registration failed")
                before = _now_ms() - int(cfg.reclaim_grace_seconds * 1000)
                for tl in list(self._tenants.values()):
                    try:
                        n = await self.db.reclaim(tl.rt.tenant_id, before)
                        self.round_trips += 1
                        if n:
                            log.warning("tenant %s: reclaimed %d expired lease(s)",
                                        tl.rt.tenant_id, n)
                    except Exception:
                        log.exception("tenant %s: reclaiming leases failed", tl.rt.tenant_id)

    async def _tick_tenant(self, tl: _TenantLeases) -> None:
        for lease in list(tl.leases.values()):
            # One store conversation per budget at a time: an exact take
            # (take_exact) waits for a top-up in flight and then sees its grant.
            lock = tl.locks.get(lease.budget_id)
            if lock is None:
                lock = tl.locks[lease.budget_id] = asyncio.Lock()
            async with lock:
                await self._tick_lease(tl, lease)
        self._recompute(tl)

    async def _tick_lease(self, tl: _TenantLeases, lease: _Lease) -> None:
        rt, cfg = tl.rt, self.config
        core = rt.core
        b = rt.budgets.get(lease.budget_id)
        if b is None:
            return
        sent = time.monotonic()
        now = _now_ms()
        start, end = core.period_bounds(b.period, now)
        if lease.open and lease.returning >= 0:
            # A lowered limit: what was unused then, plus any grant that landed
            # since (a take in flight), goes back; the lease row stays, so the holds
            # made under it keep counting in it until they settle (a new row would
            # let their settlements move the new lease's accounting).
            back = lease.returning + max(0, self._unused(rt, lease.budget_id))
            rt.engine.set_lease(lease.budget_id, 0)
            try:
                ok = await self.db.shrink(rt.tenant_id, lease.budget_id,
                                          lease.period_start_ms, lease.row, lease.epoch,
                                          back)
            finally:
                self.round_trips += 1
            lease.returning = -1
            lease.limit_nanos = b.limit_nanos
            lease.slice = 0
            if not ok:  # reclaimed meanwhile: a new lease below
                lease.open = False
        if lease.open and start != lease.period_start_ms:
            # New period: the old lease ends (its unused part is reclaimed later).
            rt.engine.set_lease(lease.budget_id, 0)
            lease.open = False
        expires = now + int(cfg.ttl_seconds * 1000)
        if not lease.open:
            lease.period_start_ms, lease.period_end_ms = start, end
            lease.limit_nanos = b.limit_nanos
            lease.acked = 0
            lease.parked = 0
            lease.returning = -1
            lease.dormant = False
            # A fresh row key each time: an old row of ours may still be waiting
            # to be reclaimed (expired, or fenced).
            self._rows += 1
            lease.row = f"{self.holder_id}/{self._rows}"
            lease.epoch = await self.db.open(rt.tenant_id, lease.budget_id, start,
                                             b.limit_nanos, lease.row, expires)
            self.round_trips += 1
            lease.open = True
            lease.deadline = sent + cfg.ttl_seconds - cfg.safety_seconds
            rt.engine.set_lease(lease.budget_id, 0)
            # Holds still open from the previous row (fenced, or a new period, where
            # they will be charged) are carried into this one: the row is granted
            # their amount, since their settlements report used here.
            carry = max(0, (self._status(rt, lease.budget_id) or {}).get("held_nanos", 0))
            if carry:
                await self.db.take(rt.tenant_id, lease.budget_id, start, b.limit_nanos,
                                   lease.row, lease.epoch, carry, 0, expires, now,
                                   renew=False, carry=True)
                self.round_trips += 1
        status = {d["budget_id"]: d for d in rt.engine.lease_status()}
        st = status.get(lease.budget_id)
        unused = st["unused_nanos"] if st else 0
        used = st["used_nanos"] if st else 0
        if used != lease.spent_mark:
            lease.spent_mark, lease.idle_since = used, sent
        if (unused > 0 and not lease.dormant
                and sent - lease.idle_since >= cfg.idle_return_seconds):
            lease.idle_since = sent  # idle or not, look again a period later
            facts = await self.db.read(rt.tenant_id, lease.budget_id, start, now)
            self.round_trips += 1
            if facts is not None:
                limit, ledger, leased, holders = facts
                headroom = min(limit, b.limit_nanos) - ledger - leased
                if headroom < (b.limit_nanos // cfg.max_slice_divisor) * max(1, holders):
                    # Near the limit: the store cannot give every holder a
                    # full slice any more.
                    await self._return_idle(rt, tl, lease)
                    return
        renew_due = sent >= lease.deadline - (cfg.ttl_seconds - cfg.safety_seconds) / 2
        need = not lease.dormant and (unused <= lease.slice // 2 or unused <= 0)
        if not need and not renew_due and not lease.acked:
            return
        slice_nanos = 0
        if need:
            facts = await self.db.read(rt.tenant_id, lease.budget_id, start, now)
            self.round_trips += 1
            if facts is not None:
                limit, ledger, leased, holders = facts
                headroom = min(limit, b.limit_nanos) - ledger - leased + lease.acked
                if headroom > 0:
                    slice_nanos = min(max(1, b.limit_nanos // cfg.max_slice_divisor),
                                      max(1, headroom // (2 * max(1, holders))))
        acked = lease.acked
        row = lease.row
        try:
            taken = await self.db.take(rt.tenant_id, lease.budget_id, start,
                                       b.limit_nanos, lease.row, lease.epoch,
                                       slice_nanos, acked, expires, now)
            self.round_trips += 1
        except Fenced:
            log.warning("tenant %s: lease on %s was reclaimed; starting a new one",
                        rt.tenant_id, lease.budget_id)
            rt.engine.set_lease(lease.budget_id, 0)
            lease.open = False
            lease.acked = 0
            lease.parked = 0
            self._recompute(tl)
            return
        lease.acked -= acked
        if not lease.open or lease.row != row:
            # Closed while we awaited (the period ended: `check` fenced it): this
            # grant belongs to a lease that is over. It stays counted in the store
            # until the row is reclaimed (conservative); never spend it here, where
            # the engine has moved on to the new period.
            return
        lease.deadline = sent + cfg.ttl_seconds - cfg.safety_seconds
        if taken or lease.parked:
            lease.idle_since = time.monotonic()  # a fresh grant is not idle yet
            if taken:
                lease.slice = slice_nanos
            # Re-read: Authorizes ran while we awaited; grant on top of what is
            # unused now (set_lease re-bases at the current committed + held).
            st = {d["budget_id"]: d for d in rt.engine.lease_status()}.get(lease.budget_id)
            rt.engine.set_lease(lease.budget_id,
                                max(0, st["unused_nanos"] if st else 0) + lease.parked
                                + (slice_nanos if taken else 0))
            lease.parked = 0


__all__ = ["LeaseConfig", "LeaseManager", "LeaseStore", "Fenced"]
