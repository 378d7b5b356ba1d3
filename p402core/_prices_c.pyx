# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Prices and cost: the compiled twin of `_prices_py` (which is the specification).

Owns `PriceTier`, `ModelPrice`, `Catalog`. Same API and behaviour as the
Python twin, errors and field names included; see `_prices_py` for the cost
formula, the fallbacks and the lookup rules. What is compiled: the cost of a
call (typed rate rows, no Python objects touched once the five token counts
are converted) and the lookup fast path (one dict hit). Construction,
serialisation and the slow lookup path mirror the twin line for line.

Overflow: rates <= 10**10 and token counts <= MAX_TOKENS = 10**8 with
cached + cache_write <= input and reasoning <= output, so the input part and
the output part are each <= 10**18 and the sum <= 2 * 10**18 < 2**63.

One room, though long: a compiled twin mirrors its specification class for class and
function for function, so a change to one is made beside the other; split, the pair
could no longer be read side by side.
"""
from cpython.dict cimport PyDict_Next
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.ref cimport PyObject

cdef extern from *:
    # gcc/clang 128-bit integers: a sum of unit costs (each <= 10**21) cannot wrap
    ctypedef long long p402_i128 "__int128"

import datetime as _dt
import json
import os
from collections.abc import Mapping

from p402core import _units
from p402core._enums import MAX_STRING, MAX_TOKENS, InvalidArgument, UnknownModel

__all__ = [
    "PriceTier",
    "ModelPrice",
    "Catalog",
    "MAX_PRICE_PICO",
    "MAX_TIERS",
    "KNOWN_PROVIDERS",
]

MAX_PRICE_PICO = 10**10
MAX_TIERS = P402_MAX_TIERS
cdef Py_ssize_t _CACHE_MAX = 4096

cdef long long C_MAX_TOKENS = MAX_TOKENS
cdef long long C_MAX_PRICE = 10**10

KNOWN_PROVIDERS = frozenset((
    "openai", "text-completion-openai", "azure", "azure_ai", "anthropic",
    "bedrock", "bedrock_converse", "vertex_ai", "vertex_ai_beta", "gemini",
    "google", "mistral", "codestral", "groq", "together_ai", "together",
    "fireworks_ai", "fireworks", "openrouter", "deepseek", "xai", "cohere",
    "cohere_chat", "perplexity", "deepinfra", "anyscale", "replicate",
    "sambanova", "cerebras", "ollama", "ollama_chat", "nvidia_nim", "watsonx",
    "databricks", "cloudflare", "ai21", "nscale", "novita", "hyperbolic",
    "lambda_ai", "nebius", "dashscope", "moonshot", "meta_llama", "friendliai",
    "github", "litellm_proxy", "huggingface", "snowflake", "oci", "sagemaker",
))

_TIER_FIELDS = ("threshold_tokens", "input_pico", "output_pico", "cached_input_pico",
                "cache_write_pico", "reasoning_pico")
_PRICE_FIELDS = ("model", "provider", "family", "mode", "input_pico", "output_pico",
                 "cached_input_pico", "cache_write_pico", "reasoning_pico", "tiers",
                 "max_input_tokens", "max_output_tokens", "units", "service_tiers")
_CATALOG_FIELDS = ("version", "taken", "source", "prices", "aliases", "skipped", "rounded")


# -- validation helpers (same messages as the Python twin) ------------------

def _int_in(str field, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be an integer, not {type(value).__name__}")
    if value < lo:
        raise InvalidArgument(field, f"must be >= {lo}, got {value}")
    if value > hi:
        raise InvalidArgument(field, f"must be <= {hi}, got {value}")
    return int(value)


cdef inline long long _tok(str field, object value) except? -2:
    """A token count 0..MAX_TOKENS as a C integer, or InvalidArgument(field)."""
    cdef int overflow = 0
    cdef long long v
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(field, f"must be an integer, not {type(value).__name__}")
    v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow < 0 or (overflow == 0 and v < 0):
        raise InvalidArgument(field, f"must be >= 0, got {value}")
    if overflow > 0 or v > C_MAX_TOKENS:
        raise InvalidArgument(field, f"must be <= {MAX_TOKENS}, got {value}")
    return v


def _price(str field, value):
    return _int_in(field, value, 0, MAX_PRICE_PICO)


def _opt_price(str field, value):
    return None if value is None else _price(field, value)


def _str(str field, value, *, bint empty_ok):
    if not isinstance(value, str):
        raise InvalidArgument(field, f"must be a string, not {type(value).__name__}")
    if not value and not empty_ok:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > MAX_STRING:
        raise InvalidArgument(field, f"longer than {MAX_STRING} characters")
    return str(value)


def _check_fields(d, allowed, str what):
    if not isinstance(d, Mapping):
        raise InvalidArgument(what, f"must be a mapping, not {type(d).__name__}")
    for key in d:
        if key not in allowed:
            raise InvalidArgument(str(key), f"unknown field of {what}")


cdef class PriceTier:
    """Rates that replace the base rates when input_tokens > threshold_tokens."""

    def __init__(self, threshold_tokens, *, input_pico, output_pico, cached_input_pico=None,
                 cache_write_pico=None, reasoning_pico=None):
        self.threshold_tokens = _int_in("threshold_tokens", threshold_tokens, 0, MAX_TOKENS)
        self.input_pico = _price("input_pico", input_pico)
        self.output_pico = _price("output_pico", output_pico)
        self.cached_input_pico = _opt_price("cached_input_pico", cached_input_pico)
        self.cache_write_pico = _opt_price("cache_write_pico", cache_write_pico)
        self.reasoning_pico = _opt_price("reasoning_pico", reasoning_pico)

    def to_dict(self):
        d = {"threshold_tokens": self.threshold_tokens, "input_pico": self.input_pico,
             "output_pico": self.output_pico}
        if self.cached_input_pico is not None:
            d["cached_input_pico"] = self.cached_input_pico
        if self.cache_write_pico is not None:
            d["cache_write_pico"] = self.cache_write_pico
        if self.reasoning_pico is not None:
            d["reasoning_pico"] = self.reasoning_pico
        return d

    def __reduce__(self):
        # pickled as its dict: the same for both twins, and validated on load
        return (type(self).from_dict, (self.to_dict(),))

    @classmethod
    def from_dict(cls, d):
        _check_fields(d, _TIER_FIELDS, "tier")
        for req in ("threshold_tokens", "input_pico", "output_pico"):
            if req not in d:
                raise InvalidArgument(req, "required")
        return cls(d["threshold_tokens"], input_pico=d["input_pico"], output_pico=d["output_pico"],
                   cached_input_pico=d.get("cached_input_pico"),
                   cache_write_pico=d.get("cache_write_pico"),
                   reasoning_pico=d.get("reasoning_pico"))

    def __eq__(self, other):
        if not isinstance(other, PriceTier):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __ne__(self, other):
        if not isinstance(other, PriceTier):
            return NotImplemented
        return self.to_dict() != other.to_dict()

    __hash__ = None

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"PriceTier({args})"


cdef class ModelPrice:
    """The price of one model: integer pico-USD per token, with its tiers.

    Read-only. `cost_pico` / `cost_nanos` validate the usage (InvalidArgument
    naming the field) and price it; `_cost_pico` is the unchecked C entry for
    callers that validated already (the engine).
    """

    def __init__(self, model, provider, *, input_pico, output_pico, cached_input_pico=None,
                 cache_write_pico=None, reasoning_pico=None, tiers=(), family="",
                 max_input_tokens=0, max_output_tokens=0, mode="chat", units=None,
                 service_tiers=None):
        cdef int k, n
        self.model = _str("model", model, empty_ok=False)
        self.provider = _str("provider", provider, empty_ok=True)
        self.family = _str("family", family, empty_ok=True)
        self.mode = _str("mode", mode, empty_ok=True)
        self.input_pico = _price("input_pico", input_pico)
        self.output_pico = _price("output_pico", output_pico)
        self.cached_input_pico = _opt_price("cached_input_pico", cached_input_pico)
        self.cache_write_pico = _opt_price("cache_write_pico", cache_write_pico)
        self.reasoning_pico = _opt_price("reasoning_pico", reasoning_pico)
        self.max_input_tokens = _int_in("max_input_tokens", max_input_tokens, 0, MAX_TOKENS)
        self.max_output_tokens = _int_in("max_output_tokens", max_output_tokens, 0, MAX_TOKENS)
        if isinstance(tiers, (str, bytes, Mapping)):
            raise InvalidArgument("tiers", "must be a sequence of PriceTier")
        try:
            tier_list = list(tiers)
        except TypeError:
            raise InvalidArgument("tiers", "must be a sequence of PriceTier") from None
        for t in tier_list:
            if not isinstance(t, PriceTier):
                raise InvalidArgument("tiers", f"must hold PriceTier, not {type(t).__name__}")
        if len(tier_list) > P402_MAX_TIERS:
            raise InvalidArgument("tiers", f"at most {P402_MAX_TIERS} tiers")
        tier_list.sort(key=lambda t: t.threshold_tokens)
        for a, b in zip(tier_list, tier_list[1:]):
            if a.threshold_tokens == b.threshold_tokens:
                raise InvalidArgument("tiers", f"two tiers with threshold {a.threshold_tokens}")
        self.tiers = tuple(tier_list)
        # Effective rate rows; explicit optional rates carry upward (see _prices_py).
        c, w, r = self.cached_input_pico, self.cache_write_pico, self.reasoning_pico
        i, o = self.input_pico, self.output_pico
        self._set_row(0, i, o, i if c is None else c, i if w is None else w, o if r is None else r)
        n = len(self.tiers)
        for k in range(n):
            t = <PriceTier>self.tiers[k]
            if t.cached_input_pico is not None:
                c = t.cached_input_pico
            if t.cache_write_pico is not None:
                w = t.cache_write_pico
            if t.reasoning_pico is not None:
                r = t.reasoning_pico
            i, o = t.input_pico, t.output_pico
            self._thresholds[k] = t.threshold_tokens
            self._set_row(k + 1, i, o, i if c is None else c, i if w is None else w,
                          o if r is None else r)
        self._n_tiers = n
        self._units = _units.check_unit_rates(units)
        self._service_tiers = _check_service_tiers(service_tiers, self.model)
        for k in range(P402_NUNITS):
            self._unit_rates[k] = self._units.get(_UNIT_NAMES[k], -1)

    @property
    def units(self):
        return dict(self._units)

    @property
    def service_tiers(self):
        return dict(self._service_tiers)

    def rates_at(self, input_tokens):
        """The effective (input, output, cached_input, cache_write, reasoning) rates,
        in pico per token, for a call with this many input tokens."""
        cdef long long i = _tok("input_tokens", input_tokens)
        cdef int row = 0
        cdef int k
        cdef long long *p
        for k in range(self._n_tiers - 1, -1, -1):
            if i > self._thresholds[k]:
                row = k + 1
                break
        p = &self._rates[row * P402_NRATES]
        return (p[0], p[1], p[2], p[3], p[4])

    def for_tier(self, service_tier):
        """The price of this model in a service tier: its own rates for the tier, or
        these (standard) ones when it has none."""
        tier = _units.check_tier(service_tier)
        return self._service_tiers.get(tier, self) if tier else self

    def cost_units_pico(self, input_tokens=0, output_tokens=0, cached_input_tokens=0,
                        cache_write_tokens=0, reasoning_tokens=0, units=None,
                        service_tier=""):
        """Exact cost in pico-USD of a usage with extra units ({field: count}) in a
        service tier (p402core._units has the vocabulary and the formula)."""
        cdef long long t[5]
        _check5(input_tokens, output_tokens, cached_input_tokens, cache_write_tokens,
                reasoning_tokens, t)
        cdef ModelPrice p = (self if service_tier is None or service_tier == ""
                             else <ModelPrice>self.for_tier(service_tier))
        return p._cost_units(t[0], t[1], t[2], t[3], t[4], units)

    cdef object _cost_units(self, long long i, long long o, long long c, long long w,
                            long long r, object units):
        cdef long long q[P402_NUNITS]
        cdef int order[P402_NUNITS]
        cdef int n = 0, k, row = 0
        cdef Py_ssize_t pos
        cdef PyObject *key
        cdef PyObject *val
        cdef long long *rates
        cdef long long text_in = i - c - w, text_out = o - r, rate
        cdef p402_i128 cost
        if units is not None:
            pos = 0
            if type(units) is dict:  # the common case: no item tuples, no ABC check
                while PyDict_Next(units, &pos, &key, &val):
                    n = _take_unit(<object>key, <object>val, q, order, n)
            elif isinstance(units, Mapping):
                for name, value in units.items():
                    n = _take_unit(name, value, q, order, n)
            else:
                raise InvalidArgument("units", f"must be a mapping, not {type(units).__name__}")
        for k in range(self._n_tiers - 1, -1, -1):
            if i > self._thresholds[k]:
                row = k + 1
                break
        rates = &self._rates[row * P402_NRATES]
        cost = <p402_i128>c * rates[2] + <p402_i128>w * rates[3] + <p402_i128>r * rates[4]
        for j in range(n):
            k = order[j]
            rate = self._unit_rates[k]
            if k >= P402_NTOKEN_UNITS:
                if rate > 0:
                    cost += <p402_i128>q[k] * rate
                continue
            if rate < 0:
                rate = rates[_UNIT_FALLBACK[k]]
            cost += <p402_i128>q[k] * rate
            if _UNIT_IS_INPUT[k]:
                text_in -= q[k]
                if text_in < 0:
                    raise InvalidArgument(_UNIT_NAMES[k], _UNITS_EXCEED_INPUT)
            else:
                text_out -= q[k]
                if text_out < 0:
                    raise InvalidArgument(_UNIT_NAMES[k], _UNITS_EXCEED_OUTPUT)
        cost += <p402_i128>text_in * rates[0] + <p402_i128>text_out * rates[1]
        if cost > C_MAX_COST:
            raise InvalidArgument("usage", _COST_TOO_HIGH)
        return <long long>cost

    def cost_units_nanos(self, input_tokens=0, output_tokens=0, cached_input_tokens=0,
                         cache_write_tokens=0, reasoning_tokens=0, units=None,
                         service_tier=""):
        """`cost_units_pico` rounded half-up to nano-USD (the only rounding)."""
        cdef long long t[5]
        _check5(input_tokens, output_tokens, cached_input_tokens, cache_write_tokens,
                reasoning_tokens, t)
        cdef ModelPrice p = (self if service_tier is None or service_tier == ""
                             else <ModelPrice>self.for_tier(service_tier))
        cdef long long cost = p._cost_units(t[0], t[1], t[2], t[3], t[4], units)
        return (cost + 500) // 1000

    cdef void _set_row(self, int row, long long i, long long o, long long c,
                              long long w, long long r):
        cdef long long *p = &self._rates[row * P402_NRATES]
        p[0] = i
        p[1] = o
        p[2] = c
        p[3] = w
        p[4] = r

    cdef long long _cost_pico(self, long long input_tokens, long long output_tokens,
                              long long cached, long long cache_write,
                              long long reasoning) except? -1:
        cdef int row = 0
        cdef int k
        cdef long long *p
        for k in range(self._n_tiers - 1, -1, -1):
            if input_tokens > self._thresholds[k]:
                row = k + 1
                break
        p = &self._rates[row * P402_NRATES]
        return ((input_tokens - cached - cache_write) * p[0] + cached * p[2]
                + cache_write * p[3] + (output_tokens - reasoning) * p[1] + reasoning * p[4])

    cdef long long _checked(self, object input_tokens, object output_tokens,
                                   object cached_input_tokens, object cache_write_tokens,
                                   object reasoning_tokens) except -1:
        cdef long long t[5]
        _check5(input_tokens, output_tokens, cached_input_tokens, cache_write_tokens,
                reasoning_tokens, t)
        return self._cost_pico(t[0], t[1], t[2], t[3], t[4])

    cpdef object cost_pico(self, object input_tokens, object output_tokens,
                           object cached_input_tokens=0, object cache_write_tokens=0,
                           object reasoning_tokens=0):
        """Exact cost in pico-USD of one call's usage (validated)."""
        return self._checked(input_tokens, output_tokens, cached_input_tokens,
                             cache_write_tokens, reasoning_tokens)

    cpdef object cost_nanos(self, object input_tokens, object output_tokens,
                            object cached_input_tokens=0, object cache_write_tokens=0,
                            object reasoning_tokens=0):
        """`cost_pico` rounded half-up to nano-USD (the only rounding)."""
        # operands are >= 0: C division is floor division here
        return (self._checked(input_tokens, output_tokens, cached_input_tokens,
                              cache_write_tokens, reasoning_tokens) + 500) // 1000

    cpdef dict to_dict(self):
        d = {"model": self.model, "provider": self.provider, "family": self.family,
             "mode": self.mode, "input_pico": self.input_pico, "output_pico": self.output_pico}
        if self.cached_input_pico is not None:
            d["cached_input_pico"] = self.cached_input_pico
        if self.cache_write_pico is not None:
            d["cache_write_pico"] = self.cache_write_pico
        if self.reasoning_pico is not None:
            d["reasoning_pico"] = self.reasoning_pico
        if self.tiers:
            d["tiers"] = [t.to_dict() for t in self.tiers]
        d["max_input_tokens"] = self.max_input_tokens
        d["max_output_tokens"] = self.max_output_tokens
        if self._units:
            d["units"] = dict(self._units)
        if self._service_tiers:
            d["service_tiers"] = {k: self._service_tiers[k].to_dict()
                                  for k in sorted(self._service_tiers)}
        return d

    def __reduce__(self):
        # pickled as its dict: the same for both twins, and validated on load
        return (type(self).from_dict, (self.to_dict(),))

    @classmethod
    def from_dict(cls, d):
        _check_fields(d, _PRICE_FIELDS, "price")
        for req in ("model", "input_pico", "output_pico"):
            if req not in d:
                raise InvalidArgument(req, "required")
        raw_tiers = d.get("tiers", ())
        if not isinstance(raw_tiers, (list, tuple)):
            raise InvalidArgument("tiers", "must be a list")
        return cls(d["model"], d.get("provider", ""), input_pico=d["input_pico"],
                   output_pico=d["output_pico"], cached_input_pico=d.get("cached_input_pico"),
                   cache_write_pico=d.get("cache_write_pico"),
                   reasoning_pico=d.get("reasoning_pico"),
                   tiers=[PriceTier.from_dict(t) for t in raw_tiers],
                   family=d.get("family", ""), max_input_tokens=d.get("max_input_tokens", 0),
                   max_output_tokens=d.get("max_output_tokens", 0), mode=d.get("mode", "chat"),
                   units=d.get("units"), service_tiers=_tiers_from_dict(d.get("service_tiers")))

    def __eq__(self, other):
        if not isinstance(other, ModelPrice):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __ne__(self, other):
        if not isinstance(other, ModelPrice):
            return NotImplemented
        return self.to_dict() != other.to_dict()

    __hash__ = None

    def __repr__(self):
        return (f"ModelPrice({self.model!r}, {self.provider!r}, input_pico={self.input_pico}, "
                f"output_pico={self.output_pico}, tiers={len(self.tiers)})")


cdef int _check5(object input_tokens, object output_tokens, object cached_input_tokens,
                 object cache_write_tokens, object reasoning_tokens, long long* t) except -1:
    """The five token counts validated into t (i, o, c, w, r); errors name the field."""
    t[0] = _tok("input_tokens", input_tokens)
    t[1] = _tok("output_tokens", output_tokens)
    t[2] = _tok("cached_input_tokens", cached_input_tokens)
    t[3] = _tok("cache_write_tokens", cache_write_tokens)
    t[4] = _tok("reasoning_tokens", reasoning_tokens)
    if t[2] > t[0]:
        raise InvalidArgument("cached_input_tokens",
                              "exceeds input_tokens (cached tokens are part of the input)")
    if t[2] + t[3] > t[0]:
        raise InvalidArgument("cache_write_tokens",
                              "cached_input_tokens + cache_write_tokens exceeds input_tokens")
    if t[4] > t[1]:
        raise InvalidArgument("reasoning_tokens",
                              "exceeds output_tokens (reasoning tokens are part of the output)")
    return 0


cdef inline int _take_unit(object name, object value, long long* q, int* order,
                           int n) except -1:
    """One {unit: count} item validated into q (order: the units given, in order)."""
    idx = _UNIT_INDEX.get(name)
    if idx is None:
        raise InvalidArgument(str(name), _UNKNOWN_UNIT)
    cdef int k = idx
    q[k] = _tok(name, value)
    if q[k]:
        order[n] = k
        n += 1
    return n


# p402core._units' vocabulary as C tables (same order as _units.UNITS)
cdef tuple _UNIT_NAMES = _units.UNITS
cdef dict _UNIT_INDEX = {name: k for k, name in enumerate(_units.UNITS)}
cdef int _UNIT_FALLBACK[P402_NTOKEN_UNITS]
cdef bint _UNIT_IS_INPUT[P402_NTOKEN_UNITS]
for _k, (_name, _part, _fallback) in enumerate(_units.TOKEN_UNITS):
    assert _UNIT_NAMES[_k] == _name
    _UNIT_FALLBACK[_k] = _fallback
    _UNIT_IS_INPUT[_k] = _part == "input"
assert len(_UNIT_NAMES) == P402_NUNITS
cdef long long C_MAX_COST = _units.MAX_COST_PICO
_UNKNOWN_UNIT = "unknown usage unit (known: " + ", ".join(_units.UNITS) + ")"
_UNITS_EXCEED_INPUT = ("with cached_input_tokens, cache_write_tokens and the other input "
                       "kinds exceeds input_tokens (they are part of the input)")
_UNITS_EXCEED_OUTPUT = ("with reasoning_tokens and the other output kinds exceeds "
                        "output_tokens (they are part of the output)")
_COST_TOO_HIGH = f"costs more than {_units.MAX_COST_PICO // 10**12} USD: not a real call"


def _check_service_tiers(tiers, str model):
    """{tier: ModelPrice} for batch / flex / priority, each of the same model and
    without tiers of its own."""
    if tiers is None:
        return {}
    if not isinstance(tiers, Mapping):
        raise InvalidArgument("service_tiers", "must be a mapping {tier: ModelPrice}")
    out = {}
    for name, p in tiers.items():
        if _units.check_tier(name) == "":
            raise InvalidArgument("service_tiers", "the standard tier is the price itself")
        if not isinstance(p, ModelPrice):
            raise InvalidArgument("service_tiers", f"must hold ModelPrice, not {type(p).__name__}")
        if (<ModelPrice>p).model != model or (<ModelPrice>p)._service_tiers:
            raise InvalidArgument("service_tiers", f"tier {name!r}: a price of {model!r} "
                                                   "without service tiers of its own")
        out[name] = p
    return out


def _tiers_from_dict(d):
    if d is None:
        return None
    if not isinstance(d, Mapping):
        raise InvalidArgument("service_tiers", "must be a mapping {tier: price}")
    return {name: ModelPrice.from_dict(p) for name, p in d.items()}


def _conservative_key(ModelPrice p):
    # Ambiguous bare name: the most expensive candidate (never under-count).
    return (p.input_pico + p.output_pico, p.model)


def _default_path():
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "default_catalog.json")


cdef object _DEFAULT = None  # the parsed default catalog, once per process


cdef class Catalog:
    """A named, dated set of model prices with aliases and name resolution.

    Resolution rules: see `_prices_py.Catalog` (identical).
    """

    def __init__(self, prices, *, aliases=None, version, taken, source="", skipped=(),
                 rounded=()):
        self.version = _str("version", version, empty_ok=False)
        self.taken = _str("taken", taken, empty_ok=False)
        try:
            _dt.date.fromisoformat(self.taken)
        except ValueError:
            raise InvalidArgument("taken", f"must be an ISO date (YYYY-MM-DD), got {taken!r}") from None
        if not isinstance(source, str):
            raise InvalidArgument("source", "must be a string")
        self.source = source
        if isinstance(prices, Mapping):
            prices = prices.values()
        table = {}
        for p in prices:
            if not isinstance(p, ModelPrice):
                raise InvalidArgument("prices", f"must hold ModelPrice, not {type(p).__name__}")
            if (<ModelPrice>p).model in table:
                raise InvalidArgument("prices", f"duplicate model {(<ModelPrice>p).model!r}")
            table[(<ModelPrice>p).model] = p
        self._prices = table
        alias_table = {}
        if aliases is not None:
            if not isinstance(aliases, Mapping):
                raise InvalidArgument("aliases", "must be a mapping {alias: model}")
            for alias, target in aliases.items():
                _str("aliases", alias, empty_ok=False)
                if alias in table:
                    raise InvalidArgument("aliases", f"alias {alias!r} is also a model name")
                if target not in table:
                    raise InvalidArgument("aliases", f"alias {alias!r} names unknown model {target!r}")
                alias_table[alias] = target
        self._aliases = alias_table
        self.skipped = tuple((str(n), str(r)) for n, r in skipped)
        self.rounded = tuple((str(n), str(f)) for n, f in rounded)
        self._prefixes = KNOWN_PROVIDERS | frozenset(
            (<ModelPrice>p).provider for p in table.values() if (<ModelPrice>p).provider)
        bare = {}
        for name in sorted(table):
            parts = name.split("/")
            while len(parts) > 1 and parts[0] in self._prefixes:
                parts = parts[1:]
                bare.setdefault("/".join(parts), []).append(name)
        self._bare = {k: tuple(v) for k, v in bare.items()}
        self._resolved = {}

    # -- lookup ---------------------------------------------------------------

    cpdef ModelPrice lookup(self, str model, str provider=""):
        cdef object hit = self._prices.get(model)
        cdef ModelPrice p
        if hit is not None:
            p = <ModelPrice>hit
            if not provider or p.provider == provider:
                return p
        key = (model, provider)
        hit = self._resolved.get(key, self)  # `self` marks "not cached"
        if hit is self:
            hit = self._resolve(model, provider)
            if len(self._resolved) >= _CACHE_MAX:
                self._resolved.clear()
            self._resolved[key] = hit
        if hit is None:
            raise UnknownModel(model, provider or "")
        return <ModelPrice>hit

    cdef object _exact(self, str name):
        p = self._prices.get(name)
        if p is None:
            target = self._aliases.get(name)
            if target is not None:
                p = self._prices[target]
        return p

    cdef object _match(self, str name, str hint):
        exact = self._exact(name)
        cands = self._bare.get(name, ())
        if hint:
            if exact is not None and (<ModelPrice>exact).provider == hint:
                return exact
            p = self._exact(hint + "/" + name)
            if p is not None:
                return p
            for key in cands:
                p = self._prices[key]
                if (<ModelPrice>p).provider == hint:
                    return p
        if exact is not None:
            return exact
        if cands:
            return max([self._prices[k] for k in cands], key=_conservative_key)
        return None

    cdef ModelPrice _resolve(self, str model, str provider):
        cdef str m, prov, hint
        if model is None:
            raise InvalidArgument("model", "must not be empty")
        _str("model", model, empty_ok=False)
        if provider is None:
            provider = ""
        _str("provider", provider, empty_ok=True)
        # provider names are lower-case identifiers; model names are tried as
        # given, then lower-cased
        provider = provider.lower()
        for m, prov in ((model, provider), (model.lower(), provider)):
            hint = prov
            parts = m.split("/")
            p = self._match(m, hint)
            if p is not None:
                return p
            while len(parts) > 1 and parts[0] in self._prefixes:
                if not hint:
                    hint = parts[0]
                parts = parts[1:]
                p = self._match("/".join(parts), hint)
                if p is not None:
                    return p
            if m == m.lower():
                break
        # "hd/1024-x-1792/dall-e-3" without a price of its own: the next shorter
        # name prices it (an image's quality or size, then the model)
        rest = _units.image_rest(model)
        if rest:
            return self._resolve(rest, provider)
        return None

    def cost_nanos(self, model, *, input_tokens=0, output_tokens=0, cached_input_tokens=0,
                   cache_write_tokens=0, reasoning_tokens=0, provider="", service_tier="",
                   **units):
        """The cost in nano-USD of one call of `model`: keywords are the Usage field
        names (p402core/README.md lists them), `service_tier` one of
        standard / batch / flex / priority."""
        p = self.lookup(model, provider)
        if units or service_tier:
            return p.cost_units_nanos(input_tokens, output_tokens, cached_input_tokens,
                                      cache_write_tokens, reasoning_tokens, units, service_tier)
        return p.cost_nanos(input_tokens, output_tokens, cached_input_tokens,
                            cache_write_tokens, reasoning_tokens)

    def __len__(self):
        return len(self._prices)

    def __contains__(self, model):
        """True when `lookup(model)` would find a price (aliases and prefixes included)."""
        if not isinstance(model, str):
            return False
        try:
            self.lookup(model)
        except (UnknownModel, InvalidArgument):
            return False
        return True

    def models(self):
        return tuple(sorted(self._prices))

    def aliases(self):
        """{alias: model} (a copy)."""
        return dict(self._aliases)

    def merged(self, other):
        """A new catalog: these prices, with `other`'s entries and aliases overriding."""
        if not isinstance(other, Catalog):
            raise InvalidArgument("other", "must be a Catalog")
        cdef Catalog o = <Catalog>other
        prices = dict(self._prices)
        aliases = dict(self._aliases)
        for name, p in o._prices.items():
            prices[name] = p
            aliases.pop(name, None)
        for alias, target in o._aliases.items():
            prices.pop(alias, None)
            aliases[alias] = target
        for alias, target in list(aliases.items()):
            if target not in prices:
                target = aliases.get(target)
                if target is None or target not in prices:
                    del aliases[alias]
                else:
                    aliases[alias] = target
        return Catalog(prices.values(), aliases=aliases,
                       version=f"{self.version}+{o.version}",
                       taken=max(self.taken, o.taken),
                       source=o.source or self.source)

    # -- serialisation --------------------------------------------------------

    def to_dict(self):
        d = {"version": self.version, "taken": self.taken, "source": self.source,
             "prices": [self._prices[k].to_dict() for k in sorted(self._prices)],
             "aliases": {k: self._aliases[k] for k in sorted(self._aliases)}}
        if self.skipped:
            d["skipped"] = [list(x) for x in self.skipped]
        if self.rounded:
            d["rounded"] = [list(x) for x in self.rounded]
        return d

    def __reduce__(self):
        return (type(self).from_dict, (self.to_dict(),))

    @classmethod
    def from_dict(cls, d):
        _check_fields(d, _CATALOG_FIELDS, "catalog")
        for req in ("version", "taken", "prices"):
            if req not in d:
                raise InvalidArgument(req, "required")
        if not isinstance(d["prices"], (list, tuple)):
            raise InvalidArgument("prices", "must be a list")
        return cls([ModelPrice.from_dict(p) for p in d["prices"]], aliases=d.get("aliases"),
                   version=d["version"], taken=d["taken"], source=d.get("source", ""),
                   skipped=d.get("skipped", ()), rounded=d.get("rounded", ()))

    @classmethod
    def default(cls):
        """The curated catalog shipped in p402core/data (parsed once per process)."""
        global _DEFAULT
        if _DEFAULT is None:
            with open(_default_path(), encoding="utf-8") as fh:
                _DEFAULT = cls.from_dict(json.load(fh))
        return _DEFAULT

    @classmethod
    def from_litellm(cls, path_or_mapping, *, version=None, taken=None):
        """Import LiteLLM's price map (a path to its JSON, or the parsed mapping).

        See p402core._litellm for what becomes a price, what is skipped and rounded.
        """
        from p402core import _litellm

        parsed = _litellm.parse(path_or_mapping, version=version, taken=taken)
        return cls([ModelPrice.from_dict(p) for p in parsed.prices], aliases=parsed.aliases,
                   version=parsed.version, taken=parsed.taken, source=parsed.source,
                   skipped=parsed.skipped, rounded=parsed.rounded)

    def __repr__(self):
        return f"Catalog(version={self.version!r}, taken={self.taken!r}, models={len(self._prices)})"
