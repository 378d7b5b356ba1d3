"""BudgetBook / Budget / BudgetStatus, run against both twins (`impl`)."""
from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p402core import Enforcement, InvalidArgument, NotFound, Period

DAY = 86_400_000


def ms(y, m, d, hh=0, mm=0, ss=0, milli=0):
    t = dt.datetime(y, m, d, hh, mm, ss, tzinfo=dt.timezone.utc)
    return int(t.timestamp()) * 1000 + milli


T0 = ms(2026, 3, 14, 12)   # a Saturday in March 2026


# -- Budget ------------------------------------------------------------------------

def test_budget_fields_and_defaults(impl):
    b = impl.Budget("team", 1_000, scope={"feature": "chat", "label.env": "prod"})
    assert (b.budget_id, b.limit_nanos, b.soft_limit_nanos) == ("team", 1_000, 0)
    assert b.period == Period.MONTH and b.enforcement == Enforcement.HARD
    assert b.scope == {"feature": "chat", "label.env": "prod"}
    b.scope["feature"] = "other"          # a copy: the budget does not change
    assert b.scope["feature"] == "chat"
    with pytest.raises(AttributeError):
        b.limit_nanos = 5


@pytest.mark.parametrize("args, kwargs, field", [
    (("", 10), {}, "budget_id"),
    ((5, 10), {}, "budget_id"),
    (("b", -1), {}, "limit_nanos"),
    (("b", 1.5), {}, "limit_nanos"),
    (("b", True), {}, "limit_nanos"),
    (("b", 2**61 + 1), {}, "limit_nanos"),
    (("b", 10), {"soft_limit_nanos": 11}, "soft_limit_nanos"),
    (("b", 10), {"soft_limit_nanos": -1}, "soft_limit_nanos"),
    (("b", 10), {"period": "YEAR"}, "period"),
    (("b", 10), {"period": 9}, "period"),
    (("b", 10), {"period": 0}, "period"),
    (("b", 10), {"enforcement": "MAYBE"}, "enforcement"),
    (("b", 10), {"enforcement": 7}, "enforcement"),
    (("b", 10), {"scope": {"team": "x"}}, "scope"),
    (("b", 10), {"scope": {"label.": "x"}}, "scope"),
    (("b", 10), {"scope": {"customer": ""}}, "scope.customer"),
    (("b", 10), {"scope": ["customer"]}, "scope"),
])
def test_budget_bad_input_names_the_field(impl, args, kwargs, field):
    with pytest.raises(InvalidArgument) as exc:
        impl.Budget(*args, **kwargs)
    assert exc.value.field == field


def test_budget_dict_round_trip_uses_enum_names(impl):
    b = impl.Budget("b", 500, scope={"customer": "acme"}, period=Period.WEEK,
                    soft_limit_nanos=400, enforcement=Enforcement.SOFT)
    d = b.to_dict()
    assert d == {"budget_id": "b", "limit_nanos": 500, "scope": {"customer": "acme"},
                 "period": "WEEK", "soft_limit_nanos": 400, "enforcement": "SOFT"}
    assert impl.Budget.from_dict(d) == b
    with pytest.raises(InvalidArgument) as exc:
        impl.Budget.from_dict({**d, "color": "red"})
    assert exc.value.field == "color"
    with pytest.raises(InvalidArgument) as exc:
        impl.Budget.from_dict({"budget_id": "x"})
    assert exc.value.field == "limit_nanos"


def test_budget_matches_all_conditions(impl):
    b = impl.Budget("b", 1, scope={"customer": "acme", "label.env": "prod"})
    assert b.matches({"customer": "acme"}, {"env": "prod", "x": "y"})
    assert not b.matches({"customer": "acme"}, {"env": "dev"})
    assert not b.matches({"customer": "acme"}, None)
    assert not b.matches({"customer": "other"}, {"env": "prod"})
    assert impl.Budget("all", 1).matches(None, None)


# -- periods -------------------------------------------------------------------------

@pytest.mark.parametrize("now, period, start, end", [
    # DAY
    (ms(2026, 3, 14, 23, 59, 59, 999), Period.DAY, ms(2026, 3, 14), ms(2026, 3, 15)),
    (ms(2026, 3, 15), Period.DAY, ms(2026, 3, 15), ms(2026, 3, 16)),
    # WEEK: ISO weeks start on Monday 00:00 UTC
    (ms(2026, 3, 14, 12), Period.WEEK, ms(2026, 3, 9), ms(2026, 3, 16)),
    (ms(2026, 3, 16), Period.WEEK, ms(2026, 3, 16), ms(2026, 3, 23)),
    (ms(2026, 1, 1), Period.WEEK, ms(2025, 12, 29), ms(2026, 1, 5)),    # week across years
    # 1970-01-01 was a Thursday: its week began Monday 1969-12-29, before the epoch
    (ms(1970, 1, 1), Period.WEEK, ms(1969, 12, 29), ms(1970, 1, 5)),
    # MONTH: calendar months, leap years
    (ms(2024, 2, 29, 23), Period.MONTH, ms(2024, 2, 1), ms(2024, 3, 1)),
    (ms(2023, 2, 28, 23), Period.MONTH, ms(2023, 2, 1), ms(2023, 3, 1)),
    (ms(2000, 2, 15), Period.MONTH, ms(2000, 2, 1), ms(2000, 3, 1)),     # 400-year leap
    (ms(2100, 2, 15), Period.MONTH, ms(2100, 2, 1), ms(2100, 3, 1)),     # 100-year non-leap
    (ms(2026, 12, 31, 23, 59, 59, 999), Period.MONTH, ms(2026, 12, 1), ms(2027, 1, 1)),
    (ms(2026, 4, 30), Period.MONTH, ms(2026, 4, 1), ms(2026, 5, 1)),
    (ms(2026, 5, 1), Period.MONTH, ms(2026, 5, 1), ms(2026, 6, 1)),
    # TOTAL
    (ms(2026, 5, 1), Period.TOTAL, 0, 2**62),
])
def test_period_bounds(impl, now, period, start, end):
    assert impl.period_bounds(period, now) == (start, end)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=ms(2400, 1, 1)))
def test_period_bounds_agree_with_datetime(impl, now):
    t = dt.datetime.fromtimestamp(now // 1000, tz=dt.timezone.utc)   # whole seconds: exact
    day = dt.datetime(t.year, t.month, t.day, tzinfo=dt.timezone.utc)
    week = day - dt.timedelta(days=t.weekday())
    month = dt.datetime(t.year, t.month, 1, tzinfo=dt.timezone.utc)
    nxt = dt.datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=dt.timezone.utc)

    def m(x):
        return int(x.timestamp()) * 1000

    assert impl.period_bounds(Period.DAY, now) == (m(day), m(day) + DAY)
    assert impl.period_bounds(Period.WEEK, now) == (m(week), m(week) + 7 * DAY)
    assert impl.period_bounds(Period.MONTH, now) == (m(month), m(nxt))


def test_period_bounds_bad_input(impl):
    with pytest.raises(InvalidArgument) as exc:
        impl.period_bounds(Period.DAY, -1)
    assert exc.value.field == "now_ms"
    with pytest.raises(InvalidArgument) as exc:
        impl.period_bounds(0, 5)
    assert exc.value.field == "period"


# -- BudgetBook: reserve / commit / release -------------------------------------------

def book3(impl):
    return impl.BudgetBook([
        impl.Budget("tenant", 1_000),
        impl.Budget("acme", 300, scope={"customer": "acme"}),
        impl.Budget("soft", 100, scope={"customer": "acme"}, enforcement="SOFT",
                    soft_limit_nanos=50),
    ])


def counters(book, now=T0):
    return {s.budget_id: (s.committed_nanos, s.held_nanos) for s in book.statuses(None, now)}


def test_match_and_budget_sets(impl):
    book = book3(impl)
    assert book.match({"customer": "acme"}) == (0, 1, 2)
    assert book.match({"customer": "other"}) == (0,)
    assert book.match(None) == (0,)
    s1 = book.match_set({"customer": "acme"})
    s2 = book.match_set(("acme", "", "", "", "", ""))
    assert s1 is s2                                # interned
    assert s1.budget_ids == ("tenant", "acme", "soft")
    with pytest.raises(InvalidArgument) as exc:
        book.match({"team": "x"})
    assert exc.value.field == "owners"


def test_reserve_is_all_or_none(impl):
    book = book3(impl)
    acme = book.match({"customer": "acme"})
    assert book.reserve(acme, 250, T0)
    assert counters(book) == {"tenant": (0, 250), "acme": (0, 250), "soft": (0, 250)}
    # 100 more fits the tenant (350 <= 1000) but not acme (350 > 300): nothing is held
    assert not book.reserve(acme, 100, T0)
    assert counters(book) == {"tenant": (0, 250), "acme": (0, 250), "soft": (0, 250)}
    assert book.reserve(acme, 50, T0)              # exactly at the limit fits
    assert counters(book)["acme"] == (0, 300)
    assert not book.reserve(acme, 1, T0)
    assert book.reserve((0,), 1, T0)               # tenant alone still has room


def test_soft_never_blocks_but_is_reported(impl):
    book = book3(impl)
    acme = book.match({"customer": "acme"})
    assert book.reserve(acme, 40, T0)
    assert book.over_soft(acme, T0) == ()
    assert book.reserve(acme, 20, T0)              # soft: 60 > soft limit 50
    assert book.over_soft(acme, T0) == (2,)
    book.commit((2,), 500, T0)                      # soft budget far past its limit
    assert book.reserve((2,), 10_000, T0)           # still never blocks
    assert book.over_soft((2,), T0) == (2,)


def test_hard_budget_with_soft_limit_is_reported(impl):
    book = impl.BudgetBook([impl.Budget("h", 100, soft_limit_nanos=80)])
    assert book.reserve((0,), 80, T0)
    assert book.over_soft((0,), T0) == ()
    assert book.reserve((0,), 1, T0)
    assert book.over_soft((0,), T0) == (0,)


def test_headroom_is_the_tightest_hard_budget(impl):
    book = book3(impl)
    acme = book.match({"customer": "acme"})
    assert book.headroom(acme, T0) == 300
    book.reserve(acme, 120, T0)
    book.commit((0,), 800, T0)
    assert book.headroom(acme, T0) == 80            # tenant: 1000 - 800 - 120
    assert book.headroom((2,), T0) == 2**61          # SOFT only: unlimited
    book.commit((0,), 500, T0)                      # over the limit: no room, never negative
    assert book.headroom(acme, T0) == 0


def test_settle_commits_actual_and_releases_hold(impl):
    book = book3(impl)
    acme = book.match({"customer": "acme"})
    book.reserve(acme, 200, T0)
    book.settle(acme, 200, 260, T0)                 # overrun: committed anyway
    assert counters(book) == {"tenant": (260, 0), "acme": (260, 0), "soft": (260, 0)}
    book.release(acme, 5)                           # never below zero
    assert counters(book)["acme"] == (260, 0)


def test_reserve_bad_input(impl):
    book = book3(impl)
    for args, field in [(((0,), -1, T0), "amount_nanos"), (((0,), 1.0, T0), "amount_nanos"),
                        (((0,), 1, -5), "now_ms"), (((7,), 1, T0), "indices")]:
        with pytest.raises(InvalidArgument) as exc:
            book.reserve(*args)
        assert exc.value.field == field
    with pytest.raises(NotFound):
        book.index("nope")


def test_huge_amount_never_fits_and_never_overflows(impl):
    book = impl.BudgetBook([impl.Budget("h", 2**61), impl.Budget("s", 10, enforcement="SOFT")])
    assert not book.reserve((0,), 2**63 - 1, T0)
    assert book.reserve((1,), 2**63 - 1, T0)        # SOFT: held saturates at MAX_NANOS
    assert book.statuses((1,), T0)[0].held_nanos == 2**61
    book.commit((0,), 2**63 - 1, T0)
    book.commit((0,), 2**63 - 1, T0)
    assert book.statuses((0,), T0)[0].committed_nanos == 2**61


# -- periods in the book ----------------------------------------------------------------

@pytest.mark.parametrize("period, now, next_period", [
    (Period.DAY, ms(2026, 3, 14, 23, 59), ms(2026, 3, 15)),
    (Period.WEEK, ms(2026, 3, 15, 23, 59), ms(2026, 3, 16)),            # Sunday -> Monday
    (Period.MONTH, ms(2024, 2, 29, 23, 59), ms(2024, 3, 1)),            # leap February
    (Period.MONTH, ms(2026, 12, 31, 23), ms(2027, 1, 1)),
])
def test_rollover_resets_committed_and_keeps_holds(impl, period, now, next_period):
    book = impl.BudgetBook([impl.Budget("b", 1_000, period=period)])
    book.commit((0,), 700, now)
    assert book.reserve((0,), 200, now)
    assert not book.reserve((0,), 200, now)
    assert not book.reserve((0,), 200, next_period - 1)       # same period, 1 ms before
    st_ = book.status(0, next_period)
    assert (st_.committed_nanos, st_.held_nanos, st_.period_start_ms) == (0, 200, next_period)
    assert book.reserve((0,), 800, next_period)                 # 0 + 200 held + 800 fits
    # the old period's hold settles into the period it settles in
    book.settle((0,), 200, 150, next_period + 5)
    assert counters(book, next_period + 5) == {"b": (150, 800)}


def test_total_period_never_rolls(impl):
    book = impl.BudgetBook([impl.Budget("b", 1_000, period=Period.TOTAL)])
    book.commit((0,), 900, ms(2020, 1, 1))
    st_ = book.status(0, ms(2090, 1, 1))
    assert (st_.committed_nanos, st_.period_start_ms) == (900, 0)


def test_clock_going_back_does_not_roll_back(impl):
    book = impl.BudgetBook([impl.Budget("b", 1_000, period=Period.DAY)])
    book.commit((0,), 10, ms(2026, 3, 15, 1))
    book.commit((0,), 5, ms(2026, 3, 14, 23))                   # late clock: same period
    assert book.status(0, ms(2026, 3, 15, 2)).committed_nanos == 15


def test_set_committed(impl):
    book = impl.BudgetBook([impl.Budget("b", 1_000, period=Period.DAY)])
    day = ms(2026, 3, 14)
    assert book.set_committed("b", day, 400)                     # no period yet: adopted
    assert book.status(0, day + 5).committed_nanos == 400
    assert book.set_committed("b", day, 420)                     # same period: replaced
    assert not book.set_committed("b", day - DAY, 999)           # older period: stale
    assert book.status(0, day + 5).committed_nanos == 420
    assert book.set_committed("b", day + DAY, 7)                 # later period: becomes current
    assert book.status(0, day + DAY + 5).committed_nanos == 7
    assert book.status(0, day + 2 * DAY).committed_nanos == 0   # rolls on as usual
    with pytest.raises(InvalidArgument) as exc:
        book.set_committed("b", day + 1, 5)
    assert exc.value.field == "period_start_ms"
    with pytest.raises(InvalidArgument) as exc:
        book.set_committed("b", day, -5)
    assert exc.value.field == "nanos"
    with pytest.raises(NotFound):
        book.set_committed("zz", day, 5)


# -- leases ------------------------------------------------------------------------------

def test_lease_limits_local_spend_to_the_grant(impl):
    book = impl.BudgetBook([impl.Budget("b", 1_000), impl.Budget("s", 50, enforcement="SOFT")])
    book.commit((0,), 300, T0)                 # e.g. rebuilt from the ledger
    book.set_lease("b", 200)                   # this process may spend 200 more
    assert not book.reserve((0,), 201, T0)
    assert book.reserve((0,), 150, T0)
    assert book.headroom((0,), T0) == 50
    book.settle((0,), 150, 170, T0)            # actual 170 of the grant used
    (ls,) = book.lease_status()
    assert ls == {"budget_id": "b", "period_start_ms": ms(2026, 3, 1), "lease_nanos": 200,
                  "used_nanos": 170, "unused_nanos": 30, "committed_nanos": 470,
                  "held_nanos": 0}
    assert book.reserve((0,), 30, T0) and not book.reserve((0,), 1, T0)
    book.set_lease("b", 100)                   # top-up: a new grant from here
    assert book.headroom((0,), T0) == 100
    book.set_lease("b", None)                  # whole budget again
    assert book.headroom((0,), T0) == 1_000 - 470 - 30
    assert book.lease_status() == ()


def test_lease_never_exceeds_the_limit(impl):
    book = impl.BudgetBook([impl.Budget("b", 1_000)])
    book.commit((0,), 900, T0)
    book.set_lease("b", 500)
    assert book.headroom((0,), T0) == 100
    assert not book.reserve((0,), 101, T0)


def test_lease_rebases_at_rollover(impl):
    book = impl.BudgetBook([impl.Budget("b", 1_000, period=Period.DAY)])
    day = ms(2026, 3, 14)
    book.set_lease("b", 100)
    assert book.reserve((0,), 60, day)
    book.commit((0,), 40, day)
    assert book.headroom((0,), day) == 0
    # next day: committed resets, the 60 held stays; the grant applies anew
    assert book.headroom((0,), day + DAY) == 100
    (ls,) = book.lease_status()
    assert (ls["used_nanos"], ls["period_start_ms"]) == (0, day + DAY)


def test_lease_bad_input(impl):
    book = impl.BudgetBook([impl.Budget("b", 1_000)])
    with pytest.raises(InvalidArgument) as exc:
        book.set_lease("b", -1)
    assert exc.value.field == "lease_nanos"
    with pytest.raises(NotFound):
        book.set_lease("x", 5)


# -- replacing budgets, snapshot -----------------------------------------------------------

def test_set_budgets_keeps_counters_by_id(impl):
    book = book3(impl)
    acme_set = book.match_set({"customer": "acme"})
    book.reserve(acme_set.indices, 100, T0)
    book.commit((0,), 10, T0)
    g = book.generation
    book.set_budgets([impl.Budget("new", 5), impl.Budget("tenant", 2_000),
                      impl.Budget("acme", 300, scope={"customer": "acme"})])
    assert book.generation > g
    assert counters(book) == {"new": (0, 0), "tenant": (10, 100), "acme": (0, 100)}
    cur = book.current(acme_set)               # re-resolved by id: "soft" is gone
    assert cur.budget_ids == ("tenant", "acme") and cur.indices == (1, 2)
    book.release(cur.indices, 100)
    assert counters(book) == {"new": (0, 0), "tenant": (10, 0), "acme": (0, 0)}
    with pytest.raises(InvalidArgument) as exc:
        book.set_budgets([impl.Budget("a", 1), impl.Budget("a", 2)])
    assert exc.value.field == "budgets"
    assert [b.budget_id for b in book.budgets] == ["new", "tenant", "acme"]   # unchanged


def test_snapshot_restore_round_trip(impl):
    book = book3(impl)
    acme = book.match({"customer": "acme"})
    book.reserve(acme, 120, T0)
    book.commit(acme, 33, T0)
    book.set_lease("tenant", 500)
    snap = book.snapshot()
    other = impl.BudgetBook()
    other.restore(snap)
    assert other.snapshot() == snap
    assert counters(other) == counters(book)
    # both continue identically (acme: 300 - 120 held - 33 committed = 147 left)
    assert [b.reserve(acme, 170, T0) for b in (book, other)] == [False, False]
    assert [b.reserve(acme, 140, T0) for b in (book, other)] == [True, True]
    assert counters(other) == counters(book)
    assert other.lease_status() == book.lease_status()
    with pytest.raises(InvalidArgument):
        other.restore({"version": 99})


def test_status_fields_are_ints(impl):
    book = book3(impl)
    book.reserve((0,), 5, T0)
    s = book.status(0, T0)
    assert s.to_dict() == {"budget_id": "tenant", "limit_nanos": 1_000, "committed_nanos": 0,
                           "held_nanos": 5, "remaining_nanos": 995,
                           "period_start_ms": ms(2026, 3, 1), "enforcement": 1}
    for k, v in s.to_dict().items():
        if k != "budget_id":
            assert type(v) is int, k


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["", "c1", "c2", "c77"]),
                          st.sampled_from(["", "chat", "search"]),
                          st.sampled_from([None, "prod", "dev"])), min_size=1, max_size=8))
def test_match_agrees_with_budget_matches_many_budgets(impl, requests):
    # 150 budgets (multi-word bitsets in the compiled index): per customer, per
    # feature, label, combined and tenant-wide scopes
    budgets = [impl.Budget(f"cust-{i}", 10, scope={"customer": f"c{i}"}) for i in range(100)]
    budgets += [impl.Budget(f"feat-{i}", 10, scope={"feature": f}) for i, f in
                enumerate(["chat", "search"] * 10)]
    budgets += [impl.Budget(f"mix-{i}", 10, scope={"customer": f"c{i}", "feature": "chat",
                                                    "label.env": "prod"}) for i in range(20)]
    budgets += [impl.Budget(f"env-{i}", 10, scope={"label.env": e}) for i, e in
                enumerate(["prod", "dev"] * 4)]
    budgets += [impl.Budget("all-1", 10), impl.Budget("all-2", 10)]
    budgets = budgets[-12:] + budgets[:-12]   # every kind of scope in small books too
    for size in (5, 40, 150):                 # scan, one-word and multi-word index
        some = budgets[:size]
        book = impl.BudgetBook(some)
        for customer, feature, env in requests:
            owners = {"customer": customer, "feature": feature}
            labels = None if env is None else {"env": env, "other": "x"}
            want = tuple(i for i, b in enumerate(some) if b.matches(owners, labels))
            assert book.match(owners, labels) == want
            assert book.match_set(owners, labels).budget_ids == tuple(some[i].budget_id
                                                                      for i in want)
