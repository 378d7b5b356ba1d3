"""The ledger's per-event work — the pure-Python twin (the specification).

Owns three things the ledger does for every event it writes, and the server for every
request it converts: the canonical encoding of a ledger event (``event_bytes``; the
group-commit writer hashes it into the tenant's chain, the verifier re-derives it
from the ledger or an export), the cheap all-is-well test of the input contract
for strings (``strings_ok``; p402core.contract explains a failure) and of a whole
ledger event (``event_ok``; the ledger's LedgerEvent.validate explains a failure).
``_ledger_c`` is the compiled twin and gives identical bytes and answers.

Canonical encoding, version 1
-----------------------------
``b"p402.event.v1\\n"`` followed by the fields below, in this order, each encoded as

- a string: a netstring of its UTF-8 bytes (lone surrogates kept, ``surrogatepass``),
  ``<byte length in decimal ASCII>:<bytes>,`` (so ``"ab"`` is ``2:ab,`` and ``""`` is
  ``0:,``);
- an integer: its decimal ASCII form and a comma (``-3`` is ``-3,``; enums are their
  wire numbers: DENY is ``3,``); a decimal never contains a comma, and the field
  order says which fields are integers, so no length is needed;
- absent (None, a string field that may be unset): ``~,`` (a netstring always starts
  with a digit, so this is unambiguous);
- a list: the netstring whose payload is its elements' encodings concatenated;
- labels: the list ``key1, value1, key2, value2, …`` sorted by key (Python string
  order = Unicode code point order = UTF-8 byte order);
- budget_charges: the list of 2-element lists ``[budget_id, period_start_ms]``, in the
  event's order.

Fields (v1): tenant_id, event_id, event_ms, recorded_ms, kind, reservation_id,
customer, feature, workflow, task, department, employee, labels, provider, model,
input_tokens, cached_input_tokens, cache_write_tokens, output_tokens,
reasoning_tokens, cost_nanos, estimated_cost_nanos, overrun_nanos, revenue_nanos,
decision, reasons, rule_ids, budget_ids, budget_charges, outcome, evidence,
privacy_mode, attempt, retry_of, catalog_version, duplicate_of, prompt_fingerprint,
response_fingerprint.

A string field holds a ``str`` and an integer field an ``int`` (an IntEnum member is
its number); anything else is a TypeError naming the field, never a guess.

Canonical encoding, version 2
-----------------------------
An event with usage units or a service tier (``units`` not empty or
``service_tier`` not "") is encoded as version 2: ``b"p402.event.v2\\n"``, every
version 1 field as above, then ``service_tier`` (a string) and ``units`` (the list
``name1, count1, name2, count2, …`` sorted by name; counts are integers). Every
other event keeps its version 1 bytes, so chains written before units existed
verify unchanged, and the version an event is encoded in follows from the event.
A future encoding gets a new version line; versions 1 and 2 never change.

What is left out of the encoding, and why, is the ledger's to say
(server/p402_server/ledger/canonical.py).

Strings
-------
``strings_ok(values)``: True when every value is exactly a ``str`` of at most
MAX_STRING characters without a control character (C0, DEL, C1) or a lone surrogate
— the rules of p402core.contract, which names the problem when this says False.

Events
------
``event_ok(ev)``: True when every field of a ledger event is what the store takes,
in its plainest form:

- the string fields (_EVENT_STRS) pass ``strings_ok``, and tenant_id and event_id
  are not empty;
- the integer fields (_EVENT_INTS) are exactly ``int`` or a member of the core's
  IntEnums (never bool), within int64; event_ms is not negative;
- duplicate_of, chain_hash, prompt_fingerprint, response_fingerprint are None or
  exactly a ``str`` of at most MAX_STRING characters;
- labels is exactly a ``dict`` of at most MAX_LABELS entries whose keys and values
  pass ``strings_ok``;
- reasons, rule_ids and budget_ids are exactly tuples of exactly ``str``;
  budget_charges exactly a tuple of exact ``(str, int)`` tuples, a budget id not
  empty and a period start within 0..int64;
- units is exactly a ``dict`` of known usage units (``_units.UNITS``) to exact ints
  within 1..MAX_TOKENS, and service_tier exactly a ``str``: "" (standard), or a
  tier other than "standard" (``_units.SERVICE_TIERS``).

False says only that the plain form was not met: a value of another acceptable
form (a list where a tuple is usual, an int subclass) may still be valid, and the
caller's field-by-field check decides and names the field.
"""
from __future__ import annotations

import operator
from typing import Any

from ._enums import (
    MAX_LABELS,
    MAX_STRING,
    MAX_TOKENS,
    OWNER_KEYS,
    Decision,
    Evidence,
    Outcome,
    PrivacyMode,
)
from ._units import SERVICE_TIERS, UNITS
from .contract import _FORBIDDEN

_NONE = "~,"
_STR_ONLY = frozenset({str})


def _s(value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"canonical encoding: expected a str, got {type(value).__name__}")
    # The byte length of the UTF-8 encoding; for ASCII (the common case) len() is it.
    n = len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    return f"{n}:{value},"


def _opt(value: str | None) -> str:
    return _NONE if value is None else _s(value)


def _i(value: int) -> str:
    # operator.index: an int or an IntEnum member (its wire number); a float or a
    # str is a TypeError, never truncated or parsed.
    try:
        return f"{operator.index(value)},"
    except TypeError:
        raise TypeError("canonical encoding: expected an int, got "
                        f"{type(value).__name__}") from None


def _list(items) -> str:
    return _s("".join(_s(x) for x in items)) if items else "0:,"


def _mapping(d: dict, encode) -> str:
    """A dict as the list key1, value1, key2, value2, ... sorted by key."""
    if not d:
        return "0:,"
    return _s("".join(_s(k) + encode(d[k]) for k in sorted(d)))


def _labels(labels: dict) -> str:
    return _mapping(labels, _s)


def _units(units: dict) -> str:
    return _mapping(units, _i)


def _charges(charges) -> str:
    if not charges:
        return "0:,"
    return _s("".join(_s(_s(b) + _i(p)) for b, p in charges))


# Events repeat the same reasons, budget ids and charges: memoise their encodings.
_CACHE: dict = {}


def _cached(fn, value) -> str:
    try:
        text = _CACHE.get((fn, value))
    except TypeError:  # a list: not hashable
        return fn(value)
    if text is None:
        if len(_CACHE) >= 4096:
            _CACHE.clear()
        text = _CACHE[(fn, value)] = fn(value)
    return text


def _named(fn, name: str, value):
    try:
        return fn(value)
    except TypeError as exc:
        raise TypeError(f"{name}: {exc}") from None


def _slow_text(ev: Any) -> str:
    """The version 1 encoding field by field (the specification; any text). A field of
    the wrong type is a TypeError naming it."""
    i, s, n = _i, _s, _named
    return "".join((
        "p402.event.v1\n",
        n(s, "tenant_id", ev.tenant_id), n(s, "event_id", ev.event_id),
        n(i, "event_ms", ev.event_ms), n(i, "recorded_ms", ev.recorded_ms),
        n(s, "kind", ev.kind), n(s, "reservation_id", ev.reservation_id),
        n(s, "customer", ev.customer), n(s, "feature", ev.feature),
        n(s, "workflow", ev.workflow), n(s, "task", ev.task),
        n(s, "department", ev.department), n(s, "employee", ev.employee),
        n(_labels, "labels", ev.labels),
        n(s, "provider", ev.provider), n(s, "model", ev.model),
        n(i, "input_tokens", ev.input_tokens),
        n(i, "cached_input_tokens", ev.cached_input_tokens),
        n(i, "cache_write_tokens", ev.cache_write_tokens),
        n(i, "output_tokens", ev.output_tokens), n(i, "reasoning_tokens", ev.reasoning_tokens),
        n(i, "cost_nanos", ev.cost_nanos), n(i, "estimated_cost_nanos", ev.estimated_cost_nanos),
        n(i, "overrun_nanos", ev.overrun_nanos), n(i, "revenue_nanos", ev.revenue_nanos),
        n(i, "decision", ev.decision),
        n(_list, "reasons", ev.reasons), n(_list, "rule_ids", ev.rule_ids),
        n(_list, "budget_ids", ev.budget_ids),
        n(_charges, "budget_charges", ev.budget_charges),
        n(i, "outcome", ev.outcome), n(i, "evidence", ev.evidence),
        n(i, "privacy_mode", ev.privacy_mode), n(i, "attempt", ev.attempt),
        n(s, "retry_of", ev.retry_of), n(s, "catalog_version", ev.catalog_version),
        n(_opt, "duplicate_of", ev.duplicate_of),
        n(_opt, "prompt_fingerprint", ev.prompt_fingerprint),
        n(_opt, "response_fingerprint", ev.response_fingerprint),
    ))


def _labels_of_items(items: tuple) -> str:
    return _labels(dict(items))


def _labels_cached(labels: dict) -> str:
    # Memoised by the labels' items (a dict is not hashable; the same labels in
    # another order encode the same, sorted, and merely take another entry).
    return _cached(_labels_of_items, tuple(labels.items())) if labels else "0:,"


def _v1_text(ev: Any) -> str:
    """The version 1 encoding as text.

    One f-string (it runs once per event in the writer): string lengths come from
    len(), which is the UTF-8 byte length only for ASCII text, so the result is kept
    only when it is ASCII; otherwise, for anything but exact ints in the enum fields
    (IntEnum members, which an f-string would print by name on some Python versions)
    and for a field of the wrong type, ``_slow_text`` encodes field by field."""
    t, e, k, r = ev.tenant_id, ev.event_id, ev.kind, ev.reservation_id
    c, f, w, ta, d, em = ev.customer, ev.feature, ev.workflow, ev.task, ev.department, ev.employee
    p, m, ro, cv = ev.provider, ev.model, ev.retry_of, ev.catalog_version
    dec, out, evi, pm = ev.decision, ev.outcome, ev.evidence, ev.privacy_mode
    dup, pf, rf = ev.duplicate_of, ev.prompt_fingerprint, ev.response_fingerprint
    if not _STR_ONLY.issuperset(map(type, (t, e, k, r, c, f, w, ta, d, em, p, m, ro, cv))):
        return _slow_text(ev)  # len() and {} of anything but a str would mislead
    if type(dec) is not int or type(out) is not int or type(evi) is not int or type(pm) is not int:
        try:
            dec, out, evi, pm = (operator.index(dec), operator.index(out),
                                 operator.index(evi), operator.index(pm))
        except TypeError:
            return _slow_text(ev)
    try:
        text = (
            f"p402.event.v1\n{len(t)}:{t},{len(e)}:{e},{ev.event_ms:d},{ev.recorded_ms:d},"
            f"{len(k)}:{k},{len(r)}:{r},"
            f"{len(c)}:{c},{len(f)}:{f},{len(w)}:{w},{len(ta)}:{ta},{len(d)}:{d},{len(em)}:{em},"
            f"{_labels_cached(ev.labels)}{len(p)}:{p},{len(m)}:{m},"
            f"{ev.input_tokens:d},{ev.cached_input_tokens:d},{ev.cache_write_tokens:d},"
            f"{ev.output_tokens:d},{ev.reasoning_tokens:d},"
            f"{ev.cost_nanos:d},{ev.estimated_cost_nanos:d},{ev.overrun_nanos:d},"
            f"{ev.revenue_nanos:d},{dec:d},"
            f"{_cached(_list, ev.reasons)}{_cached(_list, ev.rule_ids)}"
            f"{_cached(_list, ev.budget_ids)}{_cached(_charges, ev.budget_charges)}"
            f"{out:d},{evi:d},{pm:d},{ev.attempt:d},{len(ro)}:{ro},{len(cv)}:{cv},"
            f"{_NONE if dup is None else _s(dup)}{_NONE if pf is None else _s(pf)}"
            f"{_NONE if rf is None else _s(rf)}"
        )
    except (TypeError, ValueError, AttributeError):  # the spec path names the field
        return _slow_text(ev)
    return text if text.isascii() else _slow_text(ev)


def event_text(ev: Any) -> str:
    """The event's canonical encoding as text (``event_bytes`` is its UTF-8)."""
    text = _v1_text(ev)
    units, tier = ev.units, ev.service_tier
    if not units and not tier:
        return text
    return "".join(("p402.event.v2\n", text[len("p402.event.v1\n"):],
                    _named(_s, "service_tier", tier), _named(_units, "units", units)))


def event_bytes(ev: Any) -> bytes:
    """The canonical encoding of a ledger event (module docstring: version 1, or 2
    with units or a service tier).

    ``ev`` is anything with the LedgerEvent attributes (a ``LedgerEvent``, or one
    rebuilt from an export row with ``LedgerEvent.from_dict``)."""
    return event_text(ev).encode("utf-8", "surrogatepass")


def strings_ok(values) -> bool:
    """True when every value is exactly a str that p402core.contract accepts as an id
    or a name (at most MAX_STRING characters, no control character, no lone
    surrogate); False otherwise (contract.strings_problem says which and why)."""
    if not _STR_ONLY.issuperset(map(type, values)):
        return False
    return (max(map(len, values), default=0) <= MAX_STRING
            and _FORBIDDEN.search("".join(values)) is None)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# A ledger event's fields by kind, as event_ok checks them.
_EVENT_STRS = ("tenant_id", "event_id", "kind", "reservation_id", *OWNER_KEYS, "provider",
              "model", "retry_of", "catalog_version")
_EVENT_INTS = ("event_ms", "recorded_ms", "input_tokens", "cached_input_tokens",
              "cache_write_tokens", "output_tokens", "reasoning_tokens", "cost_nanos",
              "estimated_cost_nanos", "overrun_nanos", "revenue_nanos", "decision",
              "outcome", "evidence", "privacy_mode", "attempt", "chain_index")
_EVENT_OPTIONAL_STRS = ("duplicate_of", "chain_hash", "prompt_fingerprint",
                       "response_fingerprint")
_strs_of = operator.attrgetter(*_EVENT_STRS)
_ints_of = operator.attrgetter(*_EVENT_INTS)
_optional_of = operator.attrgetter(*_EVENT_OPTIONAL_STRS)
# Exactly int or one of the core's IntEnums (never bool).
_INT_ONLY = frozenset({int, Decision, Outcome, Evidence, PrivacyMode})
_OPTIONAL_ONLY = frozenset({str, type(None)})
_UNIT_NAMES = frozenset(UNITS)
_TIERS = frozenset(("", *SERVICE_TIERS[1:]))
_CHARGES_OK: set = set()  # events repeat the same budget charges: checked once


def event_ok(ev: Any) -> bool:
    """True when every field of the ledger event ``ev`` is what the store takes, in
    its plainest form (module docstring, "Events"); False says check field by field."""
    ints = _ints_of(ev)
    optional = d, c, p, r = _optional_of(ev)
    labels = ev.labels
    return bool(
        strings_ok(_strs_of(ev))
        and ev.tenant_id
        and ev.event_id
        and _INT_ONLY.issuperset(map(type, ints))
        and min(ints) >= INT64_MIN
        and max(ints) <= INT64_MAX
        and ev.event_ms >= 0
        and _OPTIONAL_ONLY.issuperset(map(type, optional))
        and (d is None or len(d) <= MAX_STRING)
        and (c is None or len(c) <= MAX_STRING)
        and (p is None or len(p) <= MAX_STRING)
        and (r is None or len(r) <= MAX_STRING)
        and type(labels) is dict
        and len(labels) <= MAX_LABELS
        and (not labels or strings_ok(labels) and strings_ok(labels.values()))
        and _lists_ok(ev)
        and _units_ok(ev.units, ev.service_tier)
    )


def _lists_ok(ev: Any) -> bool:
    reasons, rule_ids, budget_ids = ev.reasons, ev.rule_ids, ev.budget_ids
    if not (
        type(reasons) is tuple
        and type(rule_ids) is tuple
        and type(budget_ids) is tuple
        and _STR_ONLY.issuperset(map(type, reasons + rule_ids + budget_ids))
    ):
        return False
    charges = ev.budget_charges
    if type(charges) is not tuple:
        return False
    if not charges:
        return True
    try:
        if charges in _CHARGES_OK:
            return True
    except TypeError:  # something unhashable inside: not the plain form
        return False
    for charge in charges:
        if (
            type(charge) is not tuple
            or len(charge) != 2
            or type(charge[0]) is not str
            or not charge[0]
            or type(charge[1]) is not int
            or not 0 <= charge[1] <= INT64_MAX
        ):
            return False
    if len(_CHARGES_OK) >= 4096:
        _CHARGES_OK.clear()
    _CHARGES_OK.add(charges)
    return True


def _units_ok(units: Any, tier: Any) -> bool:
    if type(units) is not dict or type(tier) is not str or tier not in _TIERS:
        return False
    return not units or all(name in _UNIT_NAMES and type(n) is int and 0 < n <= MAX_TOKENS
               for name, n in units.items())


__all__ = ["event_bytes", "event_text", "strings_ok", "event_ok"]
