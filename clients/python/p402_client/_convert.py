"""Conversions between the client's Python values and the p402.v1 wire messages.

Owns: building every request message from keyword arguments (with type checks
that raise InvalidArgument naming the wire field, as the server would), and turning
every response into the frozen dataclasses of `types`. Money crosses here and only
here: `google.type.Money` (units + nanos) <-> int nano-USD, exactly.

Range checks (lengths, limits, label counts) are the server's; the client checks
what it must to build a message at all (types, enum names, obvious negatives), so
one place decides what is valid.
"""
from __future__ import annotations

import datetime as _dt
import time
from typing import Any, Iterable, Mapping

from google.type import money_pb2

from p402.v1 import admin_pb2, common_pb2, meter_pb2
from p402core import _units
from p402core.contract import event_time_problem, string_problem, text_problem

from .errors import InvalidArgument
from .types import (
    NANOS_PER_USD,
    OWNER_KEYS,
    ApiKey,
    Authorization,
    Budget,
    BudgetStatus,
    CreatedKey,
    Decision,
    Effect,
    Enforcement,
    Event,
    Evidence,
    Gateway,
    Outcome,
    Owners,
    Period,
    Ping,
    PolicyRule,
    Price,
    PriceImport,
    PrivacyMode,
    RateUnit,
    RecordResult,
    RegisteredGateway,
    ReleaseResult,
    Scope,
    Settings,
    SpendRow,
    Usage,
    _WireEnum,
)

INT64_MAX = (1 << 63) - 1
INT32_MAX = (1 << 31) - 1
_OWNER_KEYS = frozenset(OWNER_KEYS)

# ---------------------------------------------------------------- money and scalars


def to_money(nanos: int) -> money_pb2.Money:
    """int nano-USD -> Money; units and nanos carry the same sign (google.type.Money)."""
    sign = -1 if nanos < 0 else 1
    units, frac = divmod(abs(nanos), NANOS_PER_USD)
    return money_pb2.Money(currency_code="USD", units=sign * units, nanos=sign * frac)


def from_money(money: money_pb2.Money) -> int:
    """Money -> int nano-USD (exact)."""
    return money.units * NANOS_PER_USD + money.nanos


def check_int(field: str, value: Any, *, minimum: int | None = 0,
              maximum: int = INT64_MAX) -> int:
    if type(value) is int and (minimum is None or value >= minimum) and value <= maximum:
        return value  # the common case, one test (bool is not exactly int)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise InvalidArgument(field, f"must be >= {minimum}, got {value}")
    if value > maximum:
        raise InvalidArgument(field, f"must be <= {maximum}, got {value}")
    return value


def check_str(field: str, value: Any, *, required: bool = False) -> str:
    """An id or a name, checked against the server's string contract
    (p402core.contract: length, no control characters, no lone surrogates)."""
    if type(value) is str:  # the common case: one test, then the contract's scan
        if value:
            problem = string_problem(value)
            if problem is not None:
                raise InvalidArgument(field, problem)
        elif required:
            raise InvalidArgument(field, "is required")
        return value
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InvalidArgument(field, f"must be a str, got {type(value).__name__}")
    if required and not value:
        raise InvalidArgument(field, "is required")
    if value:
        problem = string_problem(value)
        if problem is not None:
            raise InvalidArgument(field, problem)
    return value


def check_text(field: str, value: Any) -> str:
    """Content text: any str without lone surrogates (p402core.contract)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(field, f"must be a str, got {type(value).__name__}")
    problem = text_problem(value)
    if problem is not None:
        raise InvalidArgument(field, problem)
    return value


def check_strs(field: str, values: Any) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):  # a lone string is one item, not its characters
        values = [values]
    out = []
    for i, v in enumerate(values):
        out.append(check_str(f"{field}[{i}]", v))
    return out


def check_enum(field: str, cls: type[_WireEnum], value: Any) -> _WireEnum:
    try:
        return cls.parse(value)
    except ValueError as exc:
        raise InvalidArgument(field, str(exc)) from None


def check_enums(field: str, cls: type[_WireEnum], values: Any) -> list[int]:
    if values is None:
        return []
    if isinstance(values, (str, int)):
        values = [values]
    return [check_enum(f"{field}[{i}]", cls, v).number for i, v in enumerate(values)]


def owners_pb(field: str, owners: Any) -> common_pb2.Owners | None:
    """The Owners message, or None when no owner is given.

    None matters: a Record with the owners field set (even to all-empty) states its
    owners, while an unset field lets the server take them from the reservation.
    """
    if owners is None:
        return None
    if (type(owners) is dict and owners.keys() <= _OWNER_KEYS
            and all(type(v) is str for v in owners.values())):
        # The common case (a plain dict of known dimensions and str values) without
        # the Owners dataclass in between: the same checks in the same order.
        items = {}
        for k in OWNER_KEYS:
            v = owners.get(k)
            if v:
                problem = string_problem(v)
                if problem is not None:
                    raise InvalidArgument(f"{field}.{k}", problem)
                items[k] = v
        return common_pb2.Owners(**items) if items else None
    try:
        o = Owners.of(owners)
    except ValueError as exc:
        raise InvalidArgument(field, str(exc)) from None
    if not o:
        return None
    items = dict(o.items())
    for k, v in items.items():
        check_str(f"{field}.{k}", v)
    return common_pb2.Owners(**items)


def str_map(field: str, mapping: Any) -> dict[str, str]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise InvalidArgument(field, f"must be a mapping, got {type(mapping).__name__}")
    out = {}
    for k, v in mapping.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidArgument(f"{field}.{k}", "keys and values must be str")
        problem = string_problem(k)
        if problem is not None:
            raise InvalidArgument(field, f"key {k[:40]!r}: {problem}")
        check_str(f"{field}.{k}", v)
        out[k] = v
    return out


def time_ms(field: str, value: Any, *, now_ms: int | None = None) -> int:
    """A time as Unix ms from an int (ms), an aware/naive (UTC) datetime, a date,
    or a timedelta (that long ago). None -> 0 (open bound)."""
    if value is None:
        return 0
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    if isinstance(value, _dt.timedelta):
        return now - int(value.total_seconds() * 1000)
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return int(value.timestamp() * 1000)
    if isinstance(value, _dt.date):
        return int(_dt.datetime(value.year, value.month, value.day,
                                tzinfo=_dt.timezone.utc).timestamp() * 1000)
    return check_int(field, value)


# ---------------------------------------------------------------- requests


def authorize_request(model: str, *, provider: str = "", owners: Any = None,
                      labels: Any = None, input_bytes: int = -1, content: Any = None,
                      max_output_tokens: int = 0, privacy_mode: Any = None,
                      reservation_id: str = "", ttl_seconds: int = 0, attempt: int = 0,
                      retry_of: str = "", request_id: str = "",
                      expected_usage: Any = None) -> meter_pb2.AuthorizeRequest:
    """An AuthorizeRequest; `expected_usage` ({"images": 2}, {"audio_ms": 61_500}, …:
    the quantities a call is priced by) adds their price to the reservation."""
    if isinstance(content, (bytes, bytearray, memoryview)):
        try:
            content = bytes(content).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument("content", "bytes must be UTF-8 text") from None
    model = check_str("model", model, required=True)
    provider = check_str("provider", provider)
    owners = owners_pb("owners", owners)
    labels = str_map("labels", labels)
    input_bytes = check_int("input_bytes", input_bytes, minimum=-1)
    max_output_tokens = check_int("max_output_tokens", max_output_tokens)
    privacy_mode = (0 if privacy_mode is None
                    else check_enum("privacy_mode", PrivacyMode, privacy_mode).number)
    reservation_id = check_str("reservation_id", reservation_id)
    ttl_seconds = check_int("ttl_seconds", ttl_seconds)
    content = check_text("content", content)
    attempt = check_int("attempt", attempt, maximum=INT32_MAX)
    retry_of = check_str("retry_of", retry_of)
    request_id = check_str("request_id", request_id)
    expected = _expected("expected_usage", expected_usage)
    req = meter_pb2.AuthorizeRequest(
        model=model, provider=provider, input_bytes=input_bytes,
        max_output_tokens=max_output_tokens, privacy_mode=privacy_mode,
        reservation_id=reservation_id, ttl_seconds=ttl_seconds, content=content,
        attempt=attempt, retry_of=retry_of, request_id=request_id)
    _set_parts(req, owners, labels)
    if expected is not None:
        req.expected_usage.CopyFrom(expected)
    return req


def _set_parts(req, owners: common_pb2.Owners | None, labels: dict[str, str]) -> None:
    """A request's owners and labels, set only when given: passed to the constructor,
    an absent Owners still costs a copy and an empty labels dict a Python-level map
    update (together they were a third of building a request)."""
    if owners is not None:
        req.owners.CopyFrom(owners)
    if labels:
        req.labels.update(labels)


def _expected(field: str, units: Any) -> common_pb2.Usage | None:
    if units is None:
        return None
    if not isinstance(units, Mapping):
        raise InvalidArgument(field, f"must be a mapping {{unit: count}}, got "
                                     f"{type(units).__name__}")
    usage = common_pb2.Usage()
    for name, value in units.items():
        if name not in UNIT_FIELDS:
            raise InvalidArgument(f"{field}.{name}", "not a usage unit")
        setattr(usage, name, check_int(f"{field}.{name}", value))
    return usage


# Usage counts beyond the five token kinds (the wire's Usage fields; what each
# counts and how it is priced: p402core/README.md).
UNIT_FIELDS = _units.UNITS

RECORD_FIELDS = frozenset({
    "event_id", "reservation_id", "model", "provider", "owners", "labels",
    "input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens",
    "reasoning_tokens", "outcome", "input_bytes", "revenue_nanos", "attempt",
    "retry_of", "event_time_ms", "privacy_mode", "usage_estimated", "service_tier",
    "want_receipt",
    *UNIT_FIELDS,
})


def record_request(reservation_id: str = "", *, event_id: str, model: str = "",
                   provider: str = "", owners: Any = None, labels: Any = None,
                   input_tokens: int = 0, output_tokens: int = 0,
                   cached_input_tokens: int = 0, cache_write_tokens: int = 0,
                   reasoning_tokens: int = 0, outcome: Any = Outcome.SUCCESS,
                   input_bytes: int = -1, revenue_nanos: int = 0, attempt: int = 0,
                   retry_of: str = "", event_time_ms: Any = 0, privacy_mode: Any = None,
                   usage_estimated: bool = False, service_tier: str = "",
                   want_receipt: bool = False,
                   prefix: str = "", **units: int) -> meter_pb2.RecordRequest:
    """A RecordRequest; `prefix` ("records[3].") makes field names precise in batches.

    `units`: the other Usage counts by name (UNIT_FIELDS: images=2, audio_ms=61_500,
    audio_input_tokens=…); `service_tier`: "" / "standard", "batch", "flex",
    "priority" (OpenAI's "default" and "auto" mean standard).

    `usage_estimated=True`: the usage is the caller's estimate, not the provider's
    report (the event's evidence is then ESTIMATED, not REPORTED)."""
    if not isinstance(usage_estimated, bool):
        raise InvalidArgument(prefix + "usage_estimated",
                              f"must be a bool, got {type(usage_estimated).__name__}")
    if not isinstance(want_receipt, bool):
        raise InvalidArgument(prefix + "want_receipt",
                              f"must be a bool, got {type(want_receipt).__name__}")
    reservation_id = check_str(prefix + "reservation_id", reservation_id)
    model = check_str(prefix + "model", model)
    if not reservation_id and not model:
        raise InvalidArgument(prefix + "model",
                              "is required for a meter-only record (no reservation_id)")
    tokens = (check_int(prefix + "usage.input_tokens", input_tokens),
              check_int(prefix + "usage.cached_input_tokens", cached_input_tokens),
              check_int(prefix + "usage.cache_write_tokens", cache_write_tokens),
              check_int(prefix + "usage.output_tokens", output_tokens),
              check_int(prefix + "usage.reasoning_tokens", reasoning_tokens))
    for name, value in units.items():
        if name not in UNIT_FIELDS:
            raise InvalidArgument(prefix + name, "unknown record field")
        check_int(prefix + "usage." + name, value)
    if service_tier:
        try:
            _units.check_tier(service_tier)
        except _units.InvalidArgument as exc:  # p402core's: the SDK's has its own class
            raise InvalidArgument(prefix + "usage.service_tier", exc.message) from None
    event_id = check_str(prefix + "event_id", event_id)
    provider = check_str(prefix + "provider", provider)
    owners = owners_pb(prefix + "owners", owners)
    labels = str_map(prefix + "labels", labels)
    outcome = check_enum(prefix + "outcome", Outcome, outcome).number
    # The wire has no "unknown" for a Record's size: 0 means not measured.
    input_bytes = max(0, check_int(prefix + "input_bytes", input_bytes, minimum=-1))
    attempt = check_int(prefix + "attempt", attempt, maximum=INT32_MAX)
    retry_of = check_str(prefix + "retry_of", retry_of)
    event_time_ms = _event_time(prefix + "event_time_ms", event_time_ms)
    privacy_mode = (0 if privacy_mode is None else
                    check_enum(prefix + "privacy_mode", PrivacyMode, privacy_mode).number)
    req = meter_pb2.RecordRequest(
        event_id=event_id, reservation_id=reservation_id, model=model, provider=provider,
        outcome=outcome, input_bytes=input_bytes, attempt=attempt, retry_of=retry_of,
        event_time_ms=event_time_ms, privacy_mode=privacy_mode,
        usage_estimated=usage_estimated, want_receipt=want_receipt)
    _set_parts(req, owners, labels)
    # Usage filled in place (building a Usage and copying it in costs more); it is
    # always present on the wire, zeros included.
    usage = req.usage
    usage.SetInParent()
    (usage.input_tokens, usage.cached_input_tokens, usage.cache_write_tokens,
     usage.output_tokens, usage.reasoning_tokens) = tokens
    for name, value in units.items():
        setattr(usage, name, value)
    if service_tier:
        usage.service_tier = service_tier
    if check_int(prefix + "revenue", revenue_nanos):
        req.revenue.CopyFrom(to_money(revenue_nanos))
    return req


def _event_time(field: str, value: Any) -> int:
    if value == 0 and type(value) is int:
        return 0  # now: nothing to check
    ms = time_ms(field, value)
    problem = event_time_problem(ms, int(time.time() * 1000))
    if problem is not None:
        raise InvalidArgument(field, problem)
    return ms


def event_filter(*, since: Any = None, until: Any = None, owners: Any = None,
                 labels: Any = None, models: Any = None, providers: Any = None,
                 outcomes: Any = None, decisions: Any = None, evidences: Any = None
                 ) -> meter_pb2.EventFilter:
    return meter_pb2.EventFilter(
        start_time_ms=time_ms("filter.start_time_ms", since),
        end_time_ms=time_ms("filter.end_time_ms", until),
        owners=owners_pb("filter.owners", owners),
        labels=str_map("filter.labels", labels),
        models=check_strs("filter.models", models),
        providers=check_strs("filter.providers", providers),
        outcomes=check_enums("filter.outcomes", Outcome, outcomes),
        decisions=check_enums("filter.decisions", Decision, decisions),
        evidences=check_enums("filter.evidences", Evidence, evidences),
    )


def page_args(page_size: Any, page_token: Any) -> dict[str, Any]:
    return {"page_size": check_int("page_size", page_size, maximum=INT32_MAX),
            "page_token": check_str("page_token", page_token)}


def budget_pb(budget_id: str, *, limit_nanos: int, period: Any = Period.MONTH,
              soft_limit_nanos: int = 0, enforcement: Any = Enforcement.HARD,
              scope: Any = None) -> admin_pb2.Budget:
    b = admin_pb2.Budget(
        budget_id=check_str("budget.budget_id", budget_id, required=True),
        scope=str_map("budget.scope", scope),
        period=check_enum("budget.period", Period, period).number,
        enforcement=check_enum("budget.enforcement", Enforcement, enforcement).number,
    )
    b.limit.CopyFrom(to_money(check_int("budget.limit", limit_nanos)))
    if check_int("budget.soft_limit", soft_limit_nanos):
        b.soft_limit.CopyFrom(to_money(soft_limit_nanos))
    return b


POLICY_FIELDS = frozenset(f for f in PolicyRule.__dataclass_fields__)


def policy_rule_pb(rule_id: str, effect: Any, *, owners: Any = None, models: Any = (),
                   providers: Any = (), privacy_modes: Any = (), require_owners: Any = (),
                   allow_models: Any = (), max_output_tokens: int = 0,
                   max_cost_nanos: int = 0, rate_limit: int = 0, rate_unit: Any = None,
                   window_seconds: int = 0, per: str = "",
                   allowed_privacy_modes: Any = (), message: str = ""
                   ) -> admin_pb2.PolicyRule:
    r = admin_pb2.PolicyRule(
        rule_id=check_str("rule.rule_id", rule_id, required=True),
        effect=check_enum("rule.effect", Effect, effect).number,
        owners=str_map("rule.owners", owners),
        models=check_strs("rule.models", models),
        providers=check_strs("rule.providers", providers),
        privacy_modes=check_enums("rule.privacy_modes", PrivacyMode, privacy_modes),
        require_owners=check_strs("rule.require_owners", require_owners),
        allow_models=check_strs("rule.allow_models", allow_models),
        max_output_tokens=check_int("rule.max_output_tokens", max_output_tokens),
        rate_limit=check_int("rule.rate_limit", rate_limit),
        rate_unit=(0 if rate_unit is None
                   else check_enum("rule.rate_unit", RateUnit, rate_unit).number),
        window_seconds=check_int("rule.window_seconds", window_seconds),
        per=check_str("rule.per", per),
        allowed_privacy_modes=check_enums("rule.allowed_privacy_modes", PrivacyMode,
                                          allowed_privacy_modes),
        message=check_str("rule.message", message),
    )
    if check_int("rule.max_cost", max_cost_nanos):
        r.max_cost.CopyFrom(to_money(max_cost_nanos))
    return r


SETTINGS_FIELDS = ("default_privacy_mode", "hold_ttl_seconds", "allow_clamp",
                   "default_output_tokens", "allow_unknown_models",
                   "fallback_input_pico_per_token", "fallback_output_pico_per_token")


def settings_update(fields: Mapping[str, Any]) -> admin_pb2.UpdateSettingsRequest:
    """UpdateSettingsRequest changing exactly the given fields (the update mask)."""
    unknown = sorted(set(fields) - set(SETTINGS_FIELDS))
    if unknown:
        raise InvalidArgument(f"settings.{unknown[0]}",
                              f"unknown setting (one of {', '.join(SETTINGS_FIELDS)})")
    s = admin_pb2.Settings()
    for name, value in fields.items():
        where = f"settings.{name}"
        if name == "default_privacy_mode":
            s.default_privacy_mode = check_enum(where, PrivacyMode, value).number
        elif name in ("allow_clamp", "allow_unknown_models"):
            if not isinstance(value, bool):
                raise InvalidArgument(where, f"must be a bool, got {type(value).__name__}")
            setattr(s, name, value)
        else:
            setattr(s, name, check_int(where, value))
    return admin_pb2.UpdateSettingsRequest(settings=s, update_mask=sorted(fields))


# ---------------------------------------------------------------- responses


def budget_status(pb: common_pb2.BudgetStatus) -> BudgetStatus:
    return BudgetStatus(
        budget_id=pb.budget_id,
        limit_nanos=from_money(pb.limit),
        committed_nanos=from_money(pb.committed),
        held_nanos=from_money(pb.held),
        remaining_nanos=from_money(pb.remaining),
        period_start_time_ms=pb.period_start_time_ms,
        enforcement=Enforcement.parse(pb.enforcement),
    )


def _statuses(items: Iterable[common_pb2.BudgetStatus]) -> tuple[BudgetStatus, ...]:
    return tuple([budget_status(b) for b in items]) if items else ()


def owners(pb: common_pb2.Owners) -> Owners:
    return Owners(pb.customer, pb.feature, pb.workflow, pb.task, pb.department,
                  pb.employee)


def usage(pb: common_pb2.Usage) -> Usage:
    units = {name: getattr(pb, name) for name in UNIT_FIELDS if getattr(pb, name)}
    return Usage(pb.input_tokens, pb.cached_input_tokens, pb.cache_write_tokens,
                 pb.output_tokens, pb.reasoning_tokens, units, pb.service_tier)


def _enum(cls: type[_WireEnum], number: int) -> Any:
    # A newer server may send a value this client does not know: keep UNSPECIFIED
    # rather than failing the whole response.
    try:
        return cls.parse(number)
    except ValueError:
        return cls.parse(0)


def authorization(pb: meter_pb2.AuthorizeResponse) -> Authorization:
    reasons, rule_ids = pb.reasons, pb.rule_ids
    return Authorization(
        decision=_enum(Decision, pb.decision),
        reasons=tuple(reasons) if reasons else (),
        rule_ids=tuple(rule_ids) if rule_ids else (),
        reservation_id=pb.reservation_id,
        estimated_cost_nanos=from_money(pb.estimated_cost),
        estimated_input_tokens=pb.estimated_input_tokens,
        estimated_output_tokens=pb.estimated_output_tokens,
        output_token_cap=pb.output_token_cap,
        budgets=_statuses(pb.budgets),
        model=pb.model,
        provider=pb.provider,
        catalog_version=pb.catalog_version,
        expire_time_ms=pb.expire_time_ms,
        retry_after_ms=pb.retry_after_ms,
    )


def record_result(pb: meter_pb2.RecordResponse) -> RecordResult:
    return RecordResult(
        event_id=pb.event_id,
        cost_nanos=from_money(pb.cost),
        estimated_cost_nanos=from_money(pb.estimated_cost),
        overrun_nanos=from_money(pb.overrun),
        evidence=_enum(Evidence, pb.evidence),
        duplicate=pb.duplicate,
        budgets=_statuses(pb.budgets),
        catalog_version=pb.catalog_version,
        receipt=pb.receipt,
        reasons=tuple(pb.reasons),
    )


def release_result(pb: meter_pb2.ReleaseResponse) -> ReleaseResult:
    return ReleaseResult(event_id=pb.event_id, budgets=_statuses(pb.budgets))


def event(pb: meter_pb2.Event) -> Event:
    return Event(
        event_id=pb.event_id,
        sequence=pb.sequence,
        kind=pb.kind,
        event_time_ms=pb.event_time_ms,
        record_time_ms=pb.record_time_ms,
        reservation_id=pb.reservation_id,
        owners=owners(pb.owners),
        labels=dict(pb.labels),
        provider=pb.provider,
        model=pb.model,
        usage=usage(pb.usage),
        cost_nanos=from_money(pb.cost),
        estimated_cost_nanos=from_money(pb.estimated_cost),
        overrun_nanos=from_money(pb.overrun),
        revenue_nanos=from_money(pb.revenue),
        decision=_enum(Decision, pb.decision),
        reasons=tuple(pb.reasons),
        rule_ids=tuple(pb.rule_ids),
        budget_ids=tuple(pb.budget_ids),
        outcome=_enum(Outcome, pb.outcome),
        evidence=_enum(Evidence, pb.evidence),
        privacy_mode=_enum(PrivacyMode, pb.privacy_mode),
        attempt=pb.attempt,
        retry_of=pb.retry_of,
        catalog_version=pb.catalog_version,
        duplicate_of=pb.duplicate_of,
        chain_hash=pb.chain_hash,
        chain_index=pb.chain_index,
    )


_ENUM_GROUPS: dict[str, type[_WireEnum]] = {"decision": Decision, "outcome": Outcome,
                                             "evidence": Evidence}


def _group(group: Mapping[str, str]) -> dict[str, str]:
    """Group values as the client names them: enum keys by name ("DENY"), whether
    the server sent the name or the wire number."""
    out = dict(group)
    for key, cls in _ENUM_GROUPS.items():
        value = out.get(key)
        if value is not None and value.isascii() and value.isdigit():
            out[key] = _enum(cls, int(value)).value
    return out


def spend_row(pb: meter_pb2.SpendRow) -> SpendRow:
    return SpendRow(
        group=_group(pb.group),
        event_count=pb.event_count,
        usage=usage(pb.usage),
        cost_nanos=from_money(pb.cost),
        estimated_cost_nanos=from_money(pb.estimated_cost),
        revenue_nanos=from_money(pb.revenue),
        margin_nanos=from_money(pb.margin),
    )


def api_key(pb: admin_pb2.ApiKey) -> ApiKey:
    return ApiKey(
        key_id=pb.key_id,
        name=pb.name,
        prefix=pb.prefix,
        scopes=tuple(_enum(Scope, s) for s in pb.scopes),
        create_time_ms=pb.create_time_ms,
        revoke_time_ms=pb.revoke_time_ms,
    )


def created_key(pb: admin_pb2.CreateKeyResponse) -> CreatedKey:
    return CreatedKey(key=api_key(pb.key), api_key=pb.api_key)


def gateway(pb: admin_pb2.Gateway) -> Gateway:
    return Gateway(gateway_id=pb.gateway_id, name=pb.name,
                   create_time_ms=pb.create_time_ms, revoke_time_ms=pb.revoke_time_ms)


def registered_gateway(pb: admin_pb2.RegisterGatewayResponse) -> RegisteredGateway:
    return RegisteredGateway(gateway=gateway(pb.gateway), secret=pb.secret)


def budget(pb: admin_pb2.Budget) -> Budget:
    return Budget(
        budget_id=pb.budget_id,
        scope=dict(pb.scope),
        period=_enum(Period, pb.period),
        limit_nanos=from_money(pb.limit),
        soft_limit_nanos=from_money(pb.soft_limit),
        enforcement=_enum(Enforcement, pb.enforcement),
        status=budget_status(pb.status) if pb.HasField("status") else None,
    )


def policy_rule(pb: admin_pb2.PolicyRule) -> PolicyRule:
    return PolicyRule(
        rule_id=pb.rule_id,
        effect=_enum(Effect, pb.effect),
        owners=dict(pb.owners),
        models=tuple(pb.models),
        providers=tuple(pb.providers),
        privacy_modes=tuple(_enum(PrivacyMode, m) for m in pb.privacy_modes),
        require_owners=tuple(pb.require_owners),
        allow_models=tuple(pb.allow_models),
        max_output_tokens=pb.max_output_tokens,
        max_cost_nanos=from_money(pb.max_cost),
        rate_limit=pb.rate_limit,
        rate_unit=_enum(RateUnit, pb.rate_unit),
        window_seconds=pb.window_seconds,
        per=pb.per,
        allowed_privacy_modes=tuple(_enum(PrivacyMode, m)
                                    for m in pb.allowed_privacy_modes),
        message=pb.message,
    )


def price(pb: admin_pb2.Price) -> Price:
    return Price(
        model=pb.model,
        provider=pb.provider,
        input_pico_per_token=pb.input_pico_per_token,
        cached_input_pico_per_token=pb.cached_input_pico_per_token,
        cache_write_pico_per_token=pb.cache_write_pico_per_token,
        output_pico_per_token=pb.output_pico_per_token,
        reasoning_pico_per_token=pb.reasoning_pico_per_token,
        max_output_tokens=pb.max_output_tokens,
        tenant_override=pb.tenant_override,
    )


def price_import(pb: admin_pb2.ImportPricesResponse) -> PriceImport:
    return PriceImport(imported_count=pb.imported_count, skipped=tuple(pb.skipped),
                       catalog_version=pb.catalog_version)


def settings(pb: admin_pb2.Settings) -> Settings:
    return Settings(
        default_privacy_mode=_enum(PrivacyMode, pb.default_privacy_mode),
        hold_ttl_seconds=pb.hold_ttl_seconds,
        allow_clamp=pb.allow_clamp,
        default_output_tokens=pb.default_output_tokens,
        allow_unknown_models=pb.allow_unknown_models,
        fallback_input_pico_per_token=pb.fallback_input_pico_per_token,
        fallback_output_pico_per_token=pb.fallback_output_pico_per_token,
    )


def ping(pb: meter_pb2.PingResponse) -> Ping:
    return Ping(tenant=pb.tenant, implementation=pb.implementation)
