"""Usage beyond the five text-token counts: the unit vocabulary, service tiers and
their pricing (plain Python shared by both price twins, like `_litellm`).

A call's usage is the five token counts every price has (input, cached input,
5-minute cache write, output, reasoning) plus, when the call used them, these
units, named as the `Usage` fields of the wire, the ledger and the SDK:

Tokens that are part of a total (OpenAI and Anthropic count them inside it):
    cache_write_1h_tokens   part of input_tokens   no rate: the cache-write rate
    audio_input_tokens      part of input_tokens   no rate: the input rate
    image_input_tokens      part of input_tokens   no rate: the input rate
    audio_output_tokens     part of output_tokens  no rate: the output rate
    image_output_tokens     part of output_tokens  no rate: the output rate
(so input_tokens >= cached + cache_write + cache_write_1h + audio_input +
image_input, and output_tokens >= reasoning + audio_output + image_output).

Quantities, each priced per unit (no rate: 0, as the provider does not bill it):
    images             images generated or edited (size and quality choose the price
                       entry: "hd/1024-x-1792/dall-e-3", as LiteLLM names them)
    audio_ms           milliseconds of audio (transcription, translation): no floats
    video_ms           milliseconds of video generated
    characters         characters of text (text-to-speech)
    queries            queries (rerank, search APIs)
    web_search_calls   web-search tool calls (billed at the medium search context)
    pages              pages (OCR, document annotation)
    pixels             pixels generated (per-pixel image prices)

Each count is 0..MAX_TOKENS. A unit rate is integer pico-USD per unit: per token
rates 0..MAX_PRICE_PICO (0.01 USD), per-quantity rates 0..MAX_UNIT_PRICE_PICO
(10 USD; per millisecond for audio_ms and video_ms).

Service tiers: "standard" (also "", and OpenAI's "default" and "auto"), "batch",
"flex", "priority". A price may carry
its own full rate set per tier (`ModelPrice.service_tiers`); a tier it does not
price bills at the standard rates, as providers without the tier do.

Cost, exactly in pico-USD, with the rate row chosen by the whole input_tokens
(threshold tiers) and the rates of the call's service tier:

    text_in * input + cached * cached_input + write * cache_write
    + write_1h * r(cache_write_1h) + audio_in * r(audio_input) + image_in * r(image_input)
    + text_out * output + reasoning * reasoning
    + audio_out * r(audio_output) + image_out * r(image_output)
    + sum(quantity * r(unit))

where text_in = input - cached - write - write_1h - audio_in - image_in and
text_out = output - reasoning - audio_out - image_out; then the one rounding,
half-up to nano-USD. A cost above MAX_COST_PICO is refused (InvalidArgument
"usage"): no such call exists, and every amount must fit a signed 64-bit integer.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from ._enums import MAX_TOKENS, InvalidArgument

__all__ = ["IMAGE_QUALITIES", "image_name", "image_rest", "TOKEN_UNITS", "QUANTITY_UNITS", "UNITS", "SERVICE_TIERS", "MAX_UNIT_PRICE_PICO",
           "MAX_COST_PICO", "check_units", "check_expected", "check_unit_rates", "check_tier",
           "cost_pico", "expected_nanos"]

MAX_PRICE_PICO = 10**10
MAX_UNIT_PRICE_PICO = 10**13
MAX_COST_PICO = 9 * 10**18  # <= 2**63 - 1 with room for the half-up rounding

# (field, "input" | "output", index of the fallback rate in a rate row
# (input, output, cached_input, cache_write, reasoning))
TOKEN_UNITS = (
    ("cache_write_1h_tokens", "input", 3),
    ("audio_input_tokens", "input", 0),
    ("image_input_tokens", "input", 0),
    ("audio_output_tokens", "output", 1),
    ("image_output_tokens", "output", 1),
)
QUANTITY_UNITS = ("images", "audio_ms", "video_ms", "characters", "queries",
                  "web_search_calls", "pages", "pixels")
UNITS = tuple(u for u, _, _ in TOKEN_UNITS) + QUANTITY_UNITS
SERVICE_TIERS = ("standard", "batch", "flex", "priority")
_STANDARD = frozenset(("", "standard", "default", "auto"))

_TOKEN = {u: (part, k) for u, part, k in TOKEN_UNITS}

# Image prices by size and quality are entries named "<quality>/<W>-x-<H>/<model>"
# (LiteLLM's names: "hd/1024-x-1792/dall-e-3", "low/1024-x-1024/gpt-image-1").
IMAGE_QUALITIES = frozenset(("standard", "hd", "low", "medium", "high", "auto"))
_IMAGE_SIZE = re.compile(r"^([0-9]{2,5})-x-([0-9]{2,5})$")
_SIZE_ARG = re.compile(r"^([0-9]{2,5})\s*[xX]\s*([0-9]{2,5})$")


def image_name(model: str, size=None, quality=None) -> str:
    """The price entry name of an image request: "<quality>/<W>-x-<H>/<model>", each
    part only when the request gives it ("1024x1792" and "1024-x-1792" alike)."""
    name = model
    text = size.strip() if isinstance(size, str) else ""
    m = _SIZE_ARG.match(text) or _IMAGE_SIZE.match(text)
    if m:
        name = f"{m.group(1)}-x-{m.group(2)}/{name}"
    if isinstance(quality, str) and quality.lower() in IMAGE_QUALITIES:
        name = f"{quality.lower()}/{name}"
    return name


def image_rest(name: str) -> str:
    """`name` without its leading image quality or size ("" when it has none): a
    catalog without a price for a size or quality prices the next shorter name."""
    head, sep, rest = name.partition("/")
    if sep and rest and (head.lower() in IMAGE_QUALITIES or _IMAGE_SIZE.match(head)):
        return rest
    return ""


def _count(field: str, value, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be an integer, not {type(value).__name__}")
    if value < 0:
        raise InvalidArgument(field, f"must be >= 0, got {value}")
    if value > hi:
        raise InvalidArgument(field, f"must be <= {hi}, got {value}")
    return int(value)


def check_units(units) -> dict:
    """Validate a call's extra units ({field: count}); zeros are dropped."""
    if units is None:
        return {}
    if not isinstance(units, Mapping):
        raise InvalidArgument("units", f"must be a mapping, not {type(units).__name__}")
    out = {}
    for name, value in units.items():
        if name not in _TOKEN and name not in QUANTITY_UNITS:
            raise InvalidArgument(str(name), "unknown usage unit (known: " + ", ".join(UNITS) + ")")
        n = _count(name, value, MAX_TOKENS)
        if n:
            out[name] = n
    return out


def check_unit_rates(rates) -> dict:
    """Validate a price's unit rates ({field: pico per unit}), kept in UNITS order."""
    if rates is None:
        return {}
    if not isinstance(rates, Mapping):
        raise InvalidArgument("units", f"must be a mapping, not {type(rates).__name__}")
    for name in rates:
        if name not in _TOKEN and name not in QUANTITY_UNITS:
            raise InvalidArgument(f"units.{name}", "unknown usage unit")
    return {name: _count(f"units.{name}", rates[name],
                         MAX_PRICE_PICO if name in _TOKEN else MAX_UNIT_PRICE_PICO)
            for name in UNITS if name in rates}


def check_tier(tier) -> str:
    """The canonical tier name: "" for standard (also "standard", and OpenAI's
    "default" and "auto"), else batch / flex / priority."""
    if tier is None or tier in _STANDARD:
        return ""
    if not isinstance(tier, str):
        raise InvalidArgument("service_tier", f"must be a string, not {type(tier).__name__}")
    if tier not in SERVICE_TIERS:
        raise InvalidArgument("service_tier", f"must be one of {', '.join(SERVICE_TIERS)}, "
                                              f"got {tier[:40]!r}")
    return tier


def cost_pico(row, i: int, o: int, c: int, w: int, r: int, units: dict, rates: dict) -> int:
    """The exact cost (module docstring) of validated counts: `row` the effective
    (input, output, cached, write, reasoning) rates for this input_tokens, `units`
    from check_units, `rates` the price's unit rates."""
    text_in, text_out = i - c - w, o - r
    cost = c * row[2] + w * row[3] + r * row[4]
    for name, n in units.items():
        tok = _TOKEN.get(name)
        if tok is None:
            cost += n * rates.get(name, 0)
            continue
        part, k = tok
        cost += n * rates.get(name, row[k])
        if part == "input":
            text_in -= n
            if text_in < 0:
                raise InvalidArgument(name, "with cached_input_tokens, cache_write_tokens and "
                                            "the other input kinds exceeds input_tokens "
                                            "(they are part of the input)")
        else:
            text_out -= n
            if text_out < 0:
                raise InvalidArgument(name, "with reasoning_tokens and the other output kinds "
                                            "exceeds output_tokens (they are part of the output)")
    cost += text_in * row[0] + text_out * row[1]
    if cost > MAX_COST_PICO:
        raise InvalidArgument("usage", f"costs more than {MAX_COST_PICO // 10**12} USD: "
                                       "not a real call")
    return cost


def check_expected(units) -> dict:
    """Validate the quantities an Authorize expects ({unit: count}, QUANTITY_UNITS
    only: token counts are estimated from the prompt and the output cap)."""
    extra = check_units(units)
    for name in extra:
        if name in _TOKEN:
            raise InvalidArgument(name, "not a quantity: token counts are estimated from the "
                                        "prompt and the output cap")
    return extra


def expected_nanos(price, extra: dict) -> int:
    """The price in nanos of expected quantities (check_expected) at `price`'s
    standard rates: what an Authorize adds to its token estimate."""
    if not extra:
        return 0
    return (cost_pico(price.rates_at(0), 0, 0, 0, 0, 0, extra, price.units) + 500) // 1000
