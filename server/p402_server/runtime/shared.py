"""What the runtime's modules share: reservation and event ids (ULIDs, the
prefix that says which process issued a reservation), the reasons the runtime adds to
events, the clock, a bounded memory of recent ids, and the settlement record of a
hold settled without this process's engine."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import OrderedDict

from p402_client.ids import encode_ulid, random_bits

# A Record named a reservation this server does not hold and the ledger never
# settled: metered without a hold (see TenantRuntime.record).
RESERVATION_UNKNOWN = "reservation.unknown"


# A Record named another model than its reservation's (a fallback): priced at the
# model called, charged to the budgets the reservation held.
MODEL_SUBSTITUTED = "model.substituted"


# Scale-out: a Record or Release settled here a hold another process made, from its
# saved hold (TenantRuntime._settle_foreign); the maker's lease keeps the money.
RESERVATION_ADOPTED = "reservation.adopted"


# A reserved Record named other owners or labels than its Authorize: the event keeps
# the hold's (the owners whose budgets were charged) and says so.
RESERVATION_OWNERS_DIFFER = "reservation.owners_differ"


# A Record that overtakes its maker's hold write-behind waits this many flush
# intervals for the saved hold (TenantRuntime._saved_hold).
FOREIGN_HOLD_WAITS = 8


# Reservation-id prefixes of the engines this process built: an id carrying one was
# issued here, so if no engine of its tenant holds it, it was not lost in a crash.
_ISSUED_PREFIXES: set[str] = set()


def _issue_prefix() -> str:
    # Unique per engine instance so reservation ids never repeat across restarts
    # or rebuilds (they double as default event ids).
    prefix = f"rsv_{new_ulid()}_"
    _ISSUED_PREFIXES.add(prefix)
    return prefix


def _issued_here(reservation_id: str) -> bool:
    head, sep, _ = reservation_id.rpartition("_")
    return bool(sep) and head + "_" in _ISSUED_PREFIXES


# Scale-out: how often a process looks for dead processes' expired holds.
DEAD_SWEEP_SECONDS = 1.0


# TenantRuntime._begin_record's outcomes.
_EVENT, _KNOWN, _UNSETTLED = "event", "known", "unsettled"


def new_ulid() -> str:
    """A ULID: 48-bit Unix ms + 80 random bits, 26 Crockford base32 chars; sortable."""
    return encode_ulid((time.time_ns() // 1_000_000) << 80 | random_bits(80))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


_MISSING = object()  # no default given to a pop


class _LRU(OrderedDict):
    """A bounded dict: the oldest entries go when it is full. Full is `limit`
    entries; with `weigh` (value -> estimated bytes) also `max_bytes` of them, so
    that entries of any size cannot grow it past a known amount of memory. Entries
    are added with `put` and taken out with `pop`, which keep the weight's count."""

    def __init__(self, limit: int, *, max_bytes: int = 0, weigh=None):
        super().__init__()
        self.limit = limit
        self.max_bytes = max_bytes
        self.bytes = 0
        self._weigh = weigh
        self._weights: dict = {}

    def put(self, key, value, weight: int | None = None) -> None:
        """Add or replace `key`; `weight`, when the caller has it, saves weighing
        `value` again."""
        self[key] = value
        if self._weigh is None:
            if len(self) > self.limit:
                self.popitem(last=False)
            return
        weights = self._weights
        if weight is None:
            weight = self._weigh(value)
        self.bytes += weight - weights.get(key, 0)
        weights[key] = weight
        while len(self) > self.limit or (self.bytes > self.max_bytes and len(self) > 1):
            old, _value = self.popitem(last=False)
            self.bytes -= weights.pop(old)

    def pop(self, key, default=_MISSING):
        if self._weigh is not None and key in self:
            self.bytes -= self._weights.pop(key)
        if default is _MISSING:
            return super().pop(key)
        return super().pop(key, default)


# What a remembered LedgerEvent costs beyond its own strings and labels: the object
# and its other fields (measured on CPython 3.11: 0.9 KB for an event with short ids,
# model, provider and reasons).
_EVENT_BYTES = 900
# A str object's size beyond its characters (CPython: 49 bytes for ASCII).
_STR_BYTES = 49
_sizeof = sys.getsizeof


def _authorization_bytes(resp) -> int:
    """About the memory a remembered AuthorizeResponse holds (its encoded size,
    twice, for the message's own structures)."""
    return 512 + 2 * resp.ByteSize()


def event_bytes(ev) -> int:
    """About the memory remembering `ev` holds (the idempotency memory's weight):
    the object, its owners and its labels, each string by its actual size (a
    non-ASCII character takes up to four bytes). Kept content is not counted: the
    writer drops it once stored."""
    n = _EVENT_BYTES
    for s in (ev.customer, ev.feature, ev.workflow, ev.task, ev.department, ev.employee):
        if s:
            n += _sizeof(s) - _STR_BYTES
    labels = ev.labels
    if labels:
        n += _sizeof(labels)
        for k, v in labels.items():
            n += _sizeof(k) + _sizeof(v)
    return n


class HeldPrompts(dict):
    """Per open hold, what its Authorize left for the Record: reservation id ->
    (prompt fingerprint, prompt text or None). The texts (kept only where the
    privacy mode keeps text) together stay within `max_bytes`: past it a hold keeps
    its fingerprint alone, and its event keeps the prompt only if the Record sends
    it. Memory is bounded whatever a key holder sends; the money is not affected.
    Entries are added with `hold` and taken out with `pop`."""

    def __init__(self, max_bytes: int):
        super().__init__()
        self.max_bytes = max_bytes
        self.bytes = 0
        self.dropped = 0  # texts not held for want of room

    def hold(self, rid: str, fingerprint, text: str | None) -> bool:
        """Hold `rid`'s fingerprint and text; False when the text did not fit."""
        self.pop(rid, None)
        size = _sizeof(text) if text else 0
        fits = self.bytes + size <= self.max_bytes
        if not fits:
            text, size = None, 0
            self.dropped += 1
        self.bytes += size
        dict.__setitem__(self, rid, (fingerprint, text))
        return fits

    def pop(self, rid, default=None):
        held = dict.pop(self, rid, _MISSING)
        if held is _MISSING:
            return default
        if held[1]:
            self.bytes -= _sizeof(held[1])
        return held


def _catalog_for(core, specs: list[dict]):
    """The tenant's catalog: Catalog.default() with the tenant's prices merged over."""
    base = core.Catalog.default()
    if not specs:
        return base
    prices = [core.ModelPrice.from_dict(s) for s in specs]
    digest = hashlib.sha256(
        json.dumps(sorted(specs, key=lambda s: s.get("model", "")), sort_keys=True,
                   separators=(",", ":")).encode()).hexdigest()[:12]
    tenant = core.Catalog(prices, version=f"tenant-{digest}", taken=base.taken)
    return base.merged(tenant)


class _Settled:
    """A Settlement made without this process's engine: another process's saved
    hold, settled here (TenantRuntime._foreign_settlement); the fields the event
    needs, as p402core's Settlement names them."""

    __slots__ = ("reservation_id", "model", "provider", "owners", "labels",
                 "input_tokens", "cached_input_tokens", "cache_write_tokens",
                 "output_tokens", "reasoning_tokens", "cost_nanos",
                 "estimated_cost_nanos", "overrun_nanos", "outcome", "evidence",
                 "budget_ids", "catalog_version", "settled_ms")

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields[name])


def _canonical(config: dict) -> str:
    """A config dict (id -> core object, or plain JSON values) as comparable text:
    objects by their to_dict(), the form the store keeps; tuples equal lists."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"),
                      default=lambda o: o.to_dict() if hasattr(o, "to_dict") else repr(o))
