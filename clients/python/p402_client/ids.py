"""Client-side ids: ULIDs, so retried calls are idempotent and ids sort by time.

A ULID is 48 bits of Unix milliseconds then 80 random bits, written as 26 Crockford
base32 characters. Ids made in the same millisecond by one process increment the
random part, so they stay strictly increasing (monotonic ULID). The client makes
the event id of every Record (and the reservation id of an Authorize it may retry)
before the first attempt: a retry then carries the same id and the server answers
it with the first result instead of counting twice.
"""
from __future__ import annotations

import os
import random
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford: no I, L, O, U
_RANDOM_BITS = 80
_MS_MASK = (1 << 48) - 1
# Every 10-bit value as its two Crockford digits: a ULID is 13 lookups.
_PAIRS = [_ALPHABET[i >> 5] + _ALPHABET[i & 31] for i in range(1024)]
_SHIFTS = tuple(range(120, -1, -10))
_RANDOM_SHIFTS = tuple(range(70, -1, -10))  # the last 8 pairs: the 80 random bits
_time_text = (-1, "")  # (ms, its 10 characters), replaced whole: no torn reads
_lock = threading.Lock()
_last_ms = -1
_last_rand = 0
# Ids are not secrets (every call they name needs the tenant's key): their random
# part comes from a generator of this process seeded by the OS, not from a
# getrandom(2) system call per id (several µs each under load on a VM, measured in
# `p402 proxy`). A forked child reseeds it and starts its own sequence, so parent and
# child never draw the same ids.
_rng = random.Random()


def _after_fork() -> None:
    global _last_ms, _last_rand, _lock
    _lock = threading.Lock()  # another thread of the parent may have held it
    _rng.seed()
    _last_ms, _last_rand = -1, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def random_bits(n: int) -> int:
    """`n` random bits for an id (see `_rng`)."""
    return _rng.getrandbits(n)


def encode_ulid(value: int) -> str:
    """The 26 Crockford base32 characters of a 128-bit value (a ULID's text), most
    significant first: two digits per table lookup, about a third of the time of a
    digit-by-digit loop (base64.b32encode is Python code before 3.13, no faster)."""
    pairs = _PAIRS
    return "".join([pairs[(value >> s) & 1023] for s in _SHIFTS])


def new_ulid(now_ms: int | None = None) -> str:
    """A new 26-character ULID, strictly greater than the previous one of this process."""
    global _last_ms, _last_rand, _time_text
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    with _lock:
        if ms <= _last_ms:
            # Same (or an earlier, clock stepped back) millisecond: stay monotonic.
            ms = _last_ms
            rand = _last_rand + 1
            if rand >> _RANDOM_BITS:  # 2^80 ids in one ms: borrow the next ms
                ms += 1
                rand = _rng.getrandbits(_RANDOM_BITS - 1)
        else:
            # A fresh ms: random, top bit clear so increments cannot overflow soon.
            rand = _rng.getrandbits(_RANDOM_BITS - 1)
        _last_ms, _last_rand = ms, rand
    # The first 10 characters are the millisecond's (the same for every id made in
    # it: written once per ms), the last 16 the 80 random bits.
    cached = _time_text
    if cached[0] != ms:
        cached = _time_text = (ms, encode_ulid((ms & _MS_MASK) << _RANDOM_BITS)[:10])
    pairs = _PAIRS
    return cached[1] + "".join([pairs[(rand >> s) & 1023] for s in _RANDOM_SHIFTS])


def ulid_time_ms(ulid: str) -> int:
    """The millisecond timestamp encoded in a ULID."""
    value = 0
    for ch in ulid[:10].upper():
        value = value * 32 + _ALPHABET.index(ch)
    return value


__all__ = ["encode_ulid", "new_ulid", "random_bits", "ulid_time_ms"]
