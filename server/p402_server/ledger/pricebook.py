"""The tenant's price book: what it charges its own customers for the AI calls it
resells, so every event has revenue (and margin) even when the gateway does not know
sell prices.

Owns the document's format and validation (`PriceBook.from_dict`, errors naming the
field), its version, and `revenue` (integer nano-USD, one rounding). The runtime
applies it to a Record that carries no revenue of its own; a Record's explicit
revenue always wins.

Document (JSON):

    {
      "markup_pct": "20",                 # cost-plus for every call (decimal percent)
      "min_per_call_usd": "0.0005",       # a floor per call (USD decimal)
      "models": {                         # per model: a markup, or sell prices
        "gpt-4o": {"markup_pct": "35"},
        "gpt-4o-mini": {"sell": {"input_pico": 300000, "output_pico": 1200000,
                                 "units": {"images": 50000000000}}}
      },
      "customers": {                      # per customer: the same keys again
        "acme": {"markup_pct": "10", "min_per_call_usd": "0", "models": {…}}
      }
    }

Every key is optional. For one call the most specific rule wins: the customer's rule
for the model, then the customer's markup / minimum, then the book's rule for the
model, then the book's markup / minimum. A "sell" rule prices the call's usage (every
unit and tier, p402core) at the given per-token and per-unit rates, as the cost
catalog prices cost; a markup is revenue = cost x (100 + pct) / 100. Either is rounded
once, half-up, to nano-USD, then raised to the minimum per call (a call that cost
nothing and sold nothing stays 0: a denied or released call is not billed).

The version is "pb-" + the first 12 hex digits of the SHA-256 of the canonical JSON
of the document (the same book always has the same version).
"""
from __future__ import annotations

import hashlib
import json
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Mapping

from p402core import InvalidArgument
from p402core.contract import string_problem

MAX_PCT = Decimal(100_000)  # a markup of 1,000x: anything above is a typo
_RULE_KEYS = frozenset(("markup_pct", "min_per_call_usd", "sell"))
_BOOK_KEYS = frozenset(("markup_pct", "min_per_call_usd", "models", "customers"))
_CUSTOMER_KEYS = frozenset(("markup_pct", "min_per_call_usd", "models"))


def _pct(field: str, value: Any) -> Decimal:
    try:
        d = Decimal(str(value).strip().rstrip("%")) if not isinstance(value, bool) else None
    except InvalidOperation:
        d = None
    if d is None or not d.is_finite() or d < -100 or d > MAX_PCT:
        raise InvalidArgument(field, f"must be a percentage within -100..{MAX_PCT}, "
                                     f"got {value!r}")
    return d


def _usd(field: str, value: Any) -> int:
    try:
        d = Decimal(str(value).strip().lstrip("$")) if not isinstance(value, bool) else None
    except InvalidOperation:
        d = None
    if d is None or not d.is_finite() or d < 0 or d > 10**6:
        raise InvalidArgument(field, f"must be a USD amount within 0..1000000, got {value!r}")
    nanos = d * 10**9
    if nanos != nanos.to_integral_value():
        raise InvalidArgument(field, "finer than a nano-USD")
    return int(nanos)


class _Rule:
    __slots__ = ("pct", "min_nanos", "sell")

    def __init__(self, pct=None, min_nanos=None, sell=None):
        self.pct, self.min_nanos, self.sell = pct, min_nanos, sell


def _rule(field: str, d: Any, core, keys=_RULE_KEYS) -> _Rule:
    if not isinstance(d, Mapping):
        raise InvalidArgument(field, "must be an object")
    for k in d:
        if k not in keys:
            raise InvalidArgument(f"{field}.{k}", "unknown key")
    pct = _pct(f"{field}.markup_pct", d["markup_pct"]) if "markup_pct" in d else None
    floor = (_usd(f"{field}.min_per_call_usd", d["min_per_call_usd"])
             if "min_per_call_usd" in d else None)
    sell = None
    if "sell" in d:
        spec = d["sell"]
        if not isinstance(spec, Mapping):
            raise InvalidArgument(f"{field}.sell", "must be a price object")
        try:
            sell = core.ModelPrice.from_dict({"model": "sell", **spec})
        except InvalidArgument as exc:
            raise InvalidArgument(f"{field}.sell.{exc.field}", exc.message) from None
    if pct is not None and sell is not None:
        raise InvalidArgument(field, "give markup_pct or sell, not both")
    return _Rule(pct, floor, sell)


class PriceBook:
    """A validated price book (module docstring)."""

    def __init__(self, doc: Mapping, core):
        if not isinstance(doc, Mapping):
            raise InvalidArgument("price_book", "must be a JSON object")
        for k in doc:
            if k not in _BOOK_KEYS:
                raise InvalidArgument(str(k), "unknown key of the price book")
        self.doc = json.loads(json.dumps(doc))  # a plain copy, JSON types only
        self.base = _rule("price_book", {k: v for k, v in doc.items()
                                         if k in ("markup_pct", "min_per_call_usd")}, core)
        self.models = {_name("models", m): _rule(f"models.{m}", r, core)
                       for m, r in _mapping("models", doc.get("models")).items()}
        self.customers = {}
        for c, cd in _mapping("customers", doc.get("customers")).items():
            self.customers[_name("customers", c)] = (
                _rule(f"customers.{c}", {k: v for k, v in _mapping(f"customers.{c}", cd).items()
                                         if k != "models"}, core,
                      keys=_CUSTOMER_KEYS),
                {_name(f"customers.{c}.models", m): _rule(f"customers.{c}.models.{m}", r, core)
                 for m, r in _mapping(f"customers.{c}.models", cd.get("models")).items()})
        canonical = json.dumps(self.doc, sort_keys=True, separators=(",", ":"))
        self.version = "pb-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def revenue(self, *, customer: str, model: str, cost_nanos: int, usage: tuple,
                units: Mapping | None = None, service_tier: str = "") -> int:
        """What the call is sold for, in nano-USD (module docstring)."""
        cust_rule, cust_models = self.customers.get(customer, (None, {}))
        rules = [cust_models.get(model), cust_rule, self.models.get(model), self.base]
        pct = sell = floor = None
        for r in rules:
            if r is None:
                continue
            if pct is None and sell is None:
                pct, sell = r.pct, r.sell
            if floor is None:
                floor = r.min_nanos
        if sell is not None:
            i, c, w, o, r = usage
            revenue = sell.cost_units_nanos(i, o, c, w, r, units or None, service_tier)
        elif pct is not None:
            exact = Decimal(cost_nanos) * (Decimal(100) + pct) / Decimal(100)
            revenue = int(exact.to_integral_value(rounding=ROUND_HALF_UP))
        else:
            revenue = 0
        if floor and (cost_nanos > 0 or revenue > 0):
            revenue = max(revenue, floor)
        return max(revenue, 0)

    def to_dict(self) -> dict:
        return self.doc


def _name(field: str, key: Any) -> str:
    """A model or customer name, held to the string contract events are (a name no
    event can carry would be a rule that never applies)."""
    key = str(key)
    problem = string_problem(key) if key else "must not be empty"
    if problem is not None:
        raise InvalidArgument(field, f"name {key[:40]!r}: {problem}")
    return key


def _mapping(field: str, value: Any) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(field, "must be an object")
    return value


__all__ = ["PriceBook"]
