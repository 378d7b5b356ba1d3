# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Budgets and their counters: the compiled twin of `_budget_py`.

Same API and behaviour as the Python twin (the specification; see its module
docstring for the rules: all-or-none HARD reservations, SOFT warnings, lazy
UTC-calendar period rollover, leases, saturation at MAX_NANOS). Counters live in
one C array of `Slot` structs; a match is interned as a `BudgetSet` holding a C
array of indices, so the engine's hot path touches no Python ints.

Matching: a book of up to SCAN_MAX budgets tests each scope; a larger one uses
an index built at `set_budgets` (bitsets over the budgets, one dict per scope
key), so matching costs one lookup per distinct scope key whatever the number
of budgets: 1,000 per-customer budgets cost what 6 do. Both give exactly the
Python twin's `match` (tests compare them on books of 5, 40 and 150 budgets).

Overflow: every counter and limit is <= MAX_NANOS = 2**61, an amount is at
most MAX_NANOS + 1 and a lease base <= 2**62, so `committed + held + amount`
and `lease_base + lease` stay below 2**63.

One room, though long: a compiled twin mirrors `_budget_py` function for function,
and its C structs are shared by every function here (cimported by the engine through
_budget_c.pxd); split, the pair could no longer be read side by side.
"""
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.dict cimport PyDict_Next, PyDict_Size
from cpython.tuple cimport PyTuple_GET_ITEM
from cpython.unicode cimport PyUnicode_GET_LENGTH
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from collections.abc import Mapping

from p402core._enums import (
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

cdef extern from *:
    """
    #define P402_MAX_NANOS 2305843009213693952LL   /* 2**61 */
    #define P402_NEVER 4611686018427387904LL       /* 2**62: end of TOTAL */
    #define P402_INT64_MAX 9223372036854775807LL
    #define P402_DAY_MS 86400000LL
    """
    const int64_t C_MAX_NANOS "P402_MAX_NANOS"
    const int64_t C_NEVER "P402_NEVER"
    const int64_t C_INT64_MAX "P402_INT64_MAX"
    const int64_t DAY_MS "P402_DAY_MS"

cdef object _ONE = 1
cdef int SCAN_MAX = 16    # books up to this size match by scanning scopes
cdef dict _OWNER_INDEX = {k: i for i, k in enumerate(OWNER_KEYS)}
cdef tuple _EMPTY_OWNERS = ("",) * 6
cdef int _MAX_STRING = MAX_STRING
cdef int _MAX_LABELS = MAX_LABELS


# -- validation helpers (same checks and messages as the Python twin) --------

cdef int64_t check_i64(str field, object value, int64_t lo, int64_t hi) except? -1:
    cdef int overflow = 0
    cdef long long v
    if type(value) is not int:
        if isinstance(value, int) and not isinstance(value, bool):
            value = int(value)
        else:
            raise InvalidArgument(field, f"must be an int, not {type(value).__name__}")
    v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow != 0 or v < lo or v > hi:
        raise InvalidArgument(field, f"must be between {lo} and {hi}, not {value}")
    return v


cdef str check_str(str field, object value, bint required):
    if type(value) is not str:
        if isinstance(value, str):
            value = str(value)
        else:
            raise InvalidArgument(field, f"must be a str, not {type(value).__name__}")
    if len(<str>value) > _MAX_STRING:
        raise InvalidArgument(field, f"longer than {MAX_STRING} characters")
    if required and not value:
        raise InvalidArgument(field, "must not be empty")
    return <str>value


def _check_int(field, value, lo, hi):
    return check_i64(field, value, lo, hi)


def _check_str(field, value, required=False):
    return check_str(field, value, required)


cpdef tuple owners_tuple(object owners, str field="owners"):
    """Owners as the 6-tuple of str in OWNER_KEYS order ("" = absent)."""
    cdef int i
    cdef object v
    cdef list out
    if owners is None:
        return _EMPTY_OWNERS
    if type(owners) is tuple and len(<tuple>owners) == 6:
        for i in range(6):
            v = <object>PyTuple_GET_ITEM(<tuple>owners, i)
            if type(v) is not str:
                raise InvalidArgument(f"{field}.{OWNER_KEYS[i]}",
                                      f"must be a str, not {type(v).__name__}")
            if len(<str>v) > _MAX_STRING:
                raise InvalidArgument(f"{field}.{OWNER_KEYS[i]}",
                                      f"longer than {MAX_STRING} characters")
        return <tuple>owners
    if isinstance(owners, Mapping):
        out = ["", "", "", "", "", ""]
        for k, v in owners.items():
            idx = _OWNER_INDEX.get(k) if type(k) is str else None
            if idx is None:
                raise InvalidArgument(field, f"unknown owner dimension {k!r}; "
                                             f"expected one of {', '.join(OWNER_KEYS)}")
            if v is None:
                v = ""
            out[idx] = check_str(f"{field}.{k}", v, False)
        return tuple(out)
    if isinstance(owners, (list, tuple)):
        if len(owners) != 6:
            raise InvalidArgument(field, f"must have 6 values ({', '.join(OWNER_KEYS)}), "
                                         f"not {len(owners)}")
        return owners_tuple(tuple(owners), field)
    raise InvalidArgument(field, f"must be a mapping or a 6-tuple, not {type(owners).__name__}")


cpdef dict labels_dict(object labels, str field="labels"):
    """Labels as a dict[str, str] (None stays None), validated."""
    if labels is None:
        return None
    if _labels_ok(labels):
        return <dict>labels
    return _labels_slow(labels, field)


cdef inline bint _labels_ok(object labels):
    cdef Py_ssize_t pos = 0
    cdef PyObject* k
    cdef PyObject* v
    # fast path: an exact dict of short str -> str (no ABC isinstance, no f-strings)
    if type(labels) is dict and PyDict_Size(labels) <= _MAX_LABELS:
        while PyDict_Next(labels, &pos, &k, &v):
            if (type(<object>k) is not str or type(<object>v) is not str
                    or PyUnicode_GET_LENGTH(<object>k) == 0
                    or PyUnicode_GET_LENGTH(<object>k) > _MAX_STRING
                    or PyUnicode_GET_LENGTH(<object>v) > _MAX_STRING):
                return False
        return True
    return False


cdef dict _labels_slow(object labels, str field):
    if not isinstance(labels, Mapping):
        raise InvalidArgument(field, f"must be a mapping, not {type(labels).__name__}")
    if len(labels) > _MAX_LABELS:
        raise InvalidArgument(field, f"more than {MAX_LABELS} labels ({len(labels)})")
    for k, v in labels.items():
        check_str(field, k, True)
        check_str(f"{field}.{k}", v, False)
    if type(labels) is not dict:
        labels = dict(labels)
    return <dict>labels


# -- periods ------------------------------------------------------------------
# Operands are >= 0 here (now_ms >= 0 is validated), so C division is floor
# division.

cdef inline int64_t _days_from_civil(int64_t y, int64_t m, int64_t d) noexcept nogil:
    cdef int64_t era, yoe, doy, doe
    if m <= 2:
        y -= 1
    era = y // 400
    yoe = y - era * 400
    doy = (153 * ((m - 3) if m > 2 else (m + 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef inline void _bounds(int period, int64_t now_ms, int64_t* start, int64_t* end) noexcept nogil:
    cdef int64_t days, s, z, era, doe, yoe, doy, mp, m, y
    if period == 4:          # TOTAL
        start[0] = 0
        end[0] = C_NEVER
        return
    days = now_ms // DAY_MS
    if period == 1:          # DAY
        start[0] = days * DAY_MS
        end[0] = (days + 1) * DAY_MS
    elif period == 2:        # WEEK: 1970-01-01 was a Thursday; ISO weeks start Monday
        s = days - (days + 3) % 7
        start[0] = s * DAY_MS
        end[0] = (s + 7) * DAY_MS
    else:                    # MONTH (Hinnant's civil_from_days)
        z = days + 719468
        era = z // 146097
        doe = z - era * 146097
        yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
        doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
        mp = (5 * doy + 2) // 153
        m = (mp + 3) if mp < 10 else (mp - 9)
        y = yoe + era * 400 + (1 if m <= 2 else 0)
        start[0] = _days_from_civil(y, m, 1) * DAY_MS
        if m == 12:
            end[0] = _days_from_civil(y + 1, 1, 1) * DAY_MS
        else:
            end[0] = _days_from_civil(y, m + 1, 1) * DAY_MS


def period_bounds(period, now_ms):
    """[start_ms, end_ms) of the UTC calendar period containing now_ms (≥ 0)."""
    cdef int64_t s, e
    cdef int p = int(period)
    cdef int64_t now = check_i64("now_ms", now_ms, 0, C_NEVER - 1)
    if p < 1 or p > 4:
        raise InvalidArgument("period", f"unknown period {p}")
    _bounds(p, now, &s, &e)
    return s, e


cdef inline void _roll(Slot* s, int64_t now_ms) noexcept nogil:
    if now_ms >= s.end:
        _bounds(s.period, now_ms, &s.start, &s.end)
        s.committed = 0
        if s.leased:
            s.lease_base = s.held


cdef inline int64_t _allowance(Slot* s) noexcept nogil:
    cdef int64_t a
    if s.leased:
        a = s.lease_base + s.lease
        return a if a < s.limit else s.limit
    return s.limit


cdef inline int64_t _sat(int64_t x) noexcept nogil:
    return x if x < C_MAX_NANOS else C_MAX_NANOS


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
        value = check_str(f"scope.{key}", value, True)
        if key.startswith("label."):
            lk = key[6:]
            if not lk:
                raise InvalidArgument("scope", "empty label key in 'label.'")
            check_str("scope", lk, False)
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


cdef class Budget:
    """One budget: who it applies to (scope), per which period, how much, how strictly.

    Immutable. `scope` maps an owner dimension (`"customer"`) or `"label.<key>"`
    to the value it must have; every condition must match; empty = whole tenant.
    """

    def __init__(self, budget_id, limit_nanos, *, scope=None, period=Period.MONTH,
                 soft_limit_nanos=0, enforcement=Enforcement.HARD):
        cdef int k
        budget_id = check_str("budget_id", budget_id, True)
        limit = check_i64("limit_nanos", limit_nanos, 0, C_MAX_NANOS)
        soft = check_i64("soft_limit_nanos", soft_limit_nanos, 0, C_MAX_NANOS)
        if soft > limit:
            raise InvalidArgument("soft_limit_nanos", f"{soft} is above limit_nanos {limit}")
        period = _enum_value("period", period, Period)
        enforcement = _enum_value("enforcement", enforcement, Enforcement)
        clean, owner_conds, label_conds = _compile_scope(scope)
        self.budget_id = budget_id
        self.limit_nanos = limit
        self.soft_limit_nanos = soft
        self.period = period
        self.enforcement = enforcement
        self._scope = clean
        self._n_owner = len(owner_conds)
        for k in range(self._n_owner):
            self._owner_idx[k] = owner_conds[k][0]
        self._owner_vals = tuple(c[1] for c in owner_conds)
        self._label_conds = label_conds

    @property
    def scope(self):
        """The scope conditions (a copy: a Budget never changes)."""
        return dict(self._scope)

    cdef bint _matches(self, tuple owners, dict labels):
        cdef int k
        cdef str want
        cdef object got
        for k in range(self._n_owner):
            want = <str>PyTuple_GET_ITEM(self._owner_vals, k)
            if <str>PyTuple_GET_ITEM(owners, self._owner_idx[k]) != want:
                return False
        if self._label_conds:
            if not labels:
                return False
            for cond in self._label_conds:
                got = labels.get((<tuple>cond)[0])
                if got is None or <str>got != <str>(<tuple>cond)[1]:
                    return False
        return True

    def matches(self, owners, labels=None):
        """True when every scope condition holds for these owners/labels."""
        return self._matches(owners_tuple(owners), labels_dict(labels))

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
        if not hasattr(other, "to_dict") or not hasattr(other, "budget_id"):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self):
        return hash((self.budget_id, self.limit_nanos, self.period))

    def __reduce__(self):
        return (_budget_from_dict, (self.to_dict(),))

    def __repr__(self):
        return (f"Budget({self.budget_id!r}, {self.limit_nanos}, scope={self._scope!r}, "
                f"period={Period(self.period).name}, soft_limit_nanos={self.soft_limit_nanos}, "
                f"enforcement={Enforcement(self.enforcement).name})")


def _budget_from_dict(d):
    return Budget.from_dict(d)


cdef class BudgetStatus:
    """A budget's counters at one moment (read-only).

    `remaining_nanos` = max(0, limit − committed − held): what the budget as a
    whole has left, whatever share of it this process leases.
    """

    def __init__(self, budget_id, limit_nanos, committed_nanos, held_nanos,
                 period_start_ms, enforcement):
        self.budget_id = budget_id
        self.limit_nanos = limit_nanos
        self.committed_nanos = committed_nanos
        self.held_nanos = held_nanos
        self.remaining_nanos = max(0, limit_nanos - committed_nanos - held_nanos)
        self.period_start_ms = period_start_ms
        self.enforcement = enforcement

    def to_dict(self):
        return {
            "budget_id": self.budget_id,
            "limit_nanos": self.limit_nanos,
            "committed_nanos": self.committed_nanos,
            "held_nanos": self.held_nanos,
            "remaining_nanos": self.remaining_nanos,
            "period_start_ms": self.period_start_ms,
            "enforcement": self.enforcement,
        }

    def __eq__(self, other):
        if not hasattr(other, "to_dict") or not hasattr(other, "remaining_nanos"):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None

    def __repr__(self):
        return "BudgetStatus(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"


cdef inline BudgetStatus _new_status(Budget b, Slot* s):
    cdef BudgetStatus st = BudgetStatus.__new__(BudgetStatus)
    cdef int64_t rem = s.limit - s.committed - s.held
    st.budget_id = b.budget_id
    st.limit_nanos = s.limit
    st.committed_nanos = s.committed
    st.held_nanos = s.held
    st.remaining_nanos = rem if rem > 0 else 0
    st.period_start_ms = s.start
    st.enforcement = s.enforcement
    return st


cdef class BudgetSet:
    """An interned set of budget indices of one generation of a BudgetBook.

    What a hold points at: many holds share one object. When the book's
    `generation` moved on, `BudgetBook.current()` re-resolves it by id."""

    def __cinit__(self):
        self.idx = NULL
        self.n = 0

    def __dealloc__(self):
        if self.idx != NULL:
            free(self.idx)

    def __repr__(self):
        return f"BudgetSet({self.budget_ids!r}, generation={self.generation})"


cdef BudgetSet _new_set(tuple indices, tuple budget_ids, long long generation):
    cdef BudgetSet bs = BudgetSet.__new__(BudgetSet)
    cdef int k, n = len(indices)
    bs.indices = indices
    bs.budget_ids = budget_ids
    bs.generation = generation
    bs.n = n
    bs.idx = <int*>malloc((n if n > 0 else 1) * sizeof(int))
    if bs.idx == NULL:
        raise MemoryError()
    for k in range(n):
        bs.idx[k] = indices[k]
    return bs


cdef class BudgetBook:
    """Counters of a set of budgets; see `_budget_py`'s docstring for the rules."""

    def __cinit__(self, *args, **kwargs):
        cdef Slot* slots
        self._cache_sets = [None] * 64

        self._clear_cache()
        self._words = NULL
        self._work = NULL
        self._ckind = NULL
        self._cdim = NULL
        self._creq = NULL
        self._ncond = 0
        self._nw = 0
        self._slots = NULL
        self._scratch = NULL
        self._n = 0
        self._budgets = ()
        self._index = {}
        self._sets = {}
        self.generation = 0
        # A valid empty book from the start: BudgetBook.__new__ without
        # __init__ must not leave NULL buffers for the fast paths.
        slots = <Slot*>malloc(sizeof(Slot))
        if slots == NULL:
            raise MemoryError()
        self._install((), slots)

    def __init__(self, budgets=()):
        self.set_budgets(budgets)

    def __dealloc__(self):
        if self._slots != NULL:
            free(self._slots)
        if self._scratch != NULL:
            free(self._scratch)
        self._free_index()

    cdef void _free_index(self):
        free(self._words)
        free(self._work)
        free(self._ckind)
        free(self._cdim)
        free(self._creq)
        self._words = self._work = NULL
        self._ckind = self._cdim = self._creq = NULL
        self._ncond = 0

    cdef _build_index(self, tuple budgets):
        # Matching by condition, not by budget: for each owner dimension / label
        # key that some scope tests, one dict lookup of the request's value gives
        # the budgets wanting exactly that value. Cost grows with the number of
        # distinct scope keys, not budgets (1,000 per-customer budgets = 1 lookup).
        cdef int n = len(budgets)
        cdef int nw = (n + 63) // 64 if n > 0 else 1
        cdef int i, k, c, w, off
        cdef Budget b
        groups = {}                          # (kind, dim or key) -> [req bits, {value: bits}]
        for i in range(n):
            b = <Budget>budgets[i]
            bit = _ONE << i        # a Python int: C shifts stop at 63
            for k in range(b._n_owner):
                g = groups.setdefault((0, b._owner_idx[k]), [0, {}])
                g[0] |= bit
                v = b._owner_vals[k]
                g[1][v] = g[1].get(v, 0) | bit
            for lk, v in b._label_conds:
                g = groups.setdefault((1, lk), [0, {}])
                g[0] |= bit
                g[1][v] = g[1].get(v, 0) | bit
        bitsets = [(_ONE << n) - 1]
        ckind, cdim, creq, ckeys, cvals = [], [], [], [], []
        for (kind, what), (req, vals) in groups.items():
            ckind.append(kind)
            cdim.append(what if kind == 0 else 0)
            ckeys.append(what if kind == 1 else None)
            creq.append(len(bitsets) * nw)
            bitsets.append(req)
            offs = {}
            for v, bits in vals.items():
                offs[v] = len(bitsets) * nw
                bitsets.append(bits)
            cvals.append(offs)
        self._free_index()
        c = len(ckind)
        self._words = <uint64_t*>malloc(len(bitsets) * nw * sizeof(uint64_t))
        self._work = <uint64_t*>malloc(nw * sizeof(uint64_t))
        self._ckind = <int*>malloc((c if c else 1) * sizeof(int))
        self._cdim = <int*>malloc((c if c else 1) * sizeof(int))
        self._creq = <int*>malloc((c if c else 1) * sizeof(int))
        if (self._words == NULL or self._work == NULL or self._ckind == NULL
                or self._cdim == NULL or self._creq == NULL):
            self._free_index()
            raise MemoryError()
        for k in range(len(bitsets)):
            bits = bitsets[k]
            for w in range(nw):
                self._words[k * nw + w] = <uint64_t>((bits >> (64 * w)) & 0xFFFFFFFFFFFFFFFF)
        for k in range(c):
            self._ckind[k] = ckind[k]
            self._cdim[k] = cdim[k]
            self._creq[k] = creq[k]
        self._ncond = c
        self._nw = nw
        self._ckeys = tuple(ckeys)
        self._cvals = tuple(cvals)

    # -- the budget set -------------------------------------------------------

    @property
    def budgets(self):
        return self._budgets

    def __len__(self):
        return self._n

    cdef _install(self, tuple budgets, Slot* slots):
        cdef int n = len(budgets)
        cdef int* scratch = <int*>malloc((n if n > 0 else 1) * sizeof(int))
        if scratch == NULL:
            free(slots)
            raise MemoryError()
        if self._slots != NULL:
            free(self._slots)
        if self._scratch != NULL:
            free(self._scratch)
        self._build_index(budgets)
        self._slots = slots
        self._scratch = scratch
        self._n = n
        self._budgets = budgets
        self._index = {(<Budget>b).budget_id: i for i, b in enumerate(budgets)}
        self._sets = {}
        self._clear_cache()
        self.generation += 1

    cdef void _clear_cache(self):
        cdef int k
        for k in range(64):
            self._cache_mask[k] = 0
            self._cache_sets[k] = None

    def set_budgets(self, budgets):
        """Replace the budget set atomically; surviving ids keep their counters."""
        cdef int i, n
        cdef Slot* slots
        cdef Slot* prev
        cdef Budget b
        if isinstance(budgets, BudgetBook):
            budgets = (<BudgetBook>budgets)._budgets
        budgets = tuple(budgets)
        seen = set()
        for ob in budgets:
            if not isinstance(ob, Budget):
                raise InvalidArgument("budgets", f"must be Budget objects, not {type(ob).__name__}")
            if (<Budget>ob).budget_id in seen:
                raise InvalidArgument("budgets", f"duplicate budget_id {(<Budget>ob).budget_id!r}")
            seen.add((<Budget>ob).budget_id)
        n = len(budgets)
        slots = <Slot*>malloc((n if n > 0 else 1) * sizeof(Slot))
        if slots == NULL:
            raise MemoryError()
        for i in range(n):
            b = <Budget>budgets[i]
            slots[i].limit = b.limit_nanos
            slots[i].soft = b.soft_limit_nanos
            slots[i].period = b.period
            slots[i].enforcement = b.enforcement
            slots[i].committed = 0
            slots[i].held = 0
            slots[i].start = -1
            slots[i].end = -1
            slots[i].leased = 0
            slots[i].lease = 0
            slots[i].lease_base = 0
            j = self._index.get(b.budget_id)
            if j is not None:
                prev = &self._slots[<int>j]
                slots[i].committed = prev.committed
                slots[i].held = prev.held
                slots[i].leased = prev.leased
                slots[i].lease = prev.lease
                slots[i].lease_base = prev.lease_base
                if prev.period == b.period:
                    slots[i].start = prev.start
                    slots[i].end = prev.end
                else:
                    slots[i].committed = 0
        self._install(budgets, slots)

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
        return tuple((<Budget>self._budgets[i]).budget_id for i in indices)

    def match(self, owners, labels=None):
        """Indices of the budgets whose scope matches (all conditions hold)."""
        return self._match_set(owners_tuple(owners), labels_dict(labels)).indices

    cdef BudgetSet _interned(self, tuple indices):
        cdef BudgetSet bs = self._sets.get(indices)
        if bs is None:
            bs = _new_set(indices, self.budget_ids(indices), self.generation)
            self._sets[indices] = bs
        return bs

    cdef BudgetSet _match_set(self, tuple owners, dict labels):
        cdef int i, c, w, slot, n = 0
        cdef int nw = self._nw
        cdef uint64_t mask
        cdef uint64_t* work = self._work
        cdef uint64_t* req
        cdef uint64_t* ok
        cdef object key, value, off, found
        cdef BudgetSet bs
        if self._n <= SCAN_MAX:
            # few budgets: testing each scope directly is cheaper than the
            # index's dict lookups (one per scope key)
            mask = 0
            for i in range(self._n):
                if (<Budget>PyTuple_GET_ITEM(self._budgets, i))._matches(owners, labels):
                    mask |= (<uint64_t>1) << i
            work[0] = mask
            c = self._ncond      # skip the index below
        else:
            memcpy(work, self._words, nw * sizeof(uint64_t))
            c = 0
        while c < self._ncond:
            if self._ckind[c] == 0:
                value = <object>PyTuple_GET_ITEM(owners, self._cdim[c])
            elif labels:
                value = labels.get(<object>PyTuple_GET_ITEM(self._ckeys, c))
            else:
                value = None
            off = None
            if value is not None:
                off = (<dict>PyTuple_GET_ITEM(self._cvals, c)).get(value)
            req = self._words + self._creq[c]
            if off is None:          # no budget testing this key wants this value
                for w in range(nw):
                    work[w] &= ~req[w]
            else:
                ok = self._words + <int>off
                for w in range(nw):
                    work[w] &= ~(req[w] & ~ok[w])
            c += 1
        mask = work[0]
        slot = <int>((mask * <uint64_t>0x9E3779B97F4A7C15) >> 58)
        if self._n > 64 or self._cache_mask[slot] != mask or self._cache_sets[slot] is None:
            for w in range(nw):
                for i in range(64):
                    if (work[w] >> i) & 1:
                        self._scratch[n] = w * 64 + i
                        n += 1
        # Interned by the bitmask when the book has <= 64 budgets: first the C
        # cache (no Python int), then the dict.
        if self._n <= 64:
            if self._cache_mask[slot] == mask:
                found = self._cache_sets[slot]
                if found is not None:
                    return <BudgetSet>found
            key = mask
            bs = self._sets.get(key)
            if bs is None:
                bs = self._interned(tuple([self._scratch[i] for i in range(n)]))
                self._sets[key] = bs
            self._cache_mask[slot] = mask
            self._cache_sets[slot] = bs
            return bs
        return self._interned(tuple([self._scratch[i] for i in range(n)]))

    def match_set(self, owners, labels=None):
        """`match` as an interned BudgetSet (what the engine's holds keep)."""
        return self._match_set(owners_tuple(owners), labels_dict(labels))

    cdef BudgetSet _set_for_ids(self, tuple budget_ids):
        return self._interned(self.indices(budget_ids))

    def set_for_ids(self, budget_ids):
        """The BudgetSet of the budgets among these ids that still exist."""
        return self._set_for_ids(tuple(budget_ids))

    cdef BudgetSet _current(self, BudgetSet bs):
        if bs.generation == self.generation:
            return bs
        return self._set_for_ids(bs.budget_ids)

    def current(self, budget_set):
        """`budget_set` itself when still of this generation, else re-resolved by id."""
        return self._current(budget_set)

    # -- reservations: cdef fast paths -----------------------------------------

    cdef int _reserve(self, BudgetSet bs, int64_t amount, int64_t now_ms) except -1:
        cdef int k
        cdef Slot* s
        for k in range(bs.n):
            s = &self._slots[bs.idx[k]]
            _roll(s, now_ms)
            if s.enforcement == 1 and s.committed + s.held + amount > _allowance(s):
                return 0
        for k in range(bs.n):
            s = &self._slots[bs.idx[k]]
            s.held = _sat(s.held + amount)
        return 1

    cdef int64_t _headroom(self, BudgetSet bs, int64_t now_ms) except -1:
        cdef int k
        cdef Slot* s
        cdef int64_t r, room = C_MAX_NANOS
        for k in range(bs.n):
            s = &self._slots[bs.idx[k]]
            _roll(s, now_ms)
            if s.enforcement == 1:
                r = _allowance(s) - s.committed - s.held
                if r < room:
                    room = r
        return room if room > 0 else 0

    cdef int _reserve_into(self, BudgetSet bs, int64_t amount, int64_t now_ms,
                           int64_t* out) except -1:
        cdef int k
        cdef Slot* s
        cdef int64_t used
        cdef int result = 1
        for k in range(bs.n):
            s = &self._slots[bs.idx[k]]
            _roll(s, now_ms)
            if s.enforcement == 1 and s.committed + s.held + amount > _allowance(s):
                return 0
        for k in range(bs.n):
            s = &self._slots[bs.idx[k]]
            s.held = _sat(s.held + amount)
            used = s.committed + s.held
            if (s.soft > 0 and used > s.soft) or (s.enforcement == 2 and used > s.limit):
                result = 2
            out[3 * k] = s.committed
            out[3 * k + 1] = s.held
            out[3 * k + 2] = s.start
        return result

    cdef int _counters_into(self, BudgetSet bs, int64_t now_ms, int64_t* out) except -1:
        cdef int k
        cdef Slot* s
        for k in range(bs.n):
            s = &self._slots[bs.idx[k]]
            _roll(s, now_ms)
            out[3 * k] = s.committed
            out[3 * k + 1] = s.held
            out[3 * k + 2] = s.start
        return 0

    cdef int _any_over_soft(self, BudgetSet bs, int64_t now_ms) except -1:
        cdef int k
        cdef Slot* s
        cdef int64_t used
        for k in range(bs.n):
            s = &self._slots[bs.idx[k]]
            _roll(s, now_ms)
            used = s.committed + s.held
            if (s.soft > 0 and used > s.soft) or (s.enforcement == 2 and used > s.limit):
                return 1
        return 0

    cdef int _release(self, BudgetSet bs, int64_t amount) except -1:
        cdef int k
        cdef Slot* s
        for k in range(bs.n):
            s = &self._slots[bs.idx[k]]
            s.held = s.held - amount if s.held > amount else 0
        return 0

    cdef int _commit(self, BudgetSet bs, int64_t cost, int64_t now_ms) except -1:
        cdef int k
        cdef Slot* s
        for k in range(bs.n):
            s = &self._slots[bs.idx[k]]
            _roll(s, now_ms)
            s.committed = _sat(s.committed + cost)
        return 0

    cdef int _add_held(self, BudgetSet bs, int64_t amount, int64_t now_ms) except -1:
        cdef int k
        cdef Slot* s
        for k in range(bs.n):
            s = &self._slots[bs.idx[k]]
            _roll(s, now_ms)
            s.held = _sat(s.held + amount)
        return 0

    cdef int _settle(self, BudgetSet bs, int64_t held, int64_t cost, int64_t now_ms) except -1:
        cdef int k
        cdef Slot* s
        for k in range(bs.n):
            s = &self._slots[bs.idx[k]]
            s.held = s.held - held if s.held > held else 0
            _roll(s, now_ms)
            s.committed = _sat(s.committed + cost)
        return 0

    cdef BudgetStatus _status(self, int i, int64_t now_ms):
        cdef Slot* s = &self._slots[i]
        _roll(s, now_ms)
        return _new_status(<Budget>PyTuple_GET_ITEM(self._budgets, i), s)

    cdef tuple _statuses(self, BudgetSet bs, int64_t now_ms):
        cdef int k
        return tuple([self._status(bs.idx[k], now_ms) for k in range(bs.n)])

    # -- reservations: Python API (validated, same as the Python twin) ---------

    cdef BudgetSet _checked(self, object indices, object now_ms, int64_t* now):
        cdef int k
        now[0] = check_i64("now_ms", now_ms, 0, C_NEVER - 1)
        for i in indices:
            if type(i) is not int or i < 0 or i >= self._n:
                raise InvalidArgument("indices", f"no budget at index {i!r}")
        return _new_set(tuple(indices), (), self.generation)

    cdef int64_t _amount(self, str field, object amount) except? -1:
        cdef int64_t a = check_i64(field, amount, 0, C_INT64_MAX)
        # above MAX_NANOS an amount fits no HARD budget; keep the int64 sums exact
        return a if a <= C_MAX_NANOS else C_MAX_NANOS + 1

    def headroom(self, indices, now_ms):
        """Largest amount that still fits every HARD budget among `indices`
        (MAX_NANOS when none is HARD)."""
        cdef int64_t now
        bs = self._checked(indices, now_ms, &now)
        return self._headroom(bs, now)

    def reserve(self, indices, amount_nanos, now_ms):
        """Hold `amount_nanos` on every budget in `indices`, or on none."""
        cdef int64_t now
        bs = self._checked(indices, now_ms, &now)
        return self._reserve(bs, self._amount("amount_nanos", amount_nanos), now) == 1

    def over_soft(self, indices, now_ms):
        """Indices (among `indices`) past their soft limit, or SOFT ones past their limit."""
        cdef int64_t now, used
        cdef Slot* s
        cdef int k
        cdef BudgetSet bs = self._checked(indices, now_ms, &now)
        out = []
        for k in range(bs.n):
            s = &self._slots[bs.idx[k]]
            _roll(s, now)
            used = s.committed + s.held
            if (s.soft > 0 and used > s.soft) or (s.enforcement == 2 and used > s.limit):
                out.append(bs.idx[k])
        return tuple(out)

    def release(self, indices, amount_nanos):
        """Return a hold's amount (never below 0)."""
        cdef int64_t now
        bs = self._checked(indices, 0, &now)
        self._release(bs, self._amount("amount_nanos", amount_nanos))

    def add_held(self, indices, amount_nanos, now_ms):
        """Hold `amount_nanos` on every budget in `indices` without any limit
        check (re-creating holds that already passed their check)."""
        cdef int64_t now
        bs = self._checked(indices, now_ms, &now)
        self._add_held(bs, self._amount("amount_nanos", amount_nanos), now)

    def commit(self, indices, cost_nanos, now_ms):
        """Add an actual cost to the current period of every budget in `indices`."""
        cdef int64_t now
        bs = self._checked(indices, now_ms, &now)
        self._commit(bs, self._amount("cost_nanos", cost_nanos), now)

    def settle(self, indices, held_nanos, cost_nanos, now_ms):
        """Release a hold of `held_nanos` and commit `cost_nanos` (one pass)."""
        self.release(indices, held_nanos)
        self.commit(indices, cost_nanos, now_ms)

    # -- reading and restoring ------------------------------------------------

    def status(self, index, now_ms):
        cdef int64_t now
        self._checked((index,), now_ms, &now)
        return self._status(index, now)

    def statuses(self, indices=None, now_ms=0):
        if indices is None:
            indices = range(self._n)
        return tuple(self.status(i, now_ms) for i in indices)

    cdef int _slot_index(self, object budget_id) except -1:
        i = self._index.get(budget_id)
        if i is None:
            raise NotFound("budget", budget_id)
        return i

    def counters(self, budget_id):
        """(period_start_ms, committed_nanos, held_nanos) as last computed."""
        cdef Slot* s = &self._slots[self._slot_index(budget_id)]
        return s.start, s.committed, s.held

    def set_committed(self, budget_id, period_start_ms, nanos):
        """Set a budget's committed total for the period starting at
        `period_start_ms` (rebuilt from the ledger); see the Python twin."""
        cdef Slot* s = &self._slots[self._slot_index(budget_id)]
        cdef int64_t start = check_i64("period_start_ms", period_start_ms, 0, C_NEVER - 1)
        cdef int64_t v = check_i64("nanos", nanos, 0, C_MAX_NANOS)
        cdef int64_t p_start, p_end
        _bounds(s.period, start, &p_start, &p_end)
        if p_start != start:
            raise InvalidArgument("period_start_ms",
                                  f"{start} is not the start of a {Period(s.period).name} "
                                  f"period (that period starts at {p_start})")
        if s.end != -1 and start < s.start:
            return False
        if start > s.start:
            s.start = p_start
            s.end = p_end
            if s.leased:
                s.lease_base = s.held
        s.committed = v
        return True

    def set_lease(self, budget_id, lease_nanos):
        """Grant this process `lease_nanos` of the budget's headroom from now on
        (None: own the whole budget again)."""
        cdef Slot* s = &self._slots[self._slot_index(budget_id)]
        if lease_nanos is None:
            s.leased = 0
            s.lease = 0
            s.lease_base = 0
            return
        cdef int64_t lease = check_i64("lease_nanos", lease_nanos, 0, C_MAX_NANOS)
        s.leased = 1
        s.lease = lease
        s.lease_base = s.committed + s.held

    def lease_status(self):
        """One dict per leased budget: the grant, what was used of it, what is left."""
        cdef int i
        cdef Slot* s
        cdef int64_t used
        out = []
        for i in range(self._n):
            s = &self._slots[i]
            if s.leased:
                used = s.committed + s.held - s.lease_base
                out.append({
                    "budget_id": (<Budget>self._budgets[i]).budget_id,
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
        cdef int i
        cdef Slot* s
        counters = {}
        for i in range(self._n):
            s = &self._slots[i]
            counters[(<Budget>self._budgets[i]).budget_id] = {
                "period_start_ms": s.start,
                "period_end_ms": s.end,
                "committed_nanos": s.committed,
                "held_nanos": s.held,
                "lease_nanos": s.lease if s.leased else None,
                "lease_base_nanos": s.lease_base,
            }
        return {
            "version": 1,
            "budgets": [b.to_dict() for b in self._budgets],
            "counters": counters,
        }

    def restore(self, state):
        """Replace budgets and counters with a `snapshot()`."""
        cdef BudgetBook fresh
        cdef Slot* s
        cdef Slot* slots
        if not isinstance(state, Mapping) or state.get("version") != 1:
            raise InvalidArgument("state", "not a BudgetBook snapshot (version 1)")
        budgets = [Budget.from_dict(d) for d in state.get("budgets", ())]
        counters = state.get("counters", {})
        fresh = BudgetBook(budgets)
        for bid, c in counters.items():
            j = fresh._index.get(bid)
            if j is None:
                raise InvalidArgument("counters", f"counters for unknown budget {bid!r}")
            s = &fresh._slots[<int>j]
            s.start = check_i64("period_start_ms", c["period_start_ms"], -1, C_NEVER)
            s.end = check_i64("period_end_ms", c["period_end_ms"], -1, C_NEVER)
            s.committed = check_i64("committed_nanos", c["committed_nanos"], 0, C_MAX_NANOS)
            s.held = check_i64("held_nanos", c["held_nanos"], 0, C_MAX_NANOS)
            lease = c.get("lease_nanos")
            s.leased = lease is not None
            s.lease = check_i64("lease_nanos", lease, 0, C_MAX_NANOS) if s.leased else 0
            s.lease_base = check_i64("lease_base_nanos", c.get("lease_base_nanos", 0), 0,
                                     2 * C_MAX_NANOS)
        # take over fresh's slots (fresh gives them up)
        slots = fresh._slots
        fresh._slots = <Slot*>malloc(sizeof(Slot))
        fresh._n = 0
        if fresh._slots == NULL:
            free(slots)
            raise MemoryError()
        self._install(fresh._budgets, slots)
