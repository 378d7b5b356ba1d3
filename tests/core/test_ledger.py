"""The ledger's per-event work in both twins: the canonical encoding of an event
(byte for byte as _ledger_py specifies, identical across twins for any value) and the
strings check (the same answer as p402core.contract)."""
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
              rule_ids=(), budget_ids=(), budget_charges=(), units={}, service_tier="")
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
