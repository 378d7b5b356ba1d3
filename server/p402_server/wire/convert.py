"""Conversions between the wire (p402.v1 messages) and the core/store objects.

Owns the validation of every request field at the edge: a bad field raises
`p402core.InvalidArgument` naming its path on the wire ("owners.customer",
"usage.input_tokens", "filter.start_time_ms", "budget.limit"), which errors.py turns
into INVALID_ARGUMENT. Money on the wire is google.type.Money in USD (units + nanos);
everywhere else it is an int of nano-USD. No float touches money here.

One room, though long: every conversion between the wire and the core is here, so the
rule for a field (its name on the wire, its limits, its error) is found in one place.
"""
from __future__ import annotations

import base64
import operator
import sys
import time
from collections.abc import Iterable, Sequence

from p402.v1 import admin_pb2, common_pb2, meter_pb2
from p402_server.ledger.model import EventFilter, LedgerEvent, SpendRow
from p402_server.privacy import modes as _privacy
from p402core import (
    MAX_LABELS,
    MAX_TOKENS,
    OWNER_KEYS,
    Decision,
    Effect,
    Enforcement,
    Evidence,
    InvalidArgument,
    Outcome,
    Period,
    PrivacyMode,
    RateUnit,
    _units,
)
from p402core.contract import (
    event_time_problem,
    string_problem,
    strings_ok,
    strings_problem,
    text_problem,
)

NANOS_PER_UNIT = 1_000_000_000
INT64_MAX = 2**63 - 1
MAX_NANOS_FIELD = 999_999_999
MAX_FILTER_VALUES = 100
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
EMPTY_OWNERS = ("", "", "", "", "", "")
_intern = sys.intern

GROUP_BY_KEYS = (*OWNER_KEYS, "provider", "model", "outcome", "decision", "evidence",
                 "hour", "day", "month")

SCOPE_TO_NAME = {admin_pb2.SCOPE_METER: "meter", admin_pb2.SCOPE_READ: "read",
                 admin_pb2.SCOPE_ADMIN: "admin"}
NAME_TO_SCOPE = {v: k for k, v in SCOPE_TO_NAME.items()}

_OUTCOMES = frozenset(int(x) for x in Outcome)
_DECISIONS = frozenset(int(x) for x in Decision)
_EVIDENCES = frozenset(int(x) for x in Evidence)
_PRIVACY = frozenset(int(x) for x in PrivacyMode)
_PERIODS = frozenset(int(x) for x in Period)
_ENFORCEMENTS = frozenset(int(x) for x in Enforcement)
_EFFECTS = frozenset(int(x) for x in Effect)
_RATE_UNITS = frozenset(int(x) for x in RateUnit)


# --- scalars ---------------------------------------------------------------------

def check_str(value: str, field: str, *, required: bool = False) -> str:
    """An id or a name: the string contract (p402core.contract: length, no control
    characters, no lone surrogates), and not empty when `required`."""
    if required and not value:
        raise InvalidArgument(field, "must not be empty")
    if value:
        problem = string_problem(value)
        if problem is not None:
            raise InvalidArgument(field, problem)
    return value


def check_strs(pairs: Sequence[tuple[str, str]]) -> None:
    """check_str of several (field, value) pairs in one scan when all are fine."""
    hit = strings_problem([v for _f, v in pairs])
    if hit is not None:
        raise InvalidArgument(pairs[hit[0]][0], hit[1])


def check_text(value: str, field: str) -> str:
    """Content text (kept only when the privacy mode says so): no lone surrogates."""
    problem = text_problem(value)
    if problem is not None:
        raise InvalidArgument(field, problem)
    return value


def check_event_time(ms: int, field: str) -> int:
    problem = event_time_problem(ms, time.time_ns() // 1_000_000)
    if problem is not None:
        raise InvalidArgument(field, problem)
    return ms


def check_int(value: int, field: str, *, low: int = 0, high: int = INT64_MAX) -> int:
    if value < low:
        raise InvalidArgument(field, f"must be >= {low}, got {value}")
    if value > high:
        raise InvalidArgument(field, f"must be <= {high}, got {value}")
    return value


def check_enum(value: int, allowed: frozenset, field: str, name: str,
               *, unspecified_ok: bool = True) -> int:
    if value not in allowed or (value == 0 and not unspecified_ok):
        raise InvalidArgument(field, f"not a valid {name}: {value}")
    return value


def check_page(page_size: int, page_token: str, field_prefix: str = "") -> int:
    if page_size < 0:
        raise InvalidArgument(field_prefix + "page_size", "must not be negative")
    check_str(page_token, field_prefix + "page_token")
    return page_size or DEFAULT_PAGE_SIZE


# --- money -----------------------------------------------------------------------

def money_to_nanos(m, field: str, *, allow_negative: bool = False) -> int:
    """google.type.Money (USD) -> int nano-USD; bad or negative -> InvalidArgument."""
    if m.currency_code not in ("", "USD"):
        raise InvalidArgument(f"{field}.currency_code",
                              f"only USD is supported, got {m.currency_code!r}")
    units, nanos = m.units, m.nanos
    if not -MAX_NANOS_FIELD <= nanos <= MAX_NANOS_FIELD:
        raise InvalidArgument(f"{field}.nanos", "must be within ±999,999,999")
    if (units > 0 and nanos < 0) or (units < 0 and nanos > 0):
        raise InvalidArgument(f"{field}.nanos", "must have the same sign as units")
    total = units * NANOS_PER_UNIT + nanos
    if total < 0 and not allow_negative:
        raise InvalidArgument(field, "must not be negative")
    if not -INT64_MAX <= total <= INT64_MAX:
        raise InvalidArgument(field, "out of range (int64 nano-USD)")
    return total


def set_money(m, nanos: int) -> None:
    """Fill a google.type.Money from int nano-USD (nanos carries the sign of units)."""
    m.currency_code = "USD"
    if nanos >= 0:
        m.units, m.nanos = divmod(nanos, NANOS_PER_UNIT)
    else:
        units, rest = divmod(-nanos, NANOS_PER_UNIT)
        m.units, m.nanos = -units, -rest


# --- owners, labels, usage -------------------------------------------------------

def owners_from_proto(o, field: str = "owners") -> tuple:
    """The six owner values, validated and interned: every request decodes its own
    copies of the same few customer and feature names, and an open hold keeps its
    owners until it settles (a million holds of fresh copies take several hundred
    MB more; benchmarks/bench_holds_memory.py --fresh-owners --intern). Interned
    strings are freed like any other once no hold or event refers to them."""
    t = (o.customer, o.feature, o.workflow, o.task, o.department, o.employee)
    hit = strings_problem(t)
    if hit is not None:
        raise InvalidArgument(f"{field}.{OWNER_KEYS[hit[0]]}", hit[1])
    return (_intern(t[0]), _intern(t[1]), _intern(t[2]), _intern(t[3]), _intern(t[4]),
            _intern(t[5]))


def owners_from_mapping(d, field: str = "owners") -> tuple:
    out = ["", "", "", "", "", ""]
    for k, v in d.items():
        try:
            i = OWNER_KEYS.index(k)
        except ValueError:
            raise InvalidArgument(field, f"unknown owner dimension {k!r}") from None
        out[i] = check_str(v, f"{field}.{k}")
    return tuple(out)


def set_owners(o, owners) -> None:
    """owners: a 6-tuple or a mapping {dim: value}."""
    if isinstance(owners, tuple):
        o.customer, o.feature, o.workflow, o.task, o.department, o.employee = owners
    else:
        for k, v in owners.items():
            setattr(o, k, v)


def labels_from_proto(labels, field: str = "labels") -> dict | None:
    if not labels:
        return None
    out = {k: labels[k] for k in labels}  # a dict, the cheapest way out of a proto map
    if (len(out) <= MAX_LABELS and "" not in out and strings_ok(out)
            and strings_ok(out.values())):
        return out  # the common case: one scan of the keys, one of the values
    if len(out) > MAX_LABELS:
        raise InvalidArgument(field, f"at most {MAX_LABELS} labels, got {len(out)}")
    for k, v in out.items():
        if not k:
            raise InvalidArgument(field, "label keys must not be empty")
        problem = string_problem(k)
        if problem is not None:
            raise InvalidArgument(field, f"label key {k[:40]!r}: {problem}")
        problem = string_problem(v)
        if problem is not None:
            raise InvalidArgument(f"{field}.{k}", problem)
    return out  # pragma: no cover - strings_ok found a problem in one of them


_USAGE_FIELDS = ("input_tokens", "cached_input_tokens", "cache_write_tokens",
                 "output_tokens", "reasoning_tokens")
_UNIT_FIELDS = _units.UNITS
_usage_counts = operator.attrgetter(*_USAGE_FIELDS)
_unit_counts = operator.attrgetter(*_UNIT_FIELDS)
_INPUT_PARTS = ("cached_input_tokens", "cache_write_tokens", "cache_write_1h_tokens",
                "audio_input_tokens", "image_input_tokens")
_OUTPUT_PARTS = ("reasoning_tokens", "audio_output_tokens", "image_output_tokens")


def usage_from_proto(u, field: str = "usage") -> tuple:
    """(input, cached_input, cache_write, output, reasoning, units, service_tier),
    validated: units {field: count} holds the other Usage counts that are not 0,
    service_tier is "" for standard (p402core._units)."""
    t = _usage_counts(u)
    if min(t) < 0 or max(t) > MAX_TOKENS:
        for name, v in zip(_USAGE_FIELDS, t):
            if v < 0 or v > MAX_TOKENS:
                raise InvalidArgument(f"{field}.{name}",
                                      f"must be within 0..{MAX_TOKENS}, got {v}")
    units = {}
    counts = _unit_counts(u)  # one call; most usage has no unit beyond the five
    if any(counts):
        for name, v in zip(_UNIT_FIELDS, counts):
            if v:
                if v < 0 or v > MAX_TOKENS:
                    raise InvalidArgument(f"{field}.{name}",
                                          f"must be within 0..{MAX_TOKENS}, got {v}")
                units[name] = v
    if t[1] + t[2] > t[0]:
        raise InvalidArgument(f"{field}.cached_input_tokens",
                              "cached_input_tokens + cache_write_tokens exceed input_tokens")
    if t[4] > t[3]:
        raise InvalidArgument(f"{field}.reasoning_tokens",
                              "reasoning_tokens exceed output_tokens")
    if units:
        if t[1] + t[2] + sum(units.get(n, 0) for n in _INPUT_PARTS[2:]) > t[0]:
            raise InvalidArgument(f"{field}.input_tokens", "less than the sum of its parts ("
                                  + " + ".join(_INPUT_PARTS) + ")")
        if t[4] + sum(units.get(n, 0) for n in _OUTPUT_PARTS[1:]) > t[3]:
            raise InvalidArgument(f"{field}.output_tokens", "less than the sum of its parts ("
                                  + " + ".join(_OUTPUT_PARTS) + ")")
    tier = u.service_tier
    if tier:
        try:
            tier = _units.check_tier(tier)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{field}.service_tier", exc.message) from None
    return (*t, units, tier)


def expected_units(u, field: str = "expected_usage") -> dict | None:
    """An AuthorizeRequest's expected quantities {unit: count}, validated (None: none)."""
    for name in (*_USAGE_FIELDS, *_units.UNITS):
        v = getattr(u, name)
        if v and name not in _units.QUANTITY_UNITS:
            raise InvalidArgument(f"{field}.{name}", "not a quantity: token counts are "
                                  "estimated from input_bytes and max_output_tokens")
    if u.service_tier:
        raise InvalidArgument(f"{field}.service_tier", "an estimate is at standard rates")
    units = {}
    for name in _units.QUANTITY_UNITS:
        v = getattr(u, name)
        if v:
            if v < 0 or v > MAX_TOKENS:
                raise InvalidArgument(f"{field}.{name}", f"must be within 0..{MAX_TOKENS}, got {v}")
            units[name] = v
    return units or None


def set_usage(u, input_tokens, cached, cache_write, output, reasoning, units=None,
              service_tier: str = "") -> None:
    u.input_tokens = input_tokens
    u.cached_input_tokens = cached
    u.cache_write_tokens = cache_write
    u.output_tokens = output
    u.reasoning_tokens = reasoning
    if units:
        for name, n in units.items():
            setattr(u, name, n)
    if service_tier:
        u.service_tier = service_tier


# --- requests of MeterService ----------------------------------------------------

_AUTHORIZE_STRS = ("model", "provider", "reservation_id", "retry_of", "request_id")


def authorize_args(req, default_privacy: int) -> dict:
    """AuthorizeRequest -> keyword arguments of Engine.authorize (validated)."""
    model = req.model
    if not model:
        raise InvalidArgument("model", "must not be empty")
    # The common case is cheap: one scan of the strings; details only on failure.
    strs = (model, req.provider, req.reservation_id, req.retry_of, req.request_id)
    hit = strings_problem(strs)
    if hit is not None:
        raise InvalidArgument(_AUTHORIZE_STRS[hit[0]], hit[1])
    input_bytes = req.input_bytes
    if input_bytes < -1:
        raise InvalidArgument("input_bytes", "must be >= 0 (or -1 for unknown)")
    if not 0 <= req.max_output_tokens <= MAX_TOKENS:
        raise InvalidArgument("max_output_tokens", f"must be within 0..{MAX_TOKENS}")
    if not 0 <= req.ttl_seconds <= 30 * 86400:
        raise InvalidArgument("ttl_seconds", "must be within 0..2592000 (30 days)")
    if req.attempt < 0:
        raise InvalidArgument("attempt", "must not be negative")
    privacy = req.privacy_mode
    if privacy not in _PRIVACY:
        raise InvalidArgument("privacy_mode", f"not a valid PrivacyMode: {privacy}")
    content = req.content
    if content:
        check_text(content, "content")
    units = expected_units(req.expected_usage) if req.HasField("expected_usage") else None
    return {
        "units": units,
        "provider": req.provider,
        "owners": owners_from_proto(req.owners) if req.HasField("owners") else EMPTY_OWNERS,
        "labels": labels_from_proto(req.labels) if req.labels else None,
        # The content, when sent, is measured by the core (and dropped); otherwise
        # unset / -1 means unknown, estimated as 0 bytes of prompt.
        "input_bytes": -1 if content else (input_bytes if input_bytes > 0 else 0),
        "content": content or None,
        "max_output_tokens": req.max_output_tokens,
        "privacy_mode": privacy or default_privacy,
        "ttl_seconds": req.ttl_seconds,
        "reservation_id": req.reservation_id,
    }


_RECORD_STRS = ("event_id", "reservation_id", "model", "provider", "retry_of")
# The outcomes a Record may report (DENIED and EXPIRED are the server's own).
_RECORD_OUTCOMES = _OUTCOMES - {int(Outcome.DENIED), int(Outcome.EXPIRED)}


def validate_record(req, field: str = "") -> tuple:
    """Checks every RecordRequest field; returns (owners or None, labels, usage,
    revenue). `field` prefixes the field names in errors (a batch's "records[3].")."""
    p = field
    rid, model = req.reservation_id, req.model
    hit = strings_problem((req.event_id, rid, model, req.provider, req.retry_of))
    if hit is not None:
        raise InvalidArgument(p + _RECORD_STRS[hit[0]], hit[1])
    if req.prompt:
        check_text(req.prompt, p + "prompt")
    if req.response:
        check_text(req.response, p + "response")
    if not rid and not model:
        raise InvalidArgument(p + "model", "must not be empty without a reservation_id")
    if req.input_bytes < -1:
        raise InvalidArgument(p + "input_bytes", "must be >= 0 (or -1 for unknown)")
    if req.attempt < 0:
        raise InvalidArgument(p + "attempt", "must not be negative")
    if req.event_time_ms:
        check_event_time(req.event_time_ms, p + "event_time_ms")
    outcome = req.outcome
    if outcome not in _RECORD_OUTCOMES:
        check_enum(outcome, _OUTCOMES, p + "outcome", "Outcome")
        raise InvalidArgument(p + "outcome", "DENIED and EXPIRED are set by the server")
    check_enum(req.privacy_mode, _PRIVACY, p + "privacy_mode", "PrivacyMode")
    owners = owners_from_proto(req.owners, p + "owners") if req.HasField("owners") else None
    labels = labels_from_proto(req.labels, p + "labels") if req.labels else None
    usage = usage_from_proto(req.usage, p + "usage")
    revenue = money_to_nanos(req.revenue, p + "revenue") if req.HasField("revenue") else 0
    return owners, labels, usage, revenue


def budget_status_to_proto(s, out=None):
    # Inlined money conversions: this runs for every matched budget of every
    # Authorize and Record, and each helper call shows in the RPC benchmark.
    out = common_pb2.BudgetStatus() if out is None else out
    out.budget_id = s.budget_id
    for m, n in ((out.limit, s.limit_nanos), (out.committed, s.committed_nanos),
                 (out.held, s.held_nanos), (out.remaining, s.remaining_nanos)):
        m.currency_code = "USD"
        if n:
            if n > 0:
                m.units, m.nanos = divmod(n, NANOS_PER_UNIT)
            else:
                set_money(m, n)
    out.period_start_time_ms = s.period_start_ms
    out.enforcement = s.enforcement
    return out


def authorization_to_proto(a) -> meter_pb2.AuthorizeResponse:
    r = meter_pb2.AuthorizeResponse(
        decision=a.decision,
        reservation_id=a.reservation_id,
        estimated_input_tokens=a.estimated_input_tokens,
        estimated_output_tokens=a.estimated_output_tokens,
        output_token_cap=a.output_token_cap,
        model=a.model,
        provider=a.provider,
        catalog_version=a.catalog_version,
        expire_time_ms=a.expires_ms,
        retry_after_ms=getattr(a, "retry_after_ms", 0) or 0,
    )
    if a.reasons:
        r.reasons.extend(a.reasons)
    if a.rule_ids:
        r.rule_ids.extend(a.rule_ids)
    set_money(r.estimated_cost, a.estimated_cost_nanos)
    for s in a.budgets:
        budget_status_to_proto(s, r.budgets.add())
    return r


def record_response(ev: LedgerEvent, duplicate: bool, statuses: Iterable = ()):
    r = meter_pb2.RecordResponse(event_id=ev.event_id, evidence=ev.evidence,
                                 duplicate=duplicate, catalog_version=ev.catalog_version)
    set_money(r.cost, ev.cost_nanos)
    set_money(r.estimated_cost, ev.estimated_cost_nanos)
    set_money(r.overrun, ev.overrun_nanos)
    if ev.reasons:
        r.reasons.extend(ev.reasons)
    for s in statuses:
        budget_status_to_proto(s, r.budgets.add())
    return r


# --- the ledger ------------------------------------------------------------------

def event_to_proto(ev: LedgerEvent, out=None) -> meter_pb2.Event:
    e = meter_pb2.Event() if out is None else out
    e.event_id = ev.event_id
    e.sequence = ev.seq
    e.kind = ev.kind
    e.event_time_ms = ev.event_ms
    e.record_time_ms = ev.recorded_ms
    e.reservation_id = ev.reservation_id
    o = e.owners
    o.customer, o.feature, o.workflow = ev.customer, ev.feature, ev.workflow
    o.task, o.department, o.employee = ev.task, ev.department, ev.employee
    if ev.labels:
        e.labels.update(ev.labels)
    e.provider = ev.provider
    e.model = ev.model
    set_usage(e.usage, ev.input_tokens, ev.cached_input_tokens, ev.cache_write_tokens,
              ev.output_tokens, ev.reasoning_tokens, ev.units, ev.service_tier)
    set_money(e.cost, ev.cost_nanos)
    set_money(e.estimated_cost, ev.estimated_cost_nanos)
    set_money(e.overrun, ev.overrun_nanos)
    set_money(e.revenue, ev.revenue_nanos)
    e.decision = ev.decision
    e.reasons.extend(ev.reasons)
    e.rule_ids.extend(ev.rule_ids)
    e.budget_ids.extend(ev.budget_ids)
    e.outcome = ev.outcome
    e.evidence = ev.evidence
    e.privacy_mode = ev.privacy_mode
    e.attempt = ev.attempt
    e.retry_of = ev.retry_of
    e.catalog_version = ev.catalog_version
    e.duplicate_of = ev.duplicate_of or ""
    e.chain_hash = ev.chain_hash or ""
    # Evidence fields: chain position, fingerprints, the budget charges
    # the chain covers. Never content: it is not on a LedgerEvent read back.
    e.chain_index = ev.chain_index or 0
    e.prompt_fingerprint = ev.prompt_fingerprint or ""
    e.response_fingerprint = ev.response_fingerprint or ""
    for budget_id, start_ms in ev.budget_charges:
        e.budget_charges.add(budget_id=budget_id, period_start_time_ms=start_ms)
    return e


def spend_row_to_proto(row: SpendRow, out=None) -> meter_pb2.SpendRow:
    r = meter_pb2.SpendRow() if out is None else out
    for k, v in row.group.items():
        r.group[k] = "" if v is None else str(v)
    r.event_count = row.events
    set_usage(r.usage, row.input_tokens, row.cached_input_tokens, row.cache_write_tokens,
              row.output_tokens, row.reasoning_tokens)
    set_money(r.cost, row.cost_nanos)
    set_money(r.estimated_cost, row.estimated_cost_nanos)
    set_money(r.revenue, row.revenue_nanos)
    set_money(r.margin, row.margin_nanos)
    return r


def filter_from_proto(f, field: str = "filter") -> EventFilter:
    if f.start_time_ms < 0:
        raise InvalidArgument(f"{field}.start_time_ms", "must not be negative")
    if f.end_time_ms < 0:
        raise InvalidArgument(f"{field}.end_time_ms", "must not be negative")
    if f.end_time_ms and f.end_time_ms <= f.start_time_ms:
        raise InvalidArgument(f"{field}.end_time_ms", "must be after start_time_ms")
    owners = {}
    if f.HasField("owners"):
        t = owners_from_proto(f.owners, f"{field}.owners")
        owners = {OWNER_KEYS[i]: v for i, v in enumerate(t) if v}
    labels = labels_from_proto(f.labels, f"{field}.labels") or {}

    def strings(values: Sequence[str], name: str) -> tuple:
        if len(values) > MAX_FILTER_VALUES:
            raise InvalidArgument(f"{field}.{name}", f"at most {MAX_FILTER_VALUES} values")
        for v in values:
            check_str(v, f"{field}.{name}", required=True)
        return tuple(values)

    def enums(values, allowed, name: str, label: str) -> tuple:
        if len(values) > MAX_FILTER_VALUES:
            raise InvalidArgument(f"{field}.{name}", f"at most {MAX_FILTER_VALUES} values")
        for v in values:
            check_enum(v, allowed, f"{field}.{name}", label, unspecified_ok=False)
        return tuple(int(v) for v in values)

    return EventFilter(
        since_ms=f.start_time_ms,
        until_ms=f.end_time_ms,
        owners=owners,
        labels=labels,
        models=strings(f.models, "models"),
        providers=strings(f.providers, "providers"),
        outcomes=enums(f.outcomes, _OUTCOMES, "outcomes", "Outcome"),
        decisions=enums(f.decisions, _DECISIONS, "decisions", "Decision"),
        evidences=enums(f.evidences, _EVIDENCES, "evidences", "Evidence"),
    )


def group_by_from_proto(values: Sequence[str]) -> list[str]:
    seen = []
    for v in values:
        if v not in GROUP_BY_KEYS:
            raise InvalidArgument("group_by", f"unknown key {v!r} (one of "
                                              f"{', '.join(GROUP_BY_KEYS)})")
        if v in seen:
            raise InvalidArgument("group_by", f"{v!r} given twice")
        seen.append(v)
    return seen


# --- admin: keys, budgets, rules, prices, settings ---------------------------------

def key_to_proto(k, out=None) -> admin_pb2.ApiKey:
    a = admin_pb2.ApiKey() if out is None else out
    a.key_id = k.key_id
    a.name = k.name
    a.prefix = k.prefix
    a.scopes.extend(NAME_TO_SCOPE[s] for s in ("meter", "read", "admin") if s in k.scopes)
    a.create_time_ms = k.created_ms
    a.revoke_time_ms = k.revoked_ms or 0
    return a


def scopes_from_proto(scopes, field: str = "scopes") -> frozenset:
    if not scopes:
        raise InvalidArgument(field, "at least one scope is required (meter, read, admin)")
    out = set()
    for s in scopes:
        name = SCOPE_TO_NAME.get(s)
        if name is None:
            raise InvalidArgument(field, f"not a valid Scope: {s}")
        out.add(name)
    return frozenset(out)


def _scope_map(m, field: str) -> dict:
    if len(m) > MAX_LABELS + len(OWNER_KEYS):
        raise InvalidArgument(field, "too many conditions")
    out = {}
    for k, v in m.items():
        if k not in OWNER_KEYS and not (k.startswith("label.") and len(k) > 6):
            raise InvalidArgument(field, f"unknown key {k!r}: an owner dimension "
                                         f"({', '.join(OWNER_KEYS)}) or 'label.<key>'")
        check_str(k, field)
        check_str(v, f"{field}.{k}", required=True)
        out[k] = v
    return out


def _rename(exc: InvalidArgument, prefix: str, renames: dict) -> InvalidArgument:
    """Core field names -> wire field paths (limit_nanos -> budget.limit)."""
    name = exc.field
    name = renames.get(name, name)
    return InvalidArgument(f"{prefix}.{name}", exc.message)


_BUDGET_RENAMES = {"limit_nanos": "limit", "soft_limit_nanos": "soft_limit"}


def budget_from_proto(b, core, field: str = "budget"):
    check_str(b.budget_id, f"{field}.budget_id", required=True)
    scope = _scope_map(b.scope, f"{field}.scope")
    period = check_enum(b.period, _PERIODS, f"{field}.period", "Period") or Period.MONTH
    enforcement = (check_enum(b.enforcement, _ENFORCEMENTS, f"{field}.enforcement",
                              "Enforcement") or Enforcement.HARD)
    if not b.HasField("limit"):
        raise InvalidArgument(f"{field}.limit", "is required")
    limit = money_to_nanos(b.limit, f"{field}.limit")
    soft = money_to_nanos(b.soft_limit, f"{field}.soft_limit") if b.HasField("soft_limit") else 0
    if soft > limit:
        raise InvalidArgument(f"{field}.soft_limit", "must not exceed limit")
    try:
        return core.Budget(b.budget_id, limit, scope=scope or None, period=Period(period),
                           soft_limit_nanos=soft, enforcement=Enforcement(enforcement))
    except InvalidArgument as exc:
        raise _rename(exc, field, _BUDGET_RENAMES) from None


def budget_to_proto(b, status=None, out=None) -> admin_pb2.Budget:
    p = admin_pb2.Budget() if out is None else out
    p.budget_id = b.budget_id
    if b.scope:
        p.scope.update(dict(b.scope))
    p.period = int(b.period)
    set_money(p.limit, b.limit_nanos)
    set_money(p.soft_limit, b.soft_limit_nanos)
    p.enforcement = int(b.enforcement)
    if status is not None:
        budget_status_to_proto(status, p.status)
    return p


_RULE_RENAMES = {"max_cost_nanos": "max_cost"}


def rule_from_proto(r, core, field: str = "rule"):
    check_str(r.rule_id, f"{field}.rule_id", required=True)
    check_enum(r.effect, _EFFECTS, f"{field}.effect", "Effect", unspecified_ok=False)
    owners = _scope_map(r.owners, f"{field}.owners")
    for name in ("models", "providers", "require_owners", "allow_models"):
        values = getattr(r, name)
        if len(values) > MAX_FILTER_VALUES:
            raise InvalidArgument(f"{field}.{name}", f"at most {MAX_FILTER_VALUES} values")
        for v in values:
            check_str(v, f"{field}.{name}", required=True)
    for name in ("privacy_modes", "allowed_privacy_modes"):
        for v in getattr(r, name):
            check_enum(v, _PRIVACY, f"{field}.{name}", "PrivacyMode", unspecified_ok=False)
    for name in ("max_output_tokens", "rate_limit", "window_seconds"):
        check_int(getattr(r, name), f"{field}.{name}")
    check_enum(r.rate_unit, _RATE_UNITS, f"{field}.rate_unit", "RateUnit")
    check_str(r.per, f"{field}.per")
    check_str(r.message, f"{field}.message")
    max_cost = money_to_nanos(r.max_cost, f"{field}.max_cost") if r.HasField("max_cost") else 0
    try:
        return core.Rule(
            r.rule_id, Effect(r.effect),
            owners=owners or None,
            models=tuple(r.models),
            providers=tuple(r.providers),
            privacy_modes=tuple(PrivacyMode(v) for v in r.privacy_modes),
            require_owners=tuple(r.require_owners),
            allow_models=tuple(r.allow_models),
            max_output_tokens=r.max_output_tokens,
            max_cost_nanos=max_cost,
            rate_limit=r.rate_limit,
            rate_unit=RateUnit(r.rate_unit or RateUnit.REQUESTS),
            window_seconds=r.window_seconds or 60,
            per=r.per,
            allowed_privacy_modes=tuple(PrivacyMode(v) for v in r.allowed_privacy_modes),
            message=r.message,
        )
    except InvalidArgument as exc:
        raise _rename(exc, field, _RULE_RENAMES) from None


def rule_to_proto(rule, out=None) -> admin_pb2.PolicyRule:
    p = admin_pb2.PolicyRule() if out is None else out
    p.rule_id = rule.rule_id
    p.effect = int(rule.effect)
    if rule.owners:
        p.owners.update(dict(rule.owners))
    p.models.extend(rule.models)
    p.providers.extend(rule.providers)
    p.privacy_modes.extend(int(v) for v in rule.privacy_modes)
    p.require_owners.extend(rule.require_owners)
    p.allow_models.extend(rule.allow_models)
    p.max_output_tokens = rule.max_output_tokens
    if rule.max_cost_nanos:
        set_money(p.max_cost, rule.max_cost_nanos)
    p.rate_limit = rule.rate_limit
    p.rate_unit = int(rule.rate_unit)
    p.window_seconds = rule.window_seconds
    p.per = rule.per
    p.allowed_privacy_modes.extend(int(v) for v in rule.allowed_privacy_modes)
    p.message = rule.message
    return p


def price_to_proto(price, tenant_override: bool, out=None) -> admin_pb2.Price:
    p = admin_pb2.Price() if out is None else out
    p.model = price.model
    p.provider = price.provider
    p.input_pico_per_token = price.input_pico
    p.cached_input_pico_per_token = _rate(price.cached_input_pico, price.input_pico)
    p.cache_write_pico_per_token = _rate(price.cache_write_pico, price.input_pico)
    p.output_pico_per_token = price.output_pico
    p.reasoning_pico_per_token = _rate(price.reasoning_pico, price.output_pico)
    p.max_output_tokens = price.max_output_tokens
    p.tenant_override = tenant_override
    return p


def _rate(value, fallback) -> int:
    # A rate left unset falls back the way LiteLLM's calculator does (README prices).
    return fallback if value is None else value


# Settings: a plain dict in the store (tenants.settings), the Settings message here.
SETTINGS_DEFAULTS = {
    "default_privacy_mode": int(PrivacyMode.METADATA_ONLY),
    "hold_ttl_seconds": 900,
    "allow_clamp": False,
    "default_output_tokens": 4096,
    "allow_unknown_models": False,
    "fallback_input_pico_per_token": 0,
    "fallback_output_pico_per_token": 0,
}
# Privacy settings (privacy.py owns their meaning and validation).
SETTINGS_DEFAULTS.update(_privacy.PRIVACY_DEFAULTS)
SETTINGS_FIELDS = tuple(SETTINGS_DEFAULTS)


PRICE_BOOK = "price_book"  # the settings key of the tenant's price book


def settings_with_defaults(stored: dict | None) -> dict:
    out = dict(SETTINGS_DEFAULTS)
    for k, v in (stored or {}).items():
        # The tenant's secrets ride along in the stored dict (never on the wire), and
        # its price book (AdminService.Put/GetPriceBook, pricebook.py).
        if k in out or k == _privacy.SECRETS or k == PRICE_BOOK:
            out[k] = v
    return out


def settings_to_proto(s: dict) -> admin_pb2.Settings:
    # Secrets are never exported; the evidence key's public half is.
    msg = admin_pb2.Settings(**{k: s[k] for k in SETTINGS_FIELDS})
    key = (s.get(_privacy.SECRETS) or {}).get("evidence_key")
    if key:
        from p402_server.privacy.signing import public_key_hex, unseal

        msg.evidence_public_key = public_key_hex(unseal(key))
    return msg


def settings_update(current: dict, msg, mask: Sequence[str]) -> dict:
    """Apply UpdateSettings (mask = field names; empty = every field), validated."""
    for name in mask:
        if name not in SETTINGS_DEFAULTS:
            raise InvalidArgument("update_mask", f"unknown settings field {name!r}")
    names = list(mask) or list(SETTINGS_FIELDS)
    out = dict(current)
    for name in names:
        value = getattr(msg, name)
        # Repeated fields (allowed_privacy_modes, redacted_trace_fields) as lists.
        out[name] = value if isinstance(value, (int, str, bool)) else list(value)
    f = "settings."
    out["default_privacy_mode"] = check_enum(
        out["default_privacy_mode"], _PRIVACY, f + "default_privacy_mode", "PrivacyMode",
    ) or int(PrivacyMode.METADATA_ONLY)
    check_int(out["hold_ttl_seconds"], f + "hold_ttl_seconds", low=1, high=30 * 86400)
    check_int(out["default_output_tokens"], f + "default_output_tokens", low=1,
              high=MAX_TOKENS)
    check_int(out["fallback_input_pico_per_token"], f + "fallback_input_pico_per_token",
              high=10**10)
    check_int(out["fallback_output_pico_per_token"], f + "fallback_output_pico_per_token",
              high=10**10)
    out["allow_clamp"] = bool(out["allow_clamp"])
    out["allow_unknown_models"] = bool(out["allow_unknown_models"])
    return _privacy.validate_settings(out, f)


# --- pagination over in-memory listings (admin lists are small) -------------------

def offset_page(items: Sequence, page_size: int, page_token: str, max_size: int = MAX_PAGE_SIZE):
    """(page, next_page_token) over a sorted list; the token is an opaque offset."""
    size = min(check_page(page_size, page_token), max_size)
    start = 0
    if page_token:
        try:
            raw = base64.urlsafe_b64decode(page_token.encode()).decode()
            if not raw.startswith("o:"):
                raise ValueError
            start = int(raw[2:])
            if start < 0:
                raise ValueError
        except ValueError:
            raise InvalidArgument("page_token", "not a token this server issued") from None
    page = items[start:start + size]
    end = start + len(page)
    token = base64.urlsafe_b64encode(f"o:{end}".encode()).decode() if end < len(items) else ""
    return page, token


