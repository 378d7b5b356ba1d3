"""The ledger's per-event work — the pure-Python twin (the specification).

Owns two things the ledger does for every event it writes, and the server for every
request it converts: the canonical encoding of a ledger event (``event_bytes``; the
group-commit writer hashes it into the tenant's chain, the verifier re-derives it
from the ledger or an export) and the cheap all-is-well test of the input contract
for strings (``strings_ok``; p402core.contract explains a failure). ``_ledger_c`` is
the compiled twin and gives identical bytes and answers.

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
"""
from __future__ import annotations

import operator
from typing import Any

from .contract import _FORBIDDEN
from ._enums import MAX_STRING

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


__all__ = ["event_bytes", "event_text", "strings_ok"]
