"""Plain Python types the store speaks: ledger events, filters, spend rows, keys, tenants.

Owns the mapping between an events row and a ``LedgerEvent`` (``to_row`` /
``from_row``) and the validation a ``LedgerEvent`` gets before it may enter the
writer's queue (a bad event is refused at ``write()``, so it can never poison a
group-commit batch that other callers wait on).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, NamedTuple

from p402_server.ledger.schema import CONTENT_KINDS, KINDS
from p402core import IMPLEMENTATION, _units, load
from p402core._enums import MAX_LABELS, MAX_STRING, OWNER_KEYS, InvalidArgument
from p402core.contract import string_problem, text_problem

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

# Columns that hold JSON text; on a LedgerEvent they are a dict (labels) or tuples.
_JSON_LIST_FIELDS = ("reasons", "rule_ids", "budget_ids")
# Integer columns of the events table (besides seq), checked against int64 bounds.
_INT_FIELDS = (
    "event_ms",
    "recorded_ms",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_nanos",
    "estimated_cost_nanos",
    "overrun_nanos",
    "revenue_nanos",
    "decision",
    "outcome",
    "evidence",
    "privacy_mode",
    "attempt",
    "chain_index",
)
_STR_FIELDS = (
    "tenant_id",
    "event_id",
    "kind",
    "reservation_id",
    *OWNER_KEYS,
    "provider",
    "model",
    "retry_of",
    "catalog_version",
)


class Content(NamedTuple):
    """A prompt or response kept under redacted_trace / full_trace (DESIGN §8): one
    row of the ``contents`` table, written in the same transaction as its event.

    On ``LedgerEvent.contents`` the writer fills ``tenant_id`` and ``event_id`` from
    the event (leave them ""), and ``created_ms`` from its recorded_ms when 0.
    ``expires_ms`` 0 = kept until deleted; else ``purge_contents(now)`` removes it
    once ``expires_ms <= now``. ``mode`` is the PrivacyMode it was kept under."""

    kind: str
    text: str
    mode: int = 0
    expires_ms: int = 0
    created_ms: int = 0
    tenant_id: str = ""
    event_id: str = ""

    def validate(self, field: str = "contents") -> None:
        if self.kind not in CONTENT_KINDS:
            raise InvalidArgument(f"{field}.kind", f"must be one of {', '.join(CONTENT_KINDS)}")
        if type(self.text) is not str:
            raise InvalidArgument(f"{field}.text", "must be a str")
        problem = text_problem(self.text)
        if problem is not None:
            raise InvalidArgument(f"{field}.text", problem)
        for name in ("mode", "expires_ms", "created_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= INT64_MAX:
                raise InvalidArgument(f"{field}.{name}", "must be an int >= 0")
        for name in ("tenant_id", "event_id"):
            if type(getattr(self, name)) is not str:
                raise InvalidArgument(f"{field}.{name}", "must be a str")


# LedgerEvent fields to_dict leaves out: content never; the others are no column.
_NOT_EXPORTED = frozenset({"contents", "claim", "in_ledger"})


@dataclass(slots=True)
class LedgerEvent:
    """One economic event as the ledger stores it (DESIGN §3); one events row.

    ``seq`` is 0 until the writer has committed the event. ``recorded_ms`` 0 means
    "the writer fills it in at commit"; ``event_ms`` 0 means "same as recorded_ms".
    ``budget_charges`` lists ``(budget_id, period_start_ms)`` the cost was committed
    to: the writer adds ``cost_nanos`` to each in budget_periods in the same
    transaction as the event.

    ``chain_index`` / ``chain_hash`` are the event's place in its tenant's hash chain
    (canonical.py); the writer assigns both at commit (whatever the caller set).
    ``contents`` is not a column: ``Content`` rows the writer puts in the contents
    table in the event's transaction (only when the event is new), then empties once
    the transaction has committed. It is left out of ``to_dict``, ``repr`` and
    equality, so content never reaches logs or exports.
    """

    tenant_id: str
    event_id: str
    event_ms: int = 0
    recorded_ms: int = 0
    kind: str = "record"
    reservation_id: str = ""
    customer: str = ""
    feature: str = ""
    workflow: str = ""
    task: str = ""
    department: str = ""
    employee: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    provider: str = ""
    model: str = ""
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nanos: int = 0
    estimated_cost_nanos: int = 0
    overrun_nanos: int = 0
    revenue_nanos: int = 0
    decision: int = 0
    reasons: tuple[str, ...] = ()
    rule_ids: tuple[str, ...] = ()
    budget_ids: tuple[str, ...] = ()
    outcome: int = 0
    evidence: int = 0
    privacy_mode: int = 0
    attempt: int = 0
    retry_of: str = ""
    catalog_version: str = ""
    duplicate_of: str | None = None
    chain_hash: str | None = None
    budget_charges: tuple[tuple[str, int], ...] = ()
    seq: int = 0
    chain_index: int = 0
    prompt_fingerprint: str | None = None
    response_fingerprint: str | None = None
    # Usage beyond the five token counts ({Usage field: count}, none 0) and the
    # service tier billed ("" = standard): p402core._units.
    units: dict[str, int] = field(default_factory=dict)
    service_tier: str = ""
    contents: tuple[Content, ...] = field(default=(), repr=False, compare=False)
    # Not a column: with leases on (several processes), the writer claims the
    # settlement of ``reservation_id`` for this event_id in the event's transaction
    # (hold_claims); another event_id's claim wins over it (WriteResult.claimed_by).
    claim: bool = field(default=False, repr=False, compare=False)
    # Not a column: set by the writer once a committed transaction holds this event
    # (or the ledger had it already, or a claim's winner settled its reservation):
    # from then on a crash cannot lose the settlement, so its saved hold may go.
    in_ledger: bool = field(default=False, repr=False, compare=False)

    @property
    def owners(self) -> dict[str, str]:
        """The non-empty owner dimensions as a dict."""
        return {dim: getattr(self, dim) for dim in OWNER_KEYS if getattr(self, dim)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in _NOT_EXPORTED:
                continue
            value = getattr(self, f.name)
            if f.name == "labels" or f.name == "units":
                value = dict(value)
            elif f.name == "budget_charges":
                value = [[b, int(p)] for b, p in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LedgerEvent":
        """Inverse of ``to_dict`` (unknown keys are refused, naming the key)."""
        names = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {}
        for key, value in d.items():
            if key not in names:
                raise InvalidArgument(key, "unknown LedgerEvent field")
            if key in _JSON_LIST_FIELDS:
                value = tuple(value)
            elif key == "budget_charges":
                value = tuple((str(b), int(p)) for b, p in value)
            elif key == "labels" or key == "units":
                value = dict(value)
            elif key == "contents":
                value = tuple(c if isinstance(c, Content) else Content(**c) for c in value)
            kw[key] = value
        return cls(**kw)

    def validate(self) -> None:
        """Raise InvalidArgument naming the first field the store cannot take.

        Runs once per event on the write path: the core's all-is-well check first
        (``event_ok``: every field in its plainest form), the field-by-field
        explanation only when that fails."""
        if self.kind in KINDS and not self.contents and _event_ok(self):
            return
        self._explain()

    def _explain(self) -> None:
        for name in _STR_FIELDS:
            value = getattr(self, name)
            if type(value) is not str:
                raise InvalidArgument(name, f"must be a str, got {type(value).__name__}")
            problem = string_problem(value)
            if problem is not None:
                raise InvalidArgument(name, problem)
        if not self.tenant_id:
            raise InvalidArgument("tenant_id", "must not be empty")
        if not self.event_id:
            raise InvalidArgument("event_id", "must not be empty")
        if self.kind not in KINDS:
            raise InvalidArgument("kind", f"must be one of {', '.join(KINDS)}")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            # bool is an int subclass but never a meaningful count or amount here.
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidArgument(name, f"must be an int, got {type(value).__name__}")
            if not INT64_MIN <= value <= INT64_MAX:
                raise InvalidArgument(name, "out of int64 range")
        if self.event_ms < 0:
            raise InvalidArgument("event_ms", "must be >= 0")
        for name in ("duplicate_of", "chain_hash", "prompt_fingerprint", "response_fingerprint"):
            value = getattr(self, name)
            if type(value) not in _OPT_STR:
                raise InvalidArgument(name, "must be a str or None")
            if value is not None and len(value) > MAX_STRING:
                raise InvalidArgument(name, f"longer than {MAX_STRING} characters")
        if not isinstance(self.contents, (tuple, list)):
            raise InvalidArgument("contents", "must be a tuple of Content")
        for i, c in enumerate(self.contents):
            if not isinstance(c, Content):
                raise InvalidArgument(f"contents[{i}]", "must be a Content")
            c.validate(f"contents[{i}]")
            if c.event_id and c.event_id != self.event_id:
                raise InvalidArgument(f"contents[{i}].event_id", "must be the event's (or empty)")
            if c.tenant_id and c.tenant_id != self.tenant_id:
                raise InvalidArgument(f"contents[{i}].tenant_id", "must be the event's (or empty)")
        kinds = [c.kind for c in self.contents]
        if len(set(kinds)) != len(kinds):
            raise InvalidArgument("contents", "at most one content per kind")
        if not isinstance(self.labels, dict):
            raise InvalidArgument("labels", "must be a dict of str to str")
        if len(self.labels) > MAX_LABELS:
            raise InvalidArgument("labels", f"at most {MAX_LABELS} labels")
        for k, v in self.labels.items():
            if type(k) is not str or type(v) is not str:
                raise InvalidArgument("labels", "keys and values must be str")
            problem = string_problem(k) or string_problem(v)
            if problem is not None:
                raise InvalidArgument(f"labels.{k[:40]}", problem)
        for name in _JSON_LIST_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or any(type(x) is not str for x in value):
                raise InvalidArgument(name, "must be a tuple of str")
        if not isinstance(self.units, dict):
            raise InvalidArgument("units", "must be a dict {Usage field: count}")
        _units.check_units(self.units)  # names the bad unit
        tier = self.service_tier
        if type(tier) is not str:
            raise InvalidArgument("service_tier", f"must be a str, got {type(tier).__name__}")
        _units.check_tier(tier)  # names a tier that is not one
        if tier not in _TIERS:
            raise InvalidArgument("service_tier", 'standard is "" (else batch, flex, priority)')
        if not all(type(n) is int and n > 0 for n in self.units.values()):
            raise InvalidArgument("units", "zero counts are left out")
        if not isinstance(self.budget_charges, (tuple, list)):
            raise InvalidArgument("budget_charges", "must be (budget_id, period_start_ms) pairs")
        for charge in self.budget_charges:
            if (
                not isinstance(charge, (tuple, list))
                or len(charge) != 2
                or type(charge[0]) is not str
                or not charge[0]
                or not isinstance(charge[1], int)
                or isinstance(charge[1], bool)
                or not 0 <= charge[1] <= INT64_MAX
            ):
                raise InvalidArgument(
                    "budget_charges", "must be (budget_id, period_start_ms) pairs"
                )
        # Subclasses of int other than IntEnum members would pass the slow checks above
        # (the fast path only admits exact types); they are still valid.


def _event_ok(ev: LedgerEvent) -> bool:
    """The core's ``event_ok``, bound on first use (as canonical.encoder): importing
    the ledger must not need the compiled core."""
    global _event_ok
    _event_ok = load(IMPLEMENTATION).event_ok
    return _event_ok(ev)


_OPT_STR = (str, type(None))
_TIERS = frozenset(("", *_units.SERVICE_TIERS[1:]))  # canonical: standard is ""


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_loads = json.loads

# Columns copied verbatim between a LedgerEvent and an events row.
PLAIN_COLUMNS = (
    "tenant_id",
    "event_id",
    "event_ms",
    "recorded_ms",
    "kind",
    "reservation_id",
    *OWNER_KEYS,
    "provider",
    "model",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_nanos",
    "estimated_cost_nanos",
    "overrun_nanos",
    "revenue_nanos",
    "decision",
    "outcome",
    "evidence",
    "privacy_mode",
    "attempt",
    "retry_of",
    "catalog_version",
    "duplicate_of",
    "prompt_fingerprint",
    "response_fingerprint",
)
# Assigned by the writer at commit; last, so it can append them to the other values.
CHAIN_COLUMNS = ("chain_index", "chain_hash")
# The holds table's columns in the order `hold_row` gives them.
HOLD_COLUMNS = ("tenant_id", "reservation_id", "expires_ms", "data", "maker",
                "amount_nanos", "budget_ids")


def hold_row(tenant_id: str, reservation_id: str, expires_ms: int, data_json: str,
             maker: str, hold: Mapping[str, Any]) -> tuple:
    """A holds row (HOLD_COLUMNS) from a hold's data as JSON text and its hold record
    (the amount and budgets are columns too: budget status sums them)."""
    return (tenant_id, reservation_id, int(expires_ms), data_json, maker,
            int(hold.get("amount_nanos") or 0), json.dumps(list(hold.get("budget_ids") or ())))


EVENT_COLUMNS = (
    *PLAIN_COLUMNS,
    "labels",
    "reasons",
    "rule_ids",
    "budget_ids",
    "budget_charges",
    "service_tier",
    "units",
    *CHAIN_COLUMNS,
)


def to_values(ev: LedgerEvent) -> tuple:
    """The events-row values of an event, in ``EVENT_COLUMNS`` order (without seq);
    a chain_index of 0 (not chained yet) is NULL."""
    return unchained_values(ev) + (ev.chain_index or None, ev.chain_hash)


def unchained_values(ev: LedgerEvent) -> tuple:
    """``to_values`` without the trailing CHAIN_COLUMNS (the writer appends them).

    Written out by hand: it runs once per event on the write path."""
    dumps = _cached_json
    return (
        ev.tenant_id,
        ev.event_id,
        ev.event_ms,
        ev.recorded_ms,
        ev.kind,
        ev.reservation_id,
        ev.customer,
        ev.feature,
        ev.workflow,
        ev.task,
        ev.department,
        ev.employee,
        ev.provider,
        ev.model,
        ev.input_tokens,
        ev.cached_input_tokens,
        ev.cache_write_tokens,
        ev.output_tokens,
        ev.reasoning_tokens,
        ev.cost_nanos,
        ev.estimated_cost_nanos,
        ev.overrun_nanos,
        ev.revenue_nanos,
        # IntEnum members become plain ints so every driver binds them the same way.
        int(ev.decision),
        int(ev.outcome),
        int(ev.evidence),
        int(ev.privacy_mode),
        ev.attempt,
        ev.retry_of,
        ev.catalog_version,
        ev.duplicate_of,
        ev.prompt_fingerprint,
        ev.response_fingerprint,
        _labels_json(ev.labels) if ev.labels else "{}",
        dumps(ev.reasons) if ev.reasons else "[]",
        dumps(ev.rule_ids) if ev.rule_ids else "[]",
        dumps(ev.budget_ids) if ev.budget_ids else "[]",
        dumps(ev.budget_charges) if ev.budget_charges else "[]",
        ev.service_tier,
        _dumps(ev.units) if ev.units else "{}",
    )


def _cached_json(value) -> str:
    """JSON of a tuple (of str, or of (str, int) pairs), memoised: events repeat the
    same budget ids, charges and reason codes, and encoding is a per-event cost."""
    try:
        text = _JSON_CACHE.get(value)
    except TypeError:  # a list: not hashable, encode it directly
        return _dumps(value)
    if text is None:
        if len(_JSON_CACHE) >= 4096:
            _JSON_CACHE.clear()
        text = _JSON_CACHE[value] = _dumps(value)
    return text


def _labels_json(labels: dict) -> str:
    key = tuple(labels.items())
    text = _LABELS_CACHE.get(key)
    if text is None:
        if len(_LABELS_CACHE) >= 4096:
            _LABELS_CACHE.clear()
        text = _LABELS_CACHE[key] = _dumps(labels)
    return text


_JSON_CACHE: dict = {}
_LABELS_CACHE: dict = {}


def to_row(ev: LedgerEvent) -> dict[str, Any]:
    """The events-row parameters of an event as a dict (without seq)."""
    return dict(zip(EVENT_COLUMNS, to_values(ev)))


def from_row(row: Mapping[str, Any]) -> LedgerEvent:
    """A LedgerEvent from an events row mapping (as selected by the store)."""
    kw = {name: row[name] for name in PLAIN_COLUMNS}
    kw["seq"] = int(row["seq"])
    kw["chain_index"] = int(row["chain_index"] or 0)
    kw["chain_hash"] = row["chain_hash"]
    kw["labels"] = _loads(row["labels"])
    kw["reasons"] = tuple(_loads(row["reasons"]))
    kw["rule_ids"] = tuple(_loads(row["rule_ids"]))
    kw["budget_ids"] = tuple(_loads(row["budget_ids"]))
    kw["budget_charges"] = tuple((b, int(p)) for b, p in _loads(row["budget_charges"]))
    # .get: a row of a ledger before migration 0007 (migration 0002 reads such rows)
    kw["service_tier"] = row.get("service_tier") or ""
    units = row.get("units")
    kw["units"] = _loads(units) if units and units != "{}" else {}
    return LedgerEvent(**kw)


@dataclass(slots=True, frozen=True)
class EventFilter:
    """Which events a query sees. Every given condition must hold (AND).

    ``since_ms``/``until_ms`` bound ``event_ms`` half-open: ``[since, until)``; 0 = no
    bound. ``owners`` and ``labels`` match exact values. The tuples match any of
    their values; empty means any.
    """

    since_ms: int = 0
    until_ms: int = 0
    owners: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    models: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    outcomes: tuple[int, ...] = ()
    decisions: tuple[int, ...] = ()
    evidences: tuple[int, ...] = ()
    kinds: tuple[str, ...] = ()

    def validate(self) -> None:
        for name in ("since_ms", "until_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise InvalidArgument(name, "must be an int >= 0")
        if self.since_ms and self.until_ms and self.until_ms < self.since_ms:
            raise InvalidArgument("until_ms", "must not be before since_ms")
        for dim in self.owners:
            if dim not in OWNER_KEYS:
                raise InvalidArgument(
                    "owners", f"unknown owner dimension {dim!r} (one of {', '.join(OWNER_KEYS)})"
                )
        for kind in self.kinds:
            if kind not in KINDS:
                raise InvalidArgument("kinds", f"unknown kind {kind!r}")


@dataclass(slots=True)
class SpendRow:
    """One group of a spend query: the group's values and its sums.

    ``group`` maps each group_by name to its value (``day``/``hour``/``month`` to the
    bucket's start in Unix ms, UTC; ``outcome``/``decision``/``evidence`` to the enum
    member's name, e.g. "SUCCESS"). ``margin_nanos`` = revenue − cost.
    """

    group: dict[str, Any]
    events: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nanos: int = 0
    estimated_cost_nanos: int = 0
    revenue_nanos: int = 0
    margin_nanos: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True, frozen=True)
class KeyInfo:
    """An API key as the store knows it (never the plaintext)."""

    key_id: str
    tenant_id: str
    name: str
    prefix: str
    scopes: frozenset[str]
    created_ms: int
    revoked_ms: int | None = None
    last_used_ms: int | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_ms is not None


@dataclass(slots=True, frozen=True)
class Tenant:
    """A tenant: its id, display name, creation time and settings dict."""

    tenant_id: str
    name: str
    created_ms: int
    settings: dict[str, Any]


class WriteResult(NamedTuple):
    """What ``GroupCommitWriter.write`` acknowledges, after the commit.

    ``event`` is the ledger's copy: on a duplicate, the FIRST event with that
    (tenant_id, event_id), not the one just submitted. (A NamedTuple: one is built
    per write, and a frozen dataclass costs several times more to construct.)
    """

    event: LedgerEvent
    seq: int
    duplicate: bool
    # Leases on (LedgerEvent.claim): the reservation was settled by ANOTHER event,
    # this event_id; nothing was written (event is the one submitted, seq 0).
    claimed_by: str = ""


__all__ = [
    "LedgerEvent",
    "Content",
    "CHAIN_COLUMNS",
    "unchained_values",
    "EventFilter",
    "SpendRow",
    "KeyInfo",
    "Tenant",
    "WriteResult",
    "EVENT_COLUMNS",
    "to_row",
    "to_values",
    "from_row",
]
