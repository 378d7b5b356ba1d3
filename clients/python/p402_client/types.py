"""The plain, typed objects the P402 client returns and accepts.

This module owns the client's public vocabulary: string enums (the wire enum names
without their prefix, so `Decision.DENY == "DENY"`), owners and usage, and one frozen
dataclass per response. Money is always an ``int`` of nano-USD (10⁻⁹ USD) and prices
an ``int`` of pico-USD per token; the wire's ``google.type.Money`` never leaks out of
the client. Times are ``int`` Unix milliseconds (``*_time_ms``), as on the wire.

Nothing here does I/O or imports gRPC, so gateways can type their own code against
these objects cheaply.
"""
from __future__ import annotations

import datetime as _dt
import enum
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Generic, Iterator, Mapping, TypeVar

from p402core.contract import reportable_ms

OWNER_KEYS = ("customer", "feature", "workflow", "task", "department", "employee")
NANOS_PER_USD = 1_000_000_000


# Memos: per member (by id), its wire number; per (enum, text or number) a caller
# passed, the member it names. Keyed by id and by class because members of a StrEnum
# compare equal to their text (Decision.UNSPECIFIED == Outcome.UNSPECIFIED) and must
# not share an entry.
_NUMBERS: dict[int, int] = {}
_PARSED: dict[tuple[type, str | int], Any] = {}
_PARSED_MAX = 4096


class _WireEnum(enum.StrEnum):
    """A str enum whose members are the wire names without the enum's prefix.

    `parse` accepts a member, its name in any case, the full wire name
    ("OUTCOME_SUCCESS") or the wire number, and raises ValueError otherwise (the
    caller turns that into InvalidArgument naming its field).
    """

    @classmethod
    def _prefix(cls) -> str:
        raise NotImplementedError

    @classmethod
    def parse(cls, value: Any) -> "_WireEnum":
        if isinstance(value, cls):
            return value
        t = type(value)
        if t is str or t is int:  # (not bool: never an enum value)
            member = _PARSED.get((cls, value))
            if member is None:
                member = cls._parse(value)
                if len(_PARSED) < _PARSED_MAX:
                    _PARSED[(cls, value)] = member
            return member
        return cls._parse(value)

    @classmethod
    def _parse(cls, value: Any) -> "_WireEnum":
        if isinstance(value, bool):  # bool is an int; never a meaningful enum value
            raise ValueError(f"not a {cls.__name__}: {value!r}")
        if isinstance(value, int):
            for number, member in enumerate(cls):
                if number == value:
                    return member
            raise ValueError(f"not a {cls.__name__} number: {value!r}")
        if isinstance(value, str):
            name = value.strip().upper().replace("-", "_")
            prefix = cls._prefix() + "_"
            if name.startswith(prefix):
                name = name[len(prefix):]
            try:
                return cls[name]
            except KeyError:
                pass
        valid = ", ".join(m.value for m in cls if m.value != "UNSPECIFIED")
        raise ValueError(f"{value!r} is not one of {valid}")

    @property
    def number(self) -> int:
        """The wire enum number (members are declared in wire order)."""
        n = _NUMBERS.get(id(self))
        if n is None:
            n = _NUMBERS[id(self)] = list(type(self)).index(self)
        return n


class Decision(_WireEnum):
    UNSPECIFIED = "UNSPECIFIED"
    ALLOW = "ALLOW"
    WARN = "WARN"
    DENY = "DENY"

    @classmethod
    def _prefix(cls) -> str:
        return "DECISION"


class Outcome(_WireEnum):
    UNSPECIFIED = "UNSPECIFIED"
    SUCCESS = "SUCCESS"
    PROVIDER_ERROR = "PROVIDER_ERROR"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    DENIED = "DENIED"
    EXPIRED = "EXPIRED"

    @classmethod
    def _prefix(cls) -> str:
        return "OUTCOME"


class Evidence(_WireEnum):
    UNSPECIFIED = "UNSPECIFIED"
    ESTIMATED = "ESTIMATED"
    REPORTED = "REPORTED"
    FINGERPRINTED = "FINGERPRINTED"
    ATTESTED = "ATTESTED"

    @classmethod
    def _prefix(cls) -> str:
        return "EVIDENCE"


class PrivacyMode(_WireEnum):
    UNSPECIFIED = "UNSPECIFIED"  # the tenant's default
    METADATA_ONLY = "METADATA_ONLY"
    FINGERPRINT_ONLY = "FINGERPRINT_ONLY"
    REDACTED_TRACE = "REDACTED_TRACE"
    PRIVATE_GATEWAY = "PRIVATE_GATEWAY"
    FULL_TRACE = "FULL_TRACE"

    @classmethod
    def _prefix(cls) -> str:
        return "PRIVACY_MODE"


class Period(_WireEnum):
    UNSPECIFIED = "UNSPECIFIED"
    DAY = "DAY"
    WEEK = "WEEK"
    MONTH = "MONTH"
    TOTAL = "TOTAL"

    @classmethod
    def _prefix(cls) -> str:
        return "PERIOD"


class Enforcement(_WireEnum):
    UNSPECIFIED = "UNSPECIFIED"
    HARD = "HARD"
    SOFT = "SOFT"

    @classmethod
    def _prefix(cls) -> str:
        return "ENFORCEMENT"


class Scope(_WireEnum):
    UNSPECIFIED = "UNSPECIFIED"
    METER = "METER"
    READ = "READ"
    ADMIN = "ADMIN"

    @classmethod
    def _prefix(cls) -> str:
        return "SCOPE"


class Effect(_WireEnum):
    UNSPECIFIED = "UNSPECIFIED"
    DENY = "DENY"
    WARN = "WARN"
    REQUIRE_OWNERS = "REQUIRE_OWNERS"
    ALLOW_MODELS = "ALLOW_MODELS"
    MAX_OUTPUT_TOKENS = "MAX_OUTPUT_TOKENS"
    MAX_COST_PER_REQUEST = "MAX_COST_PER_REQUEST"
    RATE_LIMIT = "RATE_LIMIT"
    PRIVACY = "PRIVACY"

    @classmethod
    def _prefix(cls) -> str:
        return "EFFECT"


class RateUnit(_WireEnum):
    UNSPECIFIED = "UNSPECIFIED"
    REQUESTS = "REQUESTS"
    TOKENS = "TOKENS"
    COST = "COST"  # nano-USD

    @classmethod
    def _prefix(cls) -> str:
        return "RATE_UNIT"


def format_usd(nanos: int) -> str:
    """Exact decimal USD string of a nano-USD amount: 1_500_000 -> "0.001500000"."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    return f"{sign}{whole}.{frac:09d}"


def _ms_to_iso(ms: int) -> str:
    if not ms:
        return ""
    when = _dt.datetime.fromtimestamp(reportable_ms(ms) / 1000, tz=_dt.timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Plain:
    """Shared helpers of the result dataclasses."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: enums as their names, tuples as lists, nested objects as dicts."""
        return _plain(asdict(self))  # type: ignore[call-overload]


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, frozenset)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class Owners(_Plain):
    """Who caused the cost. Free-form strings; "" means absent."""

    customer: str = ""
    feature: str = ""
    workflow: str = ""
    task: str = ""
    department: str = ""
    employee: str = ""

    @classmethod
    def of(cls, value: "Owners | Mapping[str, str] | None") -> "Owners":
        """An Owners from an Owners, a mapping {dimension: value} or None.

        Raises ValueError naming an unknown dimension (the vocabulary is fixed;
        anything else belongs in labels).
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"expected a mapping or Owners, got {type(value).__name__}")
        unknown = sorted(set(value) - set(OWNER_KEYS))
        if unknown:
            raise ValueError(
                f"unknown owner dimension {unknown[0]!r} (one of {', '.join(OWNER_KEYS)};"
                " use labels for anything else)")
        for key, val in value.items():
            if not isinstance(val, str):
                raise ValueError(f"{key} must be a str, got {type(val).__name__}")
        return cls(**dict(value))

    def items(self) -> Iterator[tuple[str, str]]:
        """The dimensions that are set, in OWNER_KEYS order."""
        for key in OWNER_KEYS:
            val = getattr(self, key)
            if val:
                yield key, val

    def __bool__(self) -> bool:
        return any(getattr(self, k) for k in OWNER_KEYS)


@dataclass(frozen=True, slots=True)
class Usage(_Plain):
    """Usage of one call or a sum. Cached and cache-write tokens are part of
    input_tokens; reasoning tokens part of output_tokens (OpenTelemetry GenAI).
    `units` holds the other Usage counts that are not 0 (images, audio_ms,
    audio_input_tokens, …: p402core/README.md) and `service_tier` the tier billed
    ("" = standard) — on events; sums carry tokens only."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    units: Mapping[str, int] = field(default_factory=dict)
    service_tier: str = ""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class BudgetStatus(_Plain):
    """Where one budget stands after a decision or a settlement."""

    budget_id: str
    limit_nanos: int
    committed_nanos: int
    held_nanos: int
    remaining_nanos: int
    period_start_time_ms: int
    enforcement: Enforcement


@dataclass(frozen=True, slots=True)
class Authorization(_Plain):
    """The answer to Authorize. A DENY is data, never an exception."""

    decision: Decision
    reasons: tuple[str, ...]
    rule_ids: tuple[str, ...]
    reservation_id: str
    estimated_cost_nanos: int
    estimated_input_tokens: int
    estimated_output_tokens: int
    output_token_cap: int
    budgets: tuple[BudgetStatus, ...]
    model: str
    provider: str
    catalog_version: str
    expire_time_ms: int
    retry_after_ms: int

    @property
    def allowed(self) -> bool:
        """True for ALLOW and WARN: the call may go ahead (with output_token_cap)."""
        return self.decision in (Decision.ALLOW, Decision.WARN)

    @property
    def denied(self) -> bool:
        return self.decision == Decision.DENY


@dataclass(frozen=True, slots=True)
class RecordResult(_Plain):
    """The acknowledgement of a durably committed Record."""

    event_id: str
    cost_nanos: int
    estimated_cost_nanos: int
    overrun_nanos: int
    evidence: Evidence
    duplicate: bool
    budgets: tuple[BudgetStatus, ...]
    catalog_version: str
    # The event's signed receipt (str, canonical JSON; server/p402_server/ledger/receipts.py)
    # when the Record asked for it (want_receipt=True), else "".
    receipt: str = ""
    # The event's reason codes when it was recorded other than as asked
    # ("reservation.unknown", "policy.privacy_mode_not_allowed", …), else ().
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReleaseResult(_Plain):
    event_id: str
    budgets: tuple[BudgetStatus, ...]


@dataclass(frozen=True, slots=True)
class Event(_Plain):
    """One economic event of the ledger."""

    event_id: str
    sequence: int
    kind: str  # record, denied, expired, released
    event_time_ms: int
    record_time_ms: int
    reservation_id: str
    owners: Owners
    labels: dict[str, str]
    provider: str
    model: str
    usage: Usage
    cost_nanos: int
    estimated_cost_nanos: int
    overrun_nanos: int
    revenue_nanos: int
    decision: Decision
    reasons: tuple[str, ...]
    rule_ids: tuple[str, ...]
    budget_ids: tuple[str, ...]
    outcome: Outcome
    evidence: Evidence
    privacy_mode: PrivacyMode
    attempt: int
    retry_of: str
    catalog_version: str
    duplicate_of: str
    chain_hash: str
    # The event's position in the tenant's hash chain (0 until it is committed).
    chain_index: int = 0

    @property
    def event_time(self) -> _dt.datetime:
        return _dt.datetime.fromtimestamp(reportable_ms(self.event_time_ms) / 1000,
                                         tz=_dt.timezone.utc)

    def to_flat(self) -> dict[str, Any]:
        """One flat row (owners and usage inlined, ISO time, USD strings) for CSV."""
        row: dict[str, Any] = {}
        for f in fields(self):
            val = getattr(self, f.name)
            if isinstance(val, (Owners, Usage)):
                row.update(val.to_dict())
            elif f.name == "event_time_ms":
                row["event_time"] = _ms_to_iso(val)
                row[f.name] = val
            elif f.name == "cost_nanos":
                row[f.name] = val
                row["cost_usd"] = format_usd(val)
            else:
                row[f.name] = _plain(val)
        return row


@dataclass(frozen=True, slots=True)
class SpendRow(_Plain):
    """Aggregated spend for one group (Query with group_by)."""

    group: dict[str, str]
    event_count: int
    usage: Usage
    cost_nanos: int
    estimated_cost_nanos: int
    revenue_nanos: int
    margin_nanos: int


@dataclass(frozen=True, slots=True)
class ApiKey(_Plain):
    """A key's public record; never the key itself."""

    key_id: str
    name: str
    prefix: str
    scopes: tuple[Scope, ...]
    create_time_ms: int
    revoke_time_ms: int

    @property
    def active(self) -> bool:
        return self.revoke_time_ms == 0


@dataclass(frozen=True, slots=True)
class CreatedKey(_Plain):
    """A new key: `api_key` is the secret, shown this once."""

    key: ApiKey
    api_key: str


@dataclass(frozen=True, slots=True)
class Gateway(_Plain):
    """A gateway that signs its reports (privacy mode private_gateway); never its
    secret."""

    gateway_id: str
    name: str
    create_time_ms: int
    revoke_time_ms: int

    @property
    def active(self) -> bool:
        return self.revoke_time_ms == 0


@dataclass(frozen=True, slots=True)
class RegisteredGateway(_Plain):
    """A new gateway: `secret` (hex, the HMAC-SHA256 key) is shown this once; hand
    it to `P402Client(..., gateway_id=…, gateway_secret=…)` on the gateway."""

    gateway: Gateway
    secret: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Budget(_Plain):
    budget_id: str
    scope: dict[str, str]
    period: Period
    limit_nanos: int
    soft_limit_nanos: int
    enforcement: Enforcement
    status: BudgetStatus | None = None


@dataclass(frozen=True, slots=True)
class PolicyRule(_Plain):
    """A policy rule. Field names are the keyword arguments of put_policy_rule."""

    rule_id: str
    effect: Effect
    owners: dict[str, str] = field(default_factory=dict)
    models: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    privacy_modes: tuple[PrivacyMode, ...] = ()
    require_owners: tuple[str, ...] = ()
    allow_models: tuple[str, ...] = ()
    max_output_tokens: int = 0
    max_cost_nanos: int = 0
    rate_limit: int = 0
    rate_unit: RateUnit = RateUnit.UNSPECIFIED
    window_seconds: int = 0
    per: str = ""
    allowed_privacy_modes: tuple[PrivacyMode, ...] = ()
    message: str = ""


@dataclass(frozen=True, slots=True)
class Price(_Plain):
    """A model's price in pico-USD per token (= micro-USD per million tokens)."""

    model: str
    provider: str
    input_pico_per_token: int
    cached_input_pico_per_token: int
    cache_write_pico_per_token: int
    output_pico_per_token: int
    reasoning_pico_per_token: int
    max_output_tokens: int
    tenant_override: bool


@dataclass(frozen=True, slots=True)
class PriceImport(_Plain):
    imported_count: int
    skipped: tuple[str, ...]
    catalog_version: str


@dataclass(frozen=True, slots=True)
class Settings(_Plain):
    default_privacy_mode: PrivacyMode
    hold_ttl_seconds: int
    allow_clamp: bool
    default_output_tokens: int
    allow_unknown_models: bool
    fallback_input_pico_per_token: int
    fallback_output_pico_per_token: int


@dataclass(frozen=True, slots=True)
class Ping(_Plain):
    tenant: str
    implementation: str


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list: its items and the token of the next page ("" at the end)."""

    items: tuple[T, ...]
    next_page_token: str = ""
    catalog_version: str = ""  # set by list_prices only

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> T:
        return self.items[index]

    @property
    def last(self) -> bool:
        return not self.next_page_token


__all__ = [
    "OWNER_KEYS",
    "NANOS_PER_USD",
    "format_usd",
    "Decision",
    "Outcome",
    "Evidence",
    "PrivacyMode",
    "Period",
    "Enforcement",
    "Scope",
    "Effect",
    "RateUnit",
    "Owners",
    "Usage",
    "BudgetStatus",
    "Authorization",
    "RecordResult",
    "ReleaseResult",
    "Event",
    "SpendRow",
    "ApiKey",
    "CreatedKey",
    "Gateway",
    "RegisteredGateway",
    "Budget",
    "PolicyRule",
    "Price",
    "PriceImport",
    "Settings",
    "Ping",
    "Page",
]
