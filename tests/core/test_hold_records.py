"""Hold records (Engine.hold_record / hold_records / restore_holds) and the
rate-limit state in snapshots (RuleSet.snapshot / restore), on both twins."""
from __future__ import annotations

import json

import pytest

from p402core import Effect, Evidence, InvalidArgument, NotFound, Outcome, RateUnit

T0 = 1_800_000_000_000
ACME = {"customer": "acme", "feature": "chat"}


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


def catalog(impl, version="v1"):
    return impl.Catalog([
        impl.ModelPrice("m1", "p", input_pico=1_000_000, output_pico=2_000_000, family="gpt",
                        max_output_tokens=1_000),
        impl.ModelPrice("m2", "q", input_pico=10_000, output_pico=20_000, family="gpt"),
    ], version=version, taken="2026-11-01")


def budgets(impl):
    return [impl.Budget("tenant", 10**12), impl.Budget("acme", 10**10, scope={"customer": "acme"}),
            impl.Budget("other", 10**10, scope={"customer": "zed"})]


def held(engine):
    return {s.budget_id: (s.committed_nanos, s.held_nanos) for s in engine.budget_status()}


def test_record_round_trip_into_a_fresh_engine(impl):
    clock = Clock()
    e = impl.Engine(catalog(impl), budgets=budgets(impl), clock=clock)
    a1 = e.authorize("m1", owners=ACME, labels={"env": "prod"}, input_bytes=3_000)
    a2 = e.authorize("m2", owners={"customer": "zed"}, input_bytes=900, ttl_seconds=60)
    rec = e.hold_record(a1.reservation_id)
    assert rec == {
        "reservation_id": a1.reservation_id, "model": "m1", "provider": "p",
        "price": catalog(impl).lookup("m1").to_dict(),
        "owners": ["acme", "chat", "", "", "", ""], "labels": {"env": "prod"},
        "amount_nanos": 3_000_000, "input_tokens": 1_000, "output_tokens": 1_000,
        "input_bytes": 3_000, "expires_ms": T0 + 900_000, "budget_ids": ["tenant", "acme"],
        "catalog_version": "v1",
    }
    records = e.hold_records()
    assert [r["reservation_id"] for r in records] == [a1.reservation_id, a2.reservation_id]
    json.dumps(records)  # plain data: what the server writes to its holds table

    fresh = impl.Engine(catalog(impl), budgets=budgets(impl), clock=clock)
    start = fresh.budget_status()[0].period_start_ms
    assert fresh.set_committed("tenant", start, 7)   # the ledger's total, first
    assert fresh.restore_holds(records) == 2
    assert fresh.hold_records() == records
    # held amounts are back on the budgets, the committed total is untouched
    assert held(fresh) == {"tenant": (7, 3_000_000 + a2.estimated_cost_nanos),
                           "acme": (0, 3_000_000), "other": (0, a2.estimated_cost_nanos)}


def test_restore_skips_open_ids_and_counts_only_new_ones(impl):
    e = impl.Engine(catalog(impl), budgets=budgets(impl), clock=Clock())
    a = e.authorize("m1", owners=ACME, input_bytes=3_000)
    records = e.hold_records()
    before = held(e)
    assert e.restore_holds(records) == 0          # already open: skipped
    assert held(e) == before and e.open_holds() == 1
    other = dict(records[0], reservation_id="r-2")
    assert e.restore_holds([records[0], other, other]) == 1
    assert e.open_holds() == 2 and held(e)["acme"][1] == 2 * before["acme"][1]
    e.release(a.reservation_id)


def test_restore_is_all_or_nothing_and_names_the_field(impl):
    e = impl.Engine(catalog(impl), budgets=budgets(impl), clock=Clock())
    e.authorize("m1", owners=ACME, input_bytes=3_000)
    good = e.hold_records()[0]
    target = impl.Engine(catalog(impl), budgets=budgets(impl), clock=Clock())
    bad_cases = [
        ({**good, "reservation_id": "x", "amount_nanos": -1}, "records[1].amount_nanos"),
        ({**good, "reservation_id": "x", "owners": ["a"]}, "records[1].owners"),
        ({**good, "reservation_id": "x", "surprise": 1}, "records[1].surprise"),
        ({k: v for k, v in good.items() if k != "expires_ms"}, "records[1].expires_ms"),
        ({**good, "reservation_id": "x", "price": {"model": "m1"}}, "records[1].price.input_pico"),
    ]
    for bad, field in bad_cases:
        with pytest.raises(InvalidArgument) as info:
            target.restore_holds([good, bad])
        assert info.value.field == field
        assert target.open_holds() == 0 and held(target)["tenant"] == (0, 0)
    with pytest.raises(InvalidArgument):
        target.restore_holds({"not": "a list"})
    with pytest.raises(NotFound):
        target.hold_record("nope")


def test_restored_hold_records_and_expires(impl):
    clock = Clock()
    src = impl.Engine(catalog(impl), budgets=budgets(impl), clock=clock)
    a = src.authorize("m1", owners=ACME, input_bytes=3_000, ttl_seconds=10)
    b = src.authorize("m1", owners=ACME, input_bytes=3_000, ttl_seconds=20)
    records = src.hold_records()
    # the new engine's catalog no longer prices m1 the same: the hold keeps its price
    cheap = impl.Catalog([impl.ModelPrice("m1", "p", input_pico=1, output_pico=1)],
                         version="v2", taken="2026-11-02")
    e = impl.Engine(cheap, budgets=budgets(impl), clock=clock, reservation_prefix="n-")
    assert e.restore_holds(records) == 2
    s = e.record(a.reservation_id, input_tokens=1_000, output_tokens=500, input_bytes=3_000)
    assert s.cost_nanos == 1_000 * 1_000 + 500 * 2_000     # the hold's price, not v2's
    assert s.estimated_cost_nanos == 3_000_000 and s.catalog_version == "v1"
    assert s.evidence == Evidence.REPORTED and s.budget_ids == ("tenant", "acme")
    assert held(e)["acme"] == (s.cost_nanos, 3_000_000)
    clock.now += 20_000
    (x,) = e.expire()
    assert x.reservation_id == b.reservation_id and x.outcome == Outcome.EXPIRED
    assert held(e)["acme"] == (s.cost_nanos + 3_000_000, 0)
    # generated ids never collide with restored ones
    assert e.authorize("m1", owners=ACME, input_bytes=3).reservation_id.startswith("n-")


def test_restore_onto_a_budget_that_no_longer_exists(impl):
    e = impl.Engine(catalog(impl), budgets=budgets(impl), clock=Clock())
    e.authorize("m1", owners=ACME, input_bytes=3_000)
    records = e.hold_records()
    target = impl.Engine(catalog(impl), budgets=[impl.Budget("tenant", 10**12)], clock=Clock())
    assert target.restore_holds(records) == 1
    assert target.hold_records()[0]["budget_ids"] == ["tenant"]
    assert held(target) == {"tenant": (0, 3_000_000)}


def test_restore_does_not_check_limits(impl):
    """A hold passed its check when it was made; a restart must not drop it."""
    e = impl.Engine(catalog(impl), budgets=budgets(impl), clock=Clock())
    e.authorize("m1", owners=ACME, input_bytes=3_000)
    tight = impl.Engine(catalog(impl), budgets=[impl.Budget("tenant", 1)], clock=Clock())
    assert tight.restore_holds(e.hold_records()) == 1
    assert held(tight) == {"tenant": (0, 3_000_000)}


def test_both_twins_give_the_same_records(both):
    py, c = both
    out = []
    for impl in (py, c):
        e = impl.Engine(catalog(impl), budgets=budgets(impl), clock=Clock())
        for i in range(5):
            e.authorize("m1" if i % 2 else "m2", owners=ACME, labels={"i": str(i)},
                        input_bytes=100 * i, ttl_seconds=i)
        out.append(e.hold_records())
    assert out[0] == out[1]


# -- rate-limit buckets survive snapshot / restore --------------------------------------

def rate_rules(impl, rate=3):
    return [impl.Rule("per-customer", Effect.RATE_LIMIT, rate_limit=rate, window_seconds=60,
                      per="customer"),
            impl.Rule("tokens", Effect.RATE_LIMIT, rate_limit=10**6, rate_unit=RateUnit.TOKENS,
                      window_seconds=60)]


def test_engine_snapshot_keeps_rate_limit_buckets(impl):
    clock = Clock()
    e = impl.Engine(catalog(impl), rules=rate_rules(impl), clock=clock)
    for _ in range(3):
        e.release(e.authorize("m2", owners=ACME, input_bytes=30).reservation_id)
    assert not e.authorize("m2", owners=ACME, input_bytes=30).allowed
    snap = json.loads(json.dumps(e.snapshot()))
    fresh = impl.Engine(catalog(impl), rules=rate_rules(impl), clock=clock)
    fresh.restore(snap)
    assert not fresh.authorize("m2", owners=ACME, input_bytes=30).allowed   # still empty
    assert fresh.authorize("m2", owners={"customer": "zed"}, input_bytes=30).allowed
    clock.now += 20_000   # a third of the window refills one request
    assert fresh.authorize("m2", owners=ACME, input_bytes=30).allowed
    assert fresh.rules.snapshot() != e.rules.snapshot()


def test_changed_rule_starts_full_after_restore(impl):
    clock = Clock()
    e = impl.Engine(catalog(impl), rules=rate_rules(impl), clock=clock)
    for _ in range(3):
        e.authorize("m2", owners=ACME, input_bytes=30)
    snap = e.snapshot()
    changed = impl.Engine(catalog(impl), rules=rate_rules(impl, rate=4), clock=clock)
    changed.restore(snap)
    assert changed.authorize("m2", owners=ACME, input_bytes=30).allowed


def test_ruleset_snapshot_restore_and_validation(impl):
    rs = impl.RuleSet(rate_rules(impl, rate=2))
    r = rs.evaluate(ACME, None, "m1", "p", 1)
    rs.rate_consume(r, ACME, 10, 0, T0)
    rs.rate_consume(r, ACME, 10, 0, T0)
    state = rs.snapshot()
    assert state["limiters"]["per-customer"] == {
        "key": [2, RateUnit.REQUESTS, 60, "customer"], "buckets": [["acme", 0, T0]]}
    other = impl.RuleSet(rate_rules(impl, rate=2))
    other.restore(state)
    assert other.snapshot() == state
    assert other.rate_check(other.evaluate(ACME, None, "m1", "p", 1), ACME, 10, 0, T0) \
        == "per-customer"
    bad = json.loads(json.dumps(state))
    bad["limiters"]["tokens"]["buckets"] = [["", 10**18, T0]]   # above the capacity
    fresh = impl.RuleSet(rate_rules(impl, rate=2))
    with pytest.raises(InvalidArgument) as info:
        fresh.restore(bad)
    assert info.value.field == "limiters.tokens.buckets"
    assert fresh.snapshot()["limiters"]["per-customer"]["buckets"] == []   # untouched
    with pytest.raises(InvalidArgument):
        fresh.restore({"version": 2})


def test_ruleset_snapshots_agree_across_twins(both):
    states = []
    for impl in both:
        rs = impl.RuleSet(rate_rules(impl))
        for i, who in enumerate(["a", "b", "a", "c"]):
            owners = {"customer": who}
            rs.rate_consume(rs.evaluate(owners, None, "m", "", 1), owners, 100 * i, 0, T0 + i)
        states.append(rs.snapshot())
    assert states[0] == states[1]
