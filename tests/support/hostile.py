"""Hypothesis strategies for hostile input, shared by the fuzz tests of the proxy and
the Envoy gateways: odd strings (NUL, control characters, lone surrogates, very long,
model names almost right) and JSON values of every type, nested a little."""
from __future__ import annotations

from hypothesis import strategies as st

ODD = ["", "\x00", "a\x00b", "\n", "\x01", "\x7f", "\x85", "\ud800", "\udfff", "é" * 300,
       "x" * 5000, "gpt-4o-mini", "GPT-4O-MINI", " gpt-4o-mini", "../../", "%00", "🙂"]


def odd_text():
    return st.one_of(st.sampled_from(ODD), st.text(max_size=30))


def json_value(depth: int = 0):
    """Any JSON value (integers up to 2^70, floats, odd text), lists and objects
    nested to depth 2."""
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                     st.floats(allow_nan=False), odd_text())
    if depth >= 2:
        return leaf
    return st.one_of(leaf, st.lists(st.deferred(lambda: json_value(depth + 1)), max_size=3),
                     st.dictionaries(odd_text(), st.deferred(lambda: json_value(depth + 1)),
                                     max_size=3))
