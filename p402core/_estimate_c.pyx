# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Tokenizer-free estimate: the compiled twin of `_estimate_py` (the specification).

Owns `Estimator`. Same API, rules and errors as the Python twin; see its
docstring for the ratios, the formula and the calibration rule. What is
compiled: the estimate (two dict hits for the ratio, integer arithmetic, the
price's C cost), the count of non-ASCII bytes in content (bytes and 1-byte-kind
`str` 8 bytes at a word, 2-byte-kind `str` four code units a word; an ASCII
`str` is recognised in O(1) from CPython's flag) and the calibration
step. `_estimate` / `_estimate_content` / `_observe` are C entries for the
engine (validated like the public methods).
"""
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from p402core._prices_c cimport ModelPrice

from collections.abc import Mapping

from p402core._enums import MAX_TOKENS, InvalidArgument

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    int PyUnicode_READY(object o) except -1
    int PyUnicode_KIND(object o)
    void* PyUnicode_DATA(object o)

__all__ = [
    "Estimator",
    "FAMILY_BYTES_PER_TOKEN_MILLI",
    "DEFAULT_BYTES_PER_TOKEN_MILLI",
    "NON_ASCII_BYTES_PER_TOKEN_MILLI",
]

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
DEFAULT_BYTES_PER_TOKEN_MILLI = 2500
NON_ASCII_BYTES_PER_TOKEN_MILLI = {family: 1500 for family in FAMILY_BYTES_PER_TOKEN_MILLI}
DEFAULT_NON_ASCII_BYTES_PER_TOKEN_MILLI = 1000

FLOOR_MILLI = 1000
MIN_OBSERVE_BYTES = 256
MAX_CALIBRATED_MODELS = 10_000
MAX_INPUT_BYTES = MAX_TOKENS
SNAPSHOT_VERSION = 1

cdef long long C_MAX_TOKENS = MAX_TOKENS
cdef long long C_DEFAULT_RATIO = DEFAULT_BYTES_PER_TOKEN_MILLI
cdef long long C_DEFAULT_HIGH_RATIO = DEFAULT_NON_ASCII_BYTES_PER_TOKEN_MILLI
cdef long long C_FLOOR = FLOOR_MILLI
cdef long long C_MIN_OBSERVE = MIN_OBSERVE_BYTES
cdef Py_ssize_t C_MAX_MODELS = MAX_CALIBRATED_MODELS
cdef long long C_MAX_RATIO = max(FAMILY_BYTES_PER_TOKEN_MILLI.values()) * 3 // 2
# private copies: the public dicts above are documentation, these are read
cdef dict _BASE = dict(FAMILY_BYTES_PER_TOKEN_MILLI)
cdef dict _HIGH = dict(NON_ASCII_BYTES_PER_TOKEN_MILLI)


def _int_in(str field, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be an integer, not {type(value).__name__}")
    if value < lo:
        raise InvalidArgument(field, f"must be >= {lo}, got {value}")
    if value > hi:
        raise InvalidArgument(field, f"must be <= {hi}, got {value}")
    return int(value)


cdef inline long long _count(str field, object value) except? -2:
    """An integer 0..MAX_TOKENS as a C long long, or InvalidArgument(field)."""
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


cdef inline int _check_price(ModelPrice price) except -1:
    if price is None:
        raise TypeError("Argument 'price' has incorrect type (expected ModelPrice, got NoneType)")
    return 0


cdef inline long long _base(ModelPrice price):
    v = _BASE.get(price.family)
    return C_DEFAULT_RATIO if v is None else <long long>v


cdef Py_ssize_t _high_bytes(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Number of bytes >= 0x80 in p[0:n].

    8 bytes at a time: first an OR over the words (all ASCII is the common
    case, and the compiler vectorises it); otherwise each word's top bits are
    summed in byte lanes, flushed before a lane can overflow (255 words).
    """
    cdef Py_ssize_t i = 0, high = 0, words = n // 8, k, chunk
    cdef uint64_t word, acc = 0, any_high = 0
    cdef uint64_t ones = 0x0101010101010101ULL
    cdef uint64_t w0 = 0, w1 = 0, w2 = 0, w3 = 0, t0, t1, t2, t3
    # four independent OR chains, 32 bytes a step (all ASCII: this is the scan)
    k = 0
    while k + 4 <= words:
        memcpy(&t0, p + 8 * k, 8)
        memcpy(&t1, p + 8 * k + 8, 8)
        memcpy(&t2, p + 8 * k + 16, 8)
        memcpy(&t3, p + 8 * k + 24, 8)
        w0 |= t0
        w1 |= t1
        w2 |= t2
        w3 |= t3
        k += 4
    while k < words:
        memcpy(&word, p + 8 * k, 8)
        w0 |= word
        k += 1
    any_high = w0 | w1 | w2 | w3
    if any_high & 0x8080808080808080ULL:
        k = 0
        while k < words:
            chunk = words - k if words - k < 255 else 255
            acc = 0
            for i in range(k, k + chunk):
                memcpy(&word, p + 8 * i, 8)
                acc += (word >> 7) & ones
            # byte lanes -> 16-bit lanes (no overflow: <= 510), then their sum
            acc = (acc & 0x00FF00FF00FF00FFULL) + ((acc >> 8) & 0x00FF00FF00FF00FFULL)
            high += <Py_ssize_t>((acc * 0x0001000100010001ULL) >> 48)
            k += chunk
    for i in range(8 * words, n):
        if p[i] >= 0x80:
            high += 1
    return high


cdef inline Py_ssize_t _lanes16(const uint16_t* p, Py_ssize_t n, uint16_t low_bits) noexcept nogil:
    """How many of the n UCS-2 code units are > low_bits, a power of two
    minus one (0x7F: >= 0x80; 0x7FF: >= 0x800).

    Four units per 64-bit word: the mask keeps bits [k, 15) of each lane
    (0x7F80 / 0x7800), and adding the mask again carries into the lane's
    bit 15 exactly when one of them is set (no carry leaves a lane); OR the
    lane's own bit 15 and count the lanes."""
    cdef Py_ssize_t i, k = 0, chunk, words = n // 4, count = 0
    cdef uint64_t w, acc, m = <uint64_t>(0x7FFF & ~low_bits) * 0x0001000100010001ULL
    cdef uint64_t top = 0x8000800080008000ULL
    while k < words:
        # one flag per 16-bit lane, summed in the lanes (flushed before 65535)
        chunk = words - k if words - k < 65535 else 65535
        acc = 0
        for i in range(k, k + chunk):
            memcpy(&w, p + 4 * i, 8)
            acc += ((((w & m) + m) | w) & top) >> 15
        count += <Py_ssize_t>((acc & 0xFFFF) + ((acc >> 16) & 0xFFFF)
                              + ((acc >> 32) & 0xFFFF) + (acc >> 48))
        k += chunk
    for i in range(4 * words, n):
        count += p[i] > low_bits
    return count


cdef void _utf8_counts(object s, Py_ssize_t* ascii_n, Py_ssize_t* high_n) noexcept:
    """UTF-8 size of a str split into ASCII bytes and the rest, without encoding.

    A code point takes 1 + (c >= 0x80) + (c >= 0x800) + (c >= 0x10000) bytes;
    lone surrogates count 3, as encode("utf-8", "surrogatepass") gives.
    1- and 2-byte kinds are counted a word at a time (`_high_bytes`, `_lanes16`).
    """
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(s), i, asc = 0, total = 0, ge80, ge800
    cdef int kind = PyUnicode_KIND(s)
    cdef const uint32_t* p4
    cdef unsigned int c
    if kind == 1:
        ge80 = _high_bytes(<const unsigned char*>PyUnicode_DATA(s), n)
        asc = n - ge80
        total = n + ge80
    elif kind == 2:
        ge80 = _lanes16(<const uint16_t*>PyUnicode_DATA(s), n, 0x7F)
        ge800 = _lanes16(<const uint16_t*>PyUnicode_DATA(s), n, 0x7FF)
        asc = n - ge80
        total = n + ge80 + ge800
    else:
        p4 = <const uint32_t*>PyUnicode_DATA(s)
        for i in range(n):
            c = p4[i]
            asc += c < 0x80
            total += 1 + (c >= 0x80) + (c >= 0x800) + (c >= 0x10000)
    ascii_n[0] = asc
    high_n[0] = total - asc


cdef class Estimator:
    """Worst-case token and cost estimate before a call; calibrates per model."""

    def __init__(self, *, default_output_cap=4096):
        self.default_output_cap = _int_in("default_output_cap", default_output_cap, 1, MAX_TOKENS)
        self._ratios = {}

    cdef long long _ratio(self, ModelPrice price) except -1:
        cdef long long base = _base(price)
        cdef long long ceiling = base * 3 // 2
        cdef long long r
        if not self._ratios:  # nothing calibrated yet: skip the lookup
            return base
        v = self._ratios.get(price.model)
        if v is None:
            return base
        r = <long long>v
        return r if r <= ceiling else ceiling

    cpdef long long bytes_per_token_milli(self, ModelPrice price) except -1:
        """The ratio currently used for this model (milli-bytes per token)."""
        _check_price(price)
        return self._ratio(price)

    cdef int _finish(self, ModelPrice price, long long input_tokens,
                            long long max_output_tokens, Estimate* out) except -1:
        cdef long long cap = max_output_tokens if max_output_tokens else self.default_output_cap
        if price.max_output_tokens and price.max_output_tokens < cap:
            cap = price.max_output_tokens
        out.input_tokens = input_tokens
        out.output_tokens = cap
        # both operands >= 0: C division is floor division here
        out.cost_nanos = (price._cost_pico(input_tokens, cap, 0, 0, 0) + 500) // 1000
        return 0

    cdef int _estimate(self, ModelPrice price, long long input_bytes,
                       long long max_output_tokens, Estimate* out) except -1:
        cdef long long ratio
        _check_price(price)
        if input_bytes < 0 or input_bytes > C_MAX_TOKENS:
            _int_in("input_bytes", input_bytes, 0, MAX_INPUT_BYTES)
        if max_output_tokens < 0 or max_output_tokens > C_MAX_TOKENS:
            _int_in("max_output_tokens", max_output_tokens, 0, MAX_TOKENS)
        ratio = self._ratio(price)
        return self._finish(price, (input_bytes * 1000 + ratio - 1) // ratio, max_output_tokens, out)

    cdef int _estimate_content(self, ModelPrice price, object content,
                               long long max_output_tokens, Estimate* out) except -1:
        cdef Py_ssize_t ascii_n, high_n, n
        cdef long long ratio, high_ratio, tokens
        cdef bytes raw
        _check_price(price)
        if type(content) is bytes:     # exact types first: no isinstance walk
            n = PyBytes_GET_SIZE(content)
            high_n = _high_bytes(<const unsigned char*>PyBytes_AS_STRING(content), n)
            ascii_n = n - high_n
        elif isinstance(content, str):
            PyUnicode_READY(content)
            if PyUnicode_IS_ASCII(content):  # a flag CPython keeps: O(1)
                ascii_n = PyUnicode_GET_LENGTH(content)
                high_n = 0
            else:
                _utf8_counts(content, &ascii_n, &high_n)
        elif isinstance(content, (bytes, bytearray, memoryview)):
            raw = content if type(content) is bytes else bytes(content)
            n = PyBytes_GET_SIZE(raw)
            high_n = _high_bytes(<const unsigned char*>PyBytes_AS_STRING(raw), n)
            ascii_n = n - high_n
        else:
            raise InvalidArgument("content", f"must be str or bytes, not {type(content).__name__}")
        if ascii_n + high_n > C_MAX_TOKENS:
            raise InvalidArgument("content", f"longer than {MAX_INPUT_BYTES} bytes")
        if max_output_tokens < 0 or max_output_tokens > C_MAX_TOKENS:
            _int_in("max_output_tokens", max_output_tokens, 0, MAX_TOKENS)
        ratio = self._ratio(price)
        tokens = (ascii_n * 1000 + ratio - 1) // ratio
        if high_n:
            v = _HIGH.get(price.family)
            high_ratio = C_DEFAULT_HIGH_RATIO if v is None else <long long>v
            if ratio < high_ratio:
                high_ratio = ratio
            tokens += (high_n * 1000 + high_ratio - 1) // high_ratio
        return self._finish(price, tokens, max_output_tokens, out)

    cpdef tuple estimate(self, ModelPrice price, object input_bytes, object max_output_tokens=0):
        """(input_tokens, output_tokens, cost_nanos) for a prompt of `input_bytes` bytes."""
        cdef Estimate out
        _check_price(price)
        cdef long long n = _count("input_bytes", input_bytes)
        cdef long long cap = _count("max_output_tokens", max_output_tokens)
        self._estimate(price, n, cap, &out)
        return (out.input_tokens, out.output_tokens, out.cost_nanos)

    cpdef tuple estimate_content(self, ModelPrice price, object content, object max_output_tokens=0):
        """Like `estimate`, measuring `content` (str as UTF-8, or bytes) itself."""
        cdef Estimate out
        _check_price(price)
        cdef long long cap = _count("max_output_tokens", max_output_tokens)
        self._estimate_content(price, content, cap, &out)
        return (out.input_tokens, out.output_tokens, out.cost_nanos)

    cdef int _observe(self, ModelPrice price, long long input_bytes,
                      long long input_tokens) except -1:
        cdef long long base, ceiling, target, cur
        _check_price(price)
        if input_bytes < 0 or input_bytes > C_MAX_TOKENS:
            _int_in("input_bytes", input_bytes, 0, MAX_INPUT_BYTES)
        if input_tokens < 0 or input_tokens > C_MAX_TOKENS:
            _int_in("input_tokens", input_tokens, 0, MAX_TOKENS)
        if input_bytes < C_MIN_OBSERVE or input_tokens == 0:
            return 0
        base = _base(price)
        ceiling = base * 3 // 2
        target = (input_bytes * 1000 // input_tokens) * 9 // 10
        if target > ceiling:
            target = ceiling
        if target < C_FLOOR:
            target = C_FLOOR
        v = self._ratios.get(price.model)
        if v is None:
            if len(self._ratios) >= C_MAX_MODELS:
                return 0
            cur = base
        else:
            cur = <long long>v
        # operands below are >= 0, so C and Python division agree
        if target > cur:
            cur += (target - cur) // 16
        elif target < cur:
            cur -= (cur - target + 3) // 4
        if v is not None and cur == <long long>v:
            return 0   # converged: the usual case once a model is calibrated
        self._ratios[price.model] = cur
        return 0

    cpdef object observe(self, ModelPrice price, object input_bytes, object input_tokens):
        """Refine this model's ratio from a real (bytes, input tokens) pair (rule: module doc)."""
        _check_price(price)
        cdef long long n = _count("input_bytes", input_bytes)
        cdef long long t = _count("input_tokens", input_tokens)
        self._observe(price, n, t)
        return None

    cpdef dict snapshot(self):
        """Calibration state: {"version": 1, "ratios": {model: milli}}."""
        return {"version": SNAPSHOT_VERSION,
                "ratios": {m: self._ratios[m] for m in sorted(self._ratios)}}

    cpdef object restore(self, dict state):
        """Replace the calibration state with a `snapshot()` (validated)."""
        if state is None:
            raise InvalidArgument("state", "must be a mapping")
        if state.get("version") != SNAPSHOT_VERSION:
            raise InvalidArgument("version", f"unsupported estimator snapshot version {state.get('version')!r}")
        ratios = state.get("ratios", {})
        if not isinstance(ratios, Mapping):
            raise InvalidArgument("ratios", "must be a mapping {model: milli}")
        if len(ratios) > C_MAX_MODELS:
            raise InvalidArgument("ratios", f"more than {MAX_CALIBRATED_MODELS} models")
        new = {}
        for model, milli in ratios.items():
            if not isinstance(model, str) or not model:
                raise InvalidArgument("ratios", "model names must be non-empty strings")
            new[model] = _int_in("ratios", milli, FLOOR_MILLI, C_MAX_RATIO)
        self._ratios = new
        return None

    def __repr__(self):
        return f"Estimator(default_output_cap={self.default_output_cap}, calibrated={len(self._ratios)})"
