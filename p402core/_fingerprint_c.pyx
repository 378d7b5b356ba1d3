# cython: language_level=3, boundscheck=False, wraparound=False
"""Content fingerprints — the compiled twin of `_fingerprint_py`.

Same canonical form, same salt mixing, identical digests (see `_fingerprint_py`
for the definition). What is compiled: one C pass over a str decides whether
it is already canonical (no CR, no whitespace before a line end, NFC), which is
the common case and then costs no splitting or joining; the salt is hashed
once per Fingerprinter into two ready states (one per domain tag), so a
fingerprint is one state copy, one update and one digest; structured content
is encoded into one bytearray.
"""
from libc.string cimport memchr
from cpython.unicode cimport (
    Py_UNICODE_ISSPACE,
    PyUnicode_1BYTE_DATA,
    PyUnicode_1BYTE_KIND,
    PyUnicode_GET_LENGTH,
    PyUnicode_KIND,
)

import unicodedata

import xxhash

from p402core._enums import InvalidArgument

MIN_SALT_BYTES = 16
MAX_DEPTH = 32
DIGEST_BYTES = 16

cdef bytes _RAW = b"\x00"          # domain tag: str / bytes content
cdef bytes _STRUCTURED = b"\x01"   # domain tag: list / dict content
cdef int _MAX_DEPTH = MAX_DEPTH
cdef object _is_normalized = unicodedata.is_normalized
cdef object _normalize = unicodedata.normalize


# str.isspace() of every 1-byte code point (Latin-1), for the byte-wise scan.
cdef bint _SPACE1[256]
for _i in range(256):
    _SPACE1[_i] = Py_UNICODE_ISSPACE(<Py_UCS4>_i)


cdef bint _is_canonical(str text) except -1:
    """True if canonical_text(text) == text, decided in one pass."""
    cdef Py_UCS4 c
    cdef unsigned char b
    cdef const unsigned char* p
    cdef Py_ssize_t i, n
    cdef bint prev_space = False
    cdef bint ascii = True
    cdef const unsigned char* q
    if PyUnicode_KIND(text) == PyUnicode_1BYTE_KIND:
        # Most content. Only a CR, or whitespace just before a LF or at the end,
        # makes text non-canonical, so memchr jumps from line end to line end.
        p = <const unsigned char*>PyUnicode_1BYTE_DATA(text)
        n = PyUnicode_GET_LENGTH(text)
        if n == 0:
            return True
        if memchr(p, 13, n) != NULL:          # \r
            return False
        if p[n - 1] != 10 and _SPACE1[p[n - 1]]:
            return False
        i = 0
        while True:
            q = <const unsigned char*>memchr(p + i, 10, n - i)   # \n
            if q == NULL:
                break
            if q > p and _SPACE1[q[-1]] and q[-1] != 10:
                return False
            i = (q - p) + 1
        return text.isascii() or _is_normalized("NFC", text)
    for c in text:
        if c == u'\n':
            if prev_space:
                return False
        elif c == u'\r':
            return False
        elif c >= 128:
            ascii = False
        prev_space = c != u'\n' and Py_UNICODE_ISSPACE(c)
    if prev_space:
        return False
    return ascii or _is_normalized("NFC", text)


def canonical_text(text):
    """NFC, LF line endings, no trailing whitespace on any line."""
    if not isinstance(text, str):
        raise TypeError(f"canonical_text() argument must be str, not {type(text).__name__}")
    return _canonical(text if type(text) is str else str.__str__(text))


cdef str _canonical(str text):
    if _is_canonical(text):
        return text
    if not text.isascii():
        text = _normalize("NFC", text)
    if u"\r" in text:
        text = text.replace(u"\r\n", u"\n").replace(u"\r", u"\n")
    return u"\n".join([line.rstrip() for line in text.split(u"\n")])


cdef inline bytes _utf8(str text):
    return text.encode("utf-8", "surrogatepass")


cdef inline void _u64(bytearray out, unsigned long long n):
    cdef unsigned char buf[8]
    cdef int i
    for i in range(8):
        buf[i] = <unsigned char>(n >> (8 * i))
    out.extend(buf[:8])


cdef int _encode(object node, bytearray out, int depth) except -1:
    cdef bytes data
    if depth > _MAX_DEPTH:
        raise InvalidArgument("content", f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, str):
        data = _utf8(_canonical(<str>node if type(node) is str else str.__str__(node)))
        out.append(115)   # b"s"
        _u64(out, len(data))
        out.extend(data)
    elif isinstance(node, (bytes, bytearray, memoryview)):
        data = bytes(node)
        out.append(98)    # b"b"
        _u64(out, len(data))
        out.extend(data)
    elif node is None:
        out.append(110)   # b"n"
    elif node is True:
        out.append(84)    # b"T"
    elif node is False:
        out.append(70)    # b"F"
    elif isinstance(node, int):
        data = str(int(node)).encode("ascii")
        out.append(105)   # b"i"
        _u64(out, len(data))
        out.extend(data)
    elif isinstance(node, float):
        data = float(node).hex().encode("ascii")
        out.append(114)   # b"r"
        _u64(out, len(data))
        out.extend(data)
    elif isinstance(node, (list, tuple)):
        out.append(108)   # b"l"
        _u64(out, len(node))
        for item in node:
            _encode(item, out, depth + 1)
    elif isinstance(node, dict):
        items = []
        for key, value in (<dict>node).items():
            if not isinstance(key, str):
                raise InvalidArgument("content", f"dict keys must be str, not {type(key).__name__}")
            items.append((_utf8(_canonical(str.__str__(key))), value))
        items.sort(key=_first)
        out.append(100)   # b"d"
        _u64(out, len(items))
        for key, value in items:
            out.append(115)
            _u64(out, len(<bytes>key))
            out.extend(<bytes>key)
            _encode(value, out, depth + 1)
    else:
        raise InvalidArgument("content", f"cannot fingerprint a {type(node).__name__}")
    return 0


def _first(pair):
    return pair[0]


cdef object _payload(object content):
    """The bytes hashed after the salt and domain tag, or None if not raw content."""
    if type(content) is str:
        return _utf8(_canonical(<str>content))
    if isinstance(content, str):
        return _utf8(_canonical(str.__str__(content)))
    if type(content) is bytes:
        return content
    if isinstance(content, (bytes, bytearray, memoryview)):
        return bytes(content)
    return None


def canonical_bytes(content):
    """The exact bytes hashed after the salt: a domain tag, then the payload."""
    cdef bytearray out
    payload = _payload(content)
    if payload is not None:
        return _RAW + bytes(payload)
    if isinstance(content, (list, tuple, dict)):
        out = bytearray(_STRUCTURED)
        _encode(content, out, 0)
        return bytes(out)
    raise InvalidArgument(
        "content", f"must be str, bytes or a list of messages, not {type(content).__name__}"
    )


cdef bytes _salt_arg(object salt):
    if not isinstance(salt, (bytes, bytearray, memoryview)):
        raise InvalidArgument("salt", f"must be bytes, not {type(salt).__name__}")
    salt = bytes(salt)
    if len(salt) < MIN_SALT_BYTES:
        raise InvalidArgument("salt", f"must be at least {MIN_SALT_BYTES} bytes, not {len(salt)}")
    return salt


cdef class Fingerprinter:
    """Salted xxh3-128 fingerprints of canonical content, for one tenant's salt."""
    cdef object _raw          # xxh3-128 state after salt + raw domain tag
    cdef object _structured   # ... after salt + structured domain tag

    def __init__(self, salt):
        cdef bytes s = _salt_arg(salt)
        cdef bytearray prefix = bytearray()
        _u64(prefix, len(s))
        prefix.extend(s)
        seed = xxhash.xxh3_64_intdigest(s)
        self._raw = xxhash.xxh3_128(bytes(prefix) + _RAW, seed=seed)
        self._structured = xxhash.xxh3_128(bytes(prefix) + _STRUCTURED, seed=seed)

    cpdef bytes fingerprint(self, object content):
        """16-byte digest of `content` (str, bytes, or messages; see `_fingerprint_py`)."""
        cdef bytearray out
        payload = _payload(content)
        if payload is not None:
            state = self._raw.copy()
            state.update(payload)
            return state.digest()
        if isinstance(content, (list, tuple, dict)):
            out = bytearray()
            _encode(content, out, 0)
            state = self._structured.copy()
            state.update(out)
            return state.digest()
        raise InvalidArgument(
            "content", f"must be str, bytes or a list of messages, not {type(content).__name__}"
        )

    def __repr__(self):
        return "Fingerprinter(<salt hidden>)"


def fingerprint(salt, content):
    """`Fingerprinter(salt).fingerprint(content)`."""
    return Fingerprinter(salt).fingerprint(content)


__all__ = ["Fingerprinter", "fingerprint", "canonical_bytes", "canonical_text"]
