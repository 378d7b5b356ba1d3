"""Shared vocabulary of the core: enums, reason codes and the typed errors.

Plain Python on purpose: both twins (compiled and pure-Python) use these very
objects, so a decision, an outcome or an error means the same thing whichever
implementation produced it. Compiled code compares against the integer values.
"""
from __future__ import annotations

from enum import IntEnum


class Decision(IntEnum):
    DECISION_UNSPECIFIED = 0
    ALLOW = 1
    WARN = 2
    DENY = 3


class Outcome(IntEnum):
    OUTCOME_UNSPECIFIED = 0
    SUCCESS = 1
    PROVIDER_ERROR = 2
    TIMEOUT = 3
    CANCELLED = 4
    DENIED = 5
    EXPIRED = 6


class Evidence(IntEnum):
    EVIDENCE_UNSPECIFIED = 0
    ESTIMATED = 1
    REPORTED = 2
    FINGERPRINTED = 3
    ATTESTED = 4


class Period(IntEnum):
    PERIOD_UNSPECIFIED = 0
    DAY = 1
    WEEK = 2
    MONTH = 3
    TOTAL = 4


class Enforcement(IntEnum):
    ENFORCEMENT_UNSPECIFIED = 0
    HARD = 1
    SOFT = 2


class PrivacyMode(IntEnum):
    PRIVACY_MODE_UNSPECIFIED = 0
    METADATA_ONLY = 1
    FINGERPRINT_ONLY = 2
    REDACTED_TRACE = 3
    PRIVATE_GATEWAY = 4
    FULL_TRACE = 5


class Effect(IntEnum):
    EFFECT_UNSPECIFIED = 0
    DENY = 1
    WARN = 2
    REQUIRE_OWNERS = 3
    ALLOW_MODELS = 4
    MAX_OUTPUT_TOKENS = 5
    MAX_COST_PER_REQUEST = 6
    RATE_LIMIT = 7
    PRIVACY = 8


class RateUnit(IntEnum):
    RATE_UNIT_UNSPECIFIED = 0
    REQUESTS = 1
    TOKENS = 2
    COST = 3


# The owner vocabulary, in the fixed order used everywhere (tuples, columns, proto).
OWNER_KEYS = ("customer", "feature", "workflow", "task", "department", "employee")
MAX_LABELS = 16
MAX_STRING = 256          # longest owner value, label key/value, model or id
MAX_TOKENS = 100_000_000  # per field, per call: anything above is bad input, not usage

# Stable reason codes (DESIGN §3). A decision carries every code that applied.
BUDGET_EXCEEDED = "budget.exceeded"
BUDGET_SOFT_LIMIT = "budget.soft_limit"
BUDGET_CLAMPED = "budget.clamped"
PRICE_UNKNOWN_MODEL = "price.unknown_model"
POLICY_DENIED = "policy.denied"
POLICY_WARNED = "policy.warned"
POLICY_OWNER_MISSING = "policy.owner_missing"
POLICY_MODEL_NOT_ALLOWED = "policy.model_not_allowed"
POLICY_OUTPUT_CLAMPED = "policy.output_clamped"
POLICY_COST_TOO_HIGH = "policy.cost_per_request_exceeded"
POLICY_RATE_LIMITED = "policy.rate_limited"
POLICY_PRIVACY_MODE_NOT_ALLOWED = "policy.privacy_mode_not_allowed"


class P402Error(Exception):
    """Base of every error the core raises on purpose."""


class InvalidArgument(P402Error, ValueError):
    """Bad input; `field` names the offending field (becomes INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UnknownModel(P402Error, LookupError):
    """The catalog has no price for this model (reason `price.unknown_model`)."""

    reason = PRICE_UNKNOWN_MODEL

    def __init__(self, model: str, provider: str = ""):
        where = f" (provider {provider!r})" if provider else ""
        super().__init__(f"no price for model {model!r}{where}")
        self.model = model
        self.provider = provider


class NotFound(P402Error, LookupError):
    """A named thing (reservation, budget, rule) does not exist."""

    def __init__(self, kind: str, ident: str):
        super().__init__(f"{kind} {ident!r} not found")
        self.kind = kind
        self.ident = ident


class Conflict(P402Error):
    """The request contradicts current state (e.g. a reservation already settled)."""


__all__ = [
    "Decision",
    "Outcome",
    "Evidence",
    "Period",
    "Enforcement",
    "PrivacyMode",
    "Effect",
    "RateUnit",
    "OWNER_KEYS",
    "MAX_LABELS",
    "MAX_STRING",
    "MAX_TOKENS",
    "BUDGET_EXCEEDED",
    "BUDGET_SOFT_LIMIT",
    "BUDGET_CLAMPED",
    "PRICE_UNKNOWN_MODEL",
    "POLICY_DENIED",
    "POLICY_WARNED",
    "POLICY_OWNER_MISSING",
    "POLICY_MODEL_NOT_ALLOWED",
    "POLICY_OUTPUT_CLAMPED",
    "POLICY_COST_TOO_HIGH",
    "POLICY_RATE_LIMITED",
    "POLICY_PRIVACY_MODE_NOT_ALLOWED",
    "P402Error",
    "InvalidArgument",
    "UnknownModel",
    "NotFound",
    "Conflict",
]
