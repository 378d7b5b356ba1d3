"""Prices and cost: the pure-Python twin (the executable specification).

Owns `PriceTier`, `ModelPrice` (integer pico-USD per token, the cost of one
call) and `Catalog` (a named set of prices, aliases and name resolution, the
shipped default catalog and the LiteLLM import). `_prices_c.pyx` is the
compiled twin and must behave identically, errors and field names included.

Cost of one call, exactly in pico-USD (rates per token, fallbacks resolved):

    (input - cached - cache_write) * input + cached * cached_input
    + cache_write * cache_write + (output - reasoning) * output
    + reasoning * reasoning

then rounded half-up to nano-USD once: `(pico + 500) // 1000`.

Rate fallbacks follow LiteLLM's calculator (generic_cost_per_token):
- a missing cached-input or cache-write rate bills those tokens as ordinary
  input; a missing reasoning rate bills them as ordinary output;
- tiers (`*_above_<N>k_tokens`) apply when input_tokens > threshold (the
  whole prompt, cached tokens included); the tier with the largest crossed
  threshold gives the input and output rates. A cached-input, cache-write or
  reasoning rate the tier leaves unset carries over from the last explicit one
  below it (tier or base); if none was ever set it falls back to the tier's
  own input (output, for reasoning) rate.

Bounds: prices are 0..10**10 pico (0.01 USD) per token, token counts
0..MAX_TOKENS, so every cost fits a signed 64-bit integer (<= 2 * 10**18).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping

from . import _units
from ._enums import MAX_STRING, MAX_TOKENS, InvalidArgument, UnknownModel

__all__ = [
    "PriceTier",
    "ModelPrice",
    "Catalog",
    "MAX_PRICE_PICO",
    "MAX_TIERS",
    "KNOWN_PROVIDERS",
]

MAX_PRICE_PICO = 10**10  # 0.01 USD per token: above that it is a typo, not a price
MAX_TIERS = 8            # threshold tiers per model (LiteLLM uses at most 3)
_CACHE_MAX = 4096        # resolved non-canonical names kept per catalog

# Provider prefixes stripped when resolving "provider/model" names, in
# addition to every provider that appears in the catalog itself.
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


# -- validation helpers (shared shape with the compiled twin) ---------------

def _int_in(field: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be an integer, not {type(value).__name__}")
    if value < lo:
        raise InvalidArgument(field, f"must be >= {lo}, got {value}")
    if value > hi:
        raise InvalidArgument(field, f"must be <= {hi}, got {value}")
    return int(value)


def _price(field: str, value) -> int:
    return _int_in(field, value, 0, MAX_PRICE_PICO)


def _opt_price(field: str, value):
    return None if value is None else _price(field, value)


def _str(field: str, value, *, empty_ok: bool) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(field, f"must be a string, not {type(value).__name__}")
    if not value and not empty_ok:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > MAX_STRING:
        raise InvalidArgument(field, f"longer than {MAX_STRING} characters")
    return str(value)


def _check_usage(input_tokens, output_tokens, cached, cache_write, reasoning):
    i = _int_in("input_tokens", input_tokens, 0, MAX_TOKENS)
    o = _int_in("output_tokens", output_tokens, 0, MAX_TOKENS)
    c = _int_in("cached_input_tokens", cached, 0, MAX_TOKENS)
    w = _int_in("cache_write_tokens", cache_write, 0, MAX_TOKENS)
    r = _int_in("reasoning_tokens", reasoning, 0, MAX_TOKENS)
    if c > i:
        raise InvalidArgument("cached_input_tokens", "exceeds input_tokens (cached tokens are part of the input)")
    if c + w > i:
        raise InvalidArgument("cache_write_tokens",
                              "cached_input_tokens + cache_write_tokens exceeds input_tokens")
    if r > o:
        raise InvalidArgument("reasoning_tokens", "exceeds output_tokens (reasoning tokens are part of the output)")
    return i, o, c, w, r


def _check_fields(d, allowed, what: str):
    if not isinstance(d, Mapping):
        raise InvalidArgument(what, f"must be a mapping, not {type(d).__name__}")
    for key in d:
        if key not in allowed:
            raise InvalidArgument(str(key), f"unknown field of {what}")


class PriceTier:
    """Rates that replace the base rates when input_tokens > threshold_tokens."""

    __slots__ = ("_threshold_tokens", "_input_pico", "_output_pico", "_cached_input_pico",
                 "_cache_write_pico", "_reasoning_pico")

    def __init__(self, threshold_tokens, *, input_pico, output_pico, cached_input_pico=None,
                 cache_write_pico=None, reasoning_pico=None):
        self._threshold_tokens = _int_in("threshold_tokens", threshold_tokens, 0, MAX_TOKENS)
        self._input_pico = _price("input_pico", input_pico)
        self._output_pico = _price("output_pico", output_pico)
        self._cached_input_pico = _opt_price("cached_input_pico", cached_input_pico)
        self._cache_write_pico = _opt_price("cache_write_pico", cache_write_pico)
        self._reasoning_pico = _opt_price("reasoning_pico", reasoning_pico)

    threshold_tokens = property(lambda self: self._threshold_tokens)
    input_pico = property(lambda self: self._input_pico)
    output_pico = property(lambda self: self._output_pico)
    cached_input_pico = property(lambda self: self._cached_input_pico)
    cache_write_pico = property(lambda self: self._cache_write_pico)
    reasoning_pico = property(lambda self: self._reasoning_pico)

    def to_dict(self) -> dict:
        d = {"threshold_tokens": self._threshold_tokens, "input_pico": self._input_pico,
             "output_pico": self._output_pico}
        if self._cached_input_pico is not None:
            d["cached_input_pico"] = self._cached_input_pico
        if self._cache_write_pico is not None:
            d["cache_write_pico"] = self._cache_write_pico
        if self._reasoning_pico is not None:
            d["reasoning_pico"] = self._reasoning_pico
        return d

    def __reduce__(self):
        # pickled as its dict: the same for both twins, and validated on load
        return (type(self).from_dict, (self.to_dict(),))

    @classmethod
    def from_dict(cls, d) -> "PriceTier":
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

    __hash__ = None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"PriceTier({args})"


class ModelPrice:
    """The price of one model: integer pico-USD per token, with its tiers.

    Read-only. `cost_pico` / `cost_nanos` validate the usage (InvalidArgument
    naming the field) and price it; see the module docstring for the formula.
    """

    __slots__ = ("_model", "_provider", "_family", "_mode", "_input_pico", "_output_pico",
                 "_cached_input_pico", "_cache_write_pico", "_reasoning_pico", "_tiers",
                 "_max_input_tokens", "_max_output_tokens", "_thresholds", "_rows", "_units",
                 "_service_tiers")

    def __init__(self, model, provider, *, input_pico, output_pico, cached_input_pico=None,
                 cache_write_pico=None, reasoning_pico=None, tiers=(), family="",
                 max_input_tokens=0, max_output_tokens=0, mode="chat", units=None,
                 service_tiers=None):
        self._model = _str("model", model, empty_ok=False)
        self._provider = _str("provider", provider, empty_ok=True)
        self._family = _str("family", family, empty_ok=True)
        self._mode = _str("mode", mode, empty_ok=True)
        self._input_pico = _price("input_pico", input_pico)
        self._output_pico = _price("output_pico", output_pico)
        self._cached_input_pico = _opt_price("cached_input_pico", cached_input_pico)
        self._cache_write_pico = _opt_price("cache_write_pico", cache_write_pico)
        self._reasoning_pico = _opt_price("reasoning_pico", reasoning_pico)
        self._max_input_tokens = _int_in("max_input_tokens", max_input_tokens, 0, MAX_TOKENS)
        self._max_output_tokens = _int_in("max_output_tokens", max_output_tokens, 0, MAX_TOKENS)
        if isinstance(tiers, (str, bytes, Mapping)):
            raise InvalidArgument("tiers", "must be a sequence of PriceTier")
        try:
            tier_list = list(tiers)
        except TypeError:
            raise InvalidArgument("tiers", "must be a sequence of PriceTier") from None
        for t in tier_list:
            if not isinstance(t, PriceTier):
                raise InvalidArgument("tiers", f"must hold PriceTier, not {type(t).__name__}")
        if len(tier_list) > MAX_TIERS:
            raise InvalidArgument("tiers", f"at most {MAX_TIERS} tiers")
        tier_list.sort(key=lambda t: t.threshold_tokens)
        for a, b in zip(tier_list, tier_list[1:]):
            if a.threshold_tokens == b.threshold_tokens:
                raise InvalidArgument("tiers", f"two tiers with threshold {a.threshold_tokens}")
        self._tiers = tuple(tier_list)
        # Effective rate rows (input, output, cached, write, reasoning); row 0 is
        # the base, row i tier i-1. Explicit optional rates carry upward.
        c, w, r = self._cached_input_pico, self._cache_write_pico, self._reasoning_pico
        i, o = self._input_pico, self._output_pico
        rows = [(i, o, i if c is None else c, i if w is None else w, o if r is None else r)]
        for t in self._tiers:
            if t.cached_input_pico is not None:
                c = t.cached_input_pico
            if t.cache_write_pico is not None:
                w = t.cache_write_pico
            if t.reasoning_pico is not None:
                r = t.reasoning_pico
            i, o = t.input_pico, t.output_pico
            rows.append((i, o, i if c is None else c, i if w is None else w, o if r is None else r))
        self._thresholds = tuple(t.threshold_tokens for t in self._tiers)
        self._rows = tuple(rows)
        self._units = _units.check_unit_rates(units)
        self._service_tiers = _check_service_tiers(service_tiers, self._model)

    model = property(lambda self: self._model)
    provider = property(lambda self: self._provider)
    family = property(lambda self: self._family)
    mode = property(lambda self: self._mode)
    input_pico = property(lambda self: self._input_pico)
    output_pico = property(lambda self: self._output_pico)
    cached_input_pico = property(lambda self: self._cached_input_pico)
    cache_write_pico = property(lambda self: self._cache_write_pico)
    reasoning_pico = property(lambda self: self._reasoning_pico)
    tiers = property(lambda self: self._tiers)
    max_input_tokens = property(lambda self: self._max_input_tokens)
    max_output_tokens = property(lambda self: self._max_output_tokens)
    units = property(lambda self: dict(self._units))
    service_tiers = property(lambda self: dict(self._service_tiers))

    def rates_at(self, input_tokens) -> tuple:
        """The effective (input, output, cached_input, cache_write, reasoning) rates,
        in pico per token, for a call with this many input tokens."""
        i = _int_in("input_tokens", input_tokens, 0, MAX_TOKENS)
        row = 0
        thresholds = self._thresholds
        for k in range(len(thresholds) - 1, -1, -1):
            if i > thresholds[k]:
                row = k + 1
                break
        return self._rows[row]

    def for_tier(self, service_tier) -> "ModelPrice":
        """The price of this model in a service tier: its own rates for the tier, or
        these (standard) ones when it has none."""
        tier = _units.check_tier(service_tier)
        return self._service_tiers.get(tier, self) if tier else self

    def cost_units_pico(self, input_tokens=0, output_tokens=0, cached_input_tokens=0,
                        cache_write_tokens=0, reasoning_tokens=0, units=None,
                        service_tier="") -> int:
        """Exact cost in pico-USD of a usage with extra units ({field: count}) in a
        service tier (p402core._units has the vocabulary and the formula)."""
        i, o, c, w, r = _check_usage(input_tokens, output_tokens, cached_input_tokens,
                                     cache_write_tokens, reasoning_tokens)
        p = self.for_tier(service_tier)
        extra = _units.check_units(units)
        return _units.cost_pico(p.rates_at(i), i, o, c, w, r, extra, p._units)

    def cost_units_nanos(self, input_tokens=0, output_tokens=0, cached_input_tokens=0,
                         cache_write_tokens=0, reasoning_tokens=0, units=None,
                         service_tier="") -> int:
        """`cost_units_pico` rounded half-up to nano-USD (the only rounding)."""
        return (self.cost_units_pico(input_tokens, output_tokens, cached_input_tokens,
                                     cache_write_tokens, reasoning_tokens, units,
                                     service_tier) + 500) // 1000

    def cost_pico(self, input_tokens, output_tokens, cached_input_tokens=0,
                  cache_write_tokens=0, reasoning_tokens=0) -> int:
        """Exact cost in pico-USD of one call's usage (validated)."""
        i, o, c, w, r = _check_usage(input_tokens, output_tokens, cached_input_tokens,
                                     cache_write_tokens, reasoning_tokens)
        row = 0
        thresholds = self._thresholds
        for k in range(len(thresholds) - 1, -1, -1):
            if i > thresholds[k]:
                row = k + 1
                break
        ri, ro, rc, rw, rr = self._rows[row]
        return (i - c - w) * ri + c * rc + w * rw + (o - r) * ro + r * rr

    def cost_nanos(self, input_tokens, output_tokens, cached_input_tokens=0,
                   cache_write_tokens=0, reasoning_tokens=0) -> int:
        """`cost_pico` rounded half-up to nano-USD (the only rounding)."""
        return (self.cost_pico(input_tokens, output_tokens, cached_input_tokens,
                               cache_write_tokens, reasoning_tokens) + 500) // 1000

    def to_dict(self) -> dict:
        d = {"model": self._model, "provider": self._provider, "family": self._family,
             "mode": self._mode, "input_pico": self._input_pico, "output_pico": self._output_pico}
        if self._cached_input_pico is not None:
            d["cached_input_pico"] = self._cached_input_pico
        if self._cache_write_pico is not None:
            d["cache_write_pico"] = self._cache_write_pico
        if self._reasoning_pico is not None:
            d["reasoning_pico"] = self._reasoning_pico
        if self._tiers:
            d["tiers"] = [t.to_dict() for t in self._tiers]
        d["max_input_tokens"] = self._max_input_tokens
        d["max_output_tokens"] = self._max_output_tokens
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
    def from_dict(cls, d) -> "ModelPrice":
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

    __hash__ = None

    def __repr__(self) -> str:
        return (f"ModelPrice({self._model!r}, {self._provider!r}, input_pico={self._input_pico}, "
                f"output_pico={self._output_pico}, tiers={len(self._tiers)})")


def _check_service_tiers(tiers, model: str) -> dict:
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
        if p.model != model or p._service_tiers:
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


def _conservative_key(p):
    # Ambiguous bare name: price it with the most expensive candidate (never
    # under-count), ties broken by name so the choice is deterministic.
    return (p.input_pico + p.output_pico, p.model)


def _default_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "default_catalog.json")


_DEFAULT = None  # the parsed default catalog, once per process


class Catalog:
    """A named, dated set of model prices with aliases and name resolution.

    lookup(model, provider) resolves, first match wins:
    1. the exact name (or alias) — the common path, one dict hit;
    2. then, in a slow path whose result is cached (bounded: at most 4096
       names, the cache is cleared when full), for the name and each form of
       it with a known provider prefix stripped ("openrouter/anthropic/x" ->
       "anthropic/x" -> "x"; the first stripped prefix is the provider hint
       when `provider` is empty):
       a. the exact name whose price belongs to the hinted provider,
       b. "<provider>/<name>",
       c. a catalog entry whose name with known prefixes stripped equals
          the name and whose provider is the hinted one,
       d. the exact name or alias, whatever its provider,
       e. a catalog entry whose stripped name equals the name; if several,
          the most expensive (input + output rate), then by name;
    3. the same again with the name lower-cased (the provider always is).
    Nothing found: UnknownModel. A provider the catalog does not price never
    blocks the vendor's own price (a call to "gpt-4o" through any gateway is
    priced as "gpt-4o").
    """

    __slots__ = ("_prices", "_aliases", "_bare", "_resolved", "_prefixes", "_version",
                 "_taken", "_source", "_skipped", "_rounded")

    def __init__(self, prices, *, aliases=None, version, taken, source="", skipped=(),
                 rounded=()):
        self._version = _str("version", version, empty_ok=False)
        self._taken = _str("taken", taken, empty_ok=False)
        try:
            _dt.date.fromisoformat(self._taken)
        except ValueError:
            raise InvalidArgument("taken", f"must be an ISO date (YYYY-MM-DD), got {taken!r}") from None
        if not isinstance(source, str):
            raise InvalidArgument("source", "must be a string")
        self._source = source
        if isinstance(prices, Mapping):
            prices = prices.values()
        table = {}
        for p in prices:
            if not isinstance(p, ModelPrice):
                raise InvalidArgument("prices", f"must hold ModelPrice, not {type(p).__name__}")
            if p.model in table:
                raise InvalidArgument("prices", f"duplicate model {p.model!r}")
            table[p.model] = p
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
        self._skipped = tuple((str(n), str(r)) for n, r in skipped)
        self._rounded = tuple((str(n), str(f)) for n, f in rounded)
        self._prefixes = KNOWN_PROVIDERS | frozenset(p.provider for p in table.values() if p.provider)
        bare = {}
        for name in sorted(table):
            parts = name.split("/")
            while len(parts) > 1 and parts[0] in self._prefixes:
                parts = parts[1:]
                bare.setdefault("/".join(parts), []).append(name)
        self._bare = {k: tuple(v) for k, v in bare.items()}
        self._resolved = {}

    version = property(lambda self: self._version)
    taken = property(lambda self: self._taken)
    source = property(lambda self: self._source)
    skipped = property(lambda self: self._skipped)
    rounded = property(lambda self: self._rounded)

    # -- lookup ---------------------------------------------------------------

    def lookup(self, model, provider="") -> ModelPrice:
        if not isinstance(model, str) and model is not None:
            raise TypeError(f"Argument 'model' has incorrect type (expected str, got {type(model).__name__})")
        if not isinstance(provider, str) and provider is not None:
            raise TypeError(f"Argument 'provider' has incorrect type (expected str, got {type(provider).__name__})")
        p = self._prices.get(model)
        if p is not None and (not provider or p._provider == provider):
            return p
        key = (model, provider)
        if key in self._resolved:
            p = self._resolved[key]
        else:
            p = self._resolve(model, provider)
            if len(self._resolved) >= _CACHE_MAX:
                self._resolved.clear()
            self._resolved[key] = p
        if p is None:
            raise UnknownModel(model, provider or "")
        return p

    def _exact(self, name):
        p = self._prices.get(name)
        if p is None:
            target = self._aliases.get(name)
            if target is not None:
                p = self._prices[target]
        return p

    def _match(self, name, hint):
        exact = self._exact(name)
        cands = self._bare.get(name, ())
        if hint:
            if exact is not None and exact._provider == hint:
                return exact
            p = self._exact(hint + "/" + name)
            if p is not None:
                return p
            for key in cands:
                p = self._prices[key]
                if p._provider == hint:
                    return p
        if exact is not None:
            return exact
        if cands:
            return max((self._prices[k] for k in cands), key=_conservative_key)
        return None

    def _resolve(self, model, provider):
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
                   **units) -> int:
        """The cost in nano-USD of one call of `model`: keywords are the Usage field
        names (p402core/README.md lists them), `service_tier` one of
        standard / batch / flex / priority."""
        p = self.lookup(model, provider)
        if units or service_tier:
            return p.cost_units_nanos(input_tokens, output_tokens, cached_input_tokens,
                                      cache_write_tokens, reasoning_tokens, units, service_tier)
        return p.cost_nanos(input_tokens, output_tokens, cached_input_tokens,
                            cache_write_tokens, reasoning_tokens)

    def __len__(self) -> int:
        return len(self._prices)

    def __contains__(self, model) -> bool:
        """True when `lookup(model)` would find a price (aliases and prefixes included)."""
        if not isinstance(model, str):
            return False
        try:
            self.lookup(model)
        except (UnknownModel, InvalidArgument):
            return False
        return True

    def models(self) -> tuple:
        return tuple(sorted(self._prices))

    def aliases(self) -> dict:
        """{alias: model} (a copy)."""
        return dict(self._aliases)

    def merged(self, other: "Catalog") -> "Catalog":
        """A new catalog: these prices, with `other`'s entries and aliases overriding."""
        if not isinstance(other, Catalog):
            raise InvalidArgument("other", "must be a Catalog")
        prices = dict(self._prices)
        aliases = dict(self._aliases)
        for name, p in other._prices.items():
            prices[name] = p
            aliases.pop(name, None)
        for alias, target in other._aliases.items():
            prices.pop(alias, None)
            aliases[alias] = target
        # An alias of ours may point at a model the override turned into an alias.
        for alias, target in list(aliases.items()):
            if target not in prices:
                target = aliases.get(target)
                if target is None or target not in prices:
                    del aliases[alias]
                else:
                    aliases[alias] = target
        return Catalog(prices.values(), aliases=aliases,
                       version=f"{self._version}+{other._version}",
                       taken=max(self._taken, other._taken),
                       source=other._source or self._source)

    # -- serialisation --------------------------------------------------------

    def to_dict(self) -> dict:
        d = {"version": self._version, "taken": self._taken, "source": self._source,
             "prices": [self._prices[k].to_dict() for k in sorted(self._prices)],
             "aliases": {k: self._aliases[k] for k in sorted(self._aliases)}}
        if self._skipped:
            d["skipped"] = [list(x) for x in self._skipped]
        if self._rounded:
            d["rounded"] = [list(x) for x in self._rounded]
        return d

    def __reduce__(self):
        return (type(self).from_dict, (self.to_dict(),))

    @classmethod
    def from_dict(cls, d) -> "Catalog":
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
    def default(cls) -> "Catalog":
        """The curated catalog shipped in p402core/data (parsed once per process)."""
        global _DEFAULT
        if _DEFAULT is None:
            with open(_default_path(), encoding="utf-8") as fh:
                _DEFAULT = cls.from_dict(json.load(fh))
        return _DEFAULT

    @classmethod
    def from_litellm(cls, path_or_mapping, *, version=None, taken=None) -> "Catalog":
        """Import LiteLLM's price map (a path to its JSON, or the parsed mapping).

        See p402core._litellm for what becomes a price, what is skipped (listed
        in `.skipped` as (name, reason)) and what is rounded (`.rounded`).
        """
        from . import _litellm

        parsed = _litellm.parse(path_or_mapping, version=version, taken=taken)
        return cls([ModelPrice.from_dict(p) for p in parsed.prices], aliases=parsed.aliases,
                   version=parsed.version, taken=parsed.taken, source=parsed.source,
                   skipped=parsed.skipped, rounded=parsed.rounded)

    def __repr__(self) -> str:
        return f"Catalog(version={self._version!r}, taken={self._taken!r}, models={len(self._prices)})"
