# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The per-tenant decision engine: the compiled twin of `_engine_py`.

Same API and behaviour, bit for bit, as the Python twin, whose docstring is
the specification of the authorize / record / release / expire flow. Here the
engine cimports the compiled prices, estimate, policy and budget modules and
calls their cdef fast paths directly (arguments are validated once, here).

What makes it cheap: holds are cdef objects with C fields, linked into
one-second expiry buckets; a match is an interned BudgetSet (a C array of
indices) shared by every hold of that owner set; an Authorization keeps its
budgets' counters in a C array and builds the BudgetStatus objects only when
`budgets` is read; reasons and rule ids reuse the policy's tuples unless the
engine adds one.

One room, though long: a compiled twin mirrors `_engine_py` step for step, and the
hold structs, expiry buckets and the authorize / record paths share C state that a
split would have to expose through a .pxd.
"""
cimport cython
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.tuple cimport PyTuple_GET_ITEM
from cpython.unicode cimport PyUnicode_DecodeASCII

cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void* PyUnicode_DATA(object o)
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from p402core._budget_c cimport (
    Budget,
    BudgetBook,
    BudgetSet,
    BudgetStatus,
    Slot,
    check_i64,
    check_str,
    labels_dict,
    owners_tuple,
)
from p402core._estimate_c cimport Estimate, Estimator
from p402core._policy_c cimport PolicyResult, RuleSet
from p402core._prices_c cimport Catalog, ModelPrice

import heapq
import time

from p402core._budget_c import MAX_NANOS, _check_int, _check_str
import p402core._budget_c as _budget_module   # Python-level owners_tuple / labels_dict
from p402core import _units
from p402core._holdrec import RecordParser, hold_record
from p402core._enums import (
    BUDGET_CLAMPED,
    BUDGET_EXCEEDED,
    BUDGET_SOFT_LIMIT,
    MAX_STRING,
    MAX_TOKENS,
    OWNER_KEYS,
    POLICY_COST_TOO_HIGH,
    POLICY_OUTPUT_CLAMPED,
    POLICY_RATE_LIMITED,
    PRICE_UNKNOWN_MODEL,
    Conflict,
    Decision,
    Evidence,
    InvalidArgument,
    NotFound,
    Outcome,
    PrivacyMode,
    UnknownModel,
)

__all__ = ["Engine", "Authorization", "Settlement", "SETTLED_MEMORY", "MAX_TTL_SECONDS"]

SETTLED_MEMORY = 8_192
MAX_TTL_SECONDS = 7 * 24 * 3600

cdef extern from *:
    """
    #include <time.h>
    #define P402_MAX_NANOS 2305843009213693952LL
    #define P402_MAX_NOW 4611686018427387903LL
    static long long p402_now_ms(void) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        return (long long)ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
    }
    """
    const int64_t C_MAX_NANOS "P402_MAX_NANOS"
    const int64_t C_MAX_NOW "P402_MAX_NOW"
    long long p402_now_ms() nogil

cdef int64_t C_MAX_TOKENS = MAX_TOKENS
cdef Py_ssize_t C_MAX_STRING = MAX_STRING
cdef int64_t C_MAX_TTL = MAX_TTL_SECONDS
cdef int C_SETTLED_MEMORY = SETTLED_MEMORY
cdef int64_t BUCKET_MS = 1000

cdef int ALLOW = Decision.ALLOW
cdef int WARN = Decision.WARN
cdef int DENY = Decision.DENY
cdef int EXPIRED = Outcome.EXPIRED
cdef int CANCELLED = Outcome.CANCELLED
cdef int ESTIMATED = Evidence.ESTIMATED
cdef int REPORTED = Evidence.REPORTED
cdef int O_SUCCESS = Outcome.SUCCESS
cdef int O_PROVIDER_ERROR = Outcome.PROVIDER_ERROR
cdef int O_TIMEOUT = Outcome.TIMEOUT
cdef int P_FULL_TRACE = PrivacyMode.FULL_TRACE
cdef int P_METADATA_ONLY = PrivacyMode.METADATA_ONLY
cdef tuple EMPTY_OWNERS = ("",) * 6
cdef object _OutcomeType = Outcome
cdef str S_PRICE_UNKNOWN_MODEL = PRICE_UNKNOWN_MODEL
cdef str S_POLICY_OUTPUT_CLAMPED = POLICY_OUTPUT_CLAMPED
cdef str S_POLICY_COST_TOO_HIGH = POLICY_COST_TOO_HIGH
cdef str S_POLICY_RATE_LIMITED = POLICY_RATE_LIMITED
cdef str S_BUDGET_CLAMPED = BUDGET_CLAMPED
cdef str S_BUDGET_EXCEEDED = BUDGET_EXCEEDED
cdef str S_BUDGET_SOFT_LIMIT = BUDGET_SOFT_LIMIT


# -- validation (same checks and messages as the Python twin) -----------------

cdef int _privacy(object value) except -1:
    cdef long v
    if type(value) is int:
        v = value   # any exact int in 0..5 (others take the checked path below)
        if 0 < v <= P_FULL_TRACE:
            return <int>v
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument("privacy_mode", f"must be a PrivacyMode, not {type(value).__name__}")
    if value < 0 or value > P_FULL_TRACE:
        raise InvalidArgument("privacy_mode", f"unknown PrivacyMode value {value!r}")
    v = value
    return <int>v if v else P_METADATA_ONLY


cdef int _outcome(object value) except -1:
    cdef long v
    if type(value) is int or type(value) is _OutcomeType:
        v = value
        if v == O_SUCCESS or v == O_PROVIDER_ERROR or v == O_TIMEOUT or v == CANCELLED:
            return <int>v
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument("outcome", f"must be an Outcome, not {type(value).__name__}")
    value = int(value)
    if not (value == O_SUCCESS or value == O_PROVIDER_ERROR or value == O_TIMEOUT
            or value == CANCELLED):
        raise InvalidArgument("outcome", f"{value} is not an outcome a record can report "
                                         "(SUCCESS, PROVIDER_ERROR, TIMEOUT or CANCELLED)")
    return value


cdef inline int64_t _i64(str field, object value, int64_t lo, int64_t hi) except? -1:
    # fast path for an exact int in range; the checked helper for everything else
    cdef int overflow = 0
    cdef long long v
    if type(value) is int:
        v = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and lo <= v <= hi:
            return v
    return check_i64(field, value, lo, hi)


cdef inline str _str(str field, object value, bint required):
    if type(value) is str and len(<str>value) <= C_MAX_STRING and (not required or len(<str>value) > 0):
        return <str>value
    return check_str(field, value, required)


cdef int64_t _content_bytes(object content) except -1:
    if isinstance(content, str):
        if (<str>content).isascii():
            return len(<str>content)
        return len((<str>content).encode("utf-8", "surrogatepass"))
    if isinstance(content, (bytes, bytearray, memoryview)):
        return len(content)
    raise InvalidArgument("content", f"must be str or bytes, not {type(content).__name__}")


cdef inline void _add(list lst, str item):
    if item and item not in lst:
        lst.append(item)


# -- results --------------------------------------------------------------------
# Results and holds reference only str, tuples, dicts of str and immutable core
# objects, never each other, so they cannot be part of a reference cycle:
# @no_gc keeps them out of the cyclic GC (no GC header, no traversal of a
# million open holds). That is only sound because nothing here links objects
# of these classes together (holds used to form prev/next rings, which the GC
# could not see and which could be left dangling; see the Engine docstring).

@cython.final
@cython.no_gc
cdef class Authorization:
    """The answer to `authorize`: data, never an exception. Read-only.

    `output_token_cap` is the max_tokens the caller must send to the provider
    (0 on DENY); `budgets` the status of each matched budget after the decision.
    """
    cdef readonly int decision
    cdef readonly tuple reasons
    cdef readonly tuple rule_ids
    cdef readonly str reservation_id
    cdef readonly str model
    cdef readonly str provider
    cdef readonly long long estimated_input_tokens
    cdef readonly long long estimated_output_tokens
    cdef readonly long long output_token_cap
    cdef readonly long long estimated_cost_nanos
    cdef readonly str catalog_version
    cdef readonly long long expires_ms
    # the matched budgets' counters at decision time; `budgets` is built lazily
    cdef tuple _budget_defs      # the book's Budget tuple of that generation
    cdef BudgetSet _bset
    cdef int64_t* _counters      # committed, held, period_start per budget
    cdef int64_t _inline[24]     # _counters for up to 8 budgets, no malloc
    cdef tuple _budgets

    def __cinit__(self):
        self._counters = NULL

    def __dealloc__(self):
        if self._counters != NULL and self._counters != &self._inline[0]:
            free(self._counters)

    cdef int64_t* _buffer(self, int n) except NULL:
        if n <= 8:
            self._counters = &self._inline[0]
        else:
            self._counters = <int64_t*>malloc(3 * n * sizeof(int64_t))
            if self._counters == NULL:
                raise MemoryError()
        return self._counters

    @property
    def budgets(self):
        cdef int k
        cdef Budget b
        cdef BudgetStatus st
        cdef int64_t rem
        if self._budgets is None:
            out = []
            for k in range(self._bset.n):
                b = <Budget>self._budget_defs[self._bset.idx[k]]
                st = BudgetStatus.__new__(BudgetStatus)
                st.budget_id = b.budget_id
                st.limit_nanos = b.limit_nanos
                st.committed_nanos = self._counters[3 * k]
                st.held_nanos = self._counters[3 * k + 1]
                rem = b.limit_nanos - st.committed_nanos - st.held_nanos
                st.remaining_nanos = rem if rem > 0 else 0
                st.period_start_ms = self._counters[3 * k + 2]
                st.enforcement = b.enforcement
                out.append(st)
            self._budgets = tuple(out)
        return self._budgets

    @property
    def allowed(self):
        """True for ALLOW and WARN."""
        return self.decision != DENY

    def to_dict(self):
        return {
            "decision": self.decision,
            "reasons": list(self.reasons),
            "rule_ids": list(self.rule_ids),
            "reservation_id": self.reservation_id,
            "model": self.model,
            "provider": self.provider,
            "estimated_input_tokens": self.estimated_input_tokens,
            "estimated_output_tokens": self.estimated_output_tokens,
            "output_token_cap": self.output_token_cap,
            "estimated_cost_nanos": self.estimated_cost_nanos,
            "budgets": [b.to_dict() for b in self.budgets],
            "catalog_version": self.catalog_version,
            "expires_ms": self.expires_ms,
        }

    def __repr__(self):
        return (f"Authorization({Decision(self.decision).name}, reasons={self.reasons!r}, "
                f"reservation_id={self.reservation_id!r}, "
                f"estimated_cost_nanos={self.estimated_cost_nanos}, "
                f"output_token_cap={self.output_token_cap})")


@cython.final
@cython.no_gc
cdef class Settlement:
    """How a hold (or a meter-only record) ended: what it cost. Read-only."""
    cdef readonly str reservation_id
    cdef readonly str model
    cdef readonly str provider
    cdef readonly tuple owners
    cdef readonly dict labels
    cdef readonly long long input_tokens
    cdef readonly long long output_tokens
    cdef readonly long long cached_input_tokens
    cdef readonly long long cache_write_tokens
    cdef readonly long long reasoning_tokens
    cdef readonly long long cost_nanos
    cdef readonly long long estimated_cost_nanos
    cdef readonly long long overrun_nanos
    cdef readonly int outcome
    cdef readonly int evidence
    cdef readonly tuple budget_ids
    cdef readonly str catalog_version
    cdef readonly long long settled_ms

    def to_dict(self):
        return {
            "reservation_id": self.reservation_id,
            "model": self.model,
            "provider": self.provider,
            "owners": {k: v for k, v in zip(OWNER_KEYS, self.owners)},
            "labels": dict(self.labels) if self.labels else {},
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cost_nanos": self.cost_nanos,
            "estimated_cost_nanos": self.estimated_cost_nanos,
            "overrun_nanos": self.overrun_nanos,
            "outcome": self.outcome,
            "evidence": self.evidence,
            "budget_ids": list(self.budget_ids),
            "catalog_version": self.catalog_version,
            "settled_ms": self.settled_ms,
        }

    def __repr__(self):
        return (f"Settlement({self.reservation_id!r}, {Outcome(self.outcome).name}, "
                f"cost_nanos={self.cost_nanos}, estimated_cost_nanos={self.estimated_cost_nanos}, "
                f"overrun_nanos={self.overrun_nanos})")


cdef Settlement _settlement(str rid, str model, str provider, tuple owners, dict labels,
                            int64_t i, int64_t o, int64_t c, int64_t w, int64_t r,
                            int64_t cost, int64_t estimate, int64_t overrun, int outcome,
                            int evidence, tuple budget_ids, str catalog_version,
                            int64_t settled_ms):
    cdef Settlement s = Settlement.__new__(Settlement)
    s.reservation_id = rid
    s.model = model
    s.provider = provider
    s.owners = owners
    s.labels = labels
    s.input_tokens = i
    s.output_tokens = o
    s.cached_input_tokens = c
    s.cache_write_tokens = w
    s.reasoning_tokens = r
    s.cost_nanos = cost
    s.estimated_cost_nanos = estimate
    s.overrun_nanos = overrun
    s.outcome = outcome
    s.evidence = evidence
    s.budget_ids = budget_ids
    s.catalog_version = catalog_version
    s.settled_ms = settled_ms
    return s


@cython.final
@cython.no_gc
@cython.auto_pickle(False)
cdef class _Hold:
    """One open reservation. Lives in `Engine._holds` and in the dict of its
    one-second expiry bucket (`Engine._buckets[key]`); it references no other
    hold and nothing that references it, so it can never be part of a cycle
    and needs no GC tracking (fields: str, a tuple and a dict of str, the
    price and the interned BudgetSet)."""
    cdef str reservation_id
    cdef str model
    cdef str provider
    cdef str catalog_version
    cdef ModelPrice price
    cdef BudgetSet bset
    cdef tuple owners
    cdef dict labels
    cdef int64_t amount
    cdef int64_t expires_ms
    cdef int64_t key             # expiry bucket: expires_ms // BUCKET_MS
    cdef int64_t seq
    cdef int64_t input_bytes
    cdef int input_tokens        # <= MAX_TOKENS = 10**8 fits an int
    cdef int output_tokens


@cython.final
@cython.no_gc_clear
@cython.auto_pickle(False)
cdef class Engine:
    """Authorize → hold → record/release/expire for one tenant (see `_engine_py`).

    Memory safety (the cdef fast paths trust these invariants, so they are
    structural rather than checked on every call):
    - every typed field is set in `__cinit__` and never None afterwards:
      `no_gc_clear` stops the cyclic GC from setting them to None when an
      engine is part of garbage (a cycle can only pass through `_clock`, a
      Python callable the GC clears instead), and `__cinit__` requires the
      constructor's arguments, so no half-built Engine exists;
    - holds reference no other hold: expiry buckets are dicts {id: hold},
      so there is no ring to break and nothing dangles after a restore;
    - no pickling or copying (`auto_pickle(False)`): a copy would share the
      holds' dicts with the original.
    """
    cdef Catalog _catalog
    cdef BudgetBook _book
    cdef RuleSet _rules
    cdef Estimator _estimator
    cdef object _clock
    cdef readonly long long hold_ttl_seconds
    cdef readonly bint allow_clamp
    cdef readonly ModelPrice fallback_price
    cdef readonly str reservation_prefix
    cdef bytes _prefix_ascii     # the prefix when ASCII (ids are built in one buffer)
    cdef dict _holds
    cdef dict _buckets
    cdef list _bucket_keys
    cdef int64_t _last_key       # the bucket most authorizes land in ...
    cdef dict _last_bucket       # ... and its dict (or None)
    cdef int64_t _next_id
    cdef bint _foreign_ids       # ids not from this counter exist: check collisions
    cdef int64_t _seq
    cdef list _settled           # ring of the last SETTLED_MEMORY settled ids
    cdef int _settled_pos

    def __cinit__(self, catalog, *, budgets=(), rules=(), estimator=None, clock=None,
                  hold_ttl_seconds=900, allow_clamp=False, fallback_price=None,
                  reservation_prefix=""):
        # All of construction happens here, not in __init__: Engine.__new__
        # without arguments fails, so every Engine that exists is complete.
        if not isinstance(catalog, Catalog):
            raise InvalidArgument("catalog", f"must be a Catalog, not {type(catalog).__name__}")
        self._catalog = catalog
        self._book = BudgetBook(budgets)
        self._rules = rules if isinstance(rules, RuleSet) else RuleSet(rules)
        if estimator is None:
            estimator = Estimator()
        elif not isinstance(estimator, Estimator):
            raise InvalidArgument("estimator", f"must be an Estimator, not {type(estimator).__name__}")
        self._estimator = estimator
        if clock is not None and not callable(clock):
            raise InvalidArgument("clock", "must be a callable returning Unix milliseconds")
        self._clock = clock
        self.hold_ttl_seconds = check_i64("hold_ttl_seconds", hold_ttl_seconds, 1, C_MAX_TTL)
        self.allow_clamp = bool(allow_clamp)
        if fallback_price is not None and not isinstance(fallback_price, ModelPrice):
            raise InvalidArgument("fallback_price",
                                  f"must be a ModelPrice or None, not {type(fallback_price).__name__}")
        self.fallback_price = fallback_price
        self.reservation_prefix = check_str("reservation_prefix", reservation_prefix, False)
        self._prefix_ascii = (self.reservation_prefix.encode("ascii")
                              if self.reservation_prefix.isascii() else None)
        self._reset_holds()

    cdef _reset_holds(self):
        self._holds = {}
        self._buckets = {}
        self._bucket_keys = []
        self._last_key = -1
        self._last_bucket = None
        self._next_id = 0
        self._foreign_ids = False
        self._seq = 0
        self._settled = [None] * C_SETTLED_MEMORY
        self._settled_pos = 0

    # -- configuration ----------------------------------------------------------

    @property
    def catalog(self):
        return self._catalog

    @property
    def rules(self):
        return self._rules

    @property
    def estimator(self):
        return self._estimator

    @property
    def budget_book(self):
        return self._book

    def set_catalog(self, catalog):
        """Swap the price catalog; open holds keep the price they were made with."""
        if not isinstance(catalog, Catalog):
            raise InvalidArgument("catalog", f"must be a Catalog, not {type(catalog).__name__}")
        self._catalog = catalog

    def set_budgets(self, budgets):
        """Replace the budgets atomically; budgets whose id survives keep counters."""
        self._book.set_budgets(budgets)

    def set_rules(self, rules):
        """Replace the rules atomically; unchanged rate limits keep their buckets."""
        self._rules = rules if isinstance(rules, RuleSet) else self._rules.with_rules(rules)

    def set_committed(self, budget_id, period_start_ms, nanos):
        """A budget's committed total for a period, rebuilt from the ledger."""
        return self._book.set_committed(budget_id, period_start_ms, nanos)

    def set_lease(self, budget_id, lease_nanos):
        self._book.set_lease(budget_id, lease_nanos)

    def lease_status(self):
        return self._book.lease_status()

    def budget_status(self):
        return self._book.statuses(None, self._now())

    def open_holds(self):
        return len(self._holds)

    def hold_model(self, reservation_id):
        """The model an open hold reserved, or "" when the id is not open."""
        h = self._holds.get(reservation_id)
        return (<_Hold>h).model if h is not None else ""

    cdef int64_t _now(self) except -1:
        if self._clock is None:
            return p402_now_ms()
        return _i64("clock", self._clock(), 0, C_MAX_NOW)

    # -- authorize ----------------------------------------------------------------

    def authorize(self, model, *, provider="", owners=None, labels=None, input_bytes=-1,
                  content=None, max_output_tokens=0, privacy_mode=1, ttl_seconds=0,
                  reservation_id="", units=None):
        """May this call go ahead, and with what output cap? (see `_engine_py`)"""
        return self._authorize(model, provider, owners, labels, input_bytes, content,
                               max_output_tokens, privacy_mode, ttl_seconds, reservation_id,
                               units)

    cpdef Authorization authorize_args(self, object model, object provider, object owners,
                                       object labels, object input_bytes, object content,
                                       object max_output_tokens, object privacy_mode,
                                       object ttl_seconds, object reservation_id):
        """`authorize` with every argument positional (no keyword parsing), no units."""
        return self._authorize(model, provider, owners, labels, input_bytes, content,
                               max_output_tokens, privacy_mode, ttl_seconds, reservation_id,
                               None)

    cdef Authorization _authorize(self, object model_in, object provider_in, object owners_in,
                                  object labels_in, object input_bytes_in, object content,
                                  object max_output_in, object privacy_in, object ttl_in,
                                  object rid_in, object units_in):
        cdef str model = _str("model", model_in, True)
        cdef str provider = _str("provider", provider_in, False)
        cdef tuple owners = owners_tuple(owners_in, "owners")
        cdef dict labels = labels_dict(labels_in, "labels")
        cdef int64_t input_bytes, max_output, ttl, now, cap, room
        cdef int privacy_mode, decision
        cdef str rid, limited
        cdef ModelPrice price
        cdef PolicyResult pr
        cdef BudgetSet bset
        cdef Estimate est
        cdef list reasons = None
        cdef list rule_ids = None
        cdef int64_t clamped
        cdef Catalog catalog
        cdef BudgetBook book
        cdef RuleSet rules
        cdef dict extra = None

        if content is None:
            if type(input_bytes_in) is int and input_bytes_in == -1:
                raise InvalidArgument("input_bytes", "required: give input_bytes or content")
            input_bytes = _i64("input_bytes", input_bytes_in, 0, C_MAX_TOKENS)
        else:
            if not (input_bytes_in == -1 and type(input_bytes_in) is int):
                raise InvalidArgument("input_bytes", "give input_bytes or content, not both")
            input_bytes = _content_bytes(content)
        max_output = _i64("max_output_tokens", max_output_in, 0, C_MAX_TOKENS)
        privacy_mode = _privacy(privacy_in)
        ttl = _i64("ttl_seconds", ttl_in, 0, C_MAX_TTL)
        rid = _str("reservation_id", rid_in, False)
        if units_in:
            extra = _units.check_expected(units_in)
        if rid:
            self._foreign_ids = True
            if rid in self._holds:
                raise Conflict(f"reservation {rid!r} is already open")
        now = self._now()
        catalog = self._catalog
        book = self._book
        rules = self._rules

        decision = ALLOW
        try:
            price = catalog.lookup(model, provider)
            model = price.model
            provider = price.provider
        except UnknownModel:
            price = self.fallback_price
            reasons = [S_PRICE_UNKNOWN_MODEL]
            decision = DENY if price is None else WARN

        pr = rules._evaluate(owners, labels, model, provider, privacy_mode)
        if pr.decision > decision:
            decision = pr.decision
        if reasons is not None:
            for r in pr.reasons:
                _add(reasons, <str>r)
        bset = book._match_set(owners, labels)

        est.input_tokens = 0
        est.output_tokens = 0
        est.cost_nanos = 0
        if price is not None:
            cap = max_output if max_output else self._estimator.default_output_cap
            if pr.output_cap and pr.output_cap < cap:
                cap = pr.output_cap
                if reasons is None:
                    reasons = list(pr.reasons)
                _add(reasons, S_POLICY_OUTPUT_CLAMPED)
                rule_ids = list(pr.rule_ids)
                _add(rule_ids, pr.output_cap_rule_id)
            if content is not None:
                self._estimator._estimate_content(price, content, cap, &est)
            else:
                self._estimator._estimate(price, input_bytes, cap, &est)
            if extra:
                est.cost_nanos += _units.expected_nanos(price, extra)
            if pr.max_cost_nanos and est.cost_nanos > pr.max_cost_nanos:
                decision = DENY
                if reasons is None:
                    reasons = list(pr.reasons)
                _add(reasons, S_POLICY_COST_TOO_HIGH)
                if rule_ids is None:
                    rule_ids = list(pr.rule_ids)
                _add(rule_ids, pr.max_cost_rule_id)

        if decision != DENY:
            limited = rules._rate_check(pr, owners, est.input_tokens + est.output_tokens,
                                        est.cost_nanos, now)
            if limited:
                decision = DENY
                if reasons is None:
                    reasons = list(pr.reasons)
                _add(reasons, S_POLICY_RATE_LIMITED)
                if rule_ids is None:
                    rule_ids = list(pr.rule_ids)
                _add(rule_ids, limited)
        cdef Authorization a = Authorization.__new__(Authorization)
        cdef int64_t* counters = a._buffer(bset.n)
        cdef int held = 0
        if decision != DENY:
            held = book._reserve_into(bset, _amount(est.cost_nanos), now, counters)
            if not held:
                clamped = 0 if extra else self._clamp(price, bset, est.input_tokens,
                                                      est.output_tokens, now)
                if reasons is None:
                    reasons = list(pr.reasons)
                if clamped:
                    est.output_tokens = clamped
                    est.cost_nanos = _cost_nanos(price, est.input_tokens, clamped, 0, 0, 0)
                    # fits: it is within the headroom
                    held = book._reserve_into(bset, _amount(est.cost_nanos), now, counters)
                    _add(reasons, S_BUDGET_CLAMPED)
                else:
                    decision = DENY
                    _add(reasons, S_BUDGET_EXCEEDED)
        if decision == DENY:
            book._counters_into(bset, now, counters)
            return self._fill(a, decision, reasons, rule_ids, pr, "", model, provider, &est, 0,
                              bset, catalog.version, 0)

        if held == 2:
            if decision < WARN:
                decision = WARN
            if reasons is None:
                reasons = list(pr.reasons)
            _add(reasons, S_BUDGET_SOFT_LIMIT)
        rules._rate_consume(pr, owners, est.input_tokens + est.output_tokens, est.cost_nanos, now)
        if not rid:
            rid = self._new_id()
        cdef _Hold hold = _Hold.__new__(_Hold)
        hold.reservation_id = rid
        hold.model = model
        hold.provider = provider
        hold.price = price
        hold.bset = bset
        hold.owners = owners
        hold.labels = labels
        hold.amount = est.cost_nanos
        hold.input_tokens = <int>est.input_tokens
        hold.output_tokens = <int>est.output_tokens
        hold.input_bytes = input_bytes
        hold.expires_ms = now + (ttl if ttl else self.hold_ttl_seconds) * 1000
        hold.catalog_version = catalog.version
        self._add_hold(hold)
        return self._fill(a, decision, reasons, rule_ids, pr, rid, model, provider, &est,
                          est.output_tokens, bset, catalog.version, hold.expires_ms)

    cdef Authorization _fill(self, Authorization a, int decision, list reasons, list rule_ids,
                             PolicyResult pr, str rid, str model, str provider, Estimate* est,
                             int64_t cap, BudgetSet bset, str catalog_version,
                             int64_t expires_ms):
        a.decision = decision
        a.reasons = pr.reasons if reasons is None else tuple(reasons)
        a.rule_ids = pr.rule_ids if rule_ids is None else tuple(rule_ids)
        a.reservation_id = rid
        a.model = model
        a.provider = provider
        a.estimated_input_tokens = est.input_tokens
        a.estimated_output_tokens = est.output_tokens
        a.output_token_cap = cap
        a.estimated_cost_nanos = est.cost_nanos
        a.catalog_version = catalog_version
        a.expires_ms = expires_ms
        a._budget_defs = self._book._budgets
        a._bset = bset
        return a

    cdef int64_t _clamp(self, ModelPrice price, BudgetSet bset, int64_t in_tok,
                        int64_t out_tok, int64_t now) except -1:
        cdef int64_t room, lo, hi, mid
        if not self.allow_clamp or out_tok <= 1:
            return 0
        room = self._book._headroom(bset, now)
        if _cost_nanos(price, in_tok, 1, 0, 0, 0) > room:
            return 0
        lo = 1
        hi = out_tok - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _cost_nanos(price, in_tok, mid, 0, 0, 0) <= room:
                lo = mid
            else:
                hi = mid - 1
        return lo

    cdef str _new_id(self):
        # prefix + decimal counter written straight into one new str (an ASCII
        # prefix, the usual case); otherwise the prefix is concatenated
        cdef str rid
        cdef char buf[24]
        cdef int n
        cdef Py_ssize_t plen
        cdef uint64_t v
        cdef bytes prefix = self._prefix_ascii
        cdef char* out
        while True:
            self._next_id += 1
            v = <uint64_t>self._next_id
            n = 24
            while True:
                n -= 1
                buf[n] = <char>(48 + v % 10)
                v //= 10
                if v == 0:
                    break
            if prefix is not None:
                plen = len(prefix)
                rid = <str>PyUnicode_New(plen + 24 - n, 127)
                out = <char*>PyUnicode_DATA(rid)
                memcpy(out, <char*>prefix, plen)
                memcpy(out + plen, &buf[n], 24 - n)
            else:
                rid = self.reservation_prefix + PyUnicode_DecodeASCII(&buf[n], 24 - n, NULL)
            # the counter only grows: a generated id can only collide with one
            # a caller gave (or a restored hold had)
            if not self._foreign_ids or rid not in self._holds:
                return rid

    # -- holds ------------------------------------------------------------------------

    cdef int _add_hold(self, _Hold hold) except -1:
        cdef int64_t key
        cdef dict bucket
        self._seq += 1
        hold.seq = self._seq
        self._holds[hold.reservation_id] = hold
        key = hold.expires_ms // BUCKET_MS
        hold.key = key
        if key == self._last_key:
            bucket = self._last_bucket
        else:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = {}
                self._buckets[key] = bucket
                heapq.heappush(self._bucket_keys, key)
            self._last_key = key
            self._last_bucket = bucket
        bucket[hold.reservation_id] = hold
        return 0

    cdef int _unlink(self, _Hold hold) except -1:
        # Drop the hold from its expiry bucket. An emptied bucket stays until
        # expire() passes its second (it keeps the key heap consistent).
        cdef dict bucket
        if hold.key == self._last_key:
            bucket = self._last_bucket
        else:
            bucket = self._buckets.get(hold.key)
        if bucket is not None:
            bucket.pop(hold.reservation_id, None)
        return 0

    cdef _Hold _take(self, object reservation_id):
        cdef str rid = _str("reservation_id", reservation_id, True)
        cdef object found = self._holds.pop(rid, None)
        if found is None:
            if rid in self._settled:   # scanned only on this error path
                raise Conflict(f"reservation {rid!r} is already settled")
            raise NotFound("reservation", rid)
        cdef _Hold hold = <_Hold>found
        self._unlink(hold)
        self._remember(rid)
        return hold

    cdef inline void _remember(self, str rid):
        self._settled[self._settled_pos] = rid
        self._settled_pos += 1
        if self._settled_pos == C_SETTLED_MEMORY:
            self._settled_pos = 0

    # -- record / release / expire ----------------------------------------------------

    def record(self, reservation_id="", *, model="", provider="", owners=None, labels=None,
               input_tokens=0, output_tokens=0, cached_input_tokens=0, cache_write_tokens=0,
               reasoning_tokens=0, outcome=Outcome.SUCCESS, input_bytes=-1, units=None,
               service_tier=""):
        """Settle a hold with the actual usage, or meter a call without one.

        `units` ({Usage field: count}) and `service_tier` price the usage beyond the
        five token counts (p402core._units); a bad one raises before anything changes."""
        return self._record(reservation_id, model, provider, owners, labels, input_tokens,
                            output_tokens, cached_input_tokens, cache_write_tokens,
                            reasoning_tokens, outcome, input_bytes, units, service_tier)

    cpdef Settlement record_args(self, object reservation_id, object model, object provider,
                                 object owners, object labels, object input_tokens,
                                 object output_tokens, object cached_input_tokens,
                                 object cache_write_tokens, object reasoning_tokens,
                                 object outcome, object input_bytes):
        """`record` with every argument positional (no keyword parsing), text tokens only."""
        return self._record(reservation_id, model, provider, owners, labels, input_tokens,
                            output_tokens, cached_input_tokens, cache_write_tokens,
                            reasoning_tokens, outcome, input_bytes, None, "")

    cdef Settlement _record(self, object rid_in, object model_in, object provider_in,
                            object owners_in, object labels_in, object i_in, object o_in,
                            object c_in, object w_in, object r_in, object outcome_in,
                            object bytes_in, object units_in, object tier_in):
        cdef str rid = _str("reservation_id", rid_in, False)
        cdef str model = _str("model", model_in, False)
        cdef str provider = _str("provider", provider_in, False)
        cdef tuple owners = owners_tuple(owners_in, "owners")
        cdef dict labels = labels_dict(labels_in, "labels")
        cdef int64_t i = _i64("input_tokens", i_in, 0, C_MAX_TOKENS)
        cdef int64_t o = _i64("output_tokens", o_in, 0, C_MAX_TOKENS)
        cdef int64_t c = _i64("cached_input_tokens", c_in, 0, C_MAX_TOKENS)
        cdef int64_t w = _i64("cache_write_tokens", w_in, 0, C_MAX_TOKENS)
        cdef int64_t r = _i64("reasoning_tokens", r_in, 0, C_MAX_TOKENS)
        cdef int outcome
        cdef int64_t input_bytes, now, cost, nbytes
        cdef _Hold hold
        cdef ModelPrice price
        cdef object called, version, smodel, sprovider, found
        cdef BudgetSet bset
        cdef dict extra = None
        cdef str tier = ""
        if c + w > i:
            raise InvalidArgument("cached_input_tokens",
                                  "cached_input_tokens + cache_write_tokens exceeds input_tokens "
                                  "(both are part of the input)")
        if r > o:
            raise InvalidArgument("reasoning_tokens",
                                  "exceeds output_tokens (reasoning tokens are part of the output)")
        outcome = _outcome(outcome_in)
        input_bytes = _i64("input_bytes", bytes_in, -1, C_MAX_TOKENS)
        if units_in:
            extra = _units.check_units(units_in)
        if tier_in:
            tier = _units.check_tier(tier_in)
        if not rid:
            return self._meter(model, provider, owners, labels, i, o, c, w, r, outcome,
                               input_bytes, extra, tier)
        now = self._now()
        found = self._holds.get(rid)
        hold = <_Hold>found if found is not None else self._take(rid)  # raises NotFound / Conflict
        price = hold.price
        version = hold.catalog_version
        smodel, sprovider = hold.model, hold.provider
        if model and model != hold.model:
            # The call went to another model than reserved (a gateway's fallback): it
            # is priced at the model called, on the budgets the hold reserved.
            try:
                called = self._catalog.lookup(model, provider or hold.provider)
            except UnknownModel:
                called = None  # no price for it: the reserved model's price stands
            if called is not None and called.model != hold.model:
                price = called
                version = self._catalog.version
                smodel, sprovider = called.model, called.provider
        if extra or tier:
            cost = _units_nanos(price, i, o, c, w, r, extra, tier)  # may refuse: the hold stays
        else:
            cost = _cost_nanos(price, i, o, c, w, r)
        self._take(rid)
        bset = self._book._current(hold.bset)
        self._book._settle(bset, _amount(hold.amount), _amount(cost), now)
        if i > 0:
            nbytes = input_bytes if input_bytes >= 0 else hold.input_bytes
            if nbytes >= 0:
                self._estimator._observe(price, nbytes, i)
        return _settlement(rid, smodel, sprovider, hold.owners, hold.labels, i, o,
                           c, w, r, cost, hold.amount,
                           cost - hold.amount if cost > hold.amount else 0,
                           outcome, REPORTED, bset.budget_ids, version, now)

    cdef Settlement _meter(self, str model, str provider, tuple owners, dict labels,
                           int64_t i, int64_t o, int64_t c, int64_t w, int64_t r, int outcome,
                           int64_t input_bytes, dict extra, str tier):
        cdef ModelPrice price
        cdef Catalog catalog = self._catalog
        cdef int64_t now, cost
        cdef BudgetSet bset
        if not model:
            raise InvalidArgument("model", "required for a record without a reservation_id")
        if owners == EMPTY_OWNERS:
            raise InvalidArgument("owners", "a record without a reservation_id needs at "
                                            "least one owner")
        try:
            price = catalog.lookup(model, provider)
            model = price.model
            provider = price.provider
        except UnknownModel:
            price = self.fallback_price
            if price is None:
                raise
        now = self._now()
        if extra or tier:
            cost = _units_nanos(price, i, o, c, w, r, extra, tier)
        else:
            cost = _cost_nanos(price, i, o, c, w, r)
        bset = self._book._match_set(owners, labels)
        self._book._commit(bset, _amount(cost), now)
        if i > 0 and input_bytes >= 0:
            self._estimator._observe(price, input_bytes, i)
        return _settlement("", model, provider, owners, labels, i, o, c, w, r, cost, 0, 0,
                           outcome, REPORTED, bset.budget_ids, catalog.version, now)

    def release(self, reservation_id):
        """Void a hold: the call was not made (cost 0, CANCELLED, ESTIMATED)."""
        cdef int64_t now = self._now()
        cdef _Hold hold = self._take(reservation_id)
        cdef BudgetSet bset = self._book._current(hold.bset)
        self._book._release(bset, _amount(hold.amount))
        return _settlement(hold.reservation_id, hold.model, hold.provider, hold.owners,
                           hold.labels, 0, 0, 0, 0, 0, 0, hold.amount, 0, CANCELLED,
                           ESTIMATED, bset.budget_ids, hold.catalog_version, now)

    def expire(self, now_ms=None):
        """Settle every hold whose expiry is ≤ now at its estimate (EXPIRED, ESTIMATED),
        in expiry order."""
        cdef int64_t now = self._now() if now_ms is None else check_i64("now_ms", now_ms, 0, C_MAX_NOW)
        cdef list keys = self._bucket_keys
        cdef int64_t key, now_key = now // BUCKET_MS
        cdef _Hold h
        cdef dict bucket
        cdef BudgetSet bset
        cdef list due, out, late
        if not keys or <int64_t>keys[0] > now_key:
            return []
        due = []
        while keys and <int64_t>keys[0] <= now_key:
            key = keys[0]
            bucket = <dict>self._buckets[key]
            if key < now_key:
                # a past second: every hold in it is due
                due.extend(bucket.values())
                bucket.clear()
            else:
                # the current second: only those whose expiry has come
                late = [ob for ob in bucket.values() if (<_Hold>ob).expires_ms <= now]
                for ob in late:
                    del bucket[(<_Hold>ob).reservation_id]
                due.extend(late)
            if bucket:
                break  # the current second's bucket still holds later expiries
            heapq.heappop(keys)
            del self._buckets[key]
            if key == self._last_key:
                self._last_key = -1
                self._last_bucket = None
        due.sort(key=_expiry_order)
        out = []
        for ob in due:
            h = <_Hold>ob
            del self._holds[h.reservation_id]
            self._remember(h.reservation_id)
            bset = self._book._current(h.bset)
            self._book._settle(bset, _amount(h.amount), _amount(h.amount), now)
            out.append(_settlement(h.reservation_id, h.model, h.provider, h.owners, h.labels,
                                   h.input_tokens, h.output_tokens, 0, 0, 0, h.amount,
                                   h.amount, 0, EXPIRED, ESTIMATED, bset.budget_ids,
                                   h.catalog_version, now))
        return out

    # -- snapshot / restore -----------------------------------------------------------

    cdef list _sorted_holds(self):
        return sorted(self._holds.values(), key=_seq_order)

    cdef dict _hold_dict(self, _Hold h, dict prices):
        key = id(h.price)
        if key not in prices:
            prices[key] = (len(prices), h.price)
        return {
            "reservation_id": h.reservation_id,
            "model": h.model,
            "provider": h.provider,
            "price": prices[key][0],
            "owners": list(h.owners),
            "labels": dict(h.labels) if h.labels else None,
            "amount_nanos": h.amount,
            "input_tokens": h.input_tokens,
            "output_tokens": h.output_tokens,
            "input_bytes": h.input_bytes,
            "expires_ms": h.expires_ms,
            "budget_ids": list(self._book._current(h.bset).budget_ids),
            "catalog_version": h.catalog_version,
        }

    def holds(self):
        """The open holds as plain dicts, in creation order."""
        prices = {}
        return [self._hold_dict(h, prices) for h in self._sorted_holds()]

    cdef dict _record_of(self, _Hold h):
        return hold_record(h.reservation_id, h.model, h.provider, h.price, h.owners, h.labels,
                           h.amount, h.input_tokens, h.output_tokens, h.input_bytes,
                           h.expires_ms, self._book._current(h.bset).budget_ids,
                           h.catalog_version)

    def hold_record(self, reservation_id):
        """One open hold as a self-contained record (see `_holdrec`); NotFound
        when the id is not open."""
        cdef str rid = _str("reservation_id", reservation_id, True)
        found = self._holds.get(rid)
        if found is None:
            raise NotFound("reservation", rid)
        return self._record_of(<_Hold>found)

    def hold_records(self):
        """Every open hold's record, in creation order."""
        return [self._record_of(<_Hold>h) for h in self._sorted_holds()]

    def restore_holds(self, records):
        """Re-create holds from records: each holds its amount again on those of
        its budgets that still exist (no limit check: it passed one when it
        was made), committed totals untouched. Records whose reservation id is
        already open are skipped. All-or-nothing: a bad record raises
        InvalidArgument (`records[i].<field>`) and nothing is restored.
        Returns the number of holds restored."""
        cdef _Hold h
        cdef int64_t now
        cdef int n = 0
        if isinstance(records, (str, bytes, dict)) or records is None:
            raise InvalidArgument("records", "must be a list of hold records")
        parser = RecordParser(model_price=ModelPrice, catalog=self._catalog,
                              check_int=_check_int, check_str=_check_str,
                              owners_tuple=_budget_module.owners_tuple,
                              labels_dict=_budget_module.labels_dict, max_nanos=MAX_NANOS)
        parsed = [parser.parse(i, d) for i, d in enumerate(records)]
        now = self._now()
        for t in parsed:
            if t[0] in self._holds:
                continue
            h = _Hold.__new__(_Hold)
            (h.reservation_id, h.model, h.provider, h.price, h.owners, h.labels, h.amount,
             h.input_tokens, h.output_tokens, h.input_bytes, h.expires_ms) = t[:11]
            h.catalog_version = t[12]
            h.bset = self._book._set_for_ids(t[11])
            self._book._add_held(h.bset, _amount(h.amount), now)
            self._foreign_ids = True
            self._add_hold(h)
            n += 1
        return n

    def snapshot(self):
        """Counters, open holds (with the prices they were made with), the id
        counter and the estimator's calibration, as plain data."""
        prices = {}
        holds = [self._hold_dict(h, prices) for h in self._sorted_holds()]
        return {
            "version": 1,
            "budgets": self._book.snapshot(),
            "estimator": self._estimator.snapshot(),
            "next_id": self._next_id,
            "prices": [p.to_dict() for _, p in sorted(prices.values(), key=lambda x: x[0])],
            "holds": holds,
            "rate_limits": self._rules.snapshot(),
        }

    def restore(self, state):
        """Replace counters, holds and calibration with a `snapshot()`. The
        catalog and rules stay as configured."""
        cdef _Hold h
        cdef BudgetBook book
        if not isinstance(state, dict) or state.get("version") != 1:
            raise InvalidArgument("state", "not an Engine snapshot (version 1)")
        book = BudgetBook()
        book.restore(state["budgets"])
        prices = [ModelPrice.from_dict(p) for p in state.get("prices", ())]
        next_id = check_i64("next_id", state.get("next_id", 0), 0, 2**62)
        holds = []
        seen = set()
        for d in state.get("holds", ()):
            h = _Hold.__new__(_Hold)
            h.reservation_id = check_str("reservation_id", d["reservation_id"], True)
            if h.reservation_id in seen:
                raise InvalidArgument("holds", f"duplicate reservation_id {h.reservation_id!r}")
            seen.add(h.reservation_id)
            h.model = check_str("model", d["model"], True)
            h.provider = check_str("provider", d["provider"], False)
            k = check_i64("price", d["price"], 0, len(prices) - 1)
            h.price = prices[k]
            h.owners = owners_tuple(tuple(d["owners"]), "owners")
            h.labels = labels_dict(d.get("labels"), "labels")
            h.amount = check_i64("amount_nanos", d["amount_nanos"], 0, C_MAX_NANOS + 1)
            h.input_tokens = check_i64("input_tokens", d["input_tokens"], 0, C_MAX_TOKENS)
            h.output_tokens = check_i64("output_tokens", d["output_tokens"], 0, C_MAX_TOKENS)
            h.input_bytes = check_i64("input_bytes", d["input_bytes"], -1, C_MAX_TOKENS)
            h.expires_ms = check_i64("expires_ms", d["expires_ms"], 0, C_MAX_NOW)
            h.catalog_version = check_str("catalog_version", d.get("catalog_version", ""), False)
            h.bset = book._set_for_ids(tuple(d["budget_ids"]))
            holds.append(h)
        estimator_state = state.get("estimator")
        if estimator_state is not None:   # validated before anything changes
            Estimator().restore(estimator_state)
        rate_state = state.get("rate_limits")   # absent in older snapshots
        if rate_state is not None:
            self._rules.restore(rate_state)    # validates, then applies
        if estimator_state is not None:
            self._estimator.restore(estimator_state)
        self._book = book
        self._reset_holds()
        self._next_id = next_id
        self._foreign_ids = len(holds) > 0
        for h in holds:
            self._add_hold(h)


cdef inline int64_t _cost_nanos(ModelPrice price, int64_t i, int64_t o, int64_t c, int64_t w,
                               int64_t r) except? -1:
    # the catalog's one rounding: pico-USD half-up to nano-USD (operands >= 0)
    return (price._cost_pico(i, o, c, w, r) + 500) // 1000


cdef int64_t _units_nanos(ModelPrice price, int64_t i, int64_t o, int64_t c, int64_t w,
                          int64_t r, dict extra, str tier) except? -1:
    # usage with units or a service tier (p402core._units), priced in C
    cdef ModelPrice p = price if not tier else <ModelPrice>price.for_tier(tier)
    return (p._cost_units(i, o, c, w, r, extra) + 500) // 1000


cdef inline int64_t _amount(int64_t cost) noexcept:
    # the budget book's amounts are capped at MAX_NANOS + 1 (see _budget_c)
    return cost if cost <= C_MAX_NANOS else C_MAX_NANOS + 1


def _expiry_order(h):
    return ((<_Hold>h).expires_ms, (<_Hold>h).seq)


def _seq_order(h):
    return (<_Hold>h).seq
