"""Engine: authorize → hold → record / release / expire, against both twins (`impl`).

Prices are chosen so the arithmetic is readable: model "m1" costs 1,000 nano-USD
per input token and 2,000 per output token, its family ratio is 3 bytes per
token and its max output is 1,000 tokens. So 3,000 input bytes with the default
output cap estimate 1,000 + 1,000 tokens = 3,000,000 nano-USD.
"""
from __future__ import annotations

import datetime as dt

import pytest

from p402core import (
    BUDGET_CLAMPED,
    BUDGET_EXCEEDED,
    BUDGET_SOFT_LIMIT,
    POLICY_COST_TOO_HIGH,
    POLICY_DENIED,
    POLICY_OUTPUT_CLAMPED,
    POLICY_RATE_LIMITED,
    PRICE_UNKNOWN_MODEL,
    Conflict,
    Decision,
    Effect,
    Evidence,
    InvalidArgument,
    NotFound,
    Outcome,
    Period,
    RateUnit,
    UnknownModel,
)

DAY = 86_400_000


def ms(y, m, d, hh=0):
    return int(dt.datetime(y, m, d, hh, tzinfo=dt.timezone.utc).timestamp()) * 1000


T0 = ms(2026, 3, 14, 12)
EST = 3_000_000          # estimate of 3,000 bytes, default cap, on m1
ACME = {"customer": "acme", "feature": "chat"}


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


def catalog(impl):
    return impl.Catalog([
        impl.ModelPrice("m1", "p", input_pico=1_000_000, output_pico=2_000_000,
                        family="gpt", max_output_tokens=1_000),
        impl.ModelPrice("m2", "q", input_pico=10_000, output_pico=20_000, family="gpt"),
    ], aliases={"m1-alias": "m1"}, version="v1", taken="2026-11-01")


def engine(impl, budgets=(), rules=(), **kw):
    kw.setdefault("clock", Clock())
    return impl.Engine(catalog(impl), budgets=budgets, rules=rules, **kw)


def status(e, budget_id):
    for s in e.budget_status():
        if s.budget_id == budget_id:
            return s.committed_nanos, s.held_nanos
    raise KeyError(budget_id)


# -- the happy path -----------------------------------------------------------------

def test_authorize_then_record(impl):
    e = engine(impl, [impl.Budget("tenant", 10 * EST), impl.Budget("acme", 5 * EST,
                                                                    scope={"customer": "acme"})])
    a = e.authorize("m1-alias", owners=ACME, input_bytes=3_000)
    assert a.decision == Decision.ALLOW and a.reasons == () and a.rule_ids == ()
    assert (a.model, a.provider, a.catalog_version) == ("m1", "p", "v1")
    assert (a.estimated_input_tokens, a.estimated_output_tokens, a.output_token_cap) == (1000, 1000, 1000)
    assert a.estimated_cost_nanos == EST
    assert a.reservation_id == "1" and a.expires_ms == T0 + 900_000
    assert [(b.budget_id, b.held_nanos, b.remaining_nanos) for b in a.budgets] == [
        ("tenant", EST, 9 * EST), ("acme", EST, 4 * EST)]
    assert e.open_holds() == 1

    s = e.record(a.reservation_id, input_tokens=800, output_tokens=300, outcome=Outcome.SUCCESS)
    assert s.cost_nanos == 800 * 1_000 + 300 * 2_000
    assert (s.estimated_cost_nanos, s.overrun_nanos) == (EST, 0)
    assert (s.outcome, s.evidence) == (Outcome.SUCCESS, Evidence.REPORTED)
    assert s.budget_ids == ("tenant", "acme") and s.owners[0] == "acme"
    assert (s.model, s.provider, s.settled_ms) == ("m1", "p", T0)
    assert status(e, "tenant") == (1_400_000, 0) and status(e, "acme") == (1_400_000, 0)
    assert e.open_holds() == 0


def test_a_record_of_another_model_is_priced_at_the_model_called(impl):
    """A gateway's fallback: reserved m2 (cheap), called m1. The settlement is m1's
    price and name, charged to the budgets the hold reserved; an alias of the reserved
    model, or a model without a price, changes nothing."""
    e = engine(impl, [impl.Budget("acme", 100 * EST, scope={"customer": "acme"})])
    a = e.authorize("m2", owners=ACME, input_bytes=300, max_output_tokens=100)
    assert e.hold_model(a.reservation_id) == "m2"
    s = e.record(a.reservation_id, model="m1", input_tokens=100, output_tokens=50)
    assert (s.model, s.provider) == ("m1", "p")
    assert s.cost_nanos == 100 * 1_000 + 50 * 2_000
    assert s.budget_ids == ("acme",) and status(e, "acme") == (s.cost_nanos, 0)
    assert e.hold_model(a.reservation_id) == ""

    b = e.authorize("m1", owners=ACME, input_bytes=300, max_output_tokens=100)
    s = e.record(b.reservation_id, model="m1-alias", input_tokens=10, output_tokens=5)
    assert (s.model, s.cost_nanos) == ("m1", 10 * 1_000 + 5 * 2_000)
    c = e.authorize("m2", owners=ACME, input_bytes=300, max_output_tokens=100)
    s = e.record(c.reservation_id, model="no-such-model", input_tokens=1000,
                 output_tokens=1000)
    assert (s.model, s.cost_nanos) == ("m2", 1000 * 10 + 1000 * 20)


def test_results_are_plain_ints_and_dicts(impl):
    e = engine(impl, [impl.Budget("tenant", 10 * EST)])
    a = e.authorize("m1", owners=ACME, input_bytes=3_000)
    d = a.to_dict()
    for k in ("decision", "estimated_input_tokens", "estimated_output_tokens",
              "output_token_cap", "estimated_cost_nanos", "expires_ms"):
        assert type(d[k]) is int, k
    assert d["budgets"][0]["held_nanos"] == EST and type(d["budgets"][0]["held_nanos"]) is int
    s = e.record(a.reservation_id, input_tokens=1, output_tokens=1).to_dict()
    for k in ("cost_nanos", "estimated_cost_nanos", "overrun_nanos", "outcome", "evidence",
              "settled_ms", "input_tokens"):
        assert type(s[k]) is int, k
    assert s["owners"]["customer"] == "acme" and s["labels"] == {}


def test_generated_and_given_reservation_ids(impl):
    e = engine(impl, reservation_prefix="r-")
    assert e.authorize("m1", input_bytes=10).reservation_id == "r-1"
    assert e.authorize("m1", input_bytes=10, reservation_id="mine").reservation_id == "mine"
    with pytest.raises(Conflict):
        e.authorize("m1", input_bytes=10, reservation_id="mine")
    e.authorize("m1", input_bytes=10, reservation_id="r-2")
    assert e.authorize("m1", input_bytes=10).reservation_id == "r-3"   # skips the taken id


def test_content_is_measured(impl):
    e = engine(impl)
    a = e.authorize("m1", content="x" * 3_000)
    b = e.authorize("m1", content=b"x" * 3_000)
    assert a.estimated_input_tokens == b.estimated_input_tokens == 1_000
    with pytest.raises(InvalidArgument) as exc:
        e.authorize("m1", content="x", input_bytes=5)
    assert exc.value.field == "input_bytes"


# -- budgets: all-or-none, HARD vs SOFT, clamp ------------------------------------------

def test_all_or_none_across_budgets(impl):
    e = engine(impl, [impl.Budget("tenant", 100 * EST),
                      impl.Budget("acme", EST + EST // 2, scope={"customer": "acme"}),
                      impl.Budget("chat", 100 * EST, scope={"feature": "chat"})])
    assert e.authorize("m1", owners=ACME, input_bytes=3_000).decision == Decision.ALLOW
    a = e.authorize("m1", owners=ACME, input_bytes=3_000)
    assert a.decision == Decision.DENY and a.reasons == (BUDGET_EXCEEDED,)
    assert a.reservation_id == "" and a.output_token_cap == 0 and a.expires_ms == 0
    assert a.estimated_cost_nanos == EST              # what it would have cost
    # nothing was held anywhere by the denied call
    assert [status(e, b) for b in ("tenant", "acme", "chat")] == [(0, EST)] * 3
    assert e.open_holds() == 1
    # another customer is not limited by acme's budget
    assert e.authorize("m1", owners={"customer": "zed", "feature": "chat"},
                       input_bytes=3_000).decision == Decision.ALLOW


def test_soft_budget_warns_never_denies(impl):
    e = engine(impl, [impl.Budget("soft", EST, enforcement="SOFT")])
    a = e.authorize("m1", owners=ACME, input_bytes=3_000)
    assert a.decision == Decision.ALLOW                 # exactly at the limit: not past it
    a = e.authorize("m1", owners=ACME, input_bytes=3_000)
    assert a.decision == Decision.WARN and a.reasons == (BUDGET_SOFT_LIMIT,)
    assert status(e, "soft") == (0, 2 * EST)


def test_soft_limit_of_a_hard_budget_warns(impl):
    e = engine(impl, [impl.Budget("h", 3 * EST, soft_limit_nanos=EST)])
    assert e.authorize("m1", input_bytes=3_000).decision == Decision.ALLOW
    a = e.authorize("m1", input_bytes=3_000)
    assert (a.decision, a.reasons) == (Decision.WARN, (BUDGET_SOFT_LIMIT,))
    a = e.authorize("m1", input_bytes=3_000)
    assert a.decision == Decision.WARN
    a = e.authorize("m1", input_bytes=3_000)
    assert (a.decision, a.reasons) == (Decision.DENY, (BUDGET_EXCEEDED,))


def test_clamp_gives_the_largest_output_that_fits(impl):
    limit = 1_000 * 1_000 + 400 * 2_000 + 1_999        # input + 400 output tokens (+ change)
    e = engine(impl, [impl.Budget("b", limit)], allow_clamp=True)
    a = e.authorize("m1", input_bytes=3_000)
    assert a.decision == Decision.ALLOW and a.reasons == (BUDGET_CLAMPED,)
    assert a.output_token_cap == a.estimated_output_tokens == 400
    assert a.estimated_cost_nanos == 1_800_000 <= limit
    assert status(e, "b") == (0, 1_800_000)
    # without clamping the same request is denied
    e2 = engine(impl, [impl.Budget("b", limit)])
    assert e2.authorize("m1", input_bytes=3_000).reasons == (BUDGET_EXCEEDED,)


def test_clamp_needs_the_input_and_one_output_token_to_fit(impl):
    e = engine(impl, [impl.Budget("b", 1_000 * 1_000 + 1_999)], allow_clamp=True)
    a = e.authorize("m1", input_bytes=3_000)
    assert (a.decision, a.reasons) == (Decision.DENY, (BUDGET_EXCEEDED,))
    e = engine(impl, [impl.Budget("b", 1_000 * 1_000 + 2_000)], allow_clamp=True)
    a = e.authorize("m1", input_bytes=3_000)
    assert (a.decision, a.output_token_cap) == (Decision.ALLOW, 1)


def test_hard_invariant_holds_under_pressure(impl):
    e = engine(impl, [impl.Budget("b", 7 * EST + 123)], allow_clamp=True)
    for i in range(30):
        e.authorize("m1", input_bytes=100 * (i + 1))
        committed, held = status(e, "b")
        assert committed + held <= 7 * EST + 123


# -- record: overrun, meter-only, errors --------------------------------------------------

def test_overrun_is_committed_and_flagged(impl):
    e = engine(impl, [impl.Budget("b", 2 * EST)])
    a = e.authorize("m1", input_bytes=300, max_output_tokens=10)   # tiny estimate
    s = e.record(a.reservation_id, input_tokens=2_000, output_tokens=1_000)
    assert s.cost_nanos == 4_000_000
    assert s.overrun_nanos == 4_000_000 - a.estimated_cost_nanos > 0
    assert status(e, "b") == (4_000_000, 0)         # past the HARD limit: it was spent


def test_cancelled_is_charged_what_usage_says(impl):
    e = engine(impl, [impl.Budget("b", 2 * EST)])
    a = e.authorize("m1", input_bytes=3_000)
    s = e.record(a.reservation_id, input_tokens=1_000, outcome=Outcome.CANCELLED)
    assert (s.cost_nanos, s.outcome) == (1_000_000, Outcome.CANCELLED)
    a = e.authorize("m1", input_bytes=3_000)
    s = e.record(a.reservation_id, outcome=Outcome.CANCELLED)
    assert s.cost_nanos == 0
    assert status(e, "b") == (1_000_000, 0)


def test_usage_detail_is_priced(impl):
    cat = impl.Catalog([impl.ModelPrice("c", "p", input_pico=1_000_000, output_pico=4_000_000,
                                        cached_input_pico=100_000, reasoning_pico=8_000_000)],
                       version="v", taken="2026-11-01")
    e = impl.Engine(cat, clock=Clock())
    a = e.authorize("c", input_bytes=10)
    s = e.record(a.reservation_id, input_tokens=1_000, cached_input_tokens=600,
                 output_tokens=100, reasoning_tokens=40)
    assert s.cost_nanos == 400 * 1_000 + 600 * 100 + 60 * 4_000 + 40 * 8_000
    assert (s.cached_input_tokens, s.reasoning_tokens) == (600, 40)


def test_meter_only_record(impl):
    e = engine(impl, [impl.Budget("acme", EST, scope={"customer": "acme"}),
                      impl.Budget("other", EST, scope={"customer": "other"})])
    s = e.record(model="m1", owners=ACME, labels={"env": "prod"}, input_tokens=3_000,
                 output_tokens=1_000)
    assert s.reservation_id == "" and s.budget_ids == ("acme",)
    assert (s.cost_nanos, s.estimated_cost_nanos, s.overrun_nanos) == (5_000_000, 0, 0)
    assert (s.evidence, s.labels) == (Evidence.REPORTED, {"env": "prod"})
    assert status(e, "acme") == (5_000_000, 0)      # HARD may go over: it already happened
    assert status(e, "other") == (0, 0)
    assert e.authorize("m1", owners=ACME, input_bytes=3).decision == Decision.DENY
    with pytest.raises(InvalidArgument) as exc:
        e.record(owners=ACME, input_tokens=1)
    assert exc.value.field == "model"
    with pytest.raises(InvalidArgument) as exc:
        e.record(model="m1", input_tokens=1)
    assert exc.value.field == "owners"
    with pytest.raises(UnknownModel):
        e.record(model="nope", owners=ACME, input_tokens=1)


def test_unknown_and_settled_reservations(impl):
    e = engine(impl)
    a = e.authorize("m1", input_bytes=3_000)
    e.record(a.reservation_id, input_tokens=5)
    with pytest.raises(Conflict):
        e.record(a.reservation_id, input_tokens=5)
    with pytest.raises(Conflict):
        e.release(a.reservation_id)
    with pytest.raises(NotFound):
        e.record("never-issued", input_tokens=5)
    with pytest.raises(InvalidArgument) as exc:
        e.release("")
    assert exc.value.field == "reservation_id"


def test_record_feeds_the_estimator(impl):
    e = engine(impl)
    m1 = e.catalog.lookup("m1")
    before = e.estimator.bytes_per_token_milli(m1)
    a = e.authorize("m1", input_bytes=40_000)
    e.record(a.reservation_id, input_tokens=8_000)           # 5 bytes/token observed
    assert e.estimator.bytes_per_token_milli(m1) > before
    # no bytes known and no hold: nothing to learn from
    after = e.estimator.bytes_per_token_milli(m1)
    e.record(model="m1", owners=ACME, input_tokens=8_000)
    assert e.estimator.bytes_per_token_milli(m1) == after


# -- release / expire ---------------------------------------------------------------------

def test_release_voids_the_hold(impl):
    e = engine(impl, [impl.Budget("b", 2 * EST)])
    a = e.authorize("m1", input_bytes=3_000)
    s = e.release(a.reservation_id)
    assert (s.cost_nanos, s.estimated_cost_nanos, s.outcome, s.evidence) == (
        0, EST, Outcome.CANCELLED, Evidence.ESTIMATED)
    assert status(e, "b") == (0, 0) and e.open_holds() == 0


def test_expire_commits_the_estimate(impl):
    clock = Clock()
    e = engine(impl, [impl.Budget("b", 10 * EST)], clock=clock)
    a1 = e.authorize("m1", input_bytes=3_000, ttl_seconds=60)
    a2 = e.authorize("m1", input_bytes=3_000, ttl_seconds=30)
    a3 = e.authorize("m1", input_bytes=3_000)                      # default 900 s
    e.record(a2.reservation_id, input_tokens=10)
    assert e.expire(T0 + 59_999) == []
    clock.now = T0 + 60_000
    (s,) = e.expire()
    assert (s.reservation_id, s.outcome, s.evidence) == (a1.reservation_id, Outcome.EXPIRED,
                                                         Evidence.ESTIMATED)
    assert s.cost_nanos == s.estimated_cost_nanos == EST and s.settled_ms == T0 + 60_000
    assert (s.input_tokens, s.output_tokens) == (1_000, 1_000)
    assert status(e, "b") == (EST + 10_000, EST)
    with pytest.raises(Conflict):
        e.record(a1.reservation_id, input_tokens=1)
    assert [x.reservation_id for x in e.expire(T0 + 10**7)] == [a3.reservation_id]
    assert e.open_holds() == 0 and e.expire(T0 + 10**8) == []


def test_expire_order_and_same_second(impl):
    e = engine(impl)
    ids = [e.authorize("m1", input_bytes=9, ttl_seconds=t).reservation_id for t in (5, 3, 4, 3)]
    out = e.expire(T0 + 4_000)
    assert [s.reservation_id for s in out] == [ids[1], ids[3], ids[2]]
    assert e.open_holds() == 1
    assert [s.reservation_id for s in e.expire(T0 + 5_000)] == [ids[0]]


# -- policies, prices ----------------------------------------------------------------------

def test_unknown_model_denies_without_fallback(impl):
    e = engine(impl, [impl.Budget("b", EST)])
    a = e.authorize("mystery", input_bytes=3_000)
    assert (a.decision, a.reasons, a.reservation_id) == (Decision.DENY, (PRICE_UNKNOWN_MODEL,), "")
    assert a.estimated_cost_nanos == 0 and e.open_holds() == 0 and status(e, "b") == (0, 0)


def test_unknown_model_with_fallback_warns(impl):
    fb = impl.ModelPrice("fallback", "", input_pico=5_000_000, output_pico=5_000_000)
    e = engine(impl, [impl.Budget("b", 100 * EST)], fallback_price=fb)
    a = e.authorize("mystery", provider="x", input_bytes=2_500, max_output_tokens=100)
    assert (a.decision, a.reasons) == (Decision.WARN, (PRICE_UNKNOWN_MODEL,))
    assert (a.model, a.provider) == ("mystery", "x")
    assert a.estimated_cost_nanos == (a.estimated_input_tokens + 100) * 5_000
    s = e.record(a.reservation_id, input_tokens=10, output_tokens=10)
    assert (s.cost_nanos, s.model) == (100_000, "mystery")


def test_policy_output_cap_and_reason(impl):
    rules = [impl.Rule("cap", Effect.MAX_OUTPUT_TOKENS, max_output_tokens=200)]
    e = engine(impl, rules=rules)
    a = e.authorize("m1", input_bytes=3_000)
    assert (a.decision, a.reasons, a.rule_ids) == (Decision.ALLOW, (POLICY_OUTPUT_CLAMPED,),
                                                   ("cap",))
    assert a.output_token_cap == 200
    a = e.authorize("m1", input_bytes=3_000, max_output_tokens=150)    # below the cap: no reason
    assert (a.reasons, a.output_token_cap) == ((), 150)


def test_policy_deny_reserves_nothing(impl):
    rules = [impl.Rule("no-acme", Effect.DENY, owners={"customer": "acme"}),
             impl.Rule("rate", Effect.RATE_LIMIT, rate_limit=1, window_seconds=3600)]
    e = engine(impl, [impl.Budget("b", 10 * EST)], rules=rules)
    a = e.authorize("m1", owners=ACME, input_bytes=3_000)
    assert (a.decision, a.reasons, a.rule_ids) == (Decision.DENY, (POLICY_DENIED,), ("no-acme",))
    assert status(e, "b") == (0, 0)
    # the denied call did not take the only request of the rate bucket
    assert e.authorize("m1", input_bytes=3_000).decision == Decision.ALLOW
    a = e.authorize("m1", input_bytes=3_000)
    assert (a.decision, a.reasons, a.rule_ids) == (Decision.DENY, (POLICY_RATE_LIMITED,), ("rate",))
    assert status(e, "b") == (0, EST)


def test_budget_deny_does_not_consume_rate(impl):
    rules = [impl.Rule("rate", Effect.RATE_LIMIT, rate_limit=1, window_seconds=3600)]
    e = engine(impl, [impl.Budget("b", EST // 2)], rules=rules)
    assert e.authorize("m1", input_bytes=3_000).reasons == (BUDGET_EXCEEDED,)
    assert e.authorize("m1", input_bytes=3, max_output_tokens=1).decision == Decision.ALLOW


def test_max_cost_per_request(impl):
    rules = [impl.Rule("cost", Effect.MAX_COST_PER_REQUEST, max_cost_nanos=EST - 1)]
    e = engine(impl, rules=rules)
    a = e.authorize("m1", input_bytes=3_000)
    assert (a.decision, a.reasons, a.rule_ids) == (Decision.DENY, (POLICY_COST_TOO_HIGH,), ("cost",))
    assert e.authorize("m1", input_bytes=3_000, max_output_tokens=999).decision == Decision.ALLOW


def test_rate_limit_by_tokens_uses_the_estimate(impl):
    rules = [impl.Rule("tok", Effect.RATE_LIMIT, rate_limit=3_000, rate_unit=RateUnit.TOKENS,
                       window_seconds=3600, per="customer")]
    e = engine(impl, rules=rules)
    assert e.authorize("m1", owners=ACME, input_bytes=3_000).decision == Decision.ALLOW  # 2,000
    assert e.authorize("m1", owners=ACME, input_bytes=3_000).decision == Decision.DENY   # 4,000
    assert e.authorize("m1", owners={"customer": "b"}, input_bytes=3_000).decision == Decision.ALLOW


# -- periods, restart -------------------------------------------------------------------------

def test_period_rollover_through_the_engine(impl):
    clock = Clock(ms(2024, 2, 29, 23))
    e = engine(impl, [impl.Budget("m", 2 * EST, period=Period.MONTH)], clock=clock)
    a = e.authorize("m1", input_bytes=3_000)
    e.record(a.reservation_id, output_tokens=1_000)                       # committed 2e6
    open_ = e.authorize("m1", input_bytes=3_000)                          # held across midnight
    assert e.authorize("m1", input_bytes=3_000).decision == Decision.DENY
    clock.now = ms(2024, 3, 1)
    a = e.authorize("m1", input_bytes=3_000)                               # 0 + EST held + EST
    assert a.decision == Decision.ALLOW
    assert a.budgets[0].period_start_ms == ms(2024, 3, 1)
    s = e.record(open_.reservation_id, input_tokens=10)                   # settles into March
    assert status(e, "m") == (s.cost_nanos, EST)


def test_set_committed_from_the_ledger(impl):
    e = engine(impl, [impl.Budget("m", 2 * EST, period=Period.MONTH)])
    assert e.set_committed("m", ms(2026, 3, 1), 2 * EST - 1)
    assert e.authorize("m1", input_bytes=3_000).decision == Decision.DENY
    assert not e.set_committed("m", ms(2026, 2, 1), 0)                    # stale month


def test_leases_through_the_engine(impl):
    e = engine(impl, [impl.Budget("b", 100 * EST)])
    e.set_lease("b", EST)
    assert e.authorize("m1", input_bytes=3_000).decision == Decision.ALLOW
    assert e.authorize("m1", input_bytes=3_000).decision == Decision.DENY
    (ls,) = e.lease_status()
    assert (ls["used_nanos"], ls["unused_nanos"]) == (EST, 0)


def test_set_budgets_while_holds_are_open(impl):
    e = engine(impl, [impl.Budget("a", 10 * EST), impl.Budget("b", 10 * EST)])
    h = e.authorize("m1", input_bytes=3_000)
    e.set_budgets([impl.Budget("b", 10 * EST), impl.Budget("c", 10 * EST)])
    assert status(e, "b") == (0, EST) and status(e, "c") == (0, 0)
    s = e.record(h.reservation_id, input_tokens=1_000)
    assert s.budget_ids == ("b",)
    assert status(e, "b") == (1_000_000, 0) and status(e, "c") == (0, 0)


def test_snapshot_restore_continues_identically(impl):
    clock = Clock()
    rules = [impl.Rule("cap", Effect.MAX_OUTPUT_TOKENS, max_output_tokens=500)]
    budgets = [impl.Budget("t", 50 * EST), impl.Budget("acme", 20 * EST, scope={"customer": "acme"},
                                                          soft_limit_nanos=EST)]
    e1 = engine(impl, budgets, rules, clock=clock, reservation_prefix="h")
    held = [e1.authorize("m1", owners=ACME, labels={"k": "v"}, input_bytes=900 * i + 1)
            for i in range(1, 6)]
    e1.record(held[0].reservation_id, input_tokens=300, input_bytes=2_000)
    e1.release(held[1].reservation_id)
    snap = e1.snapshot()
    e2 = engine(impl, budgets, rules, clock=clock, reservation_prefix="h")
    e2.restore(snap)
    assert e2.snapshot() == snap and e2.open_holds() == 3

    def drive(e):
        out = [e.record(held[2].reservation_id, input_tokens=10, output_tokens=5).to_dict(),
               e.authorize("m1", owners=ACME, input_bytes=4_000).to_dict()]
        clock.now += 1_000_000
        out += [s.to_dict() for s in e.expire()]
        clock.now -= 1_000_000
        return out, e.snapshot()

    assert drive(e1) == drive(e2)


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"model": ""}, "model"),
    ({"model": 5}, "model"),
    ({"model": "m" * 300}, "model"),
    ({"owners": {"team": "x"}}, "owners"),
    ({"owners": ("a", "b")}, "owners"),
    ({"owners": {"customer": 7}}, "owners.customer"),
    ({"labels": {"k": 1}}, "labels.k"),
    ({"labels": {str(i): "v" for i in range(17)}}, "labels"),
    ({"input_bytes": -1}, "input_bytes"),
    ({"input_bytes": -2}, "input_bytes"),
    ({"input_bytes": 10**9}, "input_bytes"),
    ({"input_bytes": 3.0}, "input_bytes"),
    ({"max_output_tokens": -1}, "max_output_tokens"),
    ({"max_output_tokens": 10**9}, "max_output_tokens"),
    ({"privacy_mode": 9}, "privacy_mode"),
    ({"ttl_seconds": -1}, "ttl_seconds"),
    ({"ttl_seconds": 10**8}, "ttl_seconds"),
    ({"reservation_id": 5}, "reservation_id"),
    ({"content": 5, "input_bytes": -1}, "content"),
])
def test_authorize_bad_input_names_the_field(impl, kwargs, field):
    e = engine(impl, [impl.Budget("b", EST)])
    args = {"model": "m1", "input_bytes": 100}
    args.update(kwargs)
    model = args.pop("model")
    with pytest.raises(InvalidArgument) as exc:
        e.authorize(model, **args)
    assert exc.value.field == field
    assert e.open_holds() == 0 and status(e, "b") == (0, 0)


@pytest.mark.parametrize("kwargs, field", [
    ({"input_tokens": -1}, "input_tokens"),
    ({"output_tokens": 10**9}, "output_tokens"),
    ({"input_tokens": 5, "cached_input_tokens": 4, "cache_write_tokens": 2}, "cached_input_tokens"),
    ({"output_tokens": 5, "reasoning_tokens": 6}, "reasoning_tokens"),
    ({"outcome": Outcome.EXPIRED}, "outcome"),
    ({"outcome": 0}, "outcome"),
    ({"outcome": "SUCCESS"}, "outcome"),
    ({"input_bytes": -2}, "input_bytes"),
    ({"model": 3}, "model"),
])
def test_record_bad_input_names_the_field(impl, kwargs, field):
    e = engine(impl, [impl.Budget("b", 10 * EST)])
    a = e.authorize("m1", input_bytes=3_000)
    with pytest.raises(InvalidArgument) as exc:
        e.record(a.reservation_id, **kwargs)
    assert exc.value.field == field
    assert e.open_holds() == 1 and status(e, "b") == (0, EST)     # the hold is untouched


def test_engine_constructor_bad_input(impl):
    for kwargs, field in [({"hold_ttl_seconds": 0}, "hold_ttl_seconds"),
                          ({"clock": 5}, "clock"), ({"estimator": object()}, "estimator"),
                          ({"fallback_price": "x"}, "fallback_price"),
                          ({"reservation_prefix": 1}, "reservation_prefix")]:
        with pytest.raises(InvalidArgument) as exc:
            impl.Engine(catalog(impl), **kwargs)
        assert exc.value.field == field


def test_positional_fast_paths_match_keywords(impl):
    e1, e2 = engine(impl, [impl.Budget("b", 10 * EST)]), engine(impl, [impl.Budget("b", 10 * EST)])
    a1 = e1.authorize("m1", owners=ACME, labels={"k": "v"}, input_bytes=3_000,
                      max_output_tokens=50, ttl_seconds=9)
    a2 = e2.authorize_args("m1", "", ACME, {"k": "v"}, 3_000, None, 50, 1, 9, "")
    assert a1.to_dict() == a2.to_dict()
    s1 = e1.record(a1.reservation_id, input_tokens=7, output_tokens=3, outcome=Outcome.TIMEOUT)
    s2 = e2.record_args(a2.reservation_id, "", "", None, None, 7, 3, 0, 0, 0, Outcome.TIMEOUT, -1)
    assert s1.to_dict() == s2.to_dict()
    with pytest.raises(InvalidArgument) as exc:
        e2.authorize_args("m1", "", None, None, -5, None, 0, 1, 0, "")
    assert exc.value.field == "input_bytes"


def test_catalog_must_be_this_twins(impl):
    with pytest.raises(InvalidArgument) as exc:
        impl.Engine({"m1": 1})
    assert exc.value.field == "catalog"
    e = engine(impl)
    with pytest.raises(InvalidArgument):
        e.set_catalog(None)
    new = impl.Catalog([impl.ModelPrice("m1", "p", input_pico=1, output_pico=1)],
                       version="v2", taken="2026-11-02")
    held = e.authorize("m1", input_bytes=3_000)
    e.set_catalog(new)
    assert e.authorize("m1", input_bytes=3_000).catalog_version == "v2"
    s = e.record(held.reservation_id, input_tokens=1_000)    # priced as at authorize
    assert (s.cost_nanos, s.catalog_version) == (1_000_000, "v1")


# -- usage units and service tiers ------------------------------------------------------

def _units_catalog(impl):
    batch = impl.ModelPrice("m3", "p", input_pico=500_000, output_pico=1_000_000)
    return impl.Catalog([
        impl.ModelPrice("m3", "p", input_pico=1_000_000, output_pico=2_000_000,
                        units={"audio_input_tokens": 40_000_000, "images": 10**12},
                        service_tiers={"batch": batch}),
    ], version="v1", taken="2026-11-01")


def test_record_prices_units_and_the_service_tier(impl):
    e = impl.Engine(_units_catalog(impl), clock=Clock())
    a = e.authorize("m3", owners=ACME, input_bytes=400)
    s = e.record(a.reservation_id, input_tokens=100, output_tokens=10,
                 units={"audio_input_tokens": 60, "images": 2})
    assert s.cost_nanos == (40 * 1_000_000 + 60 * 40_000_000 + 10 * 2_000_000
                            + 2 * 10**12 + 500) // 1000
    b = e.authorize("m3", owners=ACME, input_bytes=400)
    s = e.record(b.reservation_id, input_tokens=100, output_tokens=10, service_tier="batch")
    assert s.cost_nanos == (100 * 500_000 + 10 * 1_000_000) // 1000
    # meter-only records price them the same way
    s = e.record(model="m3", owners=ACME, input_tokens=0, units={"images": 1})
    assert s.cost_nanos == 10**12 // 1000


@pytest.mark.parametrize("kwargs,field", [
    ({"units": {"audio_input_tokens": 101}}, "audio_input_tokens"),
    ({"units": {"images": -1}}, "images"),
    ({"units": {"nope": 1}}, "nope"),
    ({"service_tier": "gold"}, "service_tier"),
    ({"units": {"images": 10**8}}, "usage"),   # 10**8 x 1 USD: past 9e18 pico
])
def test_a_refused_record_leaves_the_hold_in_place(impl, kwargs, field):
    e = impl.Engine(_units_catalog(impl), clock=Clock())
    a = e.authorize("m3", owners=ACME, input_bytes=400)
    with pytest.raises(InvalidArgument) as info:
        e.record(a.reservation_id, input_tokens=100, output_tokens=10, **kwargs)
    assert info.value.field == field
    # the hold is still there: a corrected Record settles it
    s = e.record(a.reservation_id, input_tokens=100, output_tokens=10)
    assert s.cost_nanos == (100 * 1_000_000 + 10 * 2_000_000) // 1000


def test_authorize_reserves_the_expected_quantities(impl):
    e = impl.Engine(_units_catalog(impl), budgets=[impl.Budget("acme", 3 * 10**9 + 10**6,
                                                               scope={"customer": "acme"})],
                    clock=Clock())
    a = e.authorize("m3", owners=ACME, input_bytes=0, max_output_tokens=1, units={"images": 2})
    assert a.estimated_cost_nanos == 2 * 10**9 + 2000  # 2 images at 1 USD + 1 output token
    assert status(e, "acme") == (0, a.estimated_cost_nanos)
    # a third and fourth image do not fit: denied, never clamped to fewer tokens
    b = e.authorize("m3", owners=ACME, input_bytes=0, max_output_tokens=1, units={"images": 2})
    assert b.decision == Decision.DENY and "budget.exceeded" in b.reasons
    s = e.record(a.reservation_id, units={"images": 2})
    assert s.cost_nanos == 2 * 10**9 and status(e, "acme") == (2 * 10**9, 0)


@pytest.mark.parametrize("units,field", [
    ({"audio_input_tokens": 5}, "audio_input_tokens"), ({"images": -1}, "images"),
    ({"bogus": 1}, "bogus"),
])
def test_expected_units_are_quantities(impl, units, field):
    e = impl.Engine(_units_catalog(impl), clock=Clock())
    with pytest.raises(InvalidArgument) as info:
        e.authorize("m3", owners=ACME, input_bytes=0, units=units)
    assert info.value.field == field
