"""The per-tenant decision engine: the pure-Python twin (the specification).

Owns the two-phase flow of a metered call and the open holds (reservations);
it composes the catalog (prices), the estimator, the rule set (policies and
rate limits) and the budget book, and owns none of their rules.

`authorize(model, …)`, in this order:

1. validate the input (InvalidArgument naming the field; a reservation id that
   is already open raises Conflict);
2. `catalog.lookup` — an unknown model is a DENY with `price.unknown_model`,
   unless the engine has a `fallback_price`: then that price is used and the
   reason is a WARN;
3. `rules.evaluate` — the most severe decision of every matching rule, all
   their reasons and rule ids;
4. the output cap: `max_output_tokens` (or the estimator's default cap),
   lowered to the policy's MAX_OUTPUT_TOKENS cap (reason
   `policy.output_clamped` when that lowered it);
5. `estimator.estimate` (from `input_bytes`, or from `content` measured here):
   worst-case input and output tokens and their cost;
6. MAX_COST_PER_REQUEST: an estimate above it is a DENY
   (`policy.cost_per_request_exceeded`);
7. a DENY so far stops here: no reservation, rate buckets untouched;
8. `rules.rate_check` — a full bucket is a DENY `policy.rate_limited` (the
   limiting rule's id is added to `rule_ids`);
9. the budgets matching the owners/labels reserve the estimate all-or-none.
   When a HARD budget cannot fit it and `allow_clamp` is set, the largest
   output cap whose worst-case cost fits every HARD budget (at least one
   output token) is reserved instead: the decision keeps its ALLOW/WARN, with
   that smaller `output_token_cap` and reason `budget.clamped`. Otherwise DENY
   `budget.exceeded`;
10. a budget past its soft limit (or a SOFT one past its limit) adds a WARN
    `budget.soft_limit`;
11. `rules.rate_consume` takes the request from its rate buckets;
12. the hold is created: reservation id as given, or `reservation_prefix` +
    a counter; it expires at now + `ttl_seconds` (or `hold_ttl_seconds`).

`record(reservation_id, …usage…)` settles a hold with the caller's usage: the
actual cost is priced with the price looked up at authorize, committed on the
hold's budgets (those that still exist), the held estimate is released, and
`overrun_nanos = max(0, actual − estimate)` flags a call that cost more than
was reserved (it is committed anyway: the provider already charged it).
Model, provider, owners and labels of a hold are those of its authorize; the
record's own are validated and ignored. The estimator learns from
(input bytes, input tokens) when `input_tokens > 0` and the bytes are known:
the record's `input_bytes`, else the size measured at authorize. Without a
reservation id the record is a meter-only event: model and at least one owner
are required, the matching budgets are charged (HARD ones may go over: the
call already happened), nothing was estimated (`estimated_cost_nanos` and
`overrun_nanos` are 0). An unknown model there raises UnknownModel unless a
fallback price is set. A reservation id that is not open raises Conflict when
it was settled recently (the last `SETTLED_MEMORY` settlements), else NotFound.
A CANCELLED outcome is charged exactly what its usage says.

`release(id)` voids a hold (cost 0, CANCELLED, evidence ESTIMATED).
`expire(now_ms)` settles every hold whose expiry is ≤ now at its estimate
(EXPIRED, ESTIMATED): spend that may have happened is never under-counted.
Holds sit in one-second expiry buckets (a heap of bucket keys, each bucket a
doubly linked list of holds), so `expire` costs O(1) when nothing is due and
settling a hold unlinks it in O(1).

The server calls `expire()` periodically (it is also what frees the
one-second buckets whose time has passed). Labels dicts are kept by reference
in holds and results: do not mutate one after passing it.

All money is int nano-USD; all time int Unix milliseconds from `clock`.

One room, though long: it is the specification of the two-phase flow that
`_engine_c` mirrors step for step; authorize, record, release and expire share the
hold and its state.
"""
from __future__ import annotations

import heapq
import time

from ._budget_py import (
    MAX_NANOS,
    BudgetBook,
    _check_int,
    _check_str,
    labels_dict,
    owners_tuple,
)
from ._enums import (
    BUDGET_CLAMPED,
    BUDGET_EXCEEDED,
    BUDGET_SOFT_LIMIT,
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
from ._estimate_py import Estimator
from ._holdrec import RecordParser, hold_record
from ._policy_py import RuleSet
from . import _units
from ._prices_py import Catalog, ModelPrice

__all__ = ["Engine", "Authorization", "Settlement", "SETTLED_MEMORY", "MAX_TTL_SECONDS"]

SETTLED_MEMORY = 8_192           # recently settled ids remembered (Conflict vs NotFound)
MAX_TTL_SECONDS = 7 * 24 * 3600  # a hold lives at most a week
_BUCKET_MS = 1000                # expiry bucket width
_MAX_NOW = 2**62 - 1

_ALLOW = int(Decision.ALLOW)
_WARN = int(Decision.WARN)
_DENY = int(Decision.DENY)
_EXPIRED = int(Outcome.EXPIRED)
_CANCELLED = int(Outcome.CANCELLED)
_ESTIMATED = int(Evidence.ESTIMATED)
_REPORTED = int(Evidence.REPORTED)
_RECORD_OUTCOMES = (int(Outcome.SUCCESS), int(Outcome.PROVIDER_ERROR), int(Outcome.TIMEOUT),
                    int(Outcome.CANCELLED))
_EMPTY_OWNERS = ("",) * len(OWNER_KEYS)


def _default_clock():
    return time.time_ns() // 1_000_000


def _check_catalog(catalog):
    if not isinstance(catalog, Catalog):
        raise InvalidArgument("catalog", f"must be a Catalog, not {type(catalog).__name__}")
    return catalog


def _privacy(value):
    # Same rule as the policy module: UNSPECIFIED (0) means METADATA_ONLY.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument("privacy_mode", f"must be a PrivacyMode, not {type(value).__name__}")
    if value < 0 or value > int(PrivacyMode.FULL_TRACE):
        raise InvalidArgument("privacy_mode", f"unknown PrivacyMode value {value!r}")
    return int(value) or int(PrivacyMode.METADATA_ONLY)


def _outcome(value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument("outcome", f"must be an Outcome, not {type(value).__name__}")
    value = int(value)
    if value not in _RECORD_OUTCOMES:
        raise InvalidArgument("outcome", f"{value} is not an outcome a record can report "
                                         "(SUCCESS, PROVIDER_ERROR, TIMEOUT or CANCELLED)")
    return value


def _cost(price, i, o, c, w, r, extra, tier) -> int:
    """The cost in nanos of validated token counts, with units and a service tier."""
    if extra or tier:
        p = price.for_tier(tier)
        return (_units.cost_pico(p.rates_at(i), i, o, c, w, r, extra or {}, p._units) + 500) // 1000
    return price.cost_nanos(i, o, c, w, r)


def _usage(input_tokens, output_tokens, cached, cache_write, reasoning):
    i = _check_int("input_tokens", input_tokens, 0, MAX_TOKENS)
    o = _check_int("output_tokens", output_tokens, 0, MAX_TOKENS)
    c = _check_int("cached_input_tokens", cached, 0, MAX_TOKENS)
    w = _check_int("cache_write_tokens", cache_write, 0, MAX_TOKENS)
    r = _check_int("reasoning_tokens", reasoning, 0, MAX_TOKENS)
    if c + w > i:
        raise InvalidArgument("cached_input_tokens",
                              "cached_input_tokens + cache_write_tokens exceeds input_tokens "
                              "(both are part of the input)")
    if r > o:
        raise InvalidArgument("reasoning_tokens",
                              "exceeds output_tokens (reasoning tokens are part of the output)")
    return i, o, c, w, r


def _content_bytes(content):
    if isinstance(content, str):
        return len(content) if content.isascii() else len(content.encode("utf-8", "surrogatepass"))
    if isinstance(content, (bytes, bytearray, memoryview)):
        return len(content)
    raise InvalidArgument("content", f"must be str or bytes, not {type(content).__name__}")


def _owners_dict(owners):
    return {k: v for k, v in zip(OWNER_KEYS, owners)}


def _add(lst, item):
    if item and item not in lst:
        lst.append(item)


class Authorization:
    """The answer to `authorize`: data, never an exception. Read-only.

    `output_token_cap` is the max_tokens the caller must send to the provider
    (0 on DENY); `budgets` the status of each matched budget after the decision.
    """

    __slots__ = ("decision", "reasons", "rule_ids", "reservation_id", "model", "provider",
                 "estimated_input_tokens", "estimated_output_tokens", "output_token_cap",
                 "estimated_cost_nanos", "budgets", "catalog_version", "expires_ms")

    def __init__(self, decision, reasons, rule_ids, reservation_id, model, provider,
                 estimated_input_tokens, estimated_output_tokens, output_token_cap,
                 estimated_cost_nanos, budgets, catalog_version, expires_ms):
        s = object.__setattr__
        s(self, "decision", decision)
        s(self, "reasons", reasons)
        s(self, "rule_ids", rule_ids)
        s(self, "reservation_id", reservation_id)
        s(self, "model", model)
        s(self, "provider", provider)
        s(self, "estimated_input_tokens", estimated_input_tokens)
        s(self, "estimated_output_tokens", estimated_output_tokens)
        s(self, "output_token_cap", output_token_cap)
        s(self, "estimated_cost_nanos", estimated_cost_nanos)
        s(self, "budgets", budgets)
        s(self, "catalog_version", catalog_version)
        s(self, "expires_ms", expires_ms)

    def __setattr__(self, name, value):
        raise AttributeError("Authorization is read-only")

    @property
    def allowed(self):
        """True for ALLOW and WARN."""
        return self.decision != _DENY

    def to_dict(self):
        d = {k: getattr(self, k) for k in self.__slots__}
        d["reasons"] = list(self.reasons)
        d["rule_ids"] = list(self.rule_ids)
        d["budgets"] = [b.to_dict() for b in self.budgets]
        return d

    def __repr__(self):
        return (f"Authorization({Decision(self.decision).name}, reasons={self.reasons!r}, "
                f"reservation_id={self.reservation_id!r}, "
                f"estimated_cost_nanos={self.estimated_cost_nanos}, "
                f"output_token_cap={self.output_token_cap})")


class Settlement:
    """How a hold (or a meter-only record) ended: what it cost. Read-only."""

    __slots__ = ("reservation_id", "model", "provider", "owners", "labels", "input_tokens",
                 "output_tokens", "cached_input_tokens", "cache_write_tokens",
                 "reasoning_tokens", "cost_nanos", "estimated_cost_nanos", "overrun_nanos",
                 "outcome", "evidence", "budget_ids", "catalog_version", "settled_ms")

    def __init__(self, reservation_id, model, provider, owners, labels, input_tokens,
                 output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens,
                 cost_nanos, estimated_cost_nanos, overrun_nanos, outcome, evidence,
                 budget_ids, catalog_version, settled_ms):
        s = object.__setattr__
        s(self, "reservation_id", reservation_id)
        s(self, "model", model)
        s(self, "provider", provider)
        s(self, "owners", owners)
        s(self, "labels", labels)
        s(self, "input_tokens", input_tokens)
        s(self, "output_tokens", output_tokens)
        s(self, "cached_input_tokens", cached_input_tokens)
        s(self, "cache_write_tokens", cache_write_tokens)
        s(self, "reasoning_tokens", reasoning_tokens)
        s(self, "cost_nanos", cost_nanos)
        s(self, "estimated_cost_nanos", estimated_cost_nanos)
        s(self, "overrun_nanos", overrun_nanos)
        s(self, "outcome", outcome)
        s(self, "evidence", evidence)
        s(self, "budget_ids", budget_ids)
        s(self, "catalog_version", catalog_version)
        s(self, "settled_ms", settled_ms)

    def __setattr__(self, name, value):
        raise AttributeError("Settlement is read-only")

    def to_dict(self):
        d = {k: getattr(self, k) for k in self.__slots__}
        d["owners"] = _owners_dict(self.owners)
        d["labels"] = dict(self.labels) if self.labels else {}
        d["budget_ids"] = list(self.budget_ids)
        return d

    def __repr__(self):
        return (f"Settlement({self.reservation_id!r}, {Outcome(self.outcome).name}, "
                f"cost_nanos={self.cost_nanos}, estimated_cost_nanos={self.estimated_cost_nanos}, "
                f"overrun_nanos={self.overrun_nanos})")


class _Hold:
    """One open reservation. `prev`/`next` link it into its expiry bucket."""

    __slots__ = ("reservation_id", "model", "provider", "price", "bset", "owners", "labels",
                 "amount", "input_tokens", "output_tokens", "input_bytes", "expires_ms", "seq",
                 "catalog_version", "prev", "next")

    def unlink(self):
        p, n = self.prev, self.next
        if p is not None:
            p.next = n
            n.prev = p
            self.prev = self.next = None


def _new_bucket():
    head = _Hold()
    head.prev = head.next = head
    head.seq = -1
    return head


class Engine:
    """Authorize → hold → record/release/expire for one tenant (module docstring)."""

    def __init__(self, catalog, *, budgets=(), rules=(), estimator=None, clock=None,
                 hold_ttl_seconds=900, allow_clamp=False, fallback_price=None,
                 reservation_prefix=""):
        self._catalog = _check_catalog(catalog)
        self._book = BudgetBook(budgets)
        self._rules = rules if isinstance(rules, RuleSet) else RuleSet(rules)
        if estimator is None:
            estimator = Estimator()
        elif not isinstance(estimator, Estimator):
            raise InvalidArgument("estimator", f"must be an Estimator, not {type(estimator).__name__}")
        self._estimator = estimator
        if clock is not None and not callable(clock):
            raise InvalidArgument("clock", "must be a callable returning Unix milliseconds")
        self._clock = clock or _default_clock
        self.hold_ttl_seconds = _check_int("hold_ttl_seconds", hold_ttl_seconds, 1, MAX_TTL_SECONDS)
        self.allow_clamp = bool(allow_clamp)
        if fallback_price is not None and not isinstance(fallback_price, ModelPrice):
            raise InvalidArgument("fallback_price",
                                  f"must be a ModelPrice or None, not {type(fallback_price).__name__}")
        self.fallback_price = fallback_price
        self.reservation_prefix = _check_str("reservation_prefix", reservation_prefix)
        self._holds = {}
        self._buckets = {}          # bucket key (expires_ms // 1000) -> list head
        self._bucket_keys = []      # min-heap of the keys of _buckets
        self._next_id = 0
        self._seq = 0
        self._settled = [None] * SETTLED_MEMORY  # ring of recently settled ids
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
        self._catalog = _check_catalog(catalog)

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
        return h.model if h is not None else ""

    def _now(self):
        return _check_int("clock", self._clock(), 0, _MAX_NOW)

    # -- authorize ----------------------------------------------------------------

    def authorize(self, model, *, provider="", owners=None, labels=None, input_bytes=-1,
                  content=None, max_output_tokens=0, privacy_mode=1, ttl_seconds=0,
                  reservation_id="", units=None):
        """May this call go ahead, and with what output cap? (module docstring)

        `units`: the quantities the call is expected to use beyond tokens ({"images":
        2}, {"audio_ms": 61_500}; p402core._units.QUANTITY_UNITS): their price is
        added to the estimate and reserved; such a call is never clamped."""
        model = _check_str("model", model, required=True)
        provider = _check_str("provider", provider)
        owners = owners_tuple(owners)
        labels = labels_dict(labels)
        if content is None:
            if input_bytes == -1 and type(input_bytes) is int:
                raise InvalidArgument("input_bytes", "required: give input_bytes or content")
            input_bytes = _check_int("input_bytes", input_bytes, 0, MAX_TOKENS)
        else:
            if not (input_bytes == -1 and type(input_bytes) is int):
                raise InvalidArgument("input_bytes", "give input_bytes or content, not both")
            input_bytes = _content_bytes(content)
        max_output_tokens = _check_int("max_output_tokens", max_output_tokens, 0, MAX_TOKENS)
        privacy_mode = _privacy(privacy_mode)
        ttl_seconds = _check_int("ttl_seconds", ttl_seconds, 0, MAX_TTL_SECONDS)
        reservation_id = _check_str("reservation_id", reservation_id)
        extra = _units.check_expected(units) if units else None
        if reservation_id and reservation_id in self._holds:
            raise Conflict(f"reservation {reservation_id!r} is already open")
        now = self._now()
        catalog = self._catalog
        book = self._book
        rules = self._rules

        decision = _ALLOW
        reasons = []
        try:
            price = catalog.lookup(model, provider)
            model, provider = price.model, price.provider
        except UnknownModel:
            price = self.fallback_price
            reasons.append(PRICE_UNKNOWN_MODEL)
            decision = _DENY if price is None else _WARN

        pr = rules.evaluate(owners, labels, model, provider, privacy_mode)
        if pr.decision > decision:
            decision = pr.decision
        for r in pr.reasons:
            _add(reasons, r)
        rule_ids = list(pr.rule_ids)
        bset = book.match_set(owners, labels)

        in_tok = out_tok = cost = 0
        if price is not None:
            cap = max_output_tokens or self._estimator.default_output_cap
            if pr.output_cap and pr.output_cap < cap:
                cap = pr.output_cap
                _add(reasons, POLICY_OUTPUT_CLAMPED)
                _add(rule_ids, pr.output_cap_rule_id)
            if content is not None:
                in_tok, out_tok, cost = self._estimator.estimate_content(price, content, cap)
            else:
                in_tok, out_tok, cost = self._estimator.estimate(price, input_bytes, cap)
            if extra:
                cost += _units.expected_nanos(price, extra)
            if pr.max_cost_nanos and cost > pr.max_cost_nanos:
                decision = _DENY
                _add(reasons, POLICY_COST_TOO_HIGH)
                _add(rule_ids, pr.max_cost_rule_id)

        if decision != _DENY:
            limited = rules.rate_check(pr, owners, in_tok + out_tok, cost, now)
            if limited:
                decision = _DENY
                _add(reasons, POLICY_RATE_LIMITED)
                _add(rule_ids, limited)
        if decision != _DENY and not book.reserve(bset.indices, cost, now):
            clamped = 0 if extra else self._clamp(price, bset, in_tok, out_tok, now)
            if clamped:
                out_tok = clamped
                cost = price.cost_nanos(in_tok, out_tok)
                book.reserve(bset.indices, cost, now)  # fits: it is within the headroom
                _add(reasons, BUDGET_CLAMPED)
            else:
                decision = _DENY
                _add(reasons, BUDGET_EXCEEDED)
        if decision == _DENY:
            return Authorization(decision, tuple(reasons), tuple(rule_ids), "", model, provider,
                                 in_tok, out_tok, 0, cost, book.statuses(bset.indices, now),
                                 catalog.version, 0)

        if book.over_soft(bset.indices, now):
            if decision < _WARN:
                decision = _WARN
            _add(reasons, BUDGET_SOFT_LIMIT)
        rules.rate_consume(pr, owners, in_tok + out_tok, cost, now)
        rid = reservation_id or self._new_id()
        expires = now + (ttl_seconds or self.hold_ttl_seconds) * 1000
        hold = _Hold()
        hold.reservation_id = rid
        hold.model = model
        hold.provider = provider
        hold.price = price
        hold.bset = bset
        hold.owners = owners
        hold.labels = labels
        hold.amount = cost
        hold.input_tokens = in_tok
        hold.output_tokens = out_tok
        hold.input_bytes = input_bytes
        hold.expires_ms = expires
        hold.catalog_version = catalog.version
        self._add_hold(hold)
        return Authorization(decision, tuple(reasons), tuple(rule_ids), rid, model, provider,
                             in_tok, out_tok, out_tok, cost, book.statuses(bset.indices, now),
                             catalog.version, expires)

    def authorize_args(self, model, provider, owners, labels, input_bytes, content,
                       max_output_tokens, privacy_mode, ttl_seconds, reservation_id):
        """`authorize` with every argument positional (the compiled twin's fast path)."""
        return self.authorize(model, provider=provider, owners=owners, labels=labels,
                              input_bytes=input_bytes, content=content,
                              max_output_tokens=max_output_tokens, privacy_mode=privacy_mode,
                              ttl_seconds=ttl_seconds, reservation_id=reservation_id)

    def _clamp(self, price, bset, in_tok, out_tok, now):
        """Largest output cap in [1, out_tok) whose worst-case cost fits every
        HARD budget, or 0 (no clamping, or not even one output token fits)."""
        if not self.allow_clamp or out_tok <= 1:
            return 0
        room = self._book.headroom(bset.indices, now)
        if price.cost_nanos(in_tok, 1) > room:
            return 0
        lo, hi = 1, out_tok - 1   # cost is non-decreasing in output tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if price.cost_nanos(in_tok, mid) <= room:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _new_id(self):
        while True:
            self._next_id += 1
            rid = f"{self.reservation_prefix}{self._next_id}"
            if rid not in self._holds:
                return rid

    # -- holds ------------------------------------------------------------------------

    def _add_hold(self, hold):
        self._seq += 1
        hold.seq = self._seq
        self._holds[hold.reservation_id] = hold
        key = hold.expires_ms // _BUCKET_MS
        head = self._buckets.get(key)
        if head is None:
            head = self._buckets[key] = _new_bucket()
            heapq.heappush(self._bucket_keys, key)
        tail = head.prev
        hold.prev = tail
        hold.next = head
        tail.next = hold
        head.prev = hold

    def _take(self, reservation_id):
        rid = _check_str("reservation_id", reservation_id, required=True)
        hold = self._holds.pop(rid, None)
        if hold is None:
            if rid in self._settled:   # scanned only on this error path
                raise Conflict(f"reservation {rid!r} is already settled")
            raise NotFound("reservation", rid)
        hold.unlink()
        self._remember(rid)
        return hold

    def _remember(self, rid):
        self._settled[self._settled_pos] = rid
        self._settled_pos = (self._settled_pos + 1) % SETTLED_MEMORY

    # -- record / release / expire ----------------------------------------------------

    def record(self, reservation_id="", *, model="", provider="", owners=None, labels=None,
               input_tokens=0, output_tokens=0, cached_input_tokens=0, cache_write_tokens=0,
               reasoning_tokens=0, outcome=Outcome.SUCCESS, input_bytes=-1, units=None,
               service_tier=""):
        """Settle a hold with the actual usage, or meter a call without one.

        `units` ({Usage field: count}) and `service_tier` price the usage beyond the
        five token counts (p402core._units); a bad one raises before anything changes."""
        rid = _check_str("reservation_id", reservation_id)
        model = _check_str("model", model)
        provider = _check_str("provider", provider)
        owners_t = owners_tuple(owners)
        labels = labels_dict(labels)
        i, o, c, w, r = _usage(input_tokens, output_tokens, cached_input_tokens,
                               cache_write_tokens, reasoning_tokens)
        outcome = _outcome(outcome)
        input_bytes = _check_int("input_bytes", input_bytes, -1, MAX_TOKENS)
        extra = _units.check_units(units) if units else None
        tier = _units.check_tier(service_tier) if service_tier else ""
        if not rid:
            return self._meter(model, provider, owners_t, labels, i, o, c, w, r, outcome,
                               input_bytes, extra, tier)
        now = self._now()
        hold = self._holds.get(rid) or self._take(rid)  # _take raises NotFound / Conflict
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
                price, version = called, self._catalog.version
                smodel, sprovider = called.model, called.provider
        cost = _cost(price, i, o, c, w, r, extra, tier)  # may refuse: the hold stays
        self._take(rid)
        book = self._book
        bset = book.current(hold.bset)
        book.settle(bset.indices, hold.amount, cost, now)
        if i > 0:
            nbytes = input_bytes if input_bytes >= 0 else hold.input_bytes
            if nbytes >= 0:
                self._estimator.observe(price, nbytes, i)
        return Settlement(rid, smodel, sprovider, hold.owners, hold.labels, i, o, c,
                          w, r, cost, hold.amount, cost - hold.amount if cost > hold.amount
                          else 0, outcome, _REPORTED, bset.budget_ids, version, now)

    def record_args(self, reservation_id, model, provider, owners, labels, input_tokens,
                    output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens,
                    outcome, input_bytes):
        """`record` with every argument positional (the compiled twin's fast path)."""
        return self.record(reservation_id, model=model, provider=provider, owners=owners,
                           labels=labels, input_tokens=input_tokens,
                           output_tokens=output_tokens, cached_input_tokens=cached_input_tokens,
                           cache_write_tokens=cache_write_tokens,
                           reasoning_tokens=reasoning_tokens, outcome=outcome,
                           input_bytes=input_bytes)

    def _meter(self, model, provider, owners, labels, i, o, c, w, r, outcome, input_bytes,
               extra=None, tier=""):
        if not model:
            raise InvalidArgument("model", "required for a record without a reservation_id")
        if owners == _EMPTY_OWNERS:
            raise InvalidArgument("owners", "a record without a reservation_id needs at "
                                            "least one owner")
        catalog = self._catalog
        try:
            price = catalog.lookup(model, provider)
            model, provider = price.model, price.provider
        except UnknownModel:
            price = self.fallback_price
            if price is None:
                raise
        now = self._now()
        cost = _cost(price, i, o, c, w, r, extra, tier)
        book = self._book
        bset = book.match_set(owners, labels)
        book.commit(bset.indices, cost, now)
        if i > 0 and input_bytes >= 0:
            self._estimator.observe(price, input_bytes, i)
        return Settlement("", model, provider, owners, labels, i, o, c, w, r, cost, 0, 0,
                          outcome, _REPORTED, bset.budget_ids, catalog.version, now)

    def release(self, reservation_id):
        """Void a hold: the call was not made (cost 0, CANCELLED, ESTIMATED)."""
        now = self._now()
        hold = self._take(reservation_id)
        book = self._book
        bset = book.current(hold.bset)
        book.release(bset.indices, hold.amount)
        return Settlement(hold.reservation_id, hold.model, hold.provider, hold.owners,
                          hold.labels, 0, 0, 0, 0, 0, 0, hold.amount, 0, _CANCELLED,
                          _ESTIMATED, bset.budget_ids, hold.catalog_version, now)

    def expire(self, now_ms=None):
        """Settle every hold whose expiry is ≤ now at its estimate (EXPIRED, ESTIMATED),
        in expiry order."""
        now = self._now() if now_ms is None else _check_int("now_ms", now_ms, 0, _MAX_NOW)
        keys = self._bucket_keys
        if not keys or keys[0] > now // _BUCKET_MS:
            return []
        due = []
        while keys and keys[0] <= now // _BUCKET_MS:
            key = keys[0]
            head = self._buckets[key]
            h = head.next
            while h is not head:
                nxt = h.next
                if h.expires_ms <= now:
                    h.unlink()
                    due.append(h)
                h = nxt
            if head.next is head:
                heapq.heappop(keys)
                del self._buckets[key]
            else:
                break  # the current second's bucket still holds later expiries
        due.sort(key=lambda h: (h.expires_ms, h.seq))
        book = self._book
        out = []
        for h in due:
            del self._holds[h.reservation_id]
            self._remember(h.reservation_id)
            bset = book.current(h.bset)
            book.settle(bset.indices, h.amount, h.amount, now)
            out.append(Settlement(h.reservation_id, h.model, h.provider, h.owners, h.labels,
                                  h.input_tokens, h.output_tokens, 0, 0, 0, h.amount, h.amount,
                                  0, _EXPIRED, _ESTIMATED, bset.budget_ids, h.catalog_version,
                                  now))
        return out

    # -- snapshot / restore -----------------------------------------------------------

    def holds(self):
        """The open holds as plain dicts, in creation order."""
        prices = {}
        return [self._hold_dict(h, prices) for h in sorted(self._holds.values(),
                                                           key=lambda h: h.seq)]

    def _hold_dict(self, h, prices):
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
            "budget_ids": list(self._book.current(h.bset).budget_ids),
            "catalog_version": h.catalog_version,
        }

    def _record_of(self, h):
        return hold_record(h.reservation_id, h.model, h.provider, h.price, h.owners, h.labels,
                           h.amount, h.input_tokens, h.output_tokens, h.input_bytes,
                           h.expires_ms, self._book.current(h.bset).budget_ids,
                           h.catalog_version)

    def hold_record(self, reservation_id):
        """One open hold as a self-contained record (see `_holdrec`); NotFound
        when the id is not open."""
        rid = _check_str("reservation_id", reservation_id, required=True)
        h = self._holds.get(rid)
        if h is None:
            raise NotFound("reservation", rid)
        return self._record_of(h)

    def hold_records(self):
        """Every open hold's record, in creation order."""
        return [self._record_of(h) for h in sorted(self._holds.values(), key=lambda h: h.seq)]

    def restore_holds(self, records):
        """Re-create holds from records: each holds its amount again on those of
        its budgets that still exist (no limit check: it passed one when it
        was made), committed totals untouched. Records whose reservation id is
        already open are skipped. All-or-nothing: a bad record raises
        InvalidArgument (`records[i].<field>`) and nothing is restored.
        Returns the number of holds restored."""
        if isinstance(records, (str, bytes, dict)) or records is None:
            raise InvalidArgument("records", "must be a list of hold records")
        parser = RecordParser(model_price=ModelPrice, catalog=self._catalog,
                              check_int=_check_int,
                              check_str=lambda f, v, r: _check_str(f, v, required=r),
                              owners_tuple=owners_tuple, labels_dict=labels_dict,
                              max_nanos=MAX_NANOS)
        parsed = [parser.parse(i, d) for i, d in enumerate(records)]
        now = self._now()
        book = self._book
        n = 0
        for t in parsed:
            if t[0] in self._holds:
                continue
            h = _Hold()
            (h.reservation_id, h.model, h.provider, h.price, h.owners, h.labels, h.amount,
             h.input_tokens, h.output_tokens, h.input_bytes, h.expires_ms) = t[:11]
            h.catalog_version = t[12]
            h.bset = book.set_for_ids(t[11])
            book.add_held(h.bset.indices, min(h.amount, MAX_NANOS + 1), now)
            self._add_hold(h)
            n += 1
        return n

    def snapshot(self):
        """Counters, open holds (with the prices they were made with), the id
        counter and the estimator's calibration, as plain data."""
        prices = {}
        holds = [self._hold_dict(h, prices) for h in sorted(self._holds.values(),
                                                            key=lambda h: h.seq)]
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
        if not isinstance(state, dict) or state.get("version") != 1:
            raise InvalidArgument("state", "not an Engine snapshot (version 1)")
        book = BudgetBook()
        book.restore(state["budgets"])
        prices = [ModelPrice.from_dict(p) for p in state.get("prices", ())]
        next_id = _check_int("next_id", state.get("next_id", 0), 0, 2**62)
        holds = []
        seen = set()
        for d in state.get("holds", ()):
            h = _Hold()
            h.reservation_id = _check_str("reservation_id", d["reservation_id"], required=True)
            if h.reservation_id in seen:
                raise InvalidArgument("holds", f"duplicate reservation_id {h.reservation_id!r}")
            seen.add(h.reservation_id)
            h.model = _check_str("model", d["model"], required=True)
            h.provider = _check_str("provider", d["provider"])
            k = _check_int("price", d["price"], 0, len(prices) - 1)
            h.price = prices[k]
            h.owners = owners_tuple(tuple(d["owners"]))
            h.labels = labels_dict(d.get("labels"))
            h.amount = _check_int("amount_nanos", d["amount_nanos"], 0, MAX_NANOS + 1)
            h.input_tokens = _check_int("input_tokens", d["input_tokens"], 0, MAX_TOKENS)
            h.output_tokens = _check_int("output_tokens", d["output_tokens"], 0, MAX_TOKENS)
            h.input_bytes = _check_int("input_bytes", d["input_bytes"], -1, MAX_TOKENS)
            h.expires_ms = _check_int("expires_ms", d["expires_ms"], 0, _MAX_NOW)
            h.catalog_version = _check_str("catalog_version", d.get("catalog_version", ""))
            h.bset = book.set_for_ids(tuple(d["budget_ids"]))
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
        self._holds = {}
        self._buckets = {}
        self._bucket_keys = []
        self._seq = 0
        self._next_id = next_id
        self._settled = [None] * SETTLED_MEMORY
        self._settled_pos = 0
        for h in holds:
            self._add_hold(h)
