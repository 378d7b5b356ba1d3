# cython: language_level=3, boundscheck=False, wraparound=False
"""A streamed chat answer read as it passes — the compiled twin of `_stream_py`.

Same answers as `_stream_py` (see there for the definitions). What is compiled: the
chunk is scanned in C (memchr for line ends, memcmp for the "data: " prefix and the
`,"usage":null}` ending), each event's JSON text is the only object made before
`loads`, the content is counted from the parsed dicts without method calls (a UTF-8
length read off the str's code points), and a chunk with cuts is written once into
a buffer of the input's size, then copied into one bytes object.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_GET_LENGTH
from libc.string cimport memchr, memcmp, memcpy

cdef extern from "Python.h":
    int PyUnicode_IS_ASCII(object)
    int PyUnicode_KIND(object)
    void* PyUnicode_DATA(object)
    Py_UCS4 PyUnicode_READ(int kind, void* data, Py_ssize_t index)

NULL_USAGE_END = b',"usage":null}'
DEF CUT = 14  # len(NULL_USAGE_END): cut whole; the closing brace is written again


cdef inline Py_ssize_t _find(const char* p, Py_ssize_t n, const char* needle,
                             Py_ssize_t m) noexcept:
    """The first index of needle[:m] in p[:n], or -1."""
    cdef Py_ssize_t i = 0
    cdef const char* hit
    while n - i >= m:
        hit = <const char*>memchr(p + i, needle[0], n - i - m + 1)
        if hit == NULL:
            return -1
        i = hit - p
        if memcmp(hit, needle, m) == 0:
            return i
        i += 1
    return -1


cdef bint _null_usage_at_end(const char* p, Py_ssize_t n) noexcept:
    if n < CUT or memcmp(p + n - CUT, b',"usage":null}', CUT) != 0:
        return False
    if _find(p, n, b'"usage"', 7) != n - CUT + 1:
        return False
    return not _usage_escape(p, n)


cdef bint _usage_escape(const char* p, Py_ssize_t n) noexcept:
    """Whether `\\u0075`, `\\u0073`, `\\u0061`, `\\u0067` or `\\u0065` (an escaped
    letter of "usage") is in p[:n]."""
    cdef Py_ssize_t at = 0, i
    cdef char a, b
    while True:
        i = _find(p + at, n - at, b"\\u00", 4)
        if i < 0:
            return False
        i += at
        if i + 6 <= n:
            a, b = p[i + 4], p[i + 5]
            if (a == b'7' and (b == b'5' or b == b'3')) or (
                    a == b'6' and (b == b'1' or b == b'7' or b == b'5')):
                return True
        at = i + 1


def null_usage_at_end(bytes data):
    return _null_usage_at_end(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


cdef Py_ssize_t _utf8_length(str text):
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text), i, total = 0
    cdef int kind
    cdef void* data
    cdef Py_UCS4 c
    if PyUnicode_IS_ASCII(text):
        return n
    kind = PyUnicode_KIND(text)
    data = PyUnicode_DATA(text)
    for i in range(n):
        c = PyUnicode_READ(kind, data, i)
        if c < 0x80:
            total += 1
        elif c < 0x800:
            total += 2
        elif c < 0x10000:
            total += 3  # a lone surrogate too, as surrogatepass writes it
        else:
            total += 4
    return total


def utf8_length(str text):
    return _utf8_length(text)


cdef long long _content(object choices, long long* out_bytes) except -1:
    """`chat_content` of the object whose "choices" member is `choices` (None: none):
    the chunks, and their UTF-8 bytes into out_bytes[0]."""
    cdef long long chunks = 0
    cdef PyObject* got
    cdef object ch, text
    out_bytes[0] = 0
    if not choices or type(choices) is not list:
        return 0
    for ch in <list>choices:
        if type(ch) is not dict:
            continue
        got = PyDict_GetItem(ch, "delta")
        if got == NULL or type(<object>got) is not dict:
            continue
        got = PyDict_GetItem(<object>got, "content")
        if got == NULL or type(<object>got) is not str:
            continue
        text = <object>got
        if PyUnicode_GET_LENGTH(text):
            chunks += 1
            out_bytes[0] += _utf8_length(text)
    return chunks


def chat_content(dict payload):
    cdef long long out_bytes
    cdef PyObject* got = PyDict_GetItem(payload, "choices")
    chunks = _content(<object>got if got != NULL else None, &out_bytes)
    return chunks, out_bytes


cdef class ChatShape:
    """The layout of a stream's last content chunk (`_stream_py`, ``shape``)."""

    cdef public bytes prefix, suffix
    cdef public bint strip, cut
    cdef public object loads

    def __init__(self):
        self.prefix = self.suffix = b""
        self.strip = self.cut = False
        self.loads = None  # nothing learned yet


cdef Py_ssize_t _plain_length(const unsigned char* s, Py_ssize_t n) noexcept:
    """n when s[:n] is a plain JSON string body (no quote, backslash or control
    character; valid UTF-8: no overlong form, surrogate or code point past
    U+10FFFF), else -1."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c, c1
    while i < n:
        c = s[i]
        if c < 0x80:
            if c < 0x20 or c == 0x22 or c == 0x5C:
                return -1
            i += 1
        elif 0xC2 <= c <= 0xDF:
            if i + 1 >= n or (s[i + 1] & 0xC0) != 0x80:
                return -1
            i += 2
        elif 0xE0 <= c <= 0xEF:
            if i + 2 >= n:
                return -1
            c1 = s[i + 1]
            if ((c == 0xE0 and c1 < 0xA0) or (c == 0xED and c1 > 0x9F)
                    or (c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80):
                return -1
            i += 3
        elif 0xF0 <= c <= 0xF4:
            if i + 3 >= n:
                return -1
            c1 = s[i + 1]
            if ((c == 0xF0 and c1 < 0x90) or (c == 0xF4 and c1 > 0x8F)
                    or (c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80
                    or (s[i + 3] & 0xC0) != 0x80):
                return -1
            i += 4
        else:
            return -1
    return n


cdef Py_ssize_t _shaped(const char* d, Py_ssize_t n, ChatShape shape) noexcept:
    """The length of the text of d[:n] when it is `shape`'s chunk with another plain
    text, else -1."""
    cdef Py_ssize_t h = PyBytes_GET_SIZE(shape.prefix)
    cdef Py_ssize_t t = PyBytes_GET_SIZE(shape.suffix)
    if n < h + t or memcmp(d, PyBytes_AS_STRING(shape.prefix), h) != 0:
        return -1
    if memcmp(d + n - t, PyBytes_AS_STRING(shape.suffix), t) != 0:
        return -1
    return _plain_length(<const unsigned char*>d + h, n - h - t)


cdef int _learn(ChatShape shape, bytes data, dict payload, bint cut, bint strip_usage,
                object loads) except -1:
    """Keep `data`'s layout in `shape` when its text can be told from the rest."""
    cdef Py_ssize_t at, start, end
    choices = payload.get("choices")
    if type(choices) is not list or len(<list>choices) != 1:
        return 0
    choice = (<list>choices)[0]
    if type(choice) is not dict:
        return 0
    delta = (<dict>choice).get("delta")
    text = (<dict>delta).get("content") if type(delta) is dict else None
    if type(text) is not str or b"\\" in data or data.count(b'"content"') != 1:
        return 0
    at = data.find(b'"content":"')
    if at < 0:
        return 0
    start = at + 11
    end = data.find(b'"', start)
    if end < 0 or data[start:end] != (<str>text).encode("utf-8", "surrogatepass"):
        return 0
    shape.prefix, shape.suffix = data[:start], data[end:]
    shape.strip, shape.loads, shape.cut = strip_usage, loads, cut
    return 0


def chat_events(bytes chunk, bint strip_usage, loads, ChatShape shape=None):
    cdef const char* p = PyBytes_AS_STRING(chunk)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(chunk)
    cdef Py_ssize_t end = 0, j, start
    cdef const char* nl
    cdef long long chunks = 0, out_bytes = 0, ev_chunks, ev_bytes
    cdef list cuts = None  # (start of the event, index of its line end) of each cut
    cdef PyObject* got
    cdef object payload, usage, choices
    cdef bytes data
    cdef bint shaped = (shape is not None and shape.loads is loads
                        and shape.strip == strip_usage)
    cdef bint cut
    cdef Py_ssize_t m
    while end < n:
        nl = <const char*>memchr(p + end, b'\n', n - end)
        if nl == NULL:
            break
        j = nl - p
        if j + 1 >= n or p[j + 1] != b'\n':
            break
        if j - end < 6 or memcmp(p + end, b"data: ", 6) != 0:
            break
        if memchr(p + end, b'\r', j - end) != NULL:
            break
        start = end + 6
        if j - start == 6 and memcmp(p + start, b"[DONE]", 6) == 0:
            end = j + 2
            continue
        if j == start or p[start] != b'{':
            break
        if shaped:
            m = _shaped(p + start, j - start, shape)
            if m >= 0:  # the last chunk with another text: read as that one was
                if shape.cut:
                    if cuts is None:
                        cuts = []
                    cuts.append((end, j))
                chunks += 1 if m else 0
                out_bytes += m
                end = j + 2
                continue
        data = PyBytes_FromStringAndSize(p + start, j - start)
        try:
            payload = loads(data)
        except ValueError:
            break
        if type(payload) is not dict:
            break
        got = PyDict_GetItem(payload, "usage")
        usage = <object>got if got != NULL else None
        if usage:
            break
        got = PyDict_GetItem(payload, "choices")
        choices = <object>got if got != NULL else None
        ev_chunks = _content(choices, &ev_bytes)
        cut = False
        if strip_usage and PyDict_GetItem(payload, "usage") != NULL:
            if (not choices or usage is not None
                    or not _null_usage_at_end(p + start, j - start)):
                break
            if cuts is None:
                cuts = []
            cuts.append((end, j))
            cut = True
        if shape is not None:
            _learn(shape, data, <dict>payload, cut, strip_usage, loads)
            shaped = shape.loads is loads and shape.strip == strip_usage
        chunks += ev_chunks
        out_bytes += ev_bytes
        end = j + 2
    if cuts is not None:
        return _cut(chunk, end, cuts), end, chunks, out_bytes
    if end < n:
        return PyBytes_FromStringAndSize(p, end), end, chunks, out_bytes
    return chunk, end, chunks, out_bytes


cdef bytes _cut(bytes chunk, Py_ssize_t n, list cuts):
    """`chunk[:n]` with the last CUT bytes of each cut event's line replaced by "}"."""
    cdef const char* p = PyBytes_AS_STRING(chunk)
    cdef Py_ssize_t at = 0, w = 0, i, j, keep
    cdef char* q = <char*>PyMem_Malloc(n)
    if q == NULL and n:
        raise MemoryError()
    try:
        for i, j in cuts:
            keep = j - CUT - at  # from where the last cut left off to the cut
            memcpy(q + w, p + at, keep)
            w += keep
            q[w] = b'}'
            w += 1
            at = j  # the line end and blank line follow as they were
        memcpy(q + w, p + at, n - at)
        w += n - at
        return PyBytes_FromStringAndSize(q, w)
    finally:
        PyMem_Free(q)


__all__ = ["ChatShape", "chat_events", "chat_content", "null_usage_at_end", "utf8_length",
           "NULL_USAGE_END"]
