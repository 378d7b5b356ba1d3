"""Budgets and their counters: the pure-Python twin (the specification).

This module owns what a budget *is* (`Budget`: scope, period, limit, soft limit,
enforcement), the per-process counters of every budget (`BudgetBook`:
`committed_nanos` recorded this period, `held_nanos` reserved by open holds) and
the read-only view of one budget (`BudgetStatus`). It does not own the holds
themselves (the engine does): a hold is, to the book, an amount placed on a set
of budget indices.

Rules, all in integer nano-USD:

- HARD budgets block: a reservation of `amount` fits when
  `committed + held + amount <= allowance`, and is placed on every matched
  budget or on none (all-or-none). SOFT budgets never block; they are reported
  by `over_soft` when past their limit. Any budget with `soft_limit_nanos > 0`
  is reported when `committed + held` passes it. Invariant: a reservation never
  takes a HARD budget's `committed + held` past its allowance (and so never
  past its limit). Commits of actual cost (the provider already charged it)
  may.
- Periods (DAY, WEEK from Monday 00:00 UTC, MONTH in the UTC calendar, TOTAL)
  are computed from `now_ms` with integer civil-calendar arithmetic. Each
  budget caches its current period `[start, end)` and rolls over lazily, on
  the first operation with `now_ms >= end`: `committed` resets to 0. Holds
  made in the old period stay held (the money may still be spent) and keep
  counting in `held`; when such a hold settles, its actual cost is committed
  into the period in which it settles. A clock that goes backwards never rolls
  a period back.
- Leases (DESIGN §6 "Scale-out"): by default a process owns the whole budget
  (allowance = limit). `set_lease(budget_id, lease_nanos)` says this process
  was granted `lease_nanos` of headroom from now on: the HARD check becomes
  `committed + held + amount <= min(limit, base + lease_nanos)` where `base`
  is `committed + held` when the lease was set. Setting it again replaces the
  grant (re-based); `None` returns to owning the whole budget. At a period
  rollover the lease keeps its size and is re-based on the new period (the
  lease manager re-grants per period). `lease_status()` reports per leased
  budget how much of the grant was used, for a lease manager to return or
  top up.
- Counters saturate at `MAX_NANOS` (2**61 nano-USD, about 2.3 billion USD) so
  that the compiled twin's int64 arithmetic can never overflow; limits above it
  are bad input.
- `set_budgets` replaces the budget set atomically; a budget whose id survives
  keeps its counters and lease. Indices are positions in the current
  `budgets` tuple; `generation` increases on every replacement so a holder of
  old indices knows to re-resolve them by id.

One room, though long: it is the specification its compiled twin mirrors; `Budget`,
`BudgetBook` and `BudgetStatus` are one idea (a budget and its counters).
"""
from __future__ import annotations

from collections.abc import Mapping

from ._enums import (
    MAX_LABELS,
    MAX_STRING,
    OWNER_KEYS,
    Enforcement,
    InvalidArgument,
    NotFound,
    Period,
)

__all__ = ["Budget", "BudgetStatus", "BudgetBook", "BudgetSet", "period_bounds", "MAX_NANOS"]

MAX_NANOS = 2**61
_NEVER = 2**62            # end of the TOTAL period ("never")
_INT64_MAX = 2**63 - 1
_DAY_MS = 86_400_000
_OWNER_INDEX = {k: i for i, k in enumerate(OWNER_KEYS)}
_EMPTY_OWNERS = ("",) * len(OWNER_KEYS)


# -- validation helpers shared with the engine twin --------------------------

def _check_int(field, value, lo, hi):
    # bool is an int subclass but never a count of money or tokens
    if type(value) is not int:
        if isinstance(value, int) and not isinstance(value, bool):
            value = int(value)  # IntEnum and int subclasses
        else:
            raise InvalidArgument(field, f"must be an int, not {type(value).__name__}")
    if value < lo or value > hi:
        raise InvalidArgument(field, f"must be between {lo} and {hi}, not {value}")
    return value


def _check_str(field, value, *, required=False):
    if type(value) is not str:
        if isinstance(value, str):
            value = str(value)
        else:
            raise InvalidArgument(field, f"must be a str, not {type(value).__name__}")
    if len(value) > MAX_STRING:
        raise InvalidArgument(field, f"longer than {MAX_STRING} characters")
    if required and not value:
        raise InvalidArgument(field, "must not be empty")
    return value


def owners_tuple(owners, field="owners"):
    """Owners as the 6-tuple of str in OWNER_KEYS order ("" = absent).

    Accepts None, a 6-sequence of str, or a mapping {dimension: value}.
    """
    if owners is None:
        return _EMPTY_OWNERS
    if type(owners) is tuple and len(owners) == 6:
        for i in range(6):
            v = owners[i]
            if type(v) is not str:
                raise InvalidArgument(f"{field}.{OWNER_KEYS[i]}",
                                      f"must be a str, not {type(v).__name__}")
            if len(v) > MAX_STRING:
                raise InvalidArgument(f"{field}.{OWNER_KEYS[i]}",
                                      f"longer than {MAX_STRING} characters")
        return owners
    if isinstance(owners, Mapping):
        out = ["", "", "", "", "", ""]
        for k, v in owners.items():
            i = _OWNER_INDEX.get(k) if type(k) is str else None
            if i is None:
                raise InvalidArgument(field, f"unknown owner dimension {k!r}; "
                                             f"expected one of {', '.join(OWNER_KEYS)}")
            if v is None:
                v = ""
            out[i] = _check_str(f"{field}.{k}", v)
        return tuple(out)
    if isinstance(owners, (list, tuple)):
        if len(owners) != 6:
            raise InvalidArgument(field, f"must have 6 values ({', '.join(OWNER_KEYS)}), "
                                         f"not {len(owners)}")
        return owners_tuple(tuple(owners), field)
    raise InvalidArgument(field, f"must be a mapping or a 6-tuple, not {type(owners).__name__}")


def labels_dict(labels, field="labels"):
    """Labels as a dict[str, str] (None stays None), validated."""
    if labels is None:
        return None
    if not isinstance(labels, Mapping):
        raise InvalidArgument(field, f"must be a mapping, not {type(labels).__name__}")
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(field, f"more than {MAX_LABELS} labels ({len(labels)})")
    for k, v in labels.items():
        _check_str(field, k, required=True)
        _check_str(f"{field}.{k}", v)
    if type(labels) is not dict:
        labels = dict(labels)
    return labels


# -- periods ------------------------------------------------------------------

def _days_from_civil(y, m, d):
    # Howard Hinnant's days_from_civil: days since 1970-01-01 of a proleptic
    # Gregorian date. Floor division keeps it right for every year.
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m - 3 if m > 2 else m + 9) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil_from_days(z):
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (m <= 2), m, d


def period_bounds(period, now_ms):
    """[start_ms, end_ms) of the UTC calendar period containing now_ms (≥ 0)."""
    period = int(period)
    now_ms = _check_int("now_ms", now_ms, 0, _NEVER - 1)
    if period == 4:  # TOTAL
        return 0, _NEVER
    days = now_ms // _DAY_MS
    if period == 1:  # DAY
        return days * _DAY_MS, (days + 1) * _DAY_MS
    if period == 2:  # WEEK: 1970-01-01 was a Thursday; ISO weeks start Monday
        start = days - (days + 3) % 7
        return start * _DAY_MS, (start + 7) * _DAY_MS
    if period == 3:  # MONTH
        y, m, _d = _civil_from_days(days)
        start = _days_from_civil(y, m, 1)
        end = _days_from_civil(y + 1, 1, 1) if m == 12 else _days_from_civil(y, m + 1, 1)
        return start * _DAY_MS, end * _DAY_MS
    raise InvalidArgument("period", f"unknown period {period}")


# -- Budget -------------------------------------------------------------------

def _enum_value(field, value, enum):
    if isinstance(value, str):
        try:
            return int(enum[value.upper()])
        except KeyError:
            raise InvalidArgument(field, f"unknown {enum.__name__} {value!r}") from None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(field, f"must be a {enum.__name__}, not {type(value).__name__}")
    try:
        member = enum(value)
    except ValueError:
        raise InvalidArgument(field, f"unknown {enum.__name__} {value}") from None
    if int(member) == 0:
        raise InvalidArgument(field, f"{enum.__name__} must be specified")
    return int(member)


def _compile_scope(scope):
    """scope mapping -> (dict, ((owner index, value), ...), ((label key, value), ...))."""
    if scope is None:
        return {}, (), ()
    if not isinstance(scope, Mapping):
        raise InvalidArgument("scope", f"must be a mapping, not {type(scope).__name__}")
    owner_conds = []
    label_conds = []
    clean = {}
    for key, value in scope.items():
        if type(key) is not str:
            raise InvalidArgument("scope", f"keys must be str, not {type(key).__name__}")
        value = _check_str(f"scope.{key}", value, required=True)
        if key.startswith("label."):
            lk = key[6:]
            if not lk:
                raise InvalidArgument("scope", "empty label key in 'label.'")
            _check_str("scope", lk)
            label_conds.append((lk, value))
        elif key in _OWNER_INDEX:
            owner_conds.append((_OWNER_INDEX[key], value))
        else:
            raise InvalidArgument("scope", f"unknown scope key {key!r}; expected an owner "
                                           f"dimension ({', '.join(OWNER_KEYS)}) or 'label.<key>'")
        clean[key] = value
    owner_conds.sort()
    label_conds.sort()
    return clean, tuple(owner_conds), tuple(label_conds)


class Budget:
    """One budget: who it applies to (scope), per which period, how much, how strictly.

    Immutable. `scope` maps an owner dimension (`"customer"`) or `"label.<key>"`
    to the value it must have; every condition must match; empty = whole tenant.
    """

    __slots__ = ("budget_id", "limit_nanos", "_scope", "period", "soft_limit_nanos",
                 "enforcement", "_owner_conds", "_label_conds")

    def __init__(self, budget_id, limit_nanos, *, scope=None, period=Period.MONTH,
                 soft_limit_nanos=0, enforcement=Enforcement.HARD):
        budget_id = _check_str("budget_id", budget_id, required=True)
        limit_nanos = _check_int("limit_nanos", limit_nanos, 0, MAX_NANOS)
        soft_limit_nanos = _check_int("soft_limit_nanos", soft_limit_nanos, 0, MAX_NANOS)
        if soft_limit_nanos > limit_nanos:
            raise InvalidArgument("soft_limit_nanos",
                                  f"{soft_limit_nanos} is above limit_nanos {limit_nanos}")
        period = _enum_value("period", period, Period)
        enforcement = _enum_value("enforcement", enforcement, Enforcement)
        clean, owner_conds, label_conds = _compile_scope(scope)
        s = object.__setattr__
        s(self, "budget_id", budget_id)
        s(self, "limit_nanos", limit_nanos)
        s(self, "_scope", clean)
        s(self, "period", period)
        s(self, "soft_limit_nanos", soft_limit_nanos)
        s(self, "enforcement", enforcement)
        s(self, "_owner_conds", owner_conds)
        s(self, "_label_conds", label_conds)

    def __setattr__(self, name, value):
        raise AttributeError("Budget is immutable")

    @property
    def scope(self):
        """The scope conditions (a copy: a Budget never changes)."""
        return dict(self._scope)

    def matches(self, owners, labels=None):
        """True when every scope condition holds for these owners/labels."""
        owners = owners_tuple(owners)
        labels = labels_dict(labels)
        return self._matches(owners, labels)

    def _matches(self, owners, labels):
        for i, v in self._owner_conds:
            if owners[i] != v:
                return False
        if self._label_conds:
            if not labels:
                return False
            for k, v in self._label_conds:
                if labels.get(k) != v:
                    return False
        return True

    def to_dict(self):
        return {
            "budget_id": self.budget_id,
            "limit_nanos": self.limit_nanos,
            "scope": dict(self._scope),
            "period": Period(self.period).name,
            "soft_limit_nanos": self.soft_limit_nanos,
            "enforcement": Enforcement(self.enforcement).name,
        }

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, Mapping):
            raise InvalidArgument("budget", f"must be a mapping, not {type(d).__name__}")
        unknown = set(d) - {"budget_id", "limit_nanos", "scope", "period",
                            "soft_limit_nanos", "enforcement"}
        if unknown:
            raise InvalidArgument(sorted(unknown)[0], "unknown budget field")
        for f in ("budget_id", "limit_nanos"):
            if f not in d:
                raise InvalidArgument(f, "is required")
        return cls(d["budget_id"], d["limit_nanos"], scope=d.get("scope"),
                   period=d.get("period", "MONTH"),
                   soft_limit_nanos=d.get("soft_limit_nanos", 0),
                   enforcement=d.get("enforcement", "HARD"))

    def __eq__(self, other):
        if not isinstance(other, Budget):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self):
        return hash((self.budget_id, self.limit_nanos, self.period))

    def __repr__(self):
        return (f"Budget({self.budget_id!r}, {self.limit_nanos}, scope={self.scope!r}, "
                f"period={Period(self.period).name}, soft_limit_nanos={self.soft_limit_nanos}, "
                f"enforcement={Enforcement(self.enforcement).name})")


class BudgetStatus:
    """A budget's counters at one moment (read-only).

    `remaining_nanos` = max(0, limit − committed − held): what the budget as a
    whole has left, whatever share of it this process leases.
    """

    __slots__ = ("budget_id", "limit_nanos", "committed_nanos", "held_nanos",
                 "remaining_nanos", "period_start_ms", "enforcement")

    def __init__(self, budget_id, limit_nanos, committed_nanos, held_nanos,
                 period_start_ms, enforcement):
        s = object.__setattr__
        s(self, "budget_id", budget_id)
        s(self, "limit_nanos", limit_nanos)
        s(self, "committed_nanos", committed_nanos)
        s(self, "held_nanos", held_nanos)
        s(self, "remaining_nanos", max(0, limit_nanos - committed_nanos - held_nanos))
        s(self, "period_start_ms", period_start_ms)
        s(self, "enforcement", enforcement)

    def __setattr__(self, name, value):
        raise AttributeError("BudgetStatus is read-only")

    def to_dict(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __eq__(self, other):
        if not hasattr(other, "to_dict") or not hasattr(other, "remaining_nanos"):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None

    def __repr__(self):
        return "BudgetStatus(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


class _Slot:
    """Counters of one budget in this process."""

    __slots__ = ("budget", "committed", "held", "start", "end", "leased", "lease",
                 "lease_base")

    def __init__(self, budget):
        self.budget = budget
        self.committed = 0
        self.held = 0
        self.start = -1       # no period yet: the first operation computes it
        self.end = -1
        self.leased = False
        self.lease = 0
        self.lease_base = 0

    def roll(self, now_ms):
        if now_ms >= self.end:
            self.start, self.end = period_bounds(self.budget.period, now_ms)
            self.committed = 0
            if self.leased:
                self.lease_base = self.held

    def allowance(self):
        limit = self.budget.limit_nanos
        if self.leased:
            return min(limit, self.lease_base + self.lease)
        return limit


class BudgetSet:
    """An interned set of budget indices of one generation of a BudgetBook.

    What a hold points at: many holds share one object. When the book's
    `generation` moved on, `BudgetBook.current()` re-resolves it by id."""

    __slots__ = ("indices", "budget_ids", "generation")

    def __init__(self, indices, budget_ids, generation):
        self.indices = indices
        self.budget_ids = budget_ids
        self.generation = generation

    def __repr__(self):
        return f"BudgetSet({self.budget_ids!r}, generation={self.generation})"


def _sat(x):
    return x if x < MAX_NANOS else MAX_NANOS


class BudgetBook:
    """Counters of a set of budgets; see the module docstring for the rules."""

    def __init__(self, budgets=()):
        self._slots = []
        self._by_id = {}
        self._budgets = ()
        self.generation = 0
        self.set_budgets(budgets)

    # -- the budget set -------------------------------------------------------

    @property
    def budgets(self):
        return self._budgets

    def __len__(self):
        return len(self._slots)

    def set_budgets(self, budgets):
        """Replace the budget set atomically; surviving ids keep their counters."""
        if isinstance(budgets, BudgetBook):
            budgets = budgets.budgets
        budgets = tuple(budgets)
        seen = set()
        for b in budgets:
            if not isinstance(b, Budget):
                raise InvalidArgument("budgets", f"must be Budget objects, not {type(b).__name__}")
            if b.budget_id in seen:
                raise InvalidArgument("budgets", f"duplicate budget_id {b.budget_id!r}")
            seen.add(b.budget_id)
        old = self._by_id
        slots = []
        for b in budgets:
            prev = old.get(b.budget_id)
            slot = _Slot(b)
            if prev is not None:
                slot.committed = prev.committed
                slot.held = prev.held
                slot.leased, slot.lease, slot.lease_base = prev.leased, prev.lease, prev.lease_base
                if prev.budget.period == b.period:
                    slot.start, slot.end = prev.start, prev.end
                # else: a new period kind starts afresh at the next operation;
                # held stays (the holds are still open)
                else:
                    slot.committed = 0
            slots.append(slot)
        self._slots = slots
        self._by_id = {s.budget.budget_id: s for s in slots}
        self._index = {s.budget.budget_id: i for i, s in enumerate(slots)}
        self._budgets = budgets
        self._sets = {}
        self.generation += 1

    def index(self, budget_id):
        """Index of a budget in `budgets`; NotFound if there is none."""
        i = self._index.get(budget_id)
        if i is None:
            raise NotFound("budget", budget_id)
        return i

    def indices(self, budget_ids):
        """Indices of the budgets among these ids that still exist (order kept)."""
        get = self._index.get
        return tuple(i for i in (get(b) for b in budget_ids) if i is not None)

    def budget_ids(self, indices):
        slots = self._slots
        return tuple(slots[i].budget.budget_id for i in indices)

    def match(self, owners, labels=None):
        """Indices of the budgets whose scope matches (all conditions hold)."""
        owners = owners_tuple(owners)
        labels = labels_dict(labels)
        return tuple(i for i, s in enumerate(self._slots) if s.budget._matches(owners, labels))

    def _interned(self, indices):
        bs = self._sets.get(indices)
        if bs is None:
            bs = BudgetSet(indices, self.budget_ids(indices), self.generation)
            self._sets[indices] = bs
        return bs

    def match_set(self, owners, labels=None):
        """`match` as an interned BudgetSet (what the engine's holds keep)."""
        return self._interned(self.match(owners, labels))

    def set_for_ids(self, budget_ids):
        """The BudgetSet of the budgets among these ids that still exist."""
        return self._interned(self.indices(budget_ids))

    def current(self, budget_set):
        """`budget_set` itself when still of this generation, else re-resolved by id."""
        if budget_set.generation == self.generation:
            return budget_set
        return self.set_for_ids(budget_set.budget_ids)

    # -- reservations ---------------------------------------------------------

    def _check(self, indices, now_ms, amount=0, field="amount_nanos"):
        now_ms = _check_int("now_ms", now_ms, 0, _NEVER - 1)
        # Any int64 amount is accepted; above MAX_NANOS it counts as MAX_NANOS + 1,
        # which fits no HARD budget and keeps the int64 sums exact.
        amount = _check_int(field, amount, 0, _INT64_MAX)
        if amount > MAX_NANOS:
            amount = MAX_NANOS + 1
        n = len(self._slots)
        for i in indices:
            if type(i) is not int or i < 0 or i >= n:
                raise InvalidArgument("indices", f"no budget at index {i!r}")
        return now_ms, amount

    def headroom(self, indices, now_ms):
        """Largest amount that still fits every HARD budget among `indices`
        (MAX_NANOS when none is HARD)."""
        now_ms, _ = self._check(indices, now_ms)
        room = MAX_NANOS
        for i in indices:
            s = self._slots[i]
            s.roll(now_ms)
            if s.budget.enforcement == 1:
                r = s.allowance() - s.committed - s.held
                if r < room:
                    room = r
        return room if room > 0 else 0

    def reserve(self, indices, amount_nanos, now_ms):
        """Hold `amount_nanos` on every budget in `indices`, or on none.

        False (nothing held) when a HARD budget cannot fit it. SOFT budgets
        never block (see `over_soft`)."""
        now_ms, amount = self._check(indices, now_ms, amount_nanos)
        slots = self._slots
        for i in indices:
            s = slots[i]
            s.roll(now_ms)
            if s.budget.enforcement == 1 and s.committed + s.held + amount > s.allowance():
                return False
        for i in indices:
            s = slots[i]
            s.held = _sat(s.held + amount)
        return True

    def over_soft(self, indices, now_ms):
        """Indices (among `indices`) past their soft limit, or SOFT ones past their limit."""
        now_ms, _ = self._check(indices, now_ms)
        out = []
        for i in indices:
            s = self._slots[i]
            s.roll(now_ms)
            used = s.committed + s.held
            b = s.budget
            if (b.soft_limit_nanos > 0 and used > b.soft_limit_nanos) or (
                    b.enforcement == 2 and used > b.limit_nanos):
                out.append(i)
        return tuple(out)

    def release(self, indices, amount_nanos):
        """Return a hold's amount (never below 0: a hold whose budget was
        removed and re-created has nothing to return to it)."""
        _, amount = self._check(indices, 0, amount_nanos)
        slots = self._slots
        for i in indices:
            s = slots[i]
            s.held = s.held - amount if s.held > amount else 0

    def add_held(self, indices, amount_nanos, now_ms):
        """Hold `amount_nanos` on every budget in `indices` without any limit
        check (re-creating holds that already passed their check)."""
        now_ms, amount = self._check(indices, now_ms, amount_nanos)
        for i in indices:
            s = self._slots[i]
            s.roll(now_ms)
            s.held = _sat(s.held + amount)

    def commit(self, indices, cost_nanos, now_ms):
        """Add an actual cost to the current period of every budget in `indices`."""
        now_ms, cost = self._check(indices, now_ms, cost_nanos, "cost_nanos")
        for i in indices:
            s = self._slots[i]
            s.roll(now_ms)
            s.committed = _sat(s.committed + cost)

    def settle(self, indices, held_nanos, cost_nanos, now_ms):
        """Release a hold of `held_nanos` and commit `cost_nanos` (one pass)."""
        self.release(indices, held_nanos)
        self.commit(indices, cost_nanos, now_ms)

    # -- reading and restoring ------------------------------------------------

    def status(self, index, now_ms):
        now_ms, _ = self._check((index,), now_ms)
        s = self._slots[index]
        s.roll(now_ms)
        b = s.budget
        return BudgetStatus(b.budget_id, b.limit_nanos, s.committed, s.held, s.start,
                            b.enforcement)

    def statuses(self, indices=None, now_ms=0):
        if indices is None:
            indices = range(len(self._slots))
        return tuple(self.status(i, now_ms) for i in indices)

    def counters(self, budget_id):
        """(period_start_ms, committed_nanos, held_nanos) as last computed, without
        rolling the period (-1 start = no operation yet)."""
        s = self._slot(budget_id)
        return s.start, s.committed, s.held

    def _slot(self, budget_id):
        s = self._by_id.get(budget_id)
        if s is None:
            raise NotFound("budget", budget_id)
        return s

    def set_committed(self, budget_id, period_start_ms, nanos):
        """Set a budget's committed total for the period starting at
        `period_start_ms` (rebuilt from the ledger). Returns True when applied;
        False when that period is older than the budget's current one (stale:
        nothing to do). A later period becomes the current one."""
        s = self._slot(budget_id)
        start = _check_int("period_start_ms", period_start_ms, 0, _NEVER - 1)
        nanos = _check_int("nanos", nanos, 0, MAX_NANOS)
        p_start, p_end = period_bounds(s.budget.period, start)
        if p_start != start:
            raise InvalidArgument("period_start_ms",
                                  f"{start} is not the start of a {Period(s.budget.period).name} "
                                  f"period (that period starts at {p_start})")
        if s.end != -1 and start < s.start:
            return False
        if start > s.start:
            s.start, s.end = p_start, p_end
            if s.leased:
                s.lease_base = s.held
        s.committed = nanos
        return True

    def set_lease(self, budget_id, lease_nanos):
        """Grant this process `lease_nanos` of the budget's headroom from now on
        (None: own the whole budget again)."""
        s = self._slot(budget_id)
        if lease_nanos is None:
            s.leased = False
            s.lease = 0
            s.lease_base = 0
            return
        lease = _check_int("lease_nanos", lease_nanos, 0, MAX_NANOS)
        s.leased = True
        s.lease = lease
        s.lease_base = s.committed + s.held

    def lease_status(self):
        """One dict per leased budget: the grant, what was used of it, what is left."""
        out = []
        for s in self._slots:
            if s.leased:
                used = s.committed + s.held - s.lease_base
                out.append({
                    "budget_id": s.budget.budget_id,
                    "period_start_ms": s.start,
                    "lease_nanos": s.lease,
                    "used_nanos": used,
                    "unused_nanos": s.lease - used,
                    "committed_nanos": s.committed,
                    "held_nanos": s.held,
                })
        return tuple(out)

    def snapshot(self):
        """Budgets and counters as plain data (`restore` takes it back)."""
        return {
            "version": 1,
            "budgets": [b.to_dict() for b in self._budgets],
            "counters": {
                s.budget.budget_id: {
                    "period_start_ms": s.start,
                    "period_end_ms": s.end,
                    "committed_nanos": s.committed,
                    "held_nanos": s.held,
                    "lease_nanos": s.lease if s.leased else None,
                    "lease_base_nanos": s.lease_base,
                }
                for s in self._slots
            },
        }

    def restore(self, state):
        """Replace budgets and counters with a `snapshot()`."""
        if not isinstance(state, Mapping) or state.get("version") != 1:
            raise InvalidArgument("state", "not a BudgetBook snapshot (version 1)")
        budgets = [Budget.from_dict(d) for d in state.get("budgets", ())]
        counters = state.get("counters", {})
        fresh = BudgetBook(budgets)
        for bid, c in counters.items():
            s = fresh._by_id.get(bid)
            if s is None:
                raise InvalidArgument("counters", f"counters for unknown budget {bid!r}")
            s.start = _check_int("period_start_ms", c["period_start_ms"], -1, _NEVER)
            s.end = _check_int("period_end_ms", c["period_end_ms"], -1, _NEVER)
            s.committed = _check_int("committed_nanos", c["committed_nanos"], 0, MAX_NANOS)
            s.held = _check_int("held_nanos", c["held_nanos"], 0, MAX_NANOS)
            lease = c.get("lease_nanos")
            s.leased = lease is not None
            s.lease = _check_int("lease_nanos", lease, 0, MAX_NANOS) if s.leased else 0
            s.lease_base = _check_int("lease_base_nanos", c.get("lease_base_nanos", 0), 0,
                                      2 * MAX_NANOS)
        self._slots = fresh._slots
        self._by_id = fresh._by_id
        self._index = fresh._index
        self._budgets = fresh._budgets
        self._sets = {}
        self.generation += 1
