"""Policies: rule validation, evaluation, rate limits — run against both twins."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p402core._enums import (
    MAX_STRING,
    POLICY_DENIED,
    POLICY_MODEL_NOT_ALLOWED,
    POLICY_OWNER_MISSING,
    POLICY_PRIVACY_MODE_NOT_ALLOWED,
    POLICY_WARNED,
    Decision,
    Effect,
    InvalidArgument,
    PrivacyMode,
    RateUnit,
)

ALLOW, WARN, DENY = int(Decision.ALLOW), int(Decision.WARN), int(Decision.DENY)
MD = int(PrivacyMode.METADATA_ONLY)
NOBODY = ("",) * 6


def owners(**kw):
    keys = ("customer", "feature", "workflow", "task", "department", "employee")
    return tuple(kw.get(k, "") for k in keys)


@pytest.fixture
def pol(impl):
    """The policy module of the twin under test (Rule, RuleSet, PolicyResult)."""
    return impl.module("policy")


def ev(rs, model="gpt-4o", *, who=NOBODY, labels=None, provider="openai", mode=MD):
    return rs.evaluate(who, labels, model, provider, mode)


def summary(r):
    return (r.decision, r.reasons, r.rule_ids, r.output_cap, r.max_cost_nanos,
            r.output_cap_rule_id, r.max_cost_rule_id)


# -- Rule: validation and storage ------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(rule_id="", effect="DENY"), "rule_id"),
    (dict(rule_id="x" * (MAX_STRING + 1), effect="DENY"), "rule_id"),
    (dict(rule_id=7, effect="DENY"), "rule_id"),
    (dict(rule_id="r", effect="EXPLODE"), "effect"),
    (dict(rule_id="r", effect=0), "effect"),
    (dict(rule_id="r", effect=99), "effect"),
    (dict(rule_id="r", effect="DENY", owners={"region": "eu"}), "owners"),
    (dict(rule_id="r", effect="DENY", owners={"label.": "x"}), "owners"),
    (dict(rule_id="r", effect="DENY", owners={"customer": 3}), "owners"),
    (dict(rule_id="r", effect="DENY", owners={"customer": "x" * (MAX_STRING + 1)}), "owners"),
    (dict(rule_id="r", effect="DENY", owners=["customer"]), "owners"),
    (dict(rule_id="r", effect="DENY", models=["gpt-4*", ""]), "models"),
    (dict(rule_id="r", effect="DENY", models=["x" * (MAX_STRING + 1)]), "models"),
    (dict(rule_id="r", effect="DENY", providers=[None]), "providers"),
    (dict(rule_id="r", effect="DENY", privacy_modes=["SECRET"]), "privacy_modes"),
    (dict(rule_id="r", effect="REQUIRE_OWNERS"), "require_owners"),
    (dict(rule_id="r", effect="REQUIRE_OWNERS", require_owners=["team"]), "require_owners"),
    (dict(rule_id="r", effect="ALLOW_MODELS"), "allow_models"),
    (dict(rule_id="r", effect="MAX_OUTPUT_TOKENS"), "max_output_tokens"),
    (dict(rule_id="r", effect="MAX_OUTPUT_TOKENS", max_output_tokens=-1), "max_output_tokens"),
    (dict(rule_id="r", effect="MAX_COST_PER_REQUEST", max_cost_nanos=0), "max_cost_nanos"),
    (dict(rule_id="r", effect="MAX_COST_PER_REQUEST", max_cost_nanos=-5), "max_cost_nanos"),
    (dict(rule_id="r", effect="RATE_LIMIT"), "rate_limit"),
    (dict(rule_id="r", effect="RATE_LIMIT", rate_limit=-1), "rate_limit"),
    (dict(rule_id="r", effect="RATE_LIMIT", rate_limit=True), "rate_limit"),
    (dict(rule_id="r", effect="RATE_LIMIT", rate_limit=10, window_seconds=0), "window_seconds"),
    (dict(rule_id="r", effect="RATE_LIMIT", rate_limit=10, window_seconds=-60), "window_seconds"),
    (dict(rule_id="r", effect="RATE_LIMIT", rate_limit=10, rate_unit="BYTES"), "rate_unit"),
    (dict(rule_id="r", effect="RATE_LIMIT", rate_limit=10, per="region"), "per"),
    (dict(rule_id="r", effect="RATE_LIMIT", rate_limit=2**61, window_seconds=60), "rate_limit"),
    (dict(rule_id="r", effect="PRIVACY"), "allowed_privacy_modes"),
    # a field that has no meaning for the effect is a typo, not a no-op
    (dict(rule_id="r", effect="DENY", max_output_tokens=10), "max_output_tokens"),
    (dict(rule_id="r", effect="WARN", rate_limit=10), "rate_limit"),
    (dict(rule_id="r", effect="DENY", per="customer"), "per"),
    (dict(rule_id="r", effect="DENY", message="m" * 5000), "message"),
])
def test_rule_validation_names_the_field(pol, kwargs, field):
    kwargs = dict(kwargs)
    with pytest.raises(InvalidArgument) as err:
        pol.Rule(kwargs.pop("rule_id"), kwargs.pop("effect"), **kwargs)
    assert err.value.field == field


def test_rule_round_trips_through_dict_with_enum_names(pol):
    rules = [
        pol.Rule("rl", Effect.RATE_LIMIT, owners={"customer": "acme", "label.env": "prod"},
                 models=["gpt-4*"], providers=["openai"], privacy_modes=[PrivacyMode.FULL_TRACE],
                 rate_limit=1000, rate_unit=RateUnit.TOKENS, window_seconds=60, per="feature",
                 message="slow down"),
        pol.Rule("p", "PRIVACY", allowed_privacy_modes=["METADATA_ONLY", 2]),
        pol.Rule("ro", "require_owners", require_owners=["customer", "label.project"]),
        pol.Rule("c", int(Effect.MAX_COST_PER_REQUEST), max_cost_nanos=5_000_000),
    ]
    d = rules[0].to_dict()
    assert d["effect"] == "RATE_LIMIT" and d["rate_unit"] == "TOKENS"
    assert d["privacy_modes"] == ["FULL_TRACE"]
    assert rules[1].to_dict()["allowed_privacy_modes"] == ["METADATA_ONLY", "FINGERPRINT_ONLY"]
    for rule in rules:
        again = pol.Rule.from_dict(rule.to_dict())
        assert again == rule and again.to_dict() == rule.to_dict()


def test_rule_from_dict_refuses_unknown_and_missing_fields(pol):
    with pytest.raises(InvalidArgument) as err:
        pol.Rule.from_dict({"rule_id": "r", "effect": "DENY", "modles": ["x"]})
    assert err.value.field == "modles"
    with pytest.raises(InvalidArgument) as err:
        pol.Rule.from_dict({"effect": "DENY"})
    assert err.value.field == "rule_id"


def test_rule_is_immutable(pol):
    rule = pol.Rule("r", "DENY")
    with pytest.raises(AttributeError):
        rule.effect = int(Effect.WARN)


def test_ruleset_refuses_duplicate_ids_and_bad_items(pol):
    with pytest.raises(InvalidArgument) as err:
        pol.RuleSet([pol.Rule("a", "DENY"), pol.Rule("a", "WARN")])
    assert err.value.field == "rules"
    with pytest.raises(InvalidArgument) as err:
        pol.RuleSet(["DENY"])
    assert err.value.field == "rules"
    with pytest.raises(InvalidArgument) as err:
        pol.RuleSet([], max_buckets=0)
    assert err.value.field == "max_buckets"


def test_ruleset_accepts_rule_dicts(pol):
    rs = pol.RuleSet([{"rule_id": "d", "effect": "DENY", "models": ["o1*"]}])
    assert rs.rules == (pol.Rule("d", "DENY", models=["o1*"]),)
    assert ev(rs, "o1-mini").decision == DENY
    assert ev(rs, "gpt-4o").decision == ALLOW


# -- each effect alone ----------------------------------------------------------------

def test_no_rules_allows_with_nothing(pol):
    r = ev(pol.RuleSet())
    assert summary(r) == (ALLOW, (), (), 0, 0, "", "")


def test_deny_and_warn(pol):
    assert summary(ev(pol.RuleSet([pol.Rule("d", "DENY")])))[:3] == (DENY, (POLICY_DENIED,), ("d",))
    assert summary(ev(pol.RuleSet([pol.Rule("w", "WARN")])))[:3] == (WARN, (POLICY_WARNED,), ("w",))


def test_require_owners(pol):
    rs = pol.RuleSet([pol.Rule("ro", "REQUIRE_OWNERS",
                               require_owners=["customer", "feature", "label.project"])])
    full = owners(customer="acme", feature="chat")
    r = ev(rs, who=full, labels={"project": "p1"})
    assert summary(r)[:3] == (ALLOW, (), ())
    for who, labels in [(owners(customer="acme"), {"project": "p1"}),
                        (owners(feature="chat"), {"project": "p1"}),
                        (full, None), (full, {"project": ""}), (full, {"other": "x"})]:
        r = ev(rs, who=who, labels=labels)
        assert summary(r)[:3] == (DENY, (POLICY_OWNER_MISSING,), ("ro",)), (who, labels)


def test_allow_models(pol):
    rs = pol.RuleSet([pol.Rule("am", "ALLOW_MODELS", allow_models=["gpt-4o-mini", "claude-*"])])
    assert ev(rs, "gpt-4o-mini").decision == ALLOW
    assert ev(rs, "claude-3-5-haiku").decision == ALLOW
    r = ev(rs, "gpt-4o")
    assert summary(r)[:3] == (DENY, (POLICY_MODEL_NOT_ALLOWED,), ("am",))


def test_privacy_effect(pol):
    rs = pol.RuleSet([pol.Rule("pv", "PRIVACY",
                               allowed_privacy_modes=["METADATA_ONLY", "FINGERPRINT_ONLY"])])
    assert ev(rs, mode=PrivacyMode.METADATA_ONLY).decision == ALLOW
    assert ev(rs, mode=2).decision == ALLOW
    # UNSPECIFIED is the default mode, metadata_only
    assert ev(rs, mode=0).decision == ALLOW
    r = ev(rs, mode=PrivacyMode.FULL_TRACE)
    assert summary(r)[:3] == (DENY, (POLICY_PRIVACY_MODE_NOT_ALLOWED,), ("pv",))


def test_max_output_tokens_is_the_minimum_and_names_its_rule(pol):
    rs = pol.RuleSet([
        pol.Rule("big", "MAX_OUTPUT_TOKENS", max_output_tokens=8000),
        pol.Rule("small", "MAX_OUTPUT_TOKENS", max_output_tokens=1000, models=["gpt-4*"]),
        pol.Rule("same", "MAX_OUTPUT_TOKENS", max_output_tokens=1000),
    ])
    r = ev(rs, "gpt-4o")
    # a cap is a limit, not a reason: the engine adds policy.output_clamped if it clamps
    assert summary(r) == (ALLOW, (), (), 1000, 0, "small", "")
    r = ev(rs, "claude-3-opus")
    assert (r.output_cap, r.output_cap_rule_id) == (1000, "same")


def test_max_cost_per_request_is_the_minimum(pol):
    rs = pol.RuleSet([
        pol.Rule("a", "MAX_COST_PER_REQUEST", max_cost_nanos=50_000_000),
        pol.Rule("b", "MAX_COST_PER_REQUEST", max_cost_nanos=20_000_000,
                 owners={"customer": "acme"}),
    ])
    assert (ev(rs).max_cost_nanos, ev(rs).max_cost_rule_id) == (50_000_000, "a")
    r = ev(rs, who=owners(customer="acme"))
    assert (r.max_cost_nanos, r.max_cost_rule_id, r.decision) == (20_000_000, "b", ALLOW)


# -- combinations -------------------------------------------------------------------

def test_most_severe_wins_with_every_reason_in_rule_order(pol):
    rs = pol.RuleSet([
        pol.Rule("w1", "WARN"),
        pol.Rule("am", "ALLOW_MODELS", allow_models=["claude-*"]),
        pol.Rule("w2", "WARN", models=["gpt-*"]),
        pol.Rule("cap", "MAX_OUTPUT_TOKENS", max_output_tokens=512),
        pol.Rule("ro", "REQUIRE_OWNERS", require_owners=["customer"]),
        pol.Rule("d", "DENY", providers=["openai"]),
        pol.Rule("pv", "PRIVACY", allowed_privacy_modes=["METADATA_ONLY"]),
    ])
    r = ev(rs, "gpt-4o", provider="openai", mode=PrivacyMode.FULL_TRACE)
    assert r.decision == DENY
    assert r.reasons == (POLICY_WARNED, POLICY_MODEL_NOT_ALLOWED, POLICY_OWNER_MISSING,
                         POLICY_DENIED, POLICY_PRIVACY_MODE_NOT_ALLOWED)
    assert r.rule_ids == ("w1", "am", "w2", "ro", "d", "pv")
    assert r.output_cap == 512
    # only the WARNs apply: WARN, reason once, both ids
    r = ev(rs, "claude-x", who=owners(customer="acme"), provider="anthropic")
    assert summary(r)[:3] == (WARN, (POLICY_WARNED,), ("w1",))
    r = ev(rs, "gpt-x", who=owners(customer="acme"), provider="anthropic")
    assert r.decision == DENY
    assert r.reasons == (POLICY_WARNED, POLICY_MODEL_NOT_ALLOWED)
    assert r.rule_ids == ("w1", "am", "w2")


def test_non_matching_rules_have_no_effect(pol):
    rs = pol.RuleSet([
        pol.Rule("d", "DENY", owners={"customer": "evil"}),
        pol.Rule("w", "WARN", providers=["azure"]),
        pol.Rule("cap", "MAX_OUTPUT_TOKENS", max_output_tokens=5, models=["o1"]),
        pol.Rule("pm", "DENY", privacy_modes=["FULL_TRACE"]),
    ])
    assert summary(ev(rs, who=owners(customer="good"))) == (ALLOW, (), (), 0, 0, "", "")
    assert ev(rs, who=owners(customer="evil")).rule_ids == ("d",)
    assert ev(rs, provider="azure").rule_ids == ("w",)
    assert ev(rs, "o1").output_cap == 5
    assert ev(rs, mode=PrivacyMode.FULL_TRACE).rule_ids == ("pm",)


# -- matching -----------------------------------------------------------------------

@pytest.mark.parametrize("glob, yes, no", [
    ("gpt-4o", ["gpt-4o"], ["gpt-4o-mini", "GPT-4o", "gpt-4"]),
    ("gpt-4*", ["gpt-4", "gpt-4o", "gpt-4o-mini", "gpt-4.1"], ["gpt-3.5-turbo", "xgpt-4"]),
    ("claude-*-sonnet*", ["claude-3-5-sonnet", "claude-3-7-sonnet-20250219"],
     ["claude-sonnet-4", "claude-3-opus", "claude-3-5-haiku"]),
    ("o?-mini", ["o1-mini", "o3-mini"], ["o1", "o10-mini"]),
    ("gemini-[12].*", ["gemini-1.5-pro", "gemini-2.0-flash"], ["gemini-3.0", "gemini-1"]),
    ("*", ["anything", ""], []),
])
def test_model_globs(pol, glob, yes, no):
    rs = pol.RuleSet([pol.Rule("d", "DENY", models=[glob]),
                      pol.Rule("am", "ALLOW_MODELS", allow_models=[glob])])
    for model in yes:
        assert ev(rs, model).rule_ids == ("d",), model
    for model in no:
        assert ev(rs, model).rule_ids == ("am",), model


def test_owner_and_label_conditions(pol):
    rs = pol.RuleSet([
        pol.Rule("d", "DENY", owners={"customer": "acme", "feature": "search",
                                      "label.env": "prod"}),
        pol.Rule("w", "WARN", owners={"label.env": ""}),   # "" matches an absent label
    ])
    acme = owners(customer="acme", feature="search")
    assert ev(rs, who=acme, labels={"env": "prod"}).rule_ids == ("d",)
    assert ev(rs, who=acme, labels={"env": "dev"}).rule_ids == ()
    assert ev(rs, who=acme, labels=None).rule_ids == ("w",)
    assert ev(rs, who=acme, labels={"env": ""}).rule_ids == ("w",)
    assert ev(rs, who=owners(customer="acme"), labels={"env": "prod"}).rule_ids == ()
    # owners as a mapping means the same as the tuple
    assert ev(rs, who={"customer": "acme", "feature": "search"},
              labels={"env": "prod"}).rule_ids == ("d",)


def test_privacy_mode_match_condition(pol):
    rs = pol.RuleSet([pol.Rule("w", "WARN", privacy_modes=["REDACTED_TRACE", "FULL_TRACE"])])
    assert ev(rs, mode=PrivacyMode.METADATA_ONLY).decision == ALLOW
    assert ev(rs, mode=PrivacyMode.REDACTED_TRACE).decision == WARN
    assert ev(rs, mode=5).decision == WARN


@pytest.mark.parametrize("args, field", [
    (dict(who=("a",) * 5), "owners"),
    (dict(who={"region": "eu"}), "owners"),
    (dict(who=(1, "", "", "", "", "")), "owners"),
    (dict(who=("x" * (MAX_STRING + 1),) + ("",) * 5), "owners"),
    (dict(labels=["env"]), "labels"),
    (dict(labels={"": "x"}), "labels"),
    (dict(labels={f"k{i}": "v" for i in range(17)}), "labels"),
    (dict(labels={"k": 1}), "labels"),
    (dict(model=None), "model"),
    (dict(model="m" * (MAX_STRING + 1)), "model"),
    (dict(provider=b"openai"), "provider"),
    (dict(mode=9), "privacy_mode"),
    (dict(mode=-1), "privacy_mode"),
    (dict(mode="FULL_TRACE"), "privacy_mode"),
    (dict(mode=2**70), "privacy_mode"),
])
def test_evaluate_rejects_bad_input_naming_the_field(pol, args, field):
    rs = pol.RuleSet([pol.Rule("d", "DENY")])
    call = dict(model="gpt-4o", who=NOBODY, labels=None, provider="openai", mode=MD)
    call.update(args)
    with pytest.raises(InvalidArgument) as err:
        rs.evaluate(call["who"], call["labels"], call["model"], call["provider"], call["mode"])
    assert err.value.field == field


def test_policy_result_is_read_only(pol):
    r = ev(pol.RuleSet([pol.Rule("d", "DENY")]))
    with pytest.raises(AttributeError):
        r.decision = ALLOW
    assert "DENY" in repr(r)


# -- rate limits --------------------------------------------------------------------

def rate_rs(pol, **kw):
    kw.setdefault("rate_limit", 3)
    kw.setdefault("window_seconds", 1)
    return pol.RuleSet([pol.Rule("rl", "RATE_LIMIT", **kw)])


def test_token_bucket_refill_is_exact(pol):
    rs = rate_rs(pol)                     # 3 requests per second: one per 333.33 ms
    r = ev(rs)
    for _ in range(3):
        assert rs.rate_check(r, NOBODY, 0, 0, 1_000) == ""
        rs.rate_consume(r, NOBODY, 0, 0, 1_000)
    assert rs.rate_check(r, NOBODY, 0, 0, 1_000) == "rl"
    assert rs.retry_after_ms(r, NOBODY, 0, 0, 1_000) == 334
    # 333 ms refill 0.999 of a request: still no room; 334 ms refill 1.002
    assert rs.rate_check(r, NOBODY, 0, 0, 1_333) == "rl"
    assert rs.retry_after_ms(r, NOBODY, 0, 0, 1_333) == 1
    assert rs.rate_check(r, NOBODY, 0, 0, 1_334) == ""
    rs.rate_consume(r, NOBODY, 0, 0, 1_334)
    # the 0.002 left over is kept, not rounded away: the next unit needs 333 ms more
    assert rs.retry_after_ms(r, NOBODY, 0, 0, 1_334) == 333
    assert rs.rate_check(r, NOBODY, 0, 0, 1_667) == ""
    # a full window refills to capacity, never beyond
    rs.rate_consume(r, NOBODY, 0, 0, 1_667)
    t = 1_667 + 60_000
    for _ in range(3):
        assert rs.rate_check(r, NOBODY, 0, 0, t) == ""
        rs.rate_consume(r, NOBODY, 0, 0, t)
    assert rs.rate_check(r, NOBODY, 0, 0, t) == "rl"


def test_rate_check_consumes_nothing(pol):
    rs = rate_rs(pol, rate_limit=1)
    r = ev(rs)
    for _ in range(5):
        assert rs.rate_check(r, NOBODY, 0, 0, 0) == ""
    rs.rate_consume(r, NOBODY, 0, 0, 0)
    assert rs.rate_check(r, NOBODY, 0, 0, 0) == "rl"


def test_clock_going_back_refills_nothing(pol):
    rs = rate_rs(pol, rate_limit=1)
    r = ev(rs)
    rs.rate_consume(r, NOBODY, 0, 0, 10_000)
    assert rs.rate_check(r, NOBODY, 0, 0, 5_000) == "rl"
    rs.rate_consume(r, NOBODY, 0, 0, 5_000)
    assert rs.rate_check(r, NOBODY, 0, 0, 10_999) == "rl"
    assert rs.rate_check(r, NOBODY, 0, 0, 11_000) == ""


def test_buckets_are_per_owner_value(pol):
    rs = rate_rs(pol, rate_limit=1, per="customer")
    a, b = owners(customer="a", feature="x"), owners(customer="b", feature="x")
    r = ev(rs, who=a)
    rs.rate_consume(r, a, 0, 0, 0)
    assert rs.rate_check(r, a, 0, 0, 0) == "rl"
    assert rs.rate_check(r, b, 0, 0, 0) == ""
    # other dimensions do not split the bucket
    assert rs.rate_check(r, owners(customer="a", feature="y"), 0, 0, 0) == "rl"
    # no `per`: one bucket for everybody
    shared = rate_rs(pol, rate_limit=1)
    r = ev(shared)
    shared.rate_consume(r, a, 0, 0, 0)
    assert shared.rate_check(r, b, 0, 0, 0) == "rl"


def test_tokens_and_cost_units(pol):
    rs = pol.RuleSet([
        pol.Rule("tok", "RATE_LIMIT", rate_limit=10_000, rate_unit="TOKENS", window_seconds=60),
        pol.Rule("usd", "RATE_LIMIT", rate_limit=1_000_000_000, rate_unit=RateUnit.COST,
                 window_seconds=3600),
    ])
    r = ev(rs)
    rs.rate_consume(r, NOBODY, 9_000, 999_999_100, 0)
    assert rs.rate_check(r, NOBODY, 1_000, 900, 0) == ""
    assert rs.rate_check(r, NOBODY, 1_001, 0, 0) == "tok"
    assert rs.rate_check(r, NOBODY, 0, 901, 0) == "usd"
    # 1 token refills every 6 ms: 1 more token needs 6 ms
    assert rs.retry_after_ms(r, NOBODY, 1_001, 0, 0) == 6
    assert rs.rate_check(r, NOBODY, 1_001, 0, 6) == ""
    # 1 nano-USD refills every 3.6 us: 6 ms refill 1666.67 nanos, so 2566 fit, 2567 not
    assert rs.rate_check(r, NOBODY, 0, 2_566, 6) == ""
    assert rs.rate_check(r, NOBODY, 0, 2_567, 6) == "usd"
    # a demand above the whole capacity never fits
    assert rs.rate_check(r, NOBODY, 10_001, 0, 10**9) == "tok"
    assert rs.retry_after_ms(r, NOBODY, 10_001, 0, 10**9) == -1
    # consuming it empties the bucket (floored, no debt)
    rs.rate_consume(r, NOBODY, 10_001, 0, 10**9)
    assert rs.retry_after_ms(r, NOBODY, 1, 0, 10**9) == 6


def test_rate_limit_rules_only_apply_when_they_match(pol):
    rs = pol.RuleSet([pol.Rule("rl", "RATE_LIMIT", rate_limit=1, models=["gpt-*"])])
    r = ev(rs, "claude-x")
    rs.rate_consume(r, NOBODY, 0, 0, 0)
    rs.rate_consume(r, NOBODY, 0, 0, 0)
    assert rs.rate_check(r, NOBODY, 0, 0, 0) == ""
    r = ev(rs, "gpt-4o")
    rs.rate_consume(r, NOBODY, 0, 0, 0)
    assert rs.rate_check(r, NOBODY, 0, 0, 0) == "rl"
    assert r.decision == ALLOW and r.rule_ids == ()   # the limiter is not a decision


def test_rate_check_returns_first_exceeded_rule(pol):
    rs = pol.RuleSet([
        pol.Rule("roomy", "RATE_LIMIT", rate_limit=100),
        pol.Rule("tight1", "RATE_LIMIT", rate_limit=1, window_seconds=1),
        pol.Rule("tight2", "RATE_LIMIT", rate_limit=1, window_seconds=10),
    ])
    r = ev(rs)
    rs.rate_consume(r, NOBODY, 0, 0, 0)
    assert rs.rate_check(r, NOBODY, 0, 0, 0) == "tight1"
    # the wait is for every bucket: the slowest one decides
    assert rs.retry_after_ms(r, NOBODY, 0, 0, 0) == 10_000


def test_bucket_state_carries_over_on_replacement(pol):
    rs = pol.RuleSet([
        pol.Rule("keep", "RATE_LIMIT", rate_limit=1, window_seconds=60, per="customer"),
        pol.Rule("change", "RATE_LIMIT", rate_limit=1, window_seconds=60),
    ])
    a = owners(customer="a")
    r = ev(rs, who=a)
    rs.rate_consume(r, a, 0, 0, 0)
    new = rs.with_rules([
        pol.Rule("keep", "RATE_LIMIT", rate_limit=1, window_seconds=60, per="customer",
                 models=["*"], message="match changed, limiter did not"),
        pol.Rule("change", "RATE_LIMIT", rate_limit=2, window_seconds=60),
        pol.Rule("fresh", "RATE_LIMIT", rate_limit=1, window_seconds=60),
    ])
    r2 = new.evaluate(a, None, "gpt-4o", "openai", MD)
    assert new.rate_check(r2, a, 0, 0, 1_000) == "keep"
    # the old set's result still works, against the same shared buckets
    assert rs.rate_check(r, a, 0, 0, 1_000) == "keep"
    # "change" (one bucket for all) was used up in the old set, but its rate
    # changed, so the new set starts it afresh; customer b has a fresh "keep"
    b = owners(customer="b")
    assert rs.rate_check(rs.evaluate(b, None, "m", "", MD), b, 0, 0, 1_000) == "change"
    assert new.rate_check(new.evaluate(b, None, "m", "", MD), b, 0, 0, 1_000) == ""
    # a rule removed and re-added later starts afresh
    gone = new.with_rules([pol.Rule("fresh", "RATE_LIMIT", rate_limit=1, window_seconds=60)])
    back = gone.with_rules([pol.Rule("keep", "RATE_LIMIT", rate_limit=1,
                                     window_seconds=60, per="customer")])
    assert back.rate_check(back.evaluate(a, None, "m", "", MD), a, 0, 0, 1_000) == ""
    # plain construction never inherits
    fresh = pol.RuleSet(new.rules)
    assert fresh.rate_check(fresh.evaluate(a, None, "m", "", MD), a, 0, 0, 1_000) == ""


def test_buckets_are_bounded(pol):
    # TOKENS so a check for 2 tokens tells a kept half-used bucket ("rl") from an
    # evicted one (a missing bucket is a full one: "")
    rs = pol.RuleSet([pol.Rule("rl", "RATE_LIMIT", rate_limit=2, rate_unit="TOKENS",
                               window_seconds=1, per="customer")], max_buckets=8)
    r = ev(rs)

    def who(i):
        return owners(customer=f"c{i}")

    for i in range(8):                       # 8 half-used buckets at t=0
        rs.rate_consume(r, who(i), 1, 0, 0)
    rs.rate_consume(r, who(0), 1, 0, 0)      # c0 used again: now the most recent
    # a 9th bucket: none is full, so the least recently used go, down to 7/8 of 8
    rs.rate_consume(r, who(8), 1, 0, 0)
    kept = [i for i in range(9) if rs.rate_check(r, who(i), 2, 0, 0) == "rl"]
    assert kept == [0, 3, 4, 5, 6, 7, 8]


def test_full_buckets_are_evicted_before_older_ones(pol):
    rs = pol.RuleSet([pol.Rule("rl", "RATE_LIMIT", rate_limit=2, rate_unit="TOKENS",
                               window_seconds=1, per="customer")], max_buckets=4)
    r = ev(rs)
    who = [owners(customer=f"c{i}") for i in range(5)]
    rs.rate_consume(r, who[0], 2, 0, 0)      # the oldest bucket, drained
    for i in (1, 2, 3):
        rs.rate_consume(r, who[i], 1, 0, 0)  # newer, half used
    # at t=600 c1..c3 have refilled completely, c0 has 1.2 of 2 tokens
    rs.rate_consume(r, who[4], 1, 0, 600)
    assert rs.rate_check(r, who[0], 2, 0, 600) == "rl"     # oldest, yet kept
    assert rs.retry_after_ms(r, who[0], 2, 0, 600) == 400
    for i in (1, 2, 3):
        assert rs.rate_check(r, who[i], 2, 0, 600) == ""


@pytest.mark.parametrize("args, field", [
    ((NOBODY, -1, 0, 0), "tokens"),
    ((NOBODY, 10**9, 0, 0), "tokens"),
    ((NOBODY, 0, -1, 0), "cost_nanos"),
    ((NOBODY, 0, 2**63, 0), "cost_nanos"),
    ((NOBODY, 0, 0, -5), "now_ms"),
    ((NOBODY, 0, 0, 1.5), "now_ms"),
    ((("a",), 0, 0, 0), "owners"),
])
def test_rate_calls_reject_bad_input(pol, args, field):
    rs = rate_rs(pol)
    r = ev(rs)
    for call in (rs.rate_check, rs.rate_consume, rs.retry_after_ms):
        with pytest.raises(InvalidArgument) as err:
            call(r, *args)
        assert err.value.field == field
    with pytest.raises(TypeError):
        rs.rate_check(None, NOBODY, 0, 0, 0)


# -- differential: compiled vs python --------------------------------------------------

OWNER_VALUES = ["", "acme", "globex"]
LABEL_KEYS = ["env", "team"]
MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-3.5-turbo", "claude-3-5-sonnet", "claude-sonnet-4",
          "o1", ""]
GLOBS = ["gpt-4o", "gpt-4*", "claude-*-sonnet*", "o?", "*", "gpt-[34]*", "claude-*"]
PROVIDERS = ["openai", "anthropic", ""]
DIMS = ["customer", "feature", "employee"]


@st.composite
def rule_dicts(draw, rule_id):
    effect = draw(st.sampled_from(list(Effect)[1:]))
    d = {"rule_id": rule_id, "effect": effect.name}
    conds = draw(st.dictionaries(st.sampled_from(DIMS + [f"label.{k}" for k in LABEL_KEYS]),
                                 st.sampled_from(OWNER_VALUES), max_size=2))
    if conds:
        d["owners"] = conds
    if draw(st.booleans()):
        d["models"] = draw(st.lists(st.sampled_from(GLOBS), min_size=1, max_size=2))
    if draw(st.integers(0, 3)) == 0:
        d["providers"] = draw(st.lists(st.sampled_from(PROVIDERS[:2]), min_size=1, max_size=2))
    if draw(st.integers(0, 3)) == 0:
        d["privacy_modes"] = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    if effect is Effect.REQUIRE_OWNERS:
        d["require_owners"] = draw(st.lists(st.sampled_from(DIMS + ["label.env"]),
                                            min_size=1, max_size=3))
    elif effect is Effect.ALLOW_MODELS:
        d["allow_models"] = draw(st.lists(st.sampled_from(GLOBS), min_size=1, max_size=3))
    elif effect is Effect.MAX_OUTPUT_TOKENS:
        d["max_output_tokens"] = draw(st.integers(1, 10_000))
    elif effect is Effect.MAX_COST_PER_REQUEST:
        d["max_cost_nanos"] = draw(st.integers(1, 10**12))
    elif effect is Effect.RATE_LIMIT:
        d["rate_limit"] = draw(st.integers(1, 50))
        d["rate_unit"] = draw(st.sampled_from(["REQUESTS", "TOKENS", "COST"]))
        d["window_seconds"] = draw(st.integers(1, 7))
        d["per"] = draw(st.sampled_from(["", "customer", "feature"]))
    elif effect is Effect.PRIVACY:
        d["allowed_privacy_modes"] = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    return d


@st.composite
def rule_sets(draw):
    n = draw(st.integers(0, 12))
    return [draw(rule_dicts(f"r{i}")) for i in range(n)]


requests = st.tuples(
    st.tuples(*[st.sampled_from(OWNER_VALUES) for _ in range(6)]),
    st.one_of(st.none(), st.dictionaries(st.sampled_from(LABEL_KEYS),
                                         st.sampled_from(OWNER_VALUES), max_size=2)),
    st.sampled_from(MODELS),
    st.sampled_from(PROVIDERS),
    st.integers(0, 5),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=rule_sets(), reqs=st.lists(requests, min_size=1, max_size=8))
def test_differential_evaluate(both, rules, reqs):
    py, c = (impl.module("policy") for impl in both)
    rs_py, rs_c = py.RuleSet(rules), c.RuleSet(rules)
    for req in reqs:
        assert summary(rs_py.evaluate(*req)) == summary(rs_c.evaluate(*req)), req


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=rule_sets(),
       ops=st.lists(st.tuples(requests, st.integers(0, 60), st.integers(0, 10**6),
                              st.integers(0, 2_500), st.booleans()), min_size=1, max_size=25),
       max_buckets=st.integers(1, 4))
def test_differential_rate_limits(both, rules, ops, max_buckets):
    py, c = (impl.module("policy") for impl in both)
    rs_py = py.RuleSet(rules, max_buckets=max_buckets)
    rs_c = c.RuleSet(rules, max_buckets=max_buckets)
    now = 0
    for i, (req, tokens, cost, dt, consume) in enumerate(ops):
        now += dt
        if i == len(ops) // 2:   # a reload half way: carried-over state must agree too
            rs_py, rs_c = rs_py.with_rules(rules[::-1]), rs_c.with_rules(rules[::-1])
        r_py, r_c = rs_py.evaluate(*req), rs_c.evaluate(*req)
        args = (req[0], tokens, cost, now)
        assert rs_py.rate_check(r_py, *args) == rs_c.rate_check(r_c, *args)
        assert rs_py.retry_after_ms(r_py, *args) == rs_c.retry_after_ms(r_c, *args)
        if consume:
            rs_py.rate_consume(r_py, *args)
            rs_c.rate_consume(r_c, *args)


@settings(max_examples=100, deadline=None)
@given(kwargs=st.fixed_dictionaries({}, optional={
    "owners": st.dictionaries(st.sampled_from(DIMS + ["label.x", "region", "label."]),
                              st.one_of(st.text(max_size=3), st.integers()), max_size=2),
    "models": st.lists(st.text(max_size=4), max_size=2),
    "max_output_tokens": st.integers(-2, 3),
    "rate_limit": st.integers(-2, 3),
    "window_seconds": st.integers(-2, 3),
    "per": st.sampled_from(["", "customer", "bogus"]),
    "allowed_privacy_modes": st.lists(st.integers(-1, 6), max_size=2),
}), effect=st.sampled_from([e.name for e in Effect]))
def test_differential_errors(both, kwargs, effect):
    """Both twins accept and refuse the same rule sets, naming the same field."""
    outcomes = []
    for impl in both:
        pol = impl.module("policy")
        try:
            rs = pol.RuleSet([{"rule_id": "r", "effect": effect, **kwargs}])
            outcomes.append(summary(rs.evaluate(NOBODY, None, "gpt-4o", "", 1)))
        except InvalidArgument as exc:
            outcomes.append(("error", exc.field))
    assert outcomes[0] == outcomes[1]


def test_compiled_twin_is_really_compiled(both):
    py, c = (impl.module("policy") for impl in both)
    assert c.__file__.endswith((".so", ".pyd")) and py.__file__.endswith(".py")
    assert c.RuleSet.__module__ == "p402core._policy_c" and c.RuleSet is not py.RuleSet
