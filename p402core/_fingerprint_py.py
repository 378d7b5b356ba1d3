"""Content fingerprints — the pure-Python twin (the specification).

Owns the canonical form of prompt/response content and its salted 128-bit
fingerprint (DESIGN §8, privacy mode fingerprint_only): content is hashed in
memory and only the 16-byte digest is kept. `_fingerprint_c` is the compiled
twin and gives identical digests.

Canonical content
- `str`: Unicode NFC, line endings (CRLF, CR) normalized to LF, trailing
  whitespace (`str.isspace`) stripped from every line, then UTF-8 (lone
  surrogates kept via `surrogatepass`, so every str has one encoding).
  Trailing empty lines are kept: "a\\n" and "a" differ.
- `bytes` / `bytearray` / `memoryview`: taken as is. A str and its canonical
  UTF-8 bytes have the same fingerprint, so a gateway may send either.
- A list/tuple (e.g. chat messages `[{"role": ..., "content": str | [parts]}]`)
  or a dict: encoded structurally, every node type-tagged and every string,
  byte string and container length-prefixed (u64 little-endian), dict keys in
  sorted order. A node is str (canonicalized as above), bytes, int, bool,
  None, float (by `float.hex`), list/tuple or dict with str keys, nested at
  most `MAX_DEPTH` deep. Length prefixes make the encoding injective, so
  splitting the same text differently across messages or parts (["ab"] vs
  ["a", "b"]) can never produce the same bytes. Raw content and structured
  content are hashed under different one-byte domain tags, so neither can
  imitate the other.

Salt. xxh3's seed has only 64 bits, and python-xxhash exposes no custom
secret, so the whole salt (>= 16 bytes, per tenant, secret) is mixed in two
ways: its own xxh3-64 is the seed, and the salt itself (length-prefixed) is
hashed ahead of the content. Every bit of the salt thus reaches the state
before any content does. This makes fingerprints tenant-specific and keeps
anyone without the salt from matching them against guessed content (a
dictionary of common prompts). xxh3 is not a MAC: fingerprints serve dedup and
replay detection, as DESIGN §8 intends, not authentication (that is HMAC's job
in private_gateway mode).
"""
from __future__ import annotations

import unicodedata
from typing import Any

import xxhash

from ._enums import InvalidArgument

MIN_SALT_BYTES = 16
MAX_DEPTH = 32
DIGEST_BYTES = 16

_RAW = b"\x00"          # domain tag: str / bytes content
_STRUCTURED = b"\x01"   # domain tag: list / dict content


def canonical_text(text: str) -> str:
    """NFC, LF line endings, no trailing whitespace on any line."""
    if not isinstance(text, str):
        raise TypeError(f"canonical_text() argument must be str, not {type(text).__name__}")
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n"))


def canonical_bytes(content: Any) -> bytes:
    """The exact bytes hashed after the salt: a domain tag, then the payload."""
    if isinstance(content, str):
        return _RAW + canonical_text(content).encode("utf-8", "surrogatepass")
    if isinstance(content, (bytes, bytearray, memoryview)):
        return _RAW + bytes(content)
    if isinstance(content, (list, tuple, dict)):
        out = [_STRUCTURED]
        _encode(content, out, 0)
        return b"".join(out)
    raise InvalidArgument(
        "content", f"must be str, bytes or a list of messages, not {type(content).__name__}"
    )


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def _encode(node: Any, out: list, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InvalidArgument("content", f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, str):
        data = canonical_text(node).encode("utf-8", "surrogatepass")
        out.append(b"s" + _u64(len(data)))
        out.append(data)
    elif isinstance(node, (bytes, bytearray, memoryview)):
        data = bytes(node)
        out.append(b"b" + _u64(len(data)))
        out.append(data)
    elif node is None:
        out.append(b"n")
    elif node is True:
        out.append(b"T")
    elif node is False:
        out.append(b"F")
    elif isinstance(node, int):
        data = str(int(node)).encode("ascii")
        out.append(b"i" + _u64(len(data)))
        out.append(data)
    elif isinstance(node, float):
        data = float(node).hex().encode("ascii")
        out.append(b"r" + _u64(len(data)))
        out.append(data)
    elif isinstance(node, (list, tuple)):
        out.append(b"l" + _u64(len(node)))
        for item in node:
            _encode(item, out, depth + 1)
    elif isinstance(node, dict):
        items = []
        for key, value in node.items():
            if not isinstance(key, str):
                raise InvalidArgument("content", f"dict keys must be str, not {type(key).__name__}")
            items.append((canonical_text(key).encode("utf-8", "surrogatepass"), value))
        items.sort(key=lambda kv: kv[0])
        out.append(b"d" + _u64(len(items)))
        for key, value in items:
            out.append(b"s" + _u64(len(key)))
            out.append(key)
            _encode(value, out, depth + 1)
    else:
        raise InvalidArgument("content", f"cannot fingerprint a {type(node).__name__}")


def _salt_arg(salt: Any) -> bytes:
    if not isinstance(salt, (bytes, bytearray, memoryview)):
        raise InvalidArgument("salt", f"must be bytes, not {type(salt).__name__}")
    salt = bytes(salt)
    if len(salt) < MIN_SALT_BYTES:
        raise InvalidArgument("salt", f"must be at least {MIN_SALT_BYTES} bytes, not {len(salt)}")
    return salt


class Fingerprinter:
    """Salted xxh3-128 fingerprints of canonical content, for one tenant's salt."""

    __slots__ = ("_salted",)

    def __init__(self, salt: bytes):
        salt = _salt_arg(salt)
        # Hash state after the salt, copied for each fingerprint (the salt is
        # hashed once, not per call).
        state = xxhash.xxh3_128(seed=xxhash.xxh3_64_intdigest(salt))
        state.update(_u64(len(salt)))
        state.update(salt)
        self._salted = state

    def fingerprint(self, content: Any) -> bytes:
        """16-byte digest of `content` (str, bytes, or messages; module docstring)."""
        state = self._salted.copy()
        state.update(canonical_bytes(content))
        return state.digest()

    def __repr__(self) -> str:
        return "Fingerprinter(<salt hidden>)"


def fingerprint(salt: bytes, content: Any) -> bytes:
    """`Fingerprinter(salt).fingerprint(content)`."""
    return Fingerprinter(salt).fingerprint(content)


__all__ = ["Fingerprinter", "fingerprint", "canonical_bytes", "canonical_text"]
