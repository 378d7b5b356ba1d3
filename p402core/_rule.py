"""The policy rule spec (`Rule`), shared by both policy twins.

A `Rule` is configuration, not hot-path state: it is validated once, here, and
then compiled by a `RuleSet` (`_policy_py` or `_policy_c`) into flat structures.
Like `_enums`, it is one plain-Python class used by both twins, so a rule means
exactly the same thing (and fails validation with exactly the same error)
whichever twin evaluates it, and one list of rules can feed both.

Validation is strict on purpose: a field that has no meaning for the rule's
effect (say `max_output_tokens` on a DENY rule) is rejected rather than silently
ignored, because a policy file with such a field almost always has a typo in it.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Any, Iterable, Mapping

from ._enums import (
    MAX_LABELS,
    MAX_STRING,
    MAX_TOKENS,
    OWNER_KEYS,
    Effect,
    InvalidArgument,
    PrivacyMode,
    RateUnit,
)

# A rule's free-text message (shown to operators) may be longer than an id.
MAX_MESSAGE = 1024
# Longest rate-limit window: one year. Longer is a budget, not a rate.
MAX_WINDOW_SECONDS = 366 * 86_400
# Token buckets are tracked exactly in "unit-milliseconds" (units x window_ms)
# in signed 64-bit integers: rate_limit * window_seconds * 1000 must stay below
# this bound (2**62 leaves headroom for the sums the compiled twin forms).
MAX_BUCKET_SCALED = 1 << 62
# The largest money amount a rule may name (nano-USD): the int64 range, halved.
MAX_NANOS = 1 << 62

_OWNER_INDEX = {name: i for i, name in enumerate(OWNER_KEYS)}
_LABEL_PREFIX = "label."
_GLOB_CHARS = frozenset("*?[")

_DEFAULTS: dict[str, Any] = {
    "owners": {},
    "models": (),
    "providers": (),
    "privacy_modes": (),
    "require_owners": (),
    "allow_models": (),
    "max_output_tokens": 0,
    "max_cost_nanos": 0,
    "rate_limit": 0,
    "rate_unit": RateUnit.REQUESTS,
    "window_seconds": 60,
    "per": "",
    "allowed_privacy_modes": (),
    "message": "",
}

# Which optional fields each effect uses (anything else must stay at its default).
_EFFECT_FIELDS = {
    Effect.DENY: (),
    Effect.WARN: (),
    Effect.REQUIRE_OWNERS: ("require_owners",),
    Effect.ALLOW_MODELS: ("allow_models",),
    Effect.MAX_OUTPUT_TOKENS: ("max_output_tokens",),
    Effect.MAX_COST_PER_REQUEST: ("max_cost_nanos",),
    Effect.RATE_LIMIT: ("rate_limit", "rate_unit", "window_seconds", "per"),
    Effect.PRIVACY: ("allowed_privacy_modes",),
}
_EFFECT_ONLY_FIELDS = (
    "require_owners", "allow_models", "max_output_tokens", "max_cost_nanos",
    "rate_limit", "rate_unit", "window_seconds", "per", "allowed_privacy_modes",
)


def parse_key(field: str, key: Any) -> tuple[int, str]:
    """An owner dimension -> (index, ""); "label.<k>" -> (-1, k). Else InvalidArgument."""
    if not isinstance(key, str):
        raise InvalidArgument(field, f"keys must be str, not {type(key).__name__}")
    index = _OWNER_INDEX.get(key)
    if index is not None:
        return index, ""
    if key.startswith(_LABEL_PREFIX):
        label = key[len(_LABEL_PREFIX):]
        if not label or len(label) > MAX_STRING:
            raise InvalidArgument(field, f"label key in {key!r} must be 1..{MAX_STRING} characters")
        return -1, label
    raise InvalidArgument(
        field, f"unknown owner dimension {key!r} (one of {', '.join(OWNER_KEYS)} or 'label.<key>')"
    )


def _enum(field: str, value: Any, enum: type) -> int:
    """An IntEnum member, its int value or its name -> int; UNSPECIFIED is unknown."""
    if isinstance(value, str):
        member = enum.__members__.get(value.upper())
        if member is None or member.value == 0:
            raise InvalidArgument(field, f"unknown {enum.__name__} {value!r}")
        return int(member)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be a {enum.__name__}, not {type(value).__name__}")
    try:
        member = enum(value)
    except ValueError:
        member = None
    if member is None or member.value == 0:
        raise InvalidArgument(field, f"unknown {enum.__name__} value {value!r}")
    return int(member)


def _int(field: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be an int, not {type(value).__name__}")
    if value < lo or value > hi:
        raise InvalidArgument(field, f"must be in {lo}..{hi}, not {value}")
    return int(value)


def _str(field: str, value: Any, *, limit: int = MAX_STRING, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(field, f"must be a str, not {type(value).__name__}")
    if not empty and not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > limit:
        raise InvalidArgument(field, f"longer than {limit} characters")
    # A str subclass becomes a plain str: the compiled twin types these as `str`.
    return value if type(value) is str else str.__str__(value)


def _strings(field: str, values: Any) -> tuple[str, ...]:
    """A str (one item) or an iterable of non-empty str -> tuple, order kept, deduplicated."""
    if isinstance(values, str):
        values = (values,)
    if values is None or isinstance(values, (bytes, Mapping)):
        raise InvalidArgument(field, "must be a list of str")
    try:
        items = list(values)
    except TypeError:
        raise InvalidArgument(field, "must be a list of str") from None
    return tuple(dict.fromkeys(_str(field, item, empty=False) for item in items))


def _modes(field: str, values: Any) -> tuple[int, ...]:
    if isinstance(values, (str, int)):
        values = (values,)
    try:
        items = list(values)
    except TypeError:
        raise InvalidArgument(field, "must be a list of PrivacyMode") from None
    return tuple(sorted({_enum(field, item, PrivacyMode) for item in items}))


def split_globs(globs: Iterable[str]) -> tuple[frozenset, tuple, Any]:
    """fnmatch globs -> (exact names, literal prefixes, one compiled regex or None).

    Most globs are a plain name or "literal*", which a set lookup or a
    `startswith` answers; only the rest go through one combined regex. Matching
    is case-sensitive (`fnmatch.fnmatchcase` semantics) on every platform.
    """
    exact, prefixes, general = set(), [], []
    for glob in globs:
        if not _GLOB_CHARS.intersection(glob):
            exact.add(glob)
        elif glob.endswith("*") and not _GLOB_CHARS.intersection(glob[:-1]):
            prefixes.append(glob[:-1])
        else:
            general.append(fnmatch.translate(glob))
    regex = re.compile("|".join(f"(?:{p})" for p in general)) if general else None
    return frozenset(exact), tuple(prefixes), regex


class Rule:
    """One policy rule: a match and an effect (DESIGN §7). Immutable once built.

    Match (all given conditions must hold; an empty condition matches anything):
    `owners` {dimension or "label.<key>": value} compared exactly ("" matches an
    absent owner or label), `models` fnmatch globs, `providers` exact names,
    `privacy_modes` PrivacyMode values.

    Effect parameters: `require_owners` (REQUIRE_OWNERS), `allow_models`
    (ALLOW_MODELS), `max_output_tokens` (MAX_OUTPUT_TOKENS), `max_cost_nanos`
    (MAX_COST_PER_REQUEST), `rate_limit` / `rate_unit` / `window_seconds` / `per`
    (RATE_LIMIT: a token bucket of `rate_limit` units refilled every
    `window_seconds`, one per value of the owner dimension `per`, "" = one
    bucket for the rule), `allowed_privacy_modes` (PRIVACY). Each is required by
    its effect and refused on any other.
    """

    __slots__ = (
        "rule_id", "effect", "_owners", "models", "providers", "privacy_modes",
        "require_owners", "allow_models", "max_output_tokens", "max_cost_nanos",
        "rate_limit", "rate_unit", "window_seconds", "per", "allowed_privacy_modes",
        "message",
    )

    def __init__(
        self,
        rule_id: str,
        effect: Any,
        *,
        owners: Mapping[str, str] | None = None,
        models: Iterable[str] = (),
        providers: Iterable[str] = (),
        privacy_modes: Iterable[Any] = (),
        require_owners: Iterable[str] = (),
        allow_models: Iterable[str] = (),
        max_output_tokens: int = 0,
        max_cost_nanos: int = 0,
        rate_limit: int = 0,
        rate_unit: Any = RateUnit.REQUESTS,
        window_seconds: int = 60,
        per: str = "",
        allowed_privacy_modes: Iterable[Any] = (),
        message: str = "",
    ):
        put = object.__setattr__
        put(self, "rule_id", _str("rule_id", rule_id, empty=False))
        eff = _enum("effect", effect, Effect)
        put(self, "effect", eff)

        conds: list[tuple[str, str]] = []
        if owners is not None:
            if not isinstance(owners, Mapping):
                raise InvalidArgument("owners", "must be a mapping {dimension: value}")
            labels = 0
            for key, value in owners.items():
                index, label = parse_key("owners", key)
                labels += index < 0
                conds.append((key, _str("owners", value)))
            if labels > MAX_LABELS:
                raise InvalidArgument("owners", f"more than {MAX_LABELS} label conditions")
        # Canonical order: owner dimensions in OWNER_KEYS order, then labels by key.
        conds.sort(key=lambda kv: (_OWNER_INDEX.get(kv[0], len(OWNER_KEYS)), kv[0]))
        put(self, "_owners", tuple(conds))
        put(self, "models", _strings("models", models))
        put(self, "providers", _strings("providers", providers))
        put(self, "privacy_modes", _modes("privacy_modes", privacy_modes))

        req = _strings("require_owners", require_owners)
        for key in req:
            parse_key("require_owners", key)
        put(self, "require_owners", req)
        put(self, "allow_models", _strings("allow_models", allow_models))
        put(self, "max_output_tokens", _int("max_output_tokens", max_output_tokens, 0, MAX_TOKENS))
        put(self, "max_cost_nanos", _int("max_cost_nanos", max_cost_nanos, 0, MAX_NANOS))
        put(self, "rate_limit", _int("rate_limit", rate_limit, 0, MAX_NANOS))
        put(self, "rate_unit", _enum("rate_unit", rate_unit, RateUnit))
        put(self, "window_seconds", _int("window_seconds", window_seconds, 1, MAX_WINDOW_SECONDS))
        per = _str("per", per)
        if per and per not in _OWNER_INDEX:
            raise InvalidArgument("per", f"unknown owner dimension {per!r} (one of {', '.join(OWNER_KEYS)})")
        put(self, "per", per)
        put(self, "allowed_privacy_modes", _modes("allowed_privacy_modes", allowed_privacy_modes))
        put(self, "message", _str("message", message, limit=MAX_MESSAGE))
        self._check_effect_fields()

    def _check_effect_fields(self) -> None:
        eff = Effect(self.effect)
        used = _EFFECT_FIELDS[eff]
        for name in _EFFECT_ONLY_FIELDS:
            if name not in used and getattr(self, name) != _DEFAULTS[name]:
                raise InvalidArgument(name, f"has no meaning for effect {eff.name}")
        if eff is Effect.REQUIRE_OWNERS and not self.require_owners:
            raise InvalidArgument("require_owners", "REQUIRE_OWNERS needs at least one owner dimension")
        elif eff is Effect.ALLOW_MODELS and not self.allow_models:
            raise InvalidArgument("allow_models", "ALLOW_MODELS needs at least one model glob")
        elif eff is Effect.MAX_OUTPUT_TOKENS and self.max_output_tokens <= 0:
            raise InvalidArgument("max_output_tokens", "MAX_OUTPUT_TOKENS needs max_output_tokens > 0")
        elif eff is Effect.MAX_COST_PER_REQUEST and self.max_cost_nanos <= 0:
            raise InvalidArgument("max_cost_nanos", "MAX_COST_PER_REQUEST needs max_cost_nanos > 0")
        elif eff is Effect.RATE_LIMIT:
            if self.rate_limit <= 0:
                raise InvalidArgument("rate_limit", "RATE_LIMIT needs rate_limit > 0")
            if self.rate_limit * self.window_seconds * 1000 > MAX_BUCKET_SCALED:
                raise InvalidArgument(
                    "rate_limit",
                    f"rate_limit x window_seconds x 1000 must not exceed {MAX_BUCKET_SCALED}",
                )
        elif eff is Effect.PRIVACY and not self.allowed_privacy_modes:
            raise InvalidArgument("allowed_privacy_modes", "PRIVACY needs at least one allowed mode")

    # -- immutability -----------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Rule is immutable (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Rule is immutable (cannot delete {name!r})")

    @property
    def owners(self) -> dict[str, str]:
        """Match conditions {dimension or "label.<key>": value} (a copy)."""
        return dict(self._owners)

    @property
    def owner_conditions(self) -> tuple[tuple[str, str], ...]:
        """The match conditions as (key, value) pairs in canonical order."""
        return self._owners

    @property
    def limiter_key(self) -> tuple:
        """What a rate-limit bucket's meaning depends on: bucket state carries over
        between rule sets only for a rule with the same id and this same key."""
        return (self.rate_limit, self.rate_unit, self.window_seconds, self.per)

    # -- storage / admin API --------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: enums by name, fields at their default left out."""
        out: dict[str, Any] = {"rule_id": self.rule_id, "effect": Effect(self.effect).name}
        if self._owners:
            out["owners"] = dict(self._owners)
        for name in ("models", "providers", "require_owners", "allow_models"):
            if getattr(self, name):
                out[name] = list(getattr(self, name))
        for name in ("privacy_modes", "allowed_privacy_modes"):
            if getattr(self, name):
                out[name] = [PrivacyMode(m).name for m in getattr(self, name)]
        for name in ("max_output_tokens", "max_cost_nanos", "rate_limit"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.effect == Effect.RATE_LIMIT:
            out["rate_unit"] = RateUnit(self.rate_unit).name
            out["window_seconds"] = self.window_seconds
            if self.per:
                out["per"] = self.per
        if self.message:
            out["message"] = self.message
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Rule":
        """Inverse of `to_dict` (enums by name or value); unknown keys are refused."""
        if not isinstance(d, Mapping):
            raise InvalidArgument("rule", "must be a mapping")
        unknown = set(d) - set(_DEFAULTS) - {"rule_id", "effect"}
        if unknown:
            raise InvalidArgument(sorted(unknown)[0], "unknown rule field")
        if "rule_id" not in d:
            raise InvalidArgument("rule_id", "missing")
        if "effect" not in d:
            raise InvalidArgument("effect", "missing")
        kwargs = {k: v for k, v in d.items() if k not in ("rule_id", "effect")}
        return cls(d["rule_id"], d["effect"], **kwargs)

    def _key(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Rule):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Rule.from_dict({self.to_dict()!r})"


def as_rule(item: Any) -> Rule:
    """A Rule, or a mapping in `Rule.to_dict` form -> Rule."""
    if isinstance(item, Rule):
        return item
    if isinstance(item, Mapping):
        return Rule.from_dict(item)
    raise InvalidArgument("rules", f"each rule must be a Rule or a mapping, not {type(item).__name__}")


__all__ = ["Rule"]


# -- argument checks shared by both twins' public entry points -------------------------
# The compiled twin takes a fast path for well-formed arguments and calls these
# for everything else, so both raise the same InvalidArgument on bad input.

_NO_OWNERS = ("",) * len(OWNER_KEYS)


def owners_arg(owners: Any) -> tuple:
    """A 6-tuple of str in OWNER_KEYS order, a mapping {dimension: value} or None."""
    if owners is None:
        return _NO_OWNERS
    if isinstance(owners, Mapping):
        out = ["", "", "", "", "", ""]
        for key, value in owners.items():
            index = _OWNER_INDEX.get(key) if isinstance(key, str) else None
            if index is None:
                raise InvalidArgument("owners", f"unknown owner dimension {key!r}")
            out[index] = _str("owners", value)
        return tuple(out)
    if isinstance(owners, (tuple, list)):
        if len(owners) != len(OWNER_KEYS):
            raise InvalidArgument("owners", f"must have {len(OWNER_KEYS)} values ({', '.join(OWNER_KEYS)})")
        return tuple(_str("owners", value) for value in owners)
    raise InvalidArgument("owners", f"must be a mapping or a 6-tuple, not {type(owners).__name__}")


def labels_arg(labels: Any) -> dict | None:
    """None or a mapping of at most MAX_LABELS str -> str (key non-empty)."""
    if labels is None:
        return None
    if not isinstance(labels, Mapping):
        raise InvalidArgument("labels", f"must be a mapping, not {type(labels).__name__}")
    if len(labels) > MAX_LABELS:
        raise InvalidArgument("labels", f"more than {MAX_LABELS} labels")
    exact = type(labels) is dict
    for key, value in labels.items():
        exact &= type(key) is str and type(value) is str
        _str("labels", key, empty=False)
        _str("labels", value)
    if exact:
        return labels
    return {_str("labels", k): _str("labels", v) for k, v in labels.items()}


def str_arg(field: str, value: Any) -> str:
    return _str(field, value)


def privacy_arg(value: Any) -> int:
    """A PrivacyMode (member or int). UNSPECIFIED (0) means the default, METADATA_ONLY."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument("privacy_mode", f"must be a PrivacyMode, not {type(value).__name__}")
    if value < 0 or value > int(PrivacyMode.FULL_TRACE):
        raise InvalidArgument("privacy_mode", f"unknown PrivacyMode value {value!r}")
    return int(value) or int(PrivacyMode.METADATA_ONLY)


def parse_rate_state(state: Any, limits: dict) -> list:
    """Validate a `RuleSet.snapshot()` against a rule set's limiters, given as
    {rule_id: (limiter_key, capacity, max_buckets)} -> [(rule_id, [(per value,
    level, last_ms), ...])] for the limiters whose id and key match (others
    start full, as after a rule change). Shared by both twins."""
    if not isinstance(state, Mapping) or state.get("version") != 1:
        raise InvalidArgument("state", "not a RuleSet snapshot (version 1)")
    entries = state.get("limiters", {})
    if not isinstance(entries, Mapping):
        raise InvalidArgument("limiters", "must be a mapping {rule_id: limiter state}")
    out = []
    for rule_id, entry in entries.items():
        field = f"limiters.{rule_id}"
        if not isinstance(entry, Mapping) or "key" not in entry or "buckets" not in entry:
            raise InvalidArgument(field, "must be a mapping with 'key' and 'buckets'")
        raw = entry["buckets"]
        if not isinstance(raw, (list, tuple)):
            raise InvalidArgument(field + ".buckets", "must be a list")
        limit = limits.get(rule_id)
        if limit is None or not isinstance(entry["key"], (list, tuple)) \
                or tuple(entry["key"]) != tuple(limit[0]):
            continue  # the rule is gone or its limit changed: its buckets start full
        key, capacity, max_buckets = limit
        buckets = []
        for item in raw[max(0, len(raw) - max_buckets):]:   # keep the most recent
            if not isinstance(item, (list, tuple)) or len(item) != 3:
                raise InvalidArgument(field + ".buckets", "each bucket is [per value, level, last_ms]")
            buckets.append((_str(field + ".buckets", item[0]),
                            _int(field + ".buckets", item[1], 0, capacity),
                            _int(field + ".buckets", item[2], 0, MAX_NANOS)))
        out.append((rule_id, buckets))
    return out


def count_arg(field: str, value: Any, hi: int) -> int:
    return _int(field, value, 0, hi)
