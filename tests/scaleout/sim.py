"""A deterministic simulation of budgets across processes (the settlement protocol of
server/p402_server/SCALEOUT.md), in the style of TigerBeetle's VOPR: one seeded
scheduler drives several simulated processes on one simulated store, with a
simulated clock, and checks the invariants after every step.

What is real and what is modelled
- Each process runs the real decision core: a p402core `Engine` (the pure-Python
  twin) with a lease (`Engine.set_lease`), holds, record, release and expiry, on the
  simulated clock.
- The store (allocation, lease rows, ledger with its settlement claims, saved holds,
  process registrations, notices) is modelled with the semantics of the SQL in
  leases.py and ledger/: a conditional take never passes the limit, a claim keeps the
  first settling event, a hold is saved only at its maker's next flush.
- The settlement rules are those of runtime/foreign.py: a foreign Record or Release settles
  the saved hold without the settler's engine and leaves the maker a notice; the
  maker books the winner's cost (notice, or its own copy losing the claim); an
  acknowledged expiry is reported as used; survivors expire a dead process's saved
  holds; a dead lease is reclaimed only once its saved holds are settled.
- Faults: Records and Releases sent to random processes, duplicated retries, holds
  recorded before they are saved, kills at any step (unflushed holds die with the
  process, and so do events still queued in its writer: a Record a gateway sent
  behind its answer), restarts under a new id, time jumps past TTLs, lowered limits.
  A settled hold's saved row is deleted only once its event has committed.

`Sim(seed, bugs=...)` adds a fault ("stalls": a live process misses its renewals
and is taken for dead) or reverts one rule of the protocol ("compensate", "adopt":
the old cross-process settlement; "expiry_unreported"; "no_sweep"; "no_carry";
"early_delete": a flush deletes the saved hold of a settlement still queued), to
show the checks catch it (tests/scaleout/test_simulation.py). A failing seed replays
exactly: the same seed gives the same steps.
"""
from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field

import p402core

CORE = p402core.load("python")
MODEL = "gpt-4o-mini"
BUDGET = "team"
TTL_MS = 3_000           # hold TTL
LEASE_TTL_MS = 2_000     # process registration / lease lifetime
SLICE_DIVISOR = 8


class InvariantBroken(AssertionError):
    pass


@dataclass
class Store:
    limit: int
    leased: int = 0
    rows: dict = field(default_factory=dict)       # row -> [process, granted, used, expires]
    ledger: dict = field(default_factory=dict)     # rid -> (kind, cost, estimate)
    saved: dict = field(default_factory=dict)      # rid -> (maker, amount, expires, est)
    alive: dict = field(default_factory=dict)      # process -> expires_ms
    notices: dict = field(default_factory=dict)    # maker -> [(rid, cost)]
    ever_saved: set = field(default_factory=set)   # every rid a flush saved

    committed: int = 0      # Σ cost of the ledger
    unknown: int = 0        # of it, metered without the hold
    overrun: int = 0        # Σ cost above the estimate of reserved events

    def claim(self, rid: str, kind: str, cost: int, est: int) -> tuple | None:
        """Write a settling event if it is the first for `rid` -> None, else the
        winner (kind, cost, estimate)."""
        if rid in self.ledger:
            return self.ledger[rid]
        self.ledger[rid] = (kind, cost, est)
        self.committed += cost
        if kind == "unknown":
            self.unknown += cost
        else:
            self.overrun += max(0, cost - est)
        return None

    def take(self, row: str, slice_nanos: int, acked: int) -> bool:
        r = self.rows.get(row)
        if r is None:
            return False  # fenced
        r[2] += acked
        self.leased -= acked
        if slice_nanos and self.committed + self.leased + slice_nanos <= self.limit:
            r[1] += slice_nanos
            self.leased += slice_nanos
            return True
        return False


class Process:
    def __init__(self, sim: "Sim", pid: str):
        self.sim = sim
        self.pid = pid
        self.engine = CORE.Engine(
            CORE.Catalog.default(), budgets=(sim.budget,), clock=lambda: sim.now,
            hold_ttl_seconds=TTL_MS // 1000, reservation_prefix=f"rsv_{pid}_")
        self.engine.set_lease(BUDGET, 0)
        self.row = f"{pid}/1"
        sim.store.rows[self.row] = [pid, 0, 0, sim.now + LEASE_TTL_MS]
        sim.store.alive[pid] = sim.now + LEASE_TTL_MS
        self.acked = 0
        self.limit = sim.store.limit
        self.unsaved: dict = {}   # rid -> (amount, expires, est)
        self.queued: dict = {}    # rid -> (cost, est): settled, its event in the writer
        self.fenced = False

    def unused(self) -> int:
        return self.engine.lease_status()[0]["unused_nanos"]

    # --- the lease tick -----------------------------------------------------------

    def tick(self) -> None:
        st, sim = self.sim.store, self.sim
        st.alive[self.pid] = sim.now + LEASE_TTL_MS
        r = st.rows.get(self.row)
        if r is None:  # fenced: a new lease row
            self.engine.set_lease(BUDGET, 0)
            self.sim.rows += 1
            self.row = f"{self.pid}/{self.sim.rows}"
            # Holds of the old row are carried into the new one (leases.py).
            carry = 0 if "no_carry" in sim.bugs else self.engine.lease_status()[0]["held_nanos"]
            st.rows[self.row] = [self.pid, carry, 0, sim.now + LEASE_TTL_MS]
            st.leased += carry
            self.acked = 0
        if self.limit != st.limit:
            if st.limit < self.limit:  # lowered: the unused part goes back, same row
                back = max(0, self.unused())
                self.engine.set_lease(BUDGET, 0)
                st.rows[self.row][1] -= back
                st.leased -= back
            self.limit = st.limit
        st.rows[self.row][3] = sim.now + LEASE_TTL_MS
        headroom = st.limit - st.committed - st.leased + self.acked
        slice_nanos = 0
        if self.unused() < sim.slice // 2 and headroom > 0:
            slice_nanos = min(sim.slice, max(1, headroom // 2))
        acked, self.acked = self.acked, 0
        if st.take(self.row, slice_nanos, acked):
            self.engine.set_lease(BUDGET, max(0, self.unused()) + slice_nanos)
        # flush: save holds, take notices, expire
        for rid, h in self.unsaved.items():
            if rid not in st.ledger:
                st.saved[rid] = (self.pid, *h)
                st.ever_saved.add(rid)
        self.unsaved.clear()
        if "early_delete" in sim.bugs:
            for rid in self.queued:
                st.saved.pop(rid, None)
        notices = st.notices.pop(self.pid, [])
        if not self.sim.bugs & {"compensate", "adopt"}:  # the old design had none
            for rid, cost in notices:
                self.book_notice(rid, cost)
        for s in self.engine.expire(sim.now):
            won = st.claim(s.reservation_id, "expired", s.cost_nanos, s.estimated_cost_nanos)
            st.saved.pop(s.reservation_id, None)
            if won is None:
                if "expiry_unreported" not in sim.bugs:
                    self.acked += s.cost_nanos
            else:
                self.rebook(s.cost_nanos, won)

    # --- settlement ---------------------------------------------------------------

    def _adjust(self, delta: int) -> None:
        st = self.engine.budget_status()[0]
        self.engine.set_committed(BUDGET, st.period_start_ms, max(0, st.committed_nanos + delta))

    def rebook(self, own_cost: int, winner: tuple) -> None:
        kind, cost, _est = winner
        if self.sim.bugs & {"compensate", "adopt"}:
            self._adjust(-own_cost)  # the old rule: give the money back to the lease
            return
        booked = 0 if kind == "unknown" else cost
        self._adjust(booked - own_cost)
        self.acked += booked

    def book_notice(self, rid: str, cost: int) -> None:
        try:
            self.engine.release(rid)
        except (p402core.NotFound, p402core.Conflict):
            return
        self._adjust(cost)
        self.acked += cost

    def authorize(self) -> str | None:
        a = self.engine.authorize(MODEL, owners={"customer": "acme"},
                                  input_bytes=self.sim.rng.choice((400, 4000, 12000)),
                                  max_output_tokens=self.sim.rng.choice((50, 500)))
        if a.decision == p402core.Decision.DENY:
            return None
        self.unsaved[a.reservation_id] = (a.estimated_cost_nanos, a.expires_ms,
                                          a.estimated_cost_nanos)
        return a.reservation_id

    def record(self, rid: str, tokens: tuple[int, int]) -> None:
        st = self.sim.store
        if rid in st.ledger:
            return  # answered with the first event
        try:
            s = self.engine.record(rid, input_tokens=tokens[0], output_tokens=tokens[1])
        except p402core.NotFound:
            self.record_foreign(rid, tokens)
            return
        except p402core.Conflict:
            return  # settled already here: the ledger has (or will have) its event
        self.unsaved.pop(rid, None)
        if self.sim.rng.random() < 0.3:
            # Sent behind the gateway's answer (an embedded proxy): its event waits in
            # the writer (commit), a flush or a kill may come first, and no retry
            # will come (the gateway is done with the call, or died with it).
            self.queued[rid] = (s.cost_nanos, s.estimated_cost_nanos)
            self.sim.behind.add(rid)
            return
        self._commit_record(rid, s.cost_nanos, s.estimated_cost_nanos)

    def _commit_record(self, rid: str, cost: int, est: int) -> None:
        st = self.sim.store
        won = st.claim(rid, "record", cost, est)
        st.saved.pop(rid, None)
        if won is None:
            self.acked += cost
        else:
            self.rebook(cost, won)

    def commit(self) -> None:
        """The writer commits the queued events (then their saved holds may go)."""
        queued, self.queued = self.queued, {}
        for rid, (cost, est) in queued.items():
            self._commit_record(rid, cost, est)

    def record_foreign(self, rid: str, tokens: tuple[int, int]) -> None:
        st, sim = self.sim.store, self.sim
        saved = st.saved.get(rid)
        if saved is None:
            # Not saved (yet, or its maker died first): metered without the hold, on
            # this engine, claiming the reservation.
            if rid in sim.reservations and rid not in st.ledger:
                s = self.engine.record("", model=MODEL, owners={"customer": "acme"},
                                       input_tokens=tokens[0], output_tokens=tokens[1])
                if st.claim(rid, "unknown", s.cost_nanos, 0) is None:
                    self.acked += s.cost_nanos
                else:
                    self._adjust(-s.cost_nanos)
            return
        maker, amount, _exp, est = saved
        price = CORE.Catalog.default().lookup(MODEL, "")
        cost = price.cost_nanos(tokens[0], tokens[1])
        if "adopt" in sim.bugs:
            # The old rule: restore the hold into this engine and settle it here.
            self.engine.restore_holds([sim.hold_records[rid]])
            s = self.engine.record(rid, input_tokens=tokens[0], output_tokens=tokens[1])
            if st.claim(rid, "record", s.cost_nanos, amount) is None:
                self.acked += s.cost_nanos
                st.saved.pop(rid, None)
            else:
                self._adjust(-s.cost_nanos)
            return
        if st.claim(rid, "record", cost, amount) is None:
            st.saved.pop(rid, None)
            if maker != self.pid:
                st.notices.setdefault(maker, []).append((rid, cost))

    def release(self, rid: str) -> None:
        st = self.sim.store
        if rid in st.ledger:
            return
        try:
            s = self.engine.release(rid)
        except p402core.NotFound:
            saved = st.saved.get(rid)
            if saved is not None and st.claim(rid, "released", 0, saved[1]) is None:
                st.saved.pop(rid, None)
                st.notices.setdefault(saved[0], []).append((rid, 0))
            return
        except p402core.Conflict:
            return
        self.unsaved.pop(rid, None)
        won = st.claim(rid, "released", 0, s.estimated_cost_nanos)
        st.saved.pop(rid, None)
        if won is not None:
            self.rebook(0, won)


class Sim:
    def __init__(self, seed: int, *, processes: int = 3, limit: int = 150_000_000,
                 bugs: frozenset = frozenset()):
        self.seed = seed
        self.rng = random.Random(seed)
        self.bugs = frozenset(bugs)
        self.now = 1_000_000
        self.budget = CORE.Budget.from_dict({
            "budget_id": BUDGET, "scope": {"customer": "acme"}, "period": "TOTAL",
            "limit_nanos": limit, "enforcement": "HARD"})
        self.slice = limit // SLICE_DIVISOR
        self.store = Store(limit)
        self.rows = 1
        self.next_pid = 0
        self.procs: dict[str, Process] = {}
        self.reservations: dict[str, int] = {}   # rid -> estimate (given to clients)
        self.rids: list[str] = []
        self.recent: collections.deque = collections.deque(maxlen=32)
        self.behind: set = set()  # Records sent behind their answers (never retried)
        self.hold_records: dict[str, dict] = {}
        self.steps = 0
        self.limits = [(self.now, limit)]  # (time, limit) of every change
        self.floor = 0  # ledger + open holds when a limit was lowered below them
        self.trace = False
        self.log: list[str] = []
        for _ in range(processes):
            self.spawn()

    def spawn(self) -> None:
        pid = f"p{self.next_pid}"
        self.next_pid += 1
        self.procs[pid] = Process(self, pid)

    # --- one step -----------------------------------------------------------------

    def step(self) -> None:
        rng, procs = self.rng, list(self.procs.values())
        self.steps += 1
        op = rng.random()
        p = rng.choice(procs)
        before = (self.store.committed, len(self.store.ledger))
        if op < 0.30:
            rid = p.authorize()
            if rid is not None:
                self.rids.append(rid)
                self.recent.append(rid)
                self.reservations[rid] = p.engine.hold_record(rid)["amount_nanos"]
                self.hold_records[rid] = p.engine.hold_record(rid)
        elif op < 0.55 and self.reservations:
            rid = self.pick()
            rec = self.hold_records[rid]
            if rng.random() < 0.03:  # an overrun: more than authorized
                tokens = (rec["input_tokens"] * 2, rec["output_tokens"] * 2)
            else:
                tokens = (rng.randint(0, rec["input_tokens"]),
                          rng.randint(0, rec["output_tokens"]))
            p.record(rid, tokens)
            if rng.random() < 0.2 and rid not in self.behind:  # a retry, elsewhere
                rng.choice(list(self.procs.values())).record(rid, tokens)
        elif op < 0.62 and self.reservations:
            p.release(self.pick())
        elif op < 0.90:
            p.tick()
        elif op < 0.93:
            p.commit()
        elif op < 0.97:
            self.advance(rng.choice((10, 100, 500, 2_000, 4_000)))
        elif op < 0.972:
            # An admin changes the limit: lowered mid-run, or raised again.
            st = self.store
            new = max(st.limit // 2, st.limit + rng.choice((-1, 1, 2)) * self.slice)
            if new < st.limit:  # spend already there stays: the bound is never below it
                self.floor = max(self.floor, st.committed + self.open_holds())
            st.limit = new
            self.limits.append((self.now, st.limit))
            self.log.append(f"{self.steps}: limit {st.limit}")
        elif op < 0.975 and len(self.procs) > 1:
            self.kill(p)
        elif op < 0.98 and len(self.procs) < 4:
            self.spawn()
        self.survivor_duties()
        if self.trace:
            self.log.append(f"{self.steps} op={op:.3f} {p.pid} t={self.now} "
                            f"ledger {before} -> {self.store.committed} "
                            f"leased={self.store.leased} open={self.open_holds()}")
        self.check()

    def pick(self) -> str:
        """A reservation to settle: mostly an open one (gateways settle what they
        hold), sometimes any (a late retry)."""
        if self.rng.random() < 0.8:
            recent = [r for r in self.recent
                      if r not in self.store.ledger and r not in self.behind]
            if recent:
                return self.rng.choice(recent)
        return self.rng.choice(self.rids)

    def advance(self, ms: int) -> None:
        """Time passes; live processes renew their registration and lease in the
        background (every second), unless `stalls` lets one miss it (a process
        paused past its lease TTL: the known limit in SCALEOUT.md)."""
        stalled = (self.rng.choice(list(self.procs)) if "stalls" in self.bugs
                   and self.rng.random() < 0.3 else None)
        while ms > 0:
            dt = min(ms, 500)
            self.now += dt
            ms -= dt
            for pid, p in self.procs.items():
                if pid != stalled and p.row in self.store.rows:
                    self.store.alive[pid] = self.now + LEASE_TTL_MS
                    self.store.rows[p.row][3] = self.now + LEASE_TTL_MS

    def kill(self, p: Process) -> None:
        self.log.append(f"{self.steps}: kill {p.pid}")
        # Unsaved holds and queued events die with it; its registration lapses.
        del self.procs[p.pid]

    def survivor_duties(self) -> None:
        st = self.store
        dead = {pid for pid, exp in st.alive.items() if exp <= self.now}
        if not dead or not self.procs:
            return
        if "no_sweep" not in self.bugs:
            for rid, (maker, amount, exp, est) in list(st.saved.items()):
                if maker in dead and exp <= self.now:
                    st.claim(rid, "expired", amount, est)
                    del st.saved[rid]
        for row, (pid, granted, used, expires) in list(st.rows.items()):
            if pid in dead and expires <= self.now and not any(
                    s[0] == pid for s in st.saved.values()):
                st.leased -= granted - used
                del st.rows[row]

    # --- invariants ----------------------------------------------------------------

    def live_holds(self) -> set:
        # The twin's own map of open holds (Engine.holds() builds dicts: too slow to
        # call after every step).
        return {rid for p in self.procs.values() for rid in p.engine._holds}

    def open_holds(self) -> int:
        """Nanos of every reservation given out and not settled in the ledger,
        whose hold still exists somewhere (a live engine or the saved holds)."""
        st = self.store
        total = 0
        live = self.live_holds()
        for rid in live | st.saved.keys():
            if rid not in st.ledger and rid in self.reservations:
                total += self.reservations[rid]
        return total

    def overruns(self) -> int:
        return self.store.overrun

    def limit_in_force(self) -> int:
        """The limit I1 holds against: a lowered limit binds once the holds
        authorized under the higher one can have settled (their TTL) and every
        process has seen it (a lease lifetime); until then the higher one."""
        since = self.now - TTL_MS - LEASE_TTL_MS
        recent = [lim for t, lim in self.limits if t >= since]
        before = [lim for t, lim in self.limits if t < since]
        return max(recent + before[-1:] + [self.floor])

    def check(self) -> None:
        st = self.store
        spent = st.committed - st.unknown
        if spent + self.open_holds() > self.limit_in_force() + self.overruns():
            raise InvariantBroken(
                f"I1 seed={self.seed} step={self.steps}: ledger {st.committed} + open "
                f"holds {self.open_holds()} > limit {self.limit_in_force()} + overruns "
                f"{self.overruns()}")

    def drain(self) -> None:
        """Spend what is left, on every process, each call recorded at its estimate on
        a random process, until every process denies even after ticks: the ledger
        then shows whether any money was spendable twice (I1)."""
        idle = 0
        while idle < 3 and self.steps < 10**7:
            progressed = False
            for p in list(self.procs.values()):
                self.steps += 1
                rid = p.authorize()
                if rid is None:
                    continue
                progressed = True
                rec = p.engine.hold_record(rid)
                self.reservations[rid] = rec["amount_nanos"]
                self.hold_records[rid] = rec
                p.tick()  # saved, so any process can settle it
                self.rng.choice(list(self.procs.values())).record(
                    rid, (rec["input_tokens"], rec["output_tokens"]))
                self.check()
            for p in list(self.procs.values()):
                p.commit()
                p.tick()
            self.advance(TTL_MS + 1)
            for p in list(self.procs.values()):
                p.tick()
            self.check()
            idle = 0 if progressed else idle + 1

    def settle_all(self) -> None:
        """Quiesce: time passes beyond every TTL, every process ticks, survivors sweep."""
        for _ in range(4):
            self.advance(TTL_MS + LEASE_TTL_MS + 1)
            for p in list(self.procs.values()):
                p.commit()
                p.tick()
            self.survivor_duties()
            for p in list(self.procs.values()):
                p.tick()

    def check_quiet(self) -> None:
        """I2: every reservation whose hold was saved (at any time) or is live settled
        exactly once.
        I3: with nothing open, the store's allocation covers exactly the live leases
        (leased = their unused grants), so limit − ledger is spendable."""
        st = self.store
        live = self.live_holds()
        for rid in self.reservations:
            if rid not in st.ledger and rid in live:
                raise InvariantBroken(f"I2 seed={self.seed}: {rid} still held after TTL")
        if st.saved:
            raise InvariantBroken(f"I2 seed={self.seed}: saved holds never settled: "
                                  f"{sorted(st.saved)[:5]}")
        lost = st.ever_saved - st.ledger.keys()
        if lost:
            raise InvariantBroken(f"I2 seed={self.seed}: saved holds gone, never settled: "
                                  f"{sorted(lost)[:5]}")
        unused = sum(max(0, p.unused()) for p in self.procs.values()) + sum(
            p.acked for p in self.procs.values())
        stranded = st.leased - unused
        if stranded > 0:
            raise InvariantBroken(f"I3 seed={self.seed}: {stranded} nanos leased to "
                                  f"nobody's spendable slice")


def run(seed: int, steps: int, **kw) -> Sim:
    sim = Sim(seed, **kw)
    for _ in range(steps):
        sim.step()
    sim.settle_all()
    sim.check_quiet()
    sim.drain()
    return sim
