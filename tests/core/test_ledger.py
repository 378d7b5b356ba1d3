"""The ledger's per-event work in both twins: the canonical encoding of an event
(byte for byte as _ledger_py specifies, identical across twins for any value), the
strings check (the same answer as p402core.contract) and the all-is-well check of a
whole event (`event_ok`, the same answer in both twins for any value)."""
from __future__ import annotations

import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p402core import Decision, Evidence, Outcome, PrivacyMode
from p402core.contract import string_problem

INT64 = 2**63

STR_FIELDS = ("tenant_id", "event_id", "kind", "reservation_id", "customer", "feature",
              "workflow", "task", "department", "employee", "provider", "model",
              "retry_of", "catalog_version")
INT_FIELDS = ("event_ms", "recorded_ms", "input_tokens", "cached_input_tokens",
              "cache_write_tokens", "output_tokens", "reasoning_tokens", "cost_nanos",
              "estimated_cost_nanos", "overrun_nanos", "revenue_nanos", "decision",
              "outcome", "evidence", "privacy_mode", "attempt")
OPT_FIELDS = ("duplicate_of", "prompt_fingerprint", "response_fingerprint")


def event(**kw) -> types.SimpleNamespace:
    """Anything with a ledger event's attributes will do (as an export row rebuilt)."""
    ev = dict.fromkeys(STR_FIELDS, "")
    ev.update(dict.fromkeys(INT_FIELDS, 0))
    ev.update(dict.fromkeys(OPT_FIELDS, None))
    ev.update(tenant_id="t", event_id="e", kind="record", labels={}, reasons=(),
              rule_ids=(), budget_ids=(), budget_charges=(), units={}, service_tier="",
              chain_index=0, chain_hash=None)
    ev.update(kw)
    return types.SimpleNamespace(**ev)


def test_version_1_bytes_are_the_documented_ones(impl):
    ev = event(tenant_id="t", event_id="é", event_ms=5, recorded_ms=6,
               labels={"b": "2", "a": "1"}, cost_nanos=-3, decision=Decision.DENY,
               reasons=("x", ""), budget_charges=(("b1", 7),), prompt_fingerprint="ff")
    want = (b"p402.event.v1\n" + b"1:t," + "2:é,".encode() + b"5,6,6:record,0:,"
            + b"0:," * 6 + b"16:1:a,1:1,1:b,1:2,," + b"0:,0:," + b"0," * 5
            + b"-3,0,0,0," + b"3," + b"7:1:x,0:,," + b"0:,0:," + b"10:7:2:b1,7,,,"
            + b"0,0,0,0," + b"0:,0:," + b"~," + b"2:ff," + b"~,")
    assert impl.event_bytes(ev) == want
    assert impl.event_text(ev) == want.decode()


def test_version_2_adds_the_tier_and_the_units_sorted_by_name(impl):
    base = event(outcome=Outcome.SUCCESS)
    v1 = impl.event_bytes(base)
    assert v1.startswith(b"p402.event.v1\n")
    ev = event(outcome=Outcome.SUCCESS, service_tier="batch",
               units={"images": 2, "audio_ms": 1500})
    want = (b"p402.event.v2\n" + v1[len(b"p402.event.v1\n"):] + b"5:batch,"
            + b"27:8:audio_ms,1500,6:images,2,,")
    assert impl.event_bytes(ev) == want
    # either one alone is version 2
    assert impl.event_bytes(event(units={"images": 1})).startswith(b"p402.event.v2\n")
    assert impl.event_bytes(event(service_tier="flex")).endswith(b"4:flex,0:,")


def test_integers_are_exact_at_any_size(impl):
    for value in (0, -1, 9, 10, -(INT64), INT64 - 1, INT64, -(INT64) - 1, 10**40, -(10**40)):
        out = impl.event_bytes(event(cost_nanos=value))
        assert f",{value},".encode() in out, value


def test_enum_members_are_their_numbers(impl):
    a = event(decision=Decision.WARN, outcome=Outcome.TIMEOUT, evidence=Evidence.ESTIMATED,
              privacy_mode=PrivacyMode.FINGERPRINT_ONLY)
    b = event(decision=int(Decision.WARN), outcome=int(Outcome.TIMEOUT),
              evidence=int(Evidence.ESTIMATED), privacy_mode=int(PrivacyMode.FINGERPRINT_ONLY))
    assert impl.event_bytes(a) == impl.event_bytes(b)


@pytest.mark.parametrize("name, value", [
    ("customer", 5), ("model", b"gpt"), ("kind", None), ("cost_nanos", 1.5),
    ("attempt", "1"), ("labels", {"k": 1}), ("reasons", ("ok", 3)),
    ("budget_charges", (("b", "7"),)), ("duplicate_of", 4), ("units", {"images": 1.0}),
    ("service_tier", 0),
])
def test_a_field_of_the_wrong_type_is_a_type_error_naming_it(impl, name, value):
    if name == "service_tier":
        ev = event(units={"images": 1}, service_tier=value)
    else:
        ev = event(**{name: value})
    with pytest.raises(TypeError, match=rf"^{name}: canonical encoding: expected an? "):
        impl.event_bytes(ev)


def test_adjacent_fields_never_run_together(impl):
    pairs = [
        (event(customer="ab", feature="c"), event(customer="a", feature="bc")),
        (event(reasons=("a", "b")), event(reasons=("ab",))),
        (event(labels={"a": "bc"}), event(labels={"ab": "c"})),
        (event(duplicate_of=None), event(duplicate_of="")),
        (event(budget_charges=(("b", 12),)), event(budget_charges=(("b1", 2),))),
    ]
    for x, y in pairs:
        assert impl.event_bytes(x) != impl.event_bytes(y)


text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
small_int = st.integers(min_value=-(2**70), max_value=2**70)


@st.composite
def events(draw):
    kw = {name: draw(text) for name in STR_FIELDS}
    kw.update({name: draw(small_int) for name in INT_FIELDS})
    kw["decision"] = draw(st.one_of(small_int, st.sampled_from(list(Decision))))
    kw.update({name: draw(st.one_of(st.none(), text)) for name in OPT_FIELDS})
    kw["labels"] = draw(st.dictionaries(text, text, max_size=4))
    for name in ("reasons", "rule_ids", "budget_ids"):
        kw[name] = tuple(draw(st.lists(text, max_size=4)))
    kw["budget_charges"] = tuple(draw(st.lists(st.tuples(text, small_int), max_size=3)))
    kw["units"] = draw(st.dictionaries(text, small_int, max_size=4))
    kw["service_tier"] = draw(st.one_of(st.just(""), text))
    return event(**kw)


@settings(max_examples=400, deadline=None)
@given(ev=events())
def test_the_twins_encode_any_event_identically(both, ev):
    python, compiled = both
    got = compiled.event_bytes(ev)
    assert got == python.event_bytes(ev)
    assert got.decode("utf-8", "surrogatepass") == python.event_text(ev)


def test_strings_ok_follows_the_contract_at_its_edges(impl):
    assert impl.strings_ok([])
    assert impl.strings_ok(["", "a" * 256, "café", "日本", "emoji 🎉", "tab-free"])
    for bad in ("a" * 257, "\x00", "a\tb", "\x1f", "\x7f", "\x80", "\x9f", "x\ud800",
                "\udfff"):
        assert not impl.strings_ok(["fine", bad]), repr(bad)
        assert string_problem(bad) is not None
    for edge in ("\xa0", "\u00ff", "\ud7ff", "\ue000", " ~"):
        assert impl.strings_ok([edge]), repr(edge)
    # exactly str: not bytes, None, numbers or a subclass
    class S(str):
        pass
    for other in (b"a", None, 1, S("a")):
        assert not impl.strings_ok(["a", other]), repr(other)
    # dict views and keys iterate as sequences do
    assert impl.strings_ok({"k": "v"}) and impl.strings_ok({"k": "v"}.values())
    assert not impl.strings_ok({"k": "\x00"}.values())


@settings(max_examples=600, deadline=None)
@given(values=st.lists(st.text(st.characters(codec=None, exclude_categories=()),
                               max_size=300), max_size=4))
def test_strings_ok_agrees_with_the_contract(impl, values):
    assert impl.strings_ok(values) == all(string_problem(v) is None for v in values)


def plain_event(**kw) -> types.SimpleNamespace:
    """An event as the ledger writes it: every field in its plainest form."""
    base = dict(event_ms=1_790_000_000_000, customer="c", model="gpt-4o", input_tokens=10,
                cost_nanos=5, decision=Decision.ALLOW, outcome=int(Outcome.SUCCESS),
                labels={"env": "prod"}, reasons=("budget.warn",), rule_ids=("r1",),
                budget_ids=("b1",), budget_charges=(("b1", 1_788_220_800_000),),
                units={"images": 2}, service_tier="flex", prompt_fingerprint="ab" * 16,
                chain_index=3, chain_hash="0" * 64)
    base.update(kw)
    return event(**base)


class IntSub(int):
    pass


@pytest.mark.parametrize("kw", [
    {}, {"service_tier": "", "units": {}}, {"labels": {}}, {"budget_charges": ()},
    {"event_ms": 0}, {"cost_nanos": -(INT64)}, {"cost_nanos": INT64 - 1},
    {"evidence": Evidence.ATTESTED}, {"privacy_mode": PrivacyMode.FULL_TRACE},
    {"customer": "x" * 256}, {"duplicate_of": "d" * 256},
    {"labels": {f"k{i}": "v" for i in range(16)}},
    {"budget_charges": (("b1", 0), ("b2", INT64 - 1))},
    {"units": {"images": 100_000_000}},
])
def test_event_ok_takes_every_plain_event(impl, kw):
    assert impl.event_ok(plain_event(**kw)) is True


@pytest.mark.parametrize("kw", [
    {"tenant_id": ""}, {"event_id": ""}, {"customer": "x" * 257}, {"model": "a\x00b"},
    {"feature": "\ud800"}, {"provider": None}, {"kind": b"record"},
    {"event_ms": -1}, {"cost_nanos": INT64}, {"revenue_nanos": -(INT64) - 1},
    {"attempt": True}, {"input_tokens": 1.0}, {"output_tokens": IntSub(1)},
    {"chain_index": "3"}, {"duplicate_of": "d" * 257}, {"chain_hash": 5},
    {"response_fingerprint": b"ab"}, {"labels": None}, {"labels": [("k", "v")]},
    {"labels": {f"k{i}": "v" for i in range(17)}}, {"labels": {"k": 1}},
    {"labels": {"k": "\x7f"}}, {"labels": {1: "v"}}, {"reasons": ["a"]},
    {"rule_ids": ("a", 1)}, {"budget_ids": None}, {"budget_charges": [("b1", 1)]},
    {"budget_charges": (["b1", 1],)}, {"budget_charges": (("", 1),)},
    {"budget_charges": (("b1", -1),)}, {"budget_charges": (("b1", INT64),)},
    {"budget_charges": (("b1", True),)}, {"budget_charges": (("b1", 1, 2),)},
    {"budget_charges": (("b1", [1]),)}, {"units": None}, {"units": {"images": 0}},
    {"units": {"bogus": 1}}, {"units": {"images": 100_000_001}},
    {"units": {"images": 1.0}}, {"service_tier": None}, {"service_tier": "standard"},
    {"service_tier": "gold"}, {"service_tier": ["flex"]},
])
def test_event_ok_refuses_anything_else(impl, kw):
    assert impl.event_ok(plain_event(**kw)) is False


def any_value():
    """A value of any of the types a wrong field might hold."""
    return st.one_of(text, small_int, st.none(), st.booleans(), st.floats(allow_nan=False),
                     st.binary(max_size=3), st.sampled_from(list(Decision)),
                     st.lists(text, max_size=2), st.tuples(text, small_int),
                     st.dictionaries(text, text, max_size=2))


@st.composite
def events_for_event_ok(draw):
    """Plain events with a few fields changed to near-misses or values of other types."""
    kw = {}
    names = st.sampled_from([*STR_FIELDS, *INT_FIELDS, *OPT_FIELDS, "chain_index",
                             "chain_hash", "labels", "reasons", "rule_ids", "budget_ids",
                             "budget_charges", "units", "service_tier"])
    for name in draw(st.lists(names, max_size=3)):
        kw[name] = draw(st.one_of(
            any_value(),
            st.text(st.characters(codec=None, exclude_categories=()), max_size=260),
            st.integers(min_value=-(2**64), max_value=2**64),
            st.dictionaries(st.sampled_from(["images", "audio_ms", "x"]),
                            st.integers(min_value=-1, max_value=100_000_001), max_size=2),
            st.lists(st.tuples(text, st.integers(min_value=-1, max_value=2**64)),
                     max_size=2).map(tuple),
            st.lists(text, max_size=2).map(tuple),
            st.sampled_from(["", "batch", "standard", "flex", "priority"]),
        ))
    return plain_event(**kw)


@settings(max_examples=800, deadline=None)
@given(ev=events_for_event_ok())
def test_the_twins_agree_on_event_ok(both, ev):
    python, compiled = both
    assert compiled.event_ok(ev) is python.event_ok(ev)
