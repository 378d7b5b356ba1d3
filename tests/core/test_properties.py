"""Random operation sequences: both twins agree, HARD budgets hold, money is int.

Each example builds the same engine in both twins (`both`), drives them with
one random sequence of authorize / record / meter-only record / release /
expire / clock advance / budget replacement / lease, and checks after every
step that the two give identical results (or identical errors) and that no
authorize pushed a HARD budget's committed + held past its limit. At the end
the snapshots must be equal too.
"""
from __future__ import annotations

import datetime as dt

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p402core import Effect, Outcome, P402Error

T0 = int(dt.datetime(2024, 2, 27, 22, tzinfo=dt.timezone.utc).timestamp()) * 1000
MODELS = ("m1", "m2", "tiered", "unknown-model")
OWNERS = (
    None,
    {"customer": "acme", "feature": "chat"},
    {"customer": "acme", "feature": "search", "department": "eng"},
    ("zed", "chat", "", "", "eng", "emp-1"),
)
LABELS = (None, {"env": "prod"}, {"env": "dev", "team": "x"})
MONEY_KEYS = ("estimated_cost_nanos", "cost_nanos", "overrun_nanos", "limit_nanos",
              "committed_nanos", "held_nanos", "remaining_nanos")


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self):
        return self.now


def build(impl, clock, allow_clamp, fallback):
    prices = [
        impl.ModelPrice("m1", "p", input_pico=1_000_000, output_pico=2_000_000, family="gpt",
                        max_output_tokens=2_000),
        impl.ModelPrice("m2", "q", input_pico=150_000, output_pico=600_000, family="claude",
                        cached_input_pico=15_000, reasoning_pico=900_000),
        impl.ModelPrice("tiered", "g", input_pico=1_250_000, output_pico=10_000_000,
                        family="gemini", tiers=[impl.PriceTier(2_000, input_pico=2_500_000,
                                                               output_pico=15_000_000)]),
    ]
    cat = impl.Catalog(prices, version="v", taken="2026-11-01")
    rules = [
        impl.Rule("cap", Effect.MAX_OUTPUT_TOKENS, owners={"feature": "search"},
                  max_output_tokens=300),
        impl.Rule("cost", Effect.MAX_COST_PER_REQUEST, owners={"department": "eng"},
                  max_cost_nanos=30_000_000),
        impl.Rule("rate", Effect.RATE_LIMIT, rate_limit=4, window_seconds=10, per="customer"),
        impl.Rule("dev", Effect.WARN, owners={"label.env": "dev"}),
        impl.Rule("no-intern", Effect.DENY, owners={"employee": "intern"}),
    ]
    fb = impl.ModelPrice("fallback", "", input_pico=3_000_000, output_pico=3_000_000) \
        if fallback else None
    return impl.Engine(cat, budgets=budget_set(impl, 0), rules=rules, clock=clock,
                       allow_clamp=allow_clamp, fallback_price=fb, hold_ttl_seconds=120,
                       reservation_prefix="r")


def budget_set(impl, variant):
    B = impl.Budget
    if variant == 0:
        return [B("tenant", 60_000_000, period="DAY"),
                B("acme", 25_000_000, scope={"customer": "acme"}, period="WEEK",
                  soft_limit_nanos=10_000_000),
                B("prod", 15_000_000, scope={"label.env": "prod"}, period="MONTH",
                  enforcement="SOFT", soft_limit_nanos=5_000_000),
                B("eng", 8_000_000, scope={"department": "eng"}, period="TOTAL")]
    return [B("acme", 30_000_000, scope={"customer": "acme"}, period="MONTH"),
            B("chat", 12_000_000, scope={"feature": "chat"}, period="DAY"),
            B("eng", 9_000_000, scope={"department": "eng"}, period="TOTAL")]


ops = st.one_of(
    st.tuples(st.just("auth"), st.sampled_from(MODELS), st.integers(0, len(OWNERS) - 1),
              st.integers(0, len(LABELS) - 1), st.integers(0, 30_000),
              st.sampled_from((0, 1, 50, 500, 5_000)), st.sampled_from((0, 5, 60)),
              st.booleans()),
    st.tuples(st.just("record"), st.integers(0, 50), st.integers(0, 6_000),
              st.integers(0, 3_000), st.integers(0, 100), st.sampled_from(list(Outcome)[1:5]),
              st.integers(-1, 20_000)),
    st.tuples(st.just("meter"), st.sampled_from(MODELS), st.integers(0, len(OWNERS) - 1),
              st.integers(0, 5_000), st.integers(0, 2_000)),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("expire")),
    st.tuples(st.just("advance"), st.sampled_from((1, 999, 30_000, 3_600_000, 86_400_000))),
    st.tuples(st.just("budgets"), st.integers(0, 1)),
    st.tuples(st.just("lease"), st.sampled_from(("tenant", "acme", "eng")),
              st.sampled_from((None, 0, 3_000_000, 50_000_000))),
)


def run(impl, engine, clock, op, issued):
    """Apply one op; returns plain data (result or error) for comparison."""
    kind = op[0]
    try:
        if kind == "auth":
            _, model, oi, li, nbytes, cap, ttl, given_id = op
            rid = f"g{len(issued)}" if given_id else ""
            a = engine.authorize(model, owners=OWNERS[oi], labels=LABELS[li], input_bytes=nbytes,
                                 max_output_tokens=cap, ttl_seconds=ttl, reservation_id=rid)
            if a.reservation_id:
                issued.append(a.reservation_id)
            return a.to_dict()
        if kind == "record":
            _, pick, i, o, cached, outcome, nbytes = op
            rid = issued[pick % len(issued)] if issued else "none"
            return engine.record(rid, input_tokens=i, output_tokens=o,
                                 cached_input_tokens=min(cached, i), outcome=outcome,
                                 input_bytes=nbytes).to_dict()
        if kind == "meter":
            _, model, oi, i, o = op
            return engine.record(model=model, owners=OWNERS[oi], input_tokens=i,
                                 output_tokens=o).to_dict()
        if kind == "release":
            rid = issued[op[1] % len(issued)] if issued else "none"
            return engine.release(rid).to_dict()
        if kind == "expire":
            return [s.to_dict() for s in engine.expire()]
        if kind == "advance":
            clock.now += op[1]
            return None
        if kind == "budgets":
            engine.set_budgets(budget_set(impl, op[1]))
            return [b.to_dict() for b in engine.budget_status()]
        if kind == "lease":
            engine.set_lease(op[1], op[2])
            return engine.lease_status()
    except P402Error as exc:
        return ("error", type(exc).__name__, getattr(exc, "field", None))
    raise AssertionError(op)


def assert_ints(value, path="result"):
    if isinstance(value, dict):
        for k, v in value.items():
            if k in MONEY_KEYS:
                assert type(v) is int, f"{path}.{k} is {type(v).__name__}"
            assert_ints(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            assert_ints(v, f"{path}[{i}]")
    else:
        assert not isinstance(value, float), f"{path} is a float"


def hard_used(engine):
    return {s.budget_id: (s.committed_nanos + s.held_nanos, s.limit_nanos)
            for s in engine.budget_status() if s.enforcement == 1}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, min_size=1, max_size=60), st.booleans(), st.booleans())
def test_twins_agree_and_hard_budgets_hold(both, seq, allow_clamp, fallback):
    py, c = both
    engines = []
    for impl in (py, c):
        clock = Clock()
        e = build(impl, clock, allow_clamp, fallback)
        engines.append((impl, e, clock, []))
    for op in seq:
        results = []
        for impl, e, clock, issued in engines:
            before = hard_used(e)
            res = run(impl, e, clock, op, issued)
            results.append(res)
            assert_ints(res)
            if op[0] == "auth":
                # an authorize never takes a HARD budget past its limit
                for bid, (used, limit) in hard_used(e).items():
                    if used > before.get(bid, (0, 0))[0]:
                        assert used <= limit, (bid, used, limit)
        assert results[0] == results[1], op
    snaps = [e.snapshot() for _, e, _, _ in engines]
    assert snaps[0] == snaps[1]
    assert_ints(snaps[0])


def test_differential_smoke(both):
    """A fixed sequence, so a twin mismatch shows up even without hypothesis' search."""
    py, c = both
    out = []
    for impl in (py, c):
        clock = Clock()
        e = build(impl, clock, True, True)
        issued = []
        trace = []
        for k in range(200):
            model = MODELS[k % 4]
            trace.append(run(impl, e, clock, ("auth", model, k % 4, k % 3, 97 * k % 20_000,
                                        (0, 50, 500)[k % 3], (0, 5)[k % 2], k % 5 == 0),
                             issued))
            if k % 3 == 0:
                trace.append(run(impl, e, clock, ("record", k, 37 * k % 3_000, 11 * k % 900, 5,
                                            Outcome.SUCCESS, -1), issued))
            if k % 7 == 0:
                trace.append(run(impl, e, clock, ("release", k * 3), issued))
            clock.now += 997 * (k % 5)
            if k % 11 == 0:
                trace.append(run(impl, e, clock, ("expire",), issued))
        out.append((trace, e.snapshot()))
    assert out[0] == out[1]
    assert any(isinstance(t, dict) and t.get("decision") == 3 for t in out[0][0])
    assert any(isinstance(t, dict) and t.get("decision") == 1 for t in out[0][0])
