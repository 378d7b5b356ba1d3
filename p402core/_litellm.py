"""Parsing of LiteLLM's price map into P402 price dicts (shared by both twins).

Plain Python on purpose: importing a price map is not a hot path, and one
parser guarantees both twins build exactly the same catalog. The output is a
list of `ModelPrice.from_dict` dicts plus what was skipped and rounded.

What becomes a price: every entry (any `mode`) with a per-token price
(`input_cost_per_token` and/or `output_cost_per_token`; a missing one is 0,
as in LiteLLM) or a `tiered_pricing` table of per-token rates. Kept:
`litellm_provider` as provider, `mode`, `max_input_tokens`,
`max_output_tokens` (a malformed limit is dropped to 0 = unknown; the price
stays), `cache_read_input_token_cost`, `cache_creation_input_token_cost`,
`output_cost_per_reasoning_token`.

Tiers: `<rate>_above_<N>k_tokens` (and `_above_<N>_tokens`) for input,
output, cache read and cache creation become a PriceTier with threshold
N*1000 (N). As in LiteLLM, a rate a tier leaves out carries over from the
tier below (or the base). xAI bills a tier once the prompt *reaches* the
threshold (LiteLLM's inclusive providers), so its thresholds are stored as
N*1000 - 1 (input > N*1000 - 1 <=> input >= N*1000 for integers). A
`tiered_pricing` table (Dashscope: a range per tier, all tokens at one tier's
rates) becomes a base price (the range starting at 0) plus one tier per
further range starting at its lower bound; rates a range leaves out resolve as
LiteLLM does (cache rates -> the range's input rate, output -> the model's
output rate, reasoning -> the range's output rate).

Fireworks: LiteLLM bills cached input at half the input rate when the map
gives no cache-read rate (FIREWORKS_AI_DEFAULT_CACHE_READ_RATE_RATIO); the
import makes that rate explicit.

Units (p402core._units, the price's `units`): the 1-hour cache-write rate
(`cache_creation_input_token_cost_above_1hr`), audio and image token rates in
and out, per image (`input_cost_per_image`, else `output_cost_per_image`, as
LiteLLM's image calculator picks), else per pixel (`input_cost_per_pixel`), per
second of audio for transcription (`cost_per_second`, `input_cost_per_second`,
`output_cost_per_second`, the first given) and of video for video generation
(`output_cost_per_video_per_second`, `output_cost_per_second`) stored per
millisecond, per character, per query, per OCR page, and web-search tool calls at
the medium search context (`search_context_cost_per_query`). An entry priced
only in such units is kept with 0 per-token rates.

Service tiers (the price's `service_tiers`): `<key>_flex`, `<key>_priority` and
`<key>_batches` rates replace `<key>` for that tier, per key, as LiteLLM's
calculator falls back. Batch follows LiteLLM's batch calculator: only
`_above_N_tokens_batches` thresholds apply, and a rate without its `_batches`
key is half the standard one (the 50 % discount OpenAI, Azure, Anthropic and
Bedrock publish; for a long prompt Anthropic bills half its long-context rate,
which LiteLLM, and so P402, bills at half the base rate).

Aliases: an `alias_of` entry becomes a catalog alias of its model (followed
through chains); one whose model has no price is skipped with that reason.

Not modelled (the standard rates are used): tiers other than batch / flex /
priority (`_ultrafast`, `_balanced`), off-peak windows, unit rates above a
long-context threshold (`…_above_1hr_above_100k_tokens`,
`input_cost_per_audio_token_above_200k_tokens`), video input per second, video
prices by resolution, per-request and per-credit prices, regional uplifts.

Skipped (listed as (name, reason)): `sample_spec`; entries that are not an
object; entries with neither a per-token price nor a unit price (the reason
names the units they are priced in, e.g. per credit); entries whose rates are
all 0 but that are billed in another unit (a 0 price would hide spend);
malformed values (negative, not a number, above 10**10 pico per token or
10**13 per unit, too many tiers, bad ranges).

Money: float USD per token -> exact integer pico via
Decimal(repr(value)) * 10**12. A value that is not a whole number of pico
(rare: sub-pico prices) is rounded half-up and listed in `rounded` as
(name, field).

Version: "litellm-" + the first 12 hex digits of the SHA-256 of the map's
canonical JSON (sorted keys, no whitespace), so the same map always gives the
same version.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import NamedTuple

from ._enums import MAX_STRING, MAX_TOKENS

MAX_PRICE_PICO = 10**10
MAX_TIERS = 8
PICO_PER_USD = 10**12
FIREWORKS_CACHE_READ_RATIO = Decimal("0.5")
INCLUSIVE_THRESHOLD_PROVIDERS = frozenset({"xai"})

# LiteLLM key -> P402 field
_RATE_KEYS = (
    ("input_cost_per_token", "input_pico"),
    ("output_cost_per_token", "output_pico"),
    ("cache_read_input_token_cost", "cached_input_pico"),
    ("cache_creation_input_token_cost", "cache_write_pico"),
)
# per-token unit rates: LiteLLM key -> p402core._units field
_TOKEN_UNIT_KEYS = (
    ("cache_creation_input_token_cost_above_1hr", "cache_write_1h_tokens"),
    ("input_cost_per_audio_token", "audio_input_tokens"),
    ("output_cost_per_audio_token", "audio_output_tokens"),
    ("input_cost_per_image_token", "image_input_tokens"),
    ("output_cost_per_image_token", "image_output_tokens"),
)
_TOKEN_UNITS = frozenset(u for _, u in _TOKEN_UNIT_KEYS)
MAX_UNIT_PRICE_PICO = 10**13
# P402 service tier -> LiteLLM key suffix
_TIER_SUFFIXES = {"batch": "batches", "flex": "flex", "priority": "priority"}
_TIER_KEY = re.compile(
    r"^(input_cost_per_token|output_cost_per_token|cache_read_input_token_cost"
    r"|cache_creation_input_token_cost)_above_(\d+)(k?)_tokens$")

_FAMILIES = (
    ("claude", re.compile(r"claude")),
    ("gemini", re.compile(r"gemini|gemma|learnlm")),
    ("llama", re.compile(r"llama")),
    ("mistral", re.compile(r"mistral|mixtral|codestral|ministral|magistral|devstral|pixtral")),
    ("deepseek", re.compile(r"deepseek")),
    ("grok", re.compile(r"grok")),
    ("command", re.compile(r"command|\bc4ai|aya")),
    ("qwen", re.compile(r"qwen|qwq")),
    ("gpt", re.compile(r"gpt|(^|/)o[1-9](-|$)|chatgpt|davinci|babbage|text-embedding|codex")),
)


class Parsed(NamedTuple):
    prices: list      # ModelPrice.from_dict dicts, sorted by model
    skipped: tuple    # ((name, reason), ...)
    rounded: tuple    # ((name, field), ...)
    version: str
    taken: str
    source: str
    aliases: dict     # {alias: model} from `alias_of` entries whose model is priced


class _Malformed(Exception):
    pass


def family_of(name: str) -> str:
    """The tokenizer family of a model name ("" when unknown); used by the estimator."""
    low = name.lower()
    for family, pattern in _FAMILIES:
        if pattern.search(low):
            return family
    return ""


def usd_to_pico(value, field: str, rounded: list, name: str, *, scale: int = PICO_PER_USD,
                limit: int = MAX_PRICE_PICO, unit: str = "token") -> int:
    """Float (or numeric string) USD per token (per `unit`) -> exact int pico (times
    `scale` / 10**12: per millisecond for a per-second rate), half-up if needed."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Malformed(f"{field}: not a number ({value!r})")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Malformed(f"{field}: not finite ({value!r})")
        text = repr(value)
    else:
        text = str(value).strip()
    try:
        exact = Decimal(text) * scale
    except InvalidOperation:
        raise _Malformed(f"{field}: not a number ({value!r})") from None
    if not exact.is_finite():
        raise _Malformed(f"{field}: not finite ({value!r})")
    if exact < 0:
        raise _Malformed(f"{field}: negative ({value!r})")
    pico = int(exact.to_integral_value(rounding=ROUND_HALF_UP))
    if pico != exact:
        rounded.append((name, field))
    if pico > limit:
        raise _Malformed(f"{field}: above {Decimal(limit) / scale} USD per {unit} ({value!r})")
    return pico


def _unit_rates(name: str, entry: Mapping, rounded: list) -> dict:
    """The `units` of a price (p402core._units) from an entry's per-unit keys."""
    units = {}
    for key, unit in _TOKEN_UNIT_KEYS:
        v = entry.get(key)
        if v is not None:
            units[unit] = usd_to_pico(v, key, rounded, name)
    # images: per image (in or out, LiteLLM's first one), else per pixel
    for key in ("input_cost_per_image", "output_cost_per_image"):
        if entry.get(key) is not None:
            units["images"] = usd_to_pico(entry[key], key, rounded, name,
                                          limit=MAX_UNIT_PRICE_PICO, unit="image")
            break
    else:
        if entry.get("input_cost_per_pixel") is not None:
            units["pixels"] = usd_to_pico(entry["input_cost_per_pixel"], "input_cost_per_pixel",
                                          rounded, name, limit=MAX_UNIT_PRICE_PICO, unit="pixel")
    mode = entry.get("mode")
    per_second = None
    if mode == "audio_transcription":
        per_second = ("audio_ms", ("cost_per_second", "input_cost_per_second",
                                   "output_cost_per_second"))
    elif mode == "video_generation":
        per_second = ("video_ms", ("output_cost_per_video_per_second", "output_cost_per_second"))
    if per_second is not None:
        unit, keys = per_second
        for key in keys:
            if entry.get(key) is not None:
                units[unit] = usd_to_pico(entry[key], key, rounded, name, scale=PICO_PER_USD // 1000,
                                          limit=MAX_UNIT_PRICE_PICO, unit="millisecond")
                break
    for key, unit in (("input_cost_per_character", "characters"),
                      ("input_cost_per_query", "queries"), ("ocr_cost_per_page", "pages")):
        if entry.get(key) is not None:
            units[unit] = usd_to_pico(entry[key], key, rounded, name,
                                      limit=MAX_UNIT_PRICE_PICO, unit=unit[:-1])
    search = entry.get("search_context_cost_per_query")
    if isinstance(search, Mapping) and search.get("search_context_size_medium") is not None:
        units["web_search_calls"] = usd_to_pico(
            search["search_context_size_medium"], "search_context_cost_per_query", rounded, name,
            limit=MAX_UNIT_PRICE_PICO, unit="call")
    return {k: v for k, v in units.items() if v or k in _TOKEN_UNITS}


def _tier_entry(entry: Mapping, suffix: str):
    """The entry as its service tier bills it: every `<key>_<suffix>` rate replaces
    `<key>` (LiteLLM's per-key fallback to the standard rate); None when the entry
    has no rate of that tier."""
    tail = "_" + suffix
    own = {k[:-len(tail)]: v for k, v in entry.items() if k.endswith(tail) and v is not None}
    if not own:
        return None
    base = {k: v for k, v in entry.items()
            if not any(k.endswith("_" + s) for s in _TIER_SUFFIXES.values())}
    if suffix == "batches":
        # LiteLLM's batch rule: only `_above_N_tokens_batches` thresholds apply, and
        # a rate without its `_batches` key is half the standard one (the 50 %
        # batch discount OpenAI, Azure, Anthropic and Bedrock publish)
        base = {k: v for k, v in base.items() if "_above_" not in k or k.endswith("_above_1hr")}
        for key, _field in _RATE_KEYS:
            if key not in own and isinstance(entry.get(key), (int, float)) \
                    and not isinstance(entry.get(key), bool):
                base[key] = str(Decimal(repr(entry[key])) / 2)
    base.update(own)
    return base


def _limit(value) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= MAX_TOKENS:
        return value
    return 0


def _unpriced_reason(entry: Mapping) -> str:
    units = sorted({k.split("_per_", 1)[1].split("_above_")[0]
                    for k, v in entry.items()
                    if v is not None and "_cost_per_" in k and not k.endswith("_per_token")})
    if units:
        return "no per-token price (priced per " + ", ".join(units) + ")"
    return "no per-token price"


def _zero_but_priced_otherwise(price: dict, entry: Mapping) -> bool:
    rates = [price.get(f) for f in ("input_pico", "output_pico", "cached_input_pico",
                                     "cache_write_pico", "reasoning_pico")]
    rates += [t[f] for t in price.get("tiers", ()) for f in ("input_pico", "output_pico")]
    rates += list(price.get("units", {}).values())
    if any(rates):
        return False
    return any(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
               for k, v in entry.items() if "_cost_per_" in k and not k.endswith("_per_token"))


def _threshold_tiers(name: str, entry: Mapping, base: dict, provider: str, rounded: list) -> list:
    by_threshold: dict = {}
    for key, value in entry.items():
        m = _TIER_KEY.match(key)
        if m is None or value is None:
            continue
        threshold = int(m.group(2)) * (1000 if m.group(3) else 1)
        field = dict(_RATE_KEYS)[m.group(1)]
        by_threshold.setdefault(threshold, {})[field] = usd_to_pico(value, key, rounded, name)
    if len(by_threshold) > MAX_TIERS:
        raise _Malformed(f"more than {MAX_TIERS} price tiers")
    tiers = []
    cur_in, cur_out = base["input_pico"], base["output_pico"]
    for threshold in sorted(by_threshold):
        rates = by_threshold[threshold]
        cur_in = rates.get("input_pico", cur_in)
        cur_out = rates.get("output_pico", cur_out)
        if provider in INCLUSIVE_THRESHOLD_PROVIDERS:
            threshold -= 1  # LiteLLM bills these at input >= N
        if not 0 <= threshold <= MAX_TOKENS:
            raise _Malformed(f"tier threshold {threshold} out of range")
        tier = {"threshold_tokens": threshold, "input_pico": cur_in, "output_pico": cur_out}
        for field in ("cached_input_pico", "cache_write_pico"):
            if field in rates:
                tier[field] = rates[field]
        tiers.append(tier)
    return tiers


def _range_tiers(name: str, entry: Mapping, rounded: list) -> tuple:
    """LiteLLM `tiered_pricing` (ranges) -> (base rates, [tier dicts])."""
    table = entry["tiered_pricing"]
    if not isinstance(table, list) or not table:
        raise _Malformed("tiered_pricing: not a non-empty list")
    if len(table) > MAX_TIERS + 1:
        raise _Malformed(f"tiered_pricing: more than {MAX_TIERS + 1} ranges")
    ranged = []
    for t in table:
        rng = t.get("range") if isinstance(t, Mapping) else None
        if (not isinstance(rng, (list, tuple)) or len(rng) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in rng)):
            raise _Malformed("tiered_pricing: a tier without a numeric [start, end] range")
        if t.get("input_cost_per_token") is None:
            raise _Malformed("tiered_pricing: a tier without input_cost_per_token")
        ranged.append((rng[0], rng[1], t))
    ranged.sort(key=lambda r: r[0])
    if ranged[0][0] != 0:
        raise _Malformed("tiered_pricing: ranges do not start at 0")
    for (s0, e0, _), (s1, _e1, _) in zip(ranged, ranged[1:]):
        if s1 != e0:
            raise _Malformed("tiered_pricing: ranges are not contiguous")
    model_out = entry.get("output_cost_per_token")
    model_out = 0 if model_out is None else usd_to_pico(model_out, "output_cost_per_token", rounded, name)
    model_reason = entry.get("output_cost_per_reasoning_token")
    model_reason = None if model_reason is None else usd_to_pico(
        model_reason, "output_cost_per_reasoning_token", rounded, name)
    rows = []
    for start, _end, t in ranged:
        if not float(start).is_integer() or start > MAX_TOKENS:
            raise _Malformed(f"tiered_pricing: bad range start {start!r}")
        i = usd_to_pico(t["input_cost_per_token"], "tiered_pricing.input_cost_per_token", rounded, name)
        has_out = t.get("output_cost_per_token") is not None
        o = usd_to_pico(t["output_cost_per_token"], "tiered_pricing.output_cost_per_token",
                        rounded, name) if has_out else model_out
        c = t.get("cache_read_input_token_cost")
        c = i if c is None else usd_to_pico(c, "tiered_pricing.cache_read_input_token_cost", rounded, name)
        w = t.get("cache_creation_input_token_cost")
        w = i if w is None else usd_to_pico(w, "tiered_pricing.cache_creation_input_token_cost", rounded, name)
        r = t.get("output_cost_per_reasoning_token")
        if r is not None:
            r = usd_to_pico(r, "tiered_pricing.output_cost_per_reasoning_token", rounded, name)
        elif has_out:
            r = o
        else:
            r = model_out if model_reason is None else model_reason
        rows.append({"threshold_tokens": int(start), "input_pico": i, "output_pico": o,
                     "cached_input_pico": c, "cache_write_pico": w, "reasoning_pico": r})
    base = dict(rows[0])
    del base["threshold_tokens"]
    return base, rows[1:]


def entry_to_price(name: str, entry: Mapping, rounded: list, *, tiers_too: bool = True) -> dict:
    """One LiteLLM entry -> a ModelPrice dict; raises _Malformed or returns None if unpriced."""
    provider = entry.get("litellm_provider") or ""
    mode = entry.get("mode") or ""
    if not isinstance(provider, str) or len(provider) > MAX_STRING:
        raise _Malformed("litellm_provider: not a short string")
    if not isinstance(mode, str) or len(mode) > MAX_STRING:
        raise _Malformed("mode: not a short string")
    price = {"model": name, "provider": provider, "family": family_of(name), "mode": mode}
    if entry.get("tiered_pricing") is not None:
        base, tiers = _range_tiers(name, entry, rounded)
        price.update(base)
    elif entry.get("input_cost_per_token") is not None or entry.get("output_cost_per_token") is not None:
        for key, field in _RATE_KEYS:
            value = entry.get(key)
            if value is not None:
                price[field] = usd_to_pico(value, key, rounded, name)
        price.setdefault("input_pico", 0)
        price.setdefault("output_pico", 0)
        reasoning = entry.get("output_cost_per_reasoning_token")
        if reasoning is not None:
            price["reasoning_pico"] = usd_to_pico(reasoning, "output_cost_per_reasoning_token",
                                                  rounded, name)
        if provider == "fireworks_ai" and "cached_input_pico" not in price:
            half = Decimal(price["input_pico"]) * FIREWORKS_CACHE_READ_RATIO
            price["cached_input_pico"] = int(half.to_integral_value(rounding=ROUND_HALF_UP))
            if price["cached_input_pico"] != half:
                rounded.append((name, "cache_read_input_token_cost"))
        tiers = _threshold_tiers(name, entry, price, provider, rounded)
    else:
        price["input_pico"] = price["output_pico"] = 0
        tiers = None  # no per-token price: priced by its units alone, if any
    units = _unit_rates(name, entry, rounded)
    if tiers is None and not units:
        return None
    if units:
        price["units"] = units
    if tiers:
        price["tiers"] = tiers
    price["max_input_tokens"] = _limit(entry.get("max_input_tokens"))
    price["max_output_tokens"] = _limit(entry.get("max_output_tokens"))
    if tiers_too:
        service = {}
        for tier, suffix in _TIER_SUFFIXES.items():
            tier_entry = _tier_entry(entry, suffix)
            if tier_entry is not None:
                tp = entry_to_price(name, tier_entry, rounded, tiers_too=False)
                if tp is not None and tp != price:
                    service[tier] = tp
        if service:
            price["service_tiers"] = service
    return price


def version_of(mapping: Mapping) -> str:
    canonical = json.dumps(mapping, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "litellm-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def parse(path_or_mapping, *, version=None, taken=None) -> Parsed:
    """Parse a LiteLLM price map (a filesystem path or the decoded mapping)."""
    if isinstance(path_or_mapping, (str, os.PathLike)):
        path = os.fspath(path_or_mapping)
        with open(path, encoding="utf-8") as fh:
            mapping = json.load(fh)
        source = f"LiteLLM price map ({os.path.basename(path)})"
        if taken is None:
            taken = _dt.datetime.fromtimestamp(os.path.getmtime(path), _dt.timezone.utc).date().isoformat()
    else:
        mapping = path_or_mapping
        source = "LiteLLM price map"
    if not isinstance(mapping, Mapping):
        from ._enums import InvalidArgument
        raise InvalidArgument("path_or_mapping", "the price map must be a JSON object")
    if taken is None:
        taken = _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    prices, skipped, rounded, alias_of = [], [], [], {}
    for name in sorted(mapping):
        entry = mapping[name]
        if name == "sample_spec":
            skipped.append((name, "sample_spec (documentation entry)"))
            continue
        if not isinstance(name, str) or not name or len(name) > MAX_STRING:
            skipped.append((str(name)[:MAX_STRING], "malformed: model name empty or too long"))
            continue
        if not isinstance(entry, Mapping):
            skipped.append((name, "malformed: entry is not an object"))
            continue
        target = entry.get("alias_of")
        if isinstance(target, str) and target and not any(
                k.endswith("_per_token") or "_cost_per_" in k for k in entry):
            alias_of[name] = target
            continue
        mark = len(rounded)
        try:
            price = entry_to_price(name, entry, rounded)
        except _Malformed as exc:
            del rounded[mark:]
            skipped.append((name, f"malformed: {exc}"))
            continue
        if price is None:
            skipped.append((name, _unpriced_reason(entry)))
            continue
        if _zero_but_priced_otherwise(price, entry):
            # e.g. rerank: 0 per token, billed per query; a 0 price would hide spend
            skipped.append((name, _unpriced_reason(entry).replace(
                "no per-token price", "per-token rates are 0")))
            continue
        prices.append(price)
    priced = {p["model"] for p in prices}
    aliases = {}
    for name, target in sorted(alias_of.items()):
        seen = {name}
        while target in alias_of and target not in seen:  # an alias of an alias
            seen.add(target)
            target = alias_of[target]
        if target in priced:
            aliases[name] = target
        else:
            skipped.append((name, f"alias of {target[:80]}, which has no price"))
    skipped.sort()
    return Parsed(prices, tuple(skipped), tuple(rounded),
                  version if version is not None else version_of(mapping), taken, source,
                  aliases)
