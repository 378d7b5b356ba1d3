"""LedgerEvent.validate: the core's all-is-well check (`event_ok`) and the
field-by-field explanation agree, and a refused event names its field."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import p402core
from p402_server.ledger.model import LedgerEvent
from p402_server.ledger.schema import KINDS
from p402core import _impl
from p402core._enums import Decision, InvalidArgument, Outcome

IMPLS = ["python"] if _impl.NO_EXTENSIONS else ["python", "compiled"]


def plain(**kw) -> LedgerEvent:
    base = dict(tenant_id="t", event_id="e", event_ms=1_790_000_000_000, customer="c",
                model="gpt-4o", input_tokens=10, cost_nanos=5, decision=Decision.ALLOW,
                outcome=int(Outcome.SUCCESS), labels={"env": "prod"},
                reasons=("budget.warn",), budget_ids=("b1",),
                budget_charges=(("b1", 1_788_220_800_000),), units={"images": 2},
                service_tier="flex", prompt_fingerprint="ab" * 16)
    base.update(kw)
    return LedgerEvent(**base)


@pytest.mark.parametrize("field, value, named", [
    ("kind", "nonsense", "kind"), ("event_id", "", "event_id"),
    ("tenant_id", 7, "tenant_id"), ("customer", "x" * 257, "customer"),
    ("model", "a\x00b", "model"), ("cost_nanos", 2**63, "cost_nanos"),
    ("input_tokens", 1.5, "input_tokens"), ("decision", True, "decision"),
    ("event_ms", -1, "event_ms"), ("chain_index", "1", "chain_index"),
    ("duplicate_of", "d" * 257, "duplicate_of"), ("chain_hash", 5, "chain_hash"),
    ("labels", {"k": 1}, "labels"), ("labels", {"k": "\x7f"}, "labels.k"),
    ("labels", {f"k{i}": "v" for i in range(17)}, "labels"),
    ("reasons", ("a", 1), "reasons"), ("budget_ids", None, "budget_ids"),
    ("budget_charges", (("", 1),), "budget_charges"),
    ("budget_charges", (("b1", -1),), "budget_charges"),
    ("units", None, "units"), ("units", {"bogus": 1}, "bogus"),
    ("units", {"images": 0}, "units"), ("units", {"images": -1}, "images"),
    ("service_tier", "gold", "service_tier"), ("service_tier", None, "service_tier"),
    ("service_tier", "standard", "service_tier"),
])
def test_a_refused_event_names_its_field(field, value, named):
    with pytest.raises(InvalidArgument) as err:
        plain(**{field: value}).validate()
    assert err.value.field == named


def test_valid_events_of_a_less_plain_form_are_taken():
    class Count(int):
        pass

    # Lists where tuples are usual, an int subclass: not the core's plain form, valid.
    plain(reasons=["a"], budget_ids=["b1"], budget_charges=[["b1", 7]]).validate()
    plain(output_tokens=Count(3)).validate()
    plain().validate()


values = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=260),
    st.integers(min_value=-(2**64), max_value=2**64), st.none(), st.booleans(),
    st.floats(allow_nan=False), st.sampled_from(list(Decision)),
    st.lists(st.text(max_size=3), max_size=2).map(tuple),
    st.dictionaries(st.sampled_from(["images", "audio_ms", "x", "k"]),
                    st.one_of(st.integers(min_value=-1, max_value=100_000_001),
                              st.text(max_size=3)), max_size=2),
    st.lists(st.tuples(st.text(max_size=3), st.integers(min_value=-1, max_value=2**64)),
             max_size=2).map(tuple),
    st.sampled_from(["", "batch", "standard", "flex", "record", "expired"]),
)
FIELDS = [f.name for f in dataclasses.fields(LedgerEvent)
          if f.name not in ("contents", "claim", "seq")]


@settings(max_examples=600, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(FIELDS), values, max_size=3))
def test_what_event_ok_takes_the_explanation_takes_too(changes):
    ev = plain(**changes)
    for kind in IMPLS:
        if ev.kind in KINDS and p402core.load(kind).event_ok(ev):  # validate's fast path
            ev._explain()  # finds nothing: the fast check never lets a bad value in
    try:
        ev.validate()
    except InvalidArgument as exc:  # refused, naming a field of the event (or a unit)
        units = ev.units if isinstance(ev.units, dict) else {}
        assert exc.field.split(".")[0] in {*FIELDS, *units}
