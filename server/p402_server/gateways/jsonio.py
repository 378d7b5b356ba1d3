"""JSON of the proxy's bodies: orjson's speed, the standard library's results.

Owns `loads` and `dumps` for the request bodies, answers and stream events the proxy
reads and rewrites. orjson parses a large chat body 2-3x faster than `json` and
writes one 20x faster, but differs on some input: it refuses what `json` accepts
(NaN and Infinity, lone UTF-16 surrogate escapes, UTF-16/32 and BOM-prefixed bytes,
nesting deeper than 1,024) and turns an integer beyond 64 bits into a float. `loads`
answers what `json.loads` answers: orjson first, the standard library when orjson
refuses the input or when the result holds an integral float beyond 64 bits (the
mark of such an integer, or of a float `json` reads the same way); the one
difference left is nesting between Python's recursion limit (where `json` stops)
and orjson's 1,024 levels, which it reads. `dumps` writes compact JSON, by the
standard library (ASCII, escaped) for what orjson cannot write: an integer beyond
64 bits, a lone surrogate, 255 levels or more.
"""
from __future__ import annotations

import json
from typing import Any

import orjson

# orjson's exact integers are int64 and uint64; one beyond becomes a float that rounds
# to -2**63 or below, or to 2**64 or above.
_LO, _HI = -(2**63), 2**64


def loads(raw: bytes | str) -> Any:
    """`json.loads(raw)`, faster; raises what it raises (ValueError, RecursionError)."""
    value = loads_lax(raw)
    return value if exact(value) else json.loads(raw)


def loads_lax(raw: bytes | str) -> Any:
    """`loads` without the look for integers orjson could not hold: for a caller that
    checks with `exact` only the parts it reads (a stream event's usage, not its
    every value)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def loads_orjson(raw: bytes | str) -> Any:
    """orjson's reading alone, for a hot path with a fallback of its own: raises
    ValueError (orjson.JSONDecodeError) for the text `loads_lax` would hand to the
    standard library, and answers as `loads_lax` does otherwise."""
    return orjson.loads(raw)


def exact(value: Any) -> bool:
    """False when a float in `value` may stand for an integer orjson could not hold
    (then `json.loads` of the same text is the exact value)."""
    t = type(value)
    if t is float:
        return not value.is_integer() or _LO < value < _HI
    if t is not dict and t is not list:
        return True
    todo = [value]
    pop, push = todo.pop, todo.extend
    while todo:
        x = pop()
        t = type(x)
        if t is dict:
            push(x.values())
        elif t is list:
            push(x)
        elif t is float and x.is_integer() and not _LO < x < _HI:
            return False
    return True


def dumps(value: Any) -> bytes:
    """Compact JSON as UTF-8 bytes."""
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer beyond 64 bits, a lone surrogate, 255+ levels deep
        return json.dumps(value, separators=(",", ":")).encode()


__all__ = ["loads", "loads_lax", "loads_orjson", "exact", "dumps"]
