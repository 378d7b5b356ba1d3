"""Policy evaluation and rate limits — the pure-Python twin (the specification).

Owns: compiling a list of `Rule`s into a `RuleSet`, evaluating a request
against it (`evaluate` -> `PolicyResult`) and the token buckets of RATE_LIMIT
rules (`rate_check`, `rate_consume`, `retry_after_ms`). `_policy_c` is the
compiled twin, same API, same results bit for bit. The `Rule` spec itself lives
in `_rule` and is shared by both twins.

Evaluation (DESIGN §7). Every rule whose match holds is evaluated; the decision
is the most severe (DENY > WARN > ALLOW); `reasons` holds every reason code,
deduplicated, in rule order; `rule_ids` the ids of the rules that gave a
reason. Effects:

- DENY -> DENY `policy.denied`; WARN -> WARN `policy.warned`;
- REQUIRE_OWNERS -> DENY `policy.owner_missing` if any listed dimension is "";
- ALLOW_MODELS -> DENY `policy.model_not_allowed` if the model matches no glob;
- PRIVACY -> DENY `policy.privacy_mode_not_allowed` if the mode is not allowed;
- MAX_OUTPUT_TOKENS -> `output_cap`, the minimum over matching rules (0 = no
  cap), `output_cap_rule_id` the first rule holding it. No reason here: the
  engine adds `policy.output_clamped` only when the cap actually lowers the
  request's output (a cap above what was asked changes nothing).
- MAX_COST_PER_REQUEST -> `max_cost_nanos`, the minimum (0 = none), and
  `max_cost_rule_id`; the engine compares its estimate and adds
  `policy.cost_per_request_exceeded`.
- RATE_LIMIT -> the rule is remembered in the result (opaque) for the rate calls.

Rate limits. One token bucket per (rule, value of the rule's `per` owner
dimension; "" = one bucket for the rule; requests without a value for that
dimension share the "" bucket): capacity `rate_limit` units, refilled
continuously at `rate_limit` per `window_seconds`. Units: REQUESTS (1 per call),
TOKENS (the `tokens` argument), COST (the `cost_nanos` argument). The level is
kept exactly, in integers, as units x window_ms ("unit-milliseconds"): a
millisecond refills `rate_limit` of those and a unit costs `window_ms`, so no
rounding ever happens. Time is injected (`now_ms`); a clock that goes back
refills nothing. A request larger than the whole bucket never fits
(`retry_after_ms` says -1). `rate_consume` never takes a bucket below empty.

Bucket state belongs to the rule, not the RuleSet: `with_rules(rules)` builds a
new RuleSet in which each RATE_LIMIT rule with the same id and limiter
parameters (`Rule.limiter_key`) shares its buckets with the old one, so a policy
reload neither resets nor forgets anyone's usage. Buckets are bounded:
`max_buckets` per rule (default 65,536). When a new bucket pushes a rule past
it, buckets that have refilled completely are dropped first (lossless: a
missing bucket is a full one), then the least recently consumed ones until
7/8 of the cap remain (amortizes the sweep; those were idle longest, so
nearest to full).
"""
from __future__ import annotations

from sys import intern
from typing import Any, Iterable

from ._enums import (
    MAX_TOKENS,
    POLICY_DENIED,
    POLICY_MODEL_NOT_ALLOWED,
    POLICY_OWNER_MISSING,
    POLICY_PRIVACY_MODE_NOT_ALLOWED,
    POLICY_WARNED,
    Decision,
    Effect,
    InvalidArgument,
    RateUnit,
)
from ._rule import (
    MAX_NANOS,
    Rule,
    as_rule,
    count_arg,
    labels_arg,
    owners_arg,
    parse_key,
    parse_rate_state,
    privacy_arg,
    split_globs,
    str_arg,
)

DEFAULT_MAX_BUCKETS = 65_536

_ALLOW = int(Decision.ALLOW)
_WARN = int(Decision.WARN)
_DENY = int(Decision.DENY)
_E_DENY = int(Effect.DENY)
_E_WARN = int(Effect.WARN)
_E_REQUIRE = int(Effect.REQUIRE_OWNERS)
_E_ALLOW_MODELS = int(Effect.ALLOW_MODELS)
_E_MAX_OUT = int(Effect.MAX_OUTPUT_TOKENS)
_E_MAX_COST = int(Effect.MAX_COST_PER_REQUEST)
_E_RATE = int(Effect.RATE_LIMIT)
_E_PRIVACY = int(Effect.PRIVACY)
_U_REQUESTS = int(RateUnit.REQUESTS)
_U_TOKENS = int(RateUnit.TOKENS)


class PolicyResult:
    """The outcome of `RuleSet.evaluate`: data, never an exception. Read-only."""

    __slots__ = ("decision", "reasons", "rule_ids", "output_cap", "max_cost_nanos",
                 "output_cap_rule_id", "max_cost_rule_id", "_limiters")

    def __init__(self, decision: int = _ALLOW, reasons: tuple = (), rule_ids: tuple = (),
                 output_cap: int = 0, max_cost_nanos: int = 0,
                 output_cap_rule_id: str = "", max_cost_rule_id: str = ""):
        put = object.__setattr__
        put(self, "decision", int(decision))
        put(self, "reasons", tuple(reasons))
        put(self, "rule_ids", tuple(rule_ids))
        put(self, "output_cap", int(output_cap))
        put(self, "max_cost_nanos", int(max_cost_nanos))
        put(self, "output_cap_rule_id", str(output_cap_rule_id))
        put(self, "max_cost_rule_id", str(max_cost_rule_id))
        put(self, "_limiters", ())

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"PolicyResult is read-only (cannot set {name!r})")

    def __repr__(self) -> str:
        return (f"PolicyResult(decision={Decision(self.decision).name}, reasons={self.reasons!r}, "
                f"rule_ids={self.rule_ids!r}, output_cap={self.output_cap}, "
                f"max_cost_nanos={self.max_cost_nanos})")


class _Globs:
    """A rule's model globs, pre-split (see `_rule.split_globs`)."""

    __slots__ = ("exact", "prefixes", "regex")

    def __init__(self, globs: Iterable[str]):
        self.exact, self.prefixes, self.regex = split_globs(globs)

    def match(self, model: str) -> bool:
        if model in self.exact:
            return True
        if self.prefixes and model.startswith(self.prefixes):
            return True
        return self.regex is not None and self.regex.match(model) is not None


class _Bucket:
    __slots__ = ("level", "last_ms", "seq")

    def __init__(self, level: int, last_ms: int, seq: int = 0):
        self.level = level      # units x window_ms, 0..rate x window_ms
        self.last_ms = last_ms
        self.seq = seq          # the limiter's consume counter at the last consume


class _Limiter:
    """A RATE_LIMIT rule's parameters and its buckets {per value: _Bucket}."""

    __slots__ = ("rule_id", "key", "unit", "rate", "window_ms", "capacity", "per_index",
                 "buckets", "max_buckets", "seq")

    def __init__(self, rule: Rule, max_buckets: int):
        self.rule_id = rule.rule_id
        self.key = rule.limiter_key
        self.unit = rule.rate_unit
        self.rate = rule.rate_limit
        self.window_ms = rule.window_seconds * 1000
        self.capacity = self.rate * self.window_ms          # <= 2**62 (Rule checks)
        self.per_index = parse_key("per", rule.per)[0] if rule.per else -1
        self.buckets: dict = {}
        self.max_buckets = max_buckets
        self.seq = 0      # consume counter: buckets' last-use order (LRU)

    def demand(self, tokens: int, cost_nanos: int) -> int:
        if self.unit == _U_REQUESTS:
            return 1
        return tokens if self.unit == _U_TOKENS else cost_nanos

    def level(self, bucket: _Bucket | None, now_ms: int) -> int:
        """The bucket's level refilled up to now_ms (without storing it)."""
        if bucket is None:
            return self.capacity
        level = bucket.level
        if now_ms > bucket.last_ms:
            # A full window refills any bucket, so clamp first (no overflow in C).
            elapsed = min(now_ms - bucket.last_ms, self.window_ms)
            level = min(level + elapsed * self.rate, self.capacity)
        return level

    def wait_ms(self, owners: tuple, tokens: int, cost_nanos: int, now_ms: int) -> int:
        """0 if the demand fits now, else ms until it does; -1 if it never can."""
        n = self.demand(tokens, cost_nanos)
        if n > self.rate:
            return -1
        key = owners[self.per_index] if self.per_index >= 0 else ""
        deficit = n * self.window_ms - self.level(self.buckets.get(key), now_ms)
        if deficit <= 0:
            return 0
        return (deficit + self.rate - 1) // self.rate

    def consume(self, owners: tuple, tokens: int, cost_nanos: int, now_ms: int) -> None:
        n = self.demand(tokens, cost_nanos)
        key = owners[self.per_index] if self.per_index >= 0 else ""
        buckets = self.buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = _Bucket(self.capacity, now_ms)
            new = True
        else:
            bucket.level = self.level(bucket, now_ms)
            if now_ms > bucket.last_ms:
                bucket.last_ms = now_ms
            new = False
        self.seq += 1
        bucket.seq = self.seq
        if n >= self.rate:
            bucket.level = 0
        else:
            bucket.level = max(bucket.level - n * self.window_ms, 0)
        if new and len(buckets) > self.max_buckets:
            self._evict(now_ms)

    def lru(self) -> list:
        """(key, bucket) pairs, least recently consumed first."""
        return sorted(self.buckets.items(), key=lambda kb: kb[1].seq)

    def _evict(self, now_ms: int) -> None:
        buckets = self.buckets
        for key in [k for k, b in buckets.items() if self.level(b, now_ms) >= self.capacity]:
            del buckets[key]
        target = self.max_buckets - self.max_buckets // 8
        if len(buckets) > target:
            for key, _ in self.lru()[: len(buckets) - target]:
                del buckets[key]


class _Compiled:
    """One rule, flattened for evaluation."""

    __slots__ = ("rule_id", "effect", "owner_conds", "label_conds", "providers", "pmask",
                 "models", "req_owners", "req_labels", "allow", "allowed_pmask", "limit",
                 "limiter")

    def __init__(self, rule: Rule, limiter: _Limiter | None):
        self.rule_id = rule.rule_id
        self.effect = rule.effect
        owner_conds, label_conds = [], []
        for key, value in rule.owner_conditions:
            index, label = parse_key("owners", key)
            if index >= 0:
                owner_conds.append((index, intern(value)))
            else:
                label_conds.append((intern(label), intern(value)))
        self.owner_conds = tuple(owner_conds)
        self.label_conds = tuple(label_conds)
        self.providers = frozenset(rule.providers)
        self.pmask = _mask(rule.privacy_modes)
        self.models = _Globs(rule.models) if rule.models else None
        req_owners, req_labels = [], []
        for key in rule.require_owners:
            index, label = parse_key("require_owners", key)
            if index >= 0:
                req_owners.append(index)
            else:
                req_labels.append(intern(label))
        self.req_owners = tuple(req_owners)
        self.req_labels = tuple(req_labels)
        self.allow = _Globs(rule.allow_models) if rule.allow_models else None
        self.allowed_pmask = _mask(rule.allowed_privacy_modes)
        self.limit = rule.max_output_tokens or rule.max_cost_nanos
        self.limiter = limiter

    def matches(self, owners: tuple, labels: dict | None, model: str, provider: str,
                privacy_mode: int) -> bool:
        if self.pmask and not (self.pmask >> privacy_mode) & 1:
            return False
        for index, value in self.owner_conds:
            if owners[index] != value:
                return False
        for key, value in self.label_conds:
            if (labels.get(key, "") if labels else "") != value:
                return False
        if self.providers and provider not in self.providers:
            return False
        return self.models is None or self.models.match(model)


def _mask(modes: Iterable[int]) -> int:
    mask = 0
    for mode in modes:
        mask |= 1 << mode
    return mask


class RuleSet:
    """An immutable, compiled list of rules plus the rate-limit bucket state.

    Replacing the rules is building a new RuleSet (`with_rules` carries bucket
    state over); the engine swaps the reference, which is atomic.
    """

    def __init__(self, rules: Iterable[Any] = (), *, max_buckets: int = DEFAULT_MAX_BUCKETS):
        if isinstance(rules, (str, bytes)) or isinstance(rules, dict):
            raise InvalidArgument("rules", "must be a list of rules")
        try:
            items = list(rules)
        except TypeError:
            raise InvalidArgument("rules", "must be a list of rules") from None
        self.max_buckets = count_arg("max_buckets", max_buckets, MAX_NANOS)
        if self.max_buckets < 1:
            raise InvalidArgument("max_buckets", "must be at least 1")
        parsed = tuple(as_rule(item) for item in items)
        seen: set = set()
        for rule in parsed:
            if rule.rule_id in seen:
                raise InvalidArgument("rules", f"duplicate rule_id {rule.rule_id!r}")
            seen.add(rule.rule_id)
        self.rules = parsed
        self._limiters: dict = {}
        compiled = []
        for rule in parsed:
            limiter = None
            if rule.effect == _E_RATE:
                limiter = self._limiters[rule.rule_id] = _Limiter(rule, self.max_buckets)
            compiled.append(_Compiled(rule, limiter))
        self._crules = tuple(compiled)

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"RuleSet({len(self.rules)} rules)"

    def with_rules(self, rules: Iterable[Any]) -> "RuleSet":
        """A new RuleSet of `rules`; RATE_LIMIT rules whose id and limiter
        parameters are unchanged keep their buckets (shared, not copied)."""
        new = RuleSet(rules, max_buckets=self.max_buckets)
        for rule_id, limiter in new._limiters.items():
            old = self._limiters.get(rule_id)
            if old is not None and old.key == limiter.key:
                limiter.buckets = old.buckets
                limiter.seq = old.seq   # the LRU order continues
        return new

    # -- rate-limit state ---------------------------------------------------------------
    def snapshot(self) -> dict:
        """Rate-limit bucket state as plain data: {"version": 1, "limiters":
        {rule_id: {"key": [rate_limit, rate_unit, window_seconds, per],
        "buckets": [[per value, level, last_ms], ...]}}}, buckets least
        recently used first. Levels are in unit-milliseconds (module docstring)."""
        return {"version": 1, "limiters": {
            rule_id: {"key": list(lim.key),
                      "buckets": [[k, b.level, b.last_ms] for k, b in lim.lru()]}
            for rule_id, lim in self._limiters.items()}}

    def restore(self, state: Any) -> None:
        """Put bucket state from `snapshot()` back into this set's RATE_LIMIT
        rules with the same id and `limiter_key` (others start full, as after
        a rule change). Validated first; nothing changes on InvalidArgument."""
        limits = {rule_id: (lim.key, lim.capacity, lim.max_buckets)
                  for rule_id, lim in self._limiters.items()}
        for rule_id, buckets in parse_rate_state(state, limits):
            limiter = self._limiters[rule_id]
            limiter.buckets.clear()
            for key, level, last_ms in buckets:
                limiter.seq += 1
                limiter.buckets[key] = _Bucket(level, last_ms, limiter.seq)

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, owners: Any, labels: Any, model: Any, provider: Any,
                 privacy_mode: Any) -> PolicyResult:
        """Every matching rule, most severe decision, all reasons (module docstring)."""
        return self._evaluate(owners_arg(owners), labels_arg(labels), str_arg("model", model),
                              str_arg("provider", provider), privacy_arg(privacy_mode))

    def _evaluate(self, owners: tuple, labels: dict | None, model: str, provider: str,
                  privacy_mode: int) -> PolicyResult:
        decision = _ALLOW
        reasons: list[str] = []
        rule_ids: list[str] = []
        output_cap = max_cost = 0
        cap_id = cost_id = ""
        limiters: list[_Limiter] = []
        for rule in self._crules:
            if not rule.matches(owners, labels, model, provider, privacy_mode):
                continue
            effect = rule.effect
            reason = None
            severity = _DENY
            if effect == _E_DENY:
                reason = POLICY_DENIED
            elif effect == _E_WARN:
                reason, severity = POLICY_WARNED, _WARN
            elif effect == _E_REQUIRE:
                if any(not owners[i] for i in rule.req_owners) or any(
                    not (labels.get(k, "") if labels else "") for k in rule.req_labels
                ):
                    reason = POLICY_OWNER_MISSING
            elif effect == _E_ALLOW_MODELS:
                if not rule.allow.match(model):
                    reason = POLICY_MODEL_NOT_ALLOWED
            elif effect == _E_PRIVACY:
                if not (rule.allowed_pmask >> privacy_mode) & 1:
                    reason = POLICY_PRIVACY_MODE_NOT_ALLOWED
            elif effect == _E_MAX_OUT:
                if not output_cap or rule.limit < output_cap:
                    output_cap, cap_id = rule.limit, rule.rule_id
            elif effect == _E_MAX_COST:
                if not max_cost or rule.limit < max_cost:
                    max_cost, cost_id = rule.limit, rule.rule_id
            elif effect == _E_RATE:
                limiters.append(rule.limiter)
            if reason is not None:
                if severity > decision:
                    decision = severity
                if reason not in reasons:
                    reasons.append(reason)
                rule_ids.append(rule.rule_id)
        result = PolicyResult(decision, tuple(reasons), tuple(rule_ids), output_cap, max_cost,
                              cap_id, cost_id)
        object.__setattr__(result, "_limiters", tuple(limiters))
        return result

    # -- rate limits ----------------------------------------------------------------------
    @staticmethod
    def _rate_args(result: Any, owners: Any, tokens: Any, cost_nanos: Any, now_ms: Any) -> tuple:
        if not isinstance(result, PolicyResult):
            raise TypeError(f"result must be a PolicyResult, not {type(result).__name__}")
        return (owners_arg(owners), count_arg("tokens", tokens, MAX_TOKENS),
                count_arg("cost_nanos", cost_nanos, MAX_NANOS),
                count_arg("now_ms", now_ms, MAX_NANOS))

    def rate_check(self, result: PolicyResult, owners: Any, tokens: Any, cost_nanos: Any,
                   now_ms: Any) -> str:
        """"" if every matching RATE_LIMIT bucket has room, else the first rule_id
        whose bucket has not. Consumes nothing."""
        owners, tokens, cost_nanos, now_ms = self._rate_args(result, owners, tokens, cost_nanos, now_ms)
        for limiter in result._limiters:
            if limiter.wait_ms(owners, tokens, cost_nanos, now_ms) != 0:
                return limiter.rule_id
        return ""

    def rate_consume(self, result: PolicyResult, owners: Any, tokens: Any, cost_nanos: Any,
                     now_ms: Any) -> None:
        """Deduct the demand from every matching RATE_LIMIT bucket (floored at empty)."""
        owners, tokens, cost_nanos, now_ms = self._rate_args(result, owners, tokens, cost_nanos, now_ms)
        for limiter in result._limiters:
            limiter.consume(owners, tokens, cost_nanos, now_ms)

    def retry_after_ms(self, result: PolicyResult, owners: Any, tokens: Any, cost_nanos: Any,
                       now_ms: Any) -> int:
        """Milliseconds until every matching bucket has room for this demand
        (0 = now), or -1 if the demand exceeds some bucket's whole capacity."""
        owners, tokens, cost_nanos, now_ms = self._rate_args(result, owners, tokens, cost_nanos, now_ms)
        wait = 0
        for limiter in result._limiters:
            w = limiter.wait_ms(owners, tokens, cost_nanos, now_ms)
            if w < 0:
                return -1
            if w > wait:
                wait = w
        return wait


__all__ = ["Rule", "RuleSet", "PolicyResult"]
