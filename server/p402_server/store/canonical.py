"""The canonical encoding of a ledger event and the per-tenant hash chain (DESIGN §3,
issue 4 "Evidence").

Owns ``canonical_bytes`` (version 1, below), ``chain_step`` and ``verify_events`` (the
walk that ``Store.verify_chain`` and the export verifier share). The group-commit
writer (writer.py) is the only producer of chain hashes; nothing on the Authorize
path touches this module.

The chain
---------
Every committed event of a tenant has a position ``chain_index`` (1, 2, 3, … with no
gaps, in commit order) and ``chain_hash = SHA-256(prev || canonical_bytes(event))``,
where ``prev`` is the 32 raw bytes of the previous event's chain hash (32 zero bytes
for chain_index 1: ``GENESIS``) and the hash is stored as 64 lowercase hex digits.
Changing, deleting, inserting or reordering any event breaks the link at that
position, which ``verify_events`` names.

Canonical encoding, version 1
-----------------------------
``b"p402.event.v1\\n"`` followed by the fields below, in this order, each encoded as

- a string: a netstring of its UTF-8 bytes, ``<byte length in decimal ASCII>:<bytes>,``
  (so ``"ab"`` is ``2:ab,`` and ``""`` is ``0:,``);
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

Deliberately left out:

- ``seq``: a storage artefact (the row id of one database); a restored or exported
  ledger may number rows differently, and ``chain_index`` is the position that counts;
- ``chain_index`` and ``chain_hash``: the chain's own output (the position is bound
  through ``prev``);
- content (prompts and responses): it lives in its own table with its own retention;
  purging it must not break the chain, and the chain must never need it.

``recorded_ms`` is included (when the ledger accepted the event is part of the
evidence); the writer fixes it before it hashes. Every field is in an export row, so
the chain can be re-verified from an export alone. A future encoding gets a new
version line; version 1 never changes.

Canonical encoding, version 2
-----------------------------
An event with usage units or a service tier (``units`` not empty or
``service_tier`` not "") is encoded as version 2: ``b"p402.event.v2\n"``, every
version 1 field as above, then ``service_tier`` (a string) and ``units`` (the list
``name1, count1, name2, count2, …`` sorted by name; counts are integers). Every
other event keeps its version 1 bytes, so chains written before units existed
verify unchanged, and the version an event is encoded in follows from the event.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, NamedTuple

VERSION = 2
HEADER = b"p402.event.v1\n"
HEADER_V2 = b"p402.event.v2\n"
GENESIS = "0" * 64
_NONE = "~,"


def _s(value: str) -> str:
    # The byte length of the UTF-8 encoding; for ASCII (the common case) len() is it.
    n = len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    return f"{n}:{value},"


def _opt(value: str | None) -> str:
    return _NONE if value is None else _s(value)


def _i(value: int) -> str:
    return f"{int(value)},"  # int(): IntEnum members become their wire numbers


def _list(items: Iterable[str]) -> str:
    return _s("".join(_s(x) for x in items)) if items else "0:,"


def _labels(labels: dict) -> str:
    if not labels:
        return "0:,"
    return _s("".join(_s(k) + _s(labels[k]) for k in sorted(labels)))


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


def _slow_text(ev: Any) -> str:
    """The encoding field by field (the specification; any text)."""
    i, s = _i, _s
    return "".join((
        "p402.event.v1\n",
        s(ev.tenant_id), s(ev.event_id), i(ev.event_ms), i(ev.recorded_ms), s(ev.kind),
        s(ev.reservation_id),
        s(ev.customer), s(ev.feature), s(ev.workflow), s(ev.task), s(ev.department),
        s(ev.employee),
        _labels(ev.labels),
        s(ev.provider), s(ev.model),
        i(ev.input_tokens), i(ev.cached_input_tokens), i(ev.cache_write_tokens),
        i(ev.output_tokens), i(ev.reasoning_tokens),
        i(ev.cost_nanos), i(ev.estimated_cost_nanos), i(ev.overrun_nanos),
        i(ev.revenue_nanos),
        i(ev.decision),
        _list(ev.reasons), _list(ev.rule_ids), _list(ev.budget_ids),
        _charges(ev.budget_charges),
        i(ev.outcome), i(ev.evidence), i(ev.privacy_mode), i(ev.attempt),
        s(ev.retry_of), s(ev.catalog_version),
        _opt(ev.duplicate_of), _opt(ev.prompt_fingerprint), _opt(ev.response_fingerprint),
    ))


def _labels_cached(labels: dict) -> str:
    if not labels:
        return "0:,"
    key = tuple(labels.items())
    text = _LABELS.get(key)
    if text is None:
        if len(_LABELS) >= 4096:
            _LABELS.clear()
        text = _LABELS[key] = _labels(labels)
    return text


_LABELS: dict = {}


def canonical_text(ev: Any) -> str:
    """The event's encoding as text (``canonical_bytes`` is its UTF-8): version 2 for
    an event with units or a service tier, else version 1."""
    text = _v1_text(ev)
    units, tier = ev.units, ev.service_tier
    if not units and not tier:
        return text
    return "".join(("p402.event.v2\n", text[len("p402.event.v1\n"):], _s(tier),
                    _s("".join(_s(k) + _i(units[k]) for k in sorted(units))) if units
                    else "0:,"))


def _v1_text(ev: Any) -> str:
    """The version 1 encoding as text.

    One f-string (it runs once per event in the writer): string lengths come from
    len(), which is the UTF-8 byte length only for ASCII text, so the result is kept
    only when it is ASCII (the common case); otherwise, and for anything but exact
    ints in the integer fields (IntEnum members, which an f-string would print by
    name on some Python versions), ``_slow_text`` encodes field by field."""
    t, e, k, r = ev.tenant_id, ev.event_id, ev.kind, ev.reservation_id
    c, f, w, ta, d, em = ev.customer, ev.feature, ev.workflow, ev.task, ev.department, ev.employee
    p, m, ro, cv = ev.provider, ev.model, ev.retry_of, ev.catalog_version
    dec, out, evi, pm = ev.decision, ev.outcome, ev.evidence, ev.privacy_mode
    dup, pf, rf = ev.duplicate_of, ev.prompt_fingerprint, ev.response_fingerprint
    if type(dec) is not int or type(out) is not int or type(evi) is not int or type(pm) is not int:
        dec, out, evi, pm = int(dec), int(out), int(evi), int(pm)
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
    except (TypeError, ValueError):  # a field of the wrong type: the spec path decides
        return _slow_text(ev)
    return text if text.isascii() else _slow_text(ev)


def canonical_bytes(ev: Any) -> bytes:
    """The canonical encoding of a LedgerEvent (module docstring: version 1, or 2
    with units or a service tier).

    ``ev`` is anything with the LedgerEvent attributes (a ``LedgerEvent``, or one
    rebuilt from an export row with ``LedgerEvent.from_dict``)."""
    return canonical_text(ev).encode("utf-8", "surrogatepass")


def chain_link(prev: bytes, canonical: bytes) -> bytes:
    """SHA-256(prev || canonical): the raw 32-byte chain hash (the writer's step)."""
    return hashlib.sha256(prev + canonical).digest()


def chain_step(prev_hex: str, ev: Any) -> str:
    """The chain hash (hex) of ``ev`` following the event whose chain hash is
    ``prev_hex`` (``GENESIS`` for the first event of a tenant)."""
    return hashlib.sha256(bytes.fromhex(prev_hex) + canonical_bytes(ev)).hexdigest()


class VerifyResult(NamedTuple):
    """The outcome of a chain walk.

    ``ok``: every event linked; ``count``: events checked (the last good position
    when not ok); ``head``: the last good chain hash (``GENESIS`` for none);
    ``first_bad_index``: the chain position where the chain breaks (None when ok);
    ``reason``: what is wrong there, in words (empty when ok)."""

    ok: bool
    count: int
    head: str
    first_bad_index: int | None = None
    reason: str = ""


class ChainVerifier:
    """An incremental chain walk: ``feed`` events in chain order (as stored, ordered
    by chain_index); it stops at the first break. ``result()`` says how it ended.

    A walk of part of a chain (an export of a time range) starts from the chain hash
    before its first event (``prev_hex``) and that event's position (``first_index``).

    What each kind of tampering looks like here: a modified event does not hash to its
    stored chain_hash; a deleted event leaves a gap in chain_index (or, when the later
    positions were renumbered, the next event does not link to the one before); an
    inserted or reordered event does not link to its predecessor; two events claiming
    one position are named as such."""

    __slots__ = ("_prev", "head", "expected", "count", "failure")

    def __init__(self, *, prev_hex: str = GENESIS, first_index: int = 1):
        self._prev = bytes.fromhex(prev_hex)
        self.head = prev_hex
        self.expected = first_index
        self.count = 0
        self.failure: VerifyResult | None = None

    def feed(self, ev: Any) -> bool:
        """Check the next event; False once the chain is broken (further events are
        ignored)."""
        if self.failure is not None:
            return False
        index, expected = ev.chain_index, self.expected
        if not index:
            return self._fail(expected, f"event {ev.event_id!r} has no chain position "
                                        "(inserted outside the ledger's writer)")
        if index < expected:
            return self._fail(index, f"chain_index {index} appears twice (event "
                                     f"{ev.event_id!r}): an event was inserted")
        if index > expected:
            return self._fail(expected, f"chain_index {expected} is missing (the next is "
                                        f"{index}): an event was deleted")
        digest = hashlib.sha256(self._prev + canonical_bytes(ev)).digest()
        got = digest.hex()
        if got != ev.chain_hash:
            return self._fail(index, f"event {ev.event_id!r} at chain_index {index} does "
                                     "not match its chain hash: it was modified, or events "
                                     "were deleted, inserted or reordered here")
        self._prev, self.head = digest, got
        self.count += 1
        self.expected += 1
        return True

    def _fail(self, index: int, reason: str) -> bool:
        self.failure = VerifyResult(False, self.count, self.head, index, reason)
        return False

    def result(self) -> VerifyResult:
        return self.failure or VerifyResult(True, self.count, self.head)


def verify_events(
    events: Iterable[Any], *, prev_hex: str = GENESIS, first_index: int = 1
) -> VerifyResult:
    """Walk ``events`` in chain order and name the first position where the chain
    breaks (``ChainVerifier``)."""
    walker = ChainVerifier(prev_hex=prev_hex, first_index=first_index)
    for ev in events:
        if not walker.feed(ev):
            break
    return walker.result()


__all__ = [
    "VERSION",
    "GENESIS",
    "canonical_bytes",
    "canonical_text",
    "chain_link",
    "chain_step",
    "VerifyResult",
    "ChainVerifier",
    "verify_events",
]
