"""Tokenizer-free estimate of a call's worst-case cost: the pure-Python twin.

Owns `Estimator` (DESIGN §5): before a call, price it from the prompt's size in
bytes, a conservative bytes-per-token ratio per model family, and the output
cap. No tokenizer, no floats: ratios are integer milli-bytes per token.

    input_tokens  = ceil(bytes * 1000 / ratio)
    output_tokens = min(max_output_tokens or default_output_cap,
                        price.max_output_tokens or unbounded)
    cost_nanos    = price.cost_nanos(input_tokens, output_tokens)   # no cache hits

Ratios are deliberately low (more tokens than a real tokenizer counts for
English prose) so that code, JSON and markup, which tokenize denser, stay
covered; a real tokenizer measures roughly 4.0-4.5 bytes/token on English
prose and 3.0-3.8 on code for GPT-4o/Llama-3-class vocabularies, less for
Claude and 32k-vocabulary Mistral models. With content (estimate_content),
the non-ASCII bytes (CJK, Cyrillic, emoji: 2-4 bytes per character, often a
token per character or more) are counted at a separate, lower ratio; with only
a byte count the core cannot tell, and the family ratio applies to all bytes.

Calibration (observe): each (bytes, real input tokens) pair of a Record
refines the ratio of that model, integers only:

    observed = bytes * 1000 // tokens            (ignored if bytes < 256 or tokens == 0)
    target   = clamp(observed * 9 // 10, FLOOR, ceiling)   # 10 % safety margin
    ceiling  = family base * 3 // 2,  FLOOR = 1000 (one token per byte, the
               most any byte-level tokenizer can produce)
    up   (target > ratio): ratio += (target - ratio) // 16   -- tightens slowly
    down (target < ratio): ratio -= ceil((ratio - target) / 4) -- loosens fast

so one outlier moves the ratio by at most 1/16 of the way up (at most ~3 % of
the base) and the ratio never leaves [FLOOR, ceiling]. At most 10 000 models
are calibrated per estimator (further models keep their family base).
"""
from __future__ import annotations

from collections.abc import Mapping

from ._enums import MAX_TOKENS, InvalidArgument
from ._prices_py import ModelPrice

__all__ = [
    "Estimator",
    "FAMILY_BYTES_PER_TOKEN_MILLI",
    "DEFAULT_BYTES_PER_TOKEN_MILLI",
    "NON_ASCII_BYTES_PER_TOKEN_MILLI",
]

# Conservative milli-bytes per token per tokenizer family (see the docstring).
FAMILY_BYTES_PER_TOKEN_MILLI = {
    "gpt": 3000,
    "claude": 2600,
    "gemini": 3000,
    "llama": 3000,
    "mistral": 2600,
    "deepseek": 2800,
    "grok": 3000,
    "command": 3000,
    "qwen": 2800,
}
DEFAULT_BYTES_PER_TOKEN_MILLI = 2500   # unknown family
# Non-ASCII bytes in estimate_content: known families have large multilingual
# vocabularies (~1 token per CJK character = 3 bytes; 1.5 leaves room for rare
# characters split into byte tokens); unknown ones get the 1-token-per-byte bound.
NON_ASCII_BYTES_PER_TOKEN_MILLI = {family: 1500 for family in FAMILY_BYTES_PER_TOKEN_MILLI}
DEFAULT_NON_ASCII_BYTES_PER_TOKEN_MILLI = 1000

FLOOR_MILLI = 1000
MIN_OBSERVE_BYTES = 256
MAX_CALIBRATED_MODELS = 10_000
MAX_INPUT_BYTES = MAX_TOKENS  # ratio >= 1000, so input tokens <= bytes <= MAX_TOKENS
_MAX_RATIO_MILLI = max(FAMILY_BYTES_PER_TOKEN_MILLI.values()) * 3 // 2
_HIGH_BYTES = bytes(range(0x80, 0x100))
SNAPSHOT_VERSION = 1


def _int_in(field: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be an integer, not {type(value).__name__}")
    if value < lo:
        raise InvalidArgument(field, f"must be >= {lo}, got {value}")
    if value > hi:
        raise InvalidArgument(field, f"must be <= {hi}, got {value}")
    return int(value)


def _check_price(price):
    if not isinstance(price, ModelPrice):
        raise TypeError(f"Argument 'price' has incorrect type (expected ModelPrice, got {type(price).__name__})")


class Estimator:
    """Worst-case token and cost estimate before a call; calibrates per model."""

    __slots__ = ("_default_output_cap", "_ratios")

    def __init__(self, *, default_output_cap=4096):
        self._default_output_cap = _int_in("default_output_cap", default_output_cap, 1, MAX_TOKENS)
        self._ratios = {}

    default_output_cap = property(lambda self: self._default_output_cap)

    def _base(self, price) -> int:
        return FAMILY_BYTES_PER_TOKEN_MILLI.get(price.family, DEFAULT_BYTES_PER_TOKEN_MILLI)

    def bytes_per_token_milli(self, price) -> int:
        """The ratio currently used for this model (milli-bytes per token)."""
        _check_price(price)
        base = self._base(price)
        r = self._ratios.get(price.model)
        if r is None:
            return base
        # a restored ratio may come from another family table: keep the ceiling
        return r if r <= base * 3 // 2 else base * 3 // 2

    def _finish(self, price, input_tokens: int, max_output_tokens: int) -> tuple:
        out = max_output_tokens or self._default_output_cap
        if price.max_output_tokens and price.max_output_tokens < out:
            out = price.max_output_tokens
        return input_tokens, out, price.cost_nanos(input_tokens, out)

    def estimate(self, price, input_bytes, max_output_tokens=0) -> tuple:
        """(input_tokens, output_tokens, cost_nanos) for a prompt of `input_bytes` bytes."""
        _check_price(price)
        n = _int_in("input_bytes", input_bytes, 0, MAX_INPUT_BYTES)
        cap = _int_in("max_output_tokens", max_output_tokens, 0, MAX_TOKENS)
        ratio = self.bytes_per_token_milli(price)
        return self._finish(price, (n * 1000 + ratio - 1) // ratio, cap)

    def estimate_content(self, price, content, max_output_tokens=0) -> tuple:
        """Like `estimate`, measuring `content` (str as UTF-8, or bytes) itself."""
        _check_price(price)
        cap = _int_in("max_output_tokens", max_output_tokens, 0, MAX_TOKENS)
        if isinstance(content, str):
            if content.isascii():
                ascii_n, high_n = len(content), 0
            else:
                raw = content.encode("utf-8", "surrogatepass")
                ascii_n = len(raw.translate(None, _HIGH_BYTES))
                high_n = len(raw) - ascii_n
        elif isinstance(content, (bytes, bytearray, memoryview)):
            raw = bytes(content)
            ascii_n = len(raw.translate(None, _HIGH_BYTES))
            high_n = len(raw) - ascii_n
        else:
            raise InvalidArgument("content", f"must be str or bytes, not {type(content).__name__}")
        if ascii_n + high_n > MAX_INPUT_BYTES:
            raise InvalidArgument("content", f"longer than {MAX_INPUT_BYTES} bytes")
        ratio = self.bytes_per_token_milli(price)
        high_ratio = NON_ASCII_BYTES_PER_TOKEN_MILLI.get(price.family,
                                                         DEFAULT_NON_ASCII_BYTES_PER_TOKEN_MILLI)
        if ratio < high_ratio:
            high_ratio = ratio
        tokens = (ascii_n * 1000 + ratio - 1) // ratio + (high_n * 1000 + high_ratio - 1) // high_ratio
        return self._finish(price, tokens, cap)

    def observe(self, price, input_bytes, input_tokens) -> None:
        """Refine this model's ratio from a real (bytes, input tokens) pair (rule: module doc)."""
        _check_price(price)
        n = _int_in("input_bytes", input_bytes, 0, MAX_INPUT_BYTES)
        t = _int_in("input_tokens", input_tokens, 0, MAX_TOKENS)
        if n < MIN_OBSERVE_BYTES or t == 0:
            return
        base = self._base(price)
        ceiling = base * 3 // 2
        target = (n * 1000 // t) * 9 // 10
        if target > ceiling:
            target = ceiling
        if target < FLOOR_MILLI:
            target = FLOOR_MILLI
        cur = self._ratios.get(price.model)
        if cur is None:
            if len(self._ratios) >= MAX_CALIBRATED_MODELS:
                return
            cur = base
        if target > cur:
            cur += (target - cur) // 16
        elif target < cur:
            cur -= (cur - target + 3) // 4
        self._ratios[price.model] = cur

    def snapshot(self) -> dict:
        """Calibration state: {"version": 1, "ratios": {model: milli}}."""
        return {"version": SNAPSHOT_VERSION,
                "ratios": {m: self._ratios[m] for m in sorted(self._ratios)}}

    def restore(self, state) -> None:
        """Replace the calibration state with a `snapshot()` (validated)."""
        if state is None:
            raise InvalidArgument("state", "must be a mapping")
        if not isinstance(state, dict):  # as the compiled twin's typed argument
            raise TypeError(f"Argument 'state' has incorrect type (expected dict, got {type(state).__name__})")
        if state.get("version") != SNAPSHOT_VERSION:
            raise InvalidArgument("version", f"unsupported estimator snapshot version {state.get('version')!r}")
        ratios = state.get("ratios", {})
        if not isinstance(ratios, Mapping):
            raise InvalidArgument("ratios", "must be a mapping {model: milli}")
        if len(ratios) > MAX_CALIBRATED_MODELS:
            raise InvalidArgument("ratios", f"more than {MAX_CALIBRATED_MODELS} models")
        new = {}
        for model, milli in ratios.items():
            if not isinstance(model, str) or not model:
                raise InvalidArgument("ratios", "model names must be non-empty strings")
            new[model] = _int_in("ratios", milli, FLOOR_MILLI, _MAX_RATIO_MILLI)
        self._ratios = new

    def __repr__(self) -> str:
        return f"Estimator(default_output_cap={self._default_output_cap}, calibrated={len(self._ratios)})"
