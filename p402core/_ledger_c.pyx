# cython: language_level=3, boundscheck=False, wraparound=False
"""The ledger's per-event work — the compiled twin of `_ledger_py`.

Same canonical encoding of a ledger event, byte for byte, and the same answers of
`strings_ok` and `event_ok` (see `_ledger_py` for the definitions). What is compiled: the encoding
is written field by field into one growing C buffer (ASCII text copied straight from
the str's own storage, integers printed in place, nested lists written in place
and moved back against their length once it is known), so an event costs one bytes object
instead of a few dozen temporary strings; `strings_ok` is one pass over each str's
code units, and `event_ok` reads each field once and checks it in C (no tuples of
fields, no generator per check).
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport (
    PyUnicode_1BYTE_DATA,
    PyUnicode_GET_LENGTH,
    PyUnicode_AsEncodedString,
)
from cpython.long cimport PyLong_AsLongLongAndOverflow
from libc.string cimport memcpy, memmove

from operator import index as _index

from p402core._enums import (
    MAX_LABELS,
    MAX_STRING,
    MAX_TOKENS,
    Decision,
    Evidence,
    Outcome,
    PrivacyMode,
)
from p402core._units import SERVICE_TIERS, UNITS

cdef extern from "Python.h":
    # Compact ASCII strs keep their characters as one byte each, which are also
    # their UTF-8 bytes.
    bint PyUnicode_IS_ASCII(object o)

cdef Py_ssize_t _MAX_STRING = MAX_STRING
cdef enum:
    # Room for a nested list's netstring header: up to 20 digits and the colon.
    _HEADER = 21
cdef Py_ssize_t _MAX_LABELS = MAX_LABELS
cdef long long _MAX_TOKENS = MAX_TOKENS
# The IntEnums an integer field may hold besides exactly int (never bool).
cdef frozenset _INT_ENUMS = frozenset({Decision, Outcome, Evidence, PrivacyMode})
cdef frozenset _UNIT_NAMES = frozenset(UNITS)
cdef frozenset _TIERS = frozenset(("", *SERVICE_TIERS[1:]))


cdef inline Py_ssize_t _decimal(char* out, unsigned long long v) noexcept:
    """Write v in decimal at out; return the number of digits (1..20)."""
    cdef char tmp[20]
    cdef Py_ssize_t k = 0, i
    while True:
        tmp[k] = <char>(48 + v % 10)
        k += 1
        v //= 10
        if v == 0:
            break
    for i in range(k):
        out[i] = tmp[k - 1 - i]
    return k


cdef class _Buf:
    """A growable byte buffer, freed with its owner (also when encoding fails)."""
    cdef char* data
    cdef Py_ssize_t n
    cdef Py_ssize_t cap

    def __cinit__(self, Py_ssize_t cap=512):
        self.data = <char*>PyMem_Malloc(cap)
        if self.data == NULL:
            raise MemoryError()
        self.n = 0
        self.cap = cap

    def __dealloc__(self):
        PyMem_Free(self.data)

    cdef int reserve(self, Py_ssize_t more) except -1:
        cdef Py_ssize_t want = self.n + more
        cdef Py_ssize_t cap = self.cap
        cdef char* grown
        if want <= cap:
            return 0
        while cap < want:
            cap *= 2
        grown = <char*>PyMem_Realloc(self.data, cap)
        if grown == NULL:
            raise MemoryError()
        self.data = grown
        self.cap = cap
        return 0

    cdef int put(self, const char* s, Py_ssize_t k) except -1:
        self.reserve(k)
        memcpy(self.data + self.n, s, k)
        self.n += k
        return 0

    cdef int netstring(self, const char* s, Py_ssize_t k) except -1:
        """<k in decimal>:<s>,"""
        self.reserve(k + 24)
        self.n += _decimal(self.data + self.n, <unsigned long long>k)
        self.data[self.n] = b':'
        self.n += 1
        memcpy(self.data + self.n, s, k)
        self.n += k
        self.data[self.n] = b','
        self.n += 1
        return 0

    cdef int string(self, object value, str field) except -1:
        cdef bytes raw
        if not isinstance(value, str):
            raise TypeError(f"{field}: canonical encoding: expected a str, got "
                            f"{type(value).__name__}")
        if PyUnicode_IS_ASCII(value):
            return self.netstring(<const char*>PyUnicode_1BYTE_DATA(value),
                                  PyUnicode_GET_LENGTH(value))
        raw = PyUnicode_AsEncodedString(value, "utf-8", "surrogatepass")
        return self.netstring(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))

    cdef int optional(self, object value, str field) except -1:
        if value is None:
            return self.put("~,", 2)
        return self.string(value, field)

    cdef int integer(self, object value, str field) except -1:
        cdef int overflow = 0
        cdef long long v
        cdef bytes digits
        if type(value) is not int:
            try:
                value = _index(value)  # an IntEnum member is its number; never a float
            except TypeError:
                raise TypeError(f"{field}: canonical encoding: expected an int, got "
                                f"{type(value).__name__}") from None
        v = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow:
            digits = str(value).encode("ascii")
            self.put(PyBytes_AS_STRING(digits), PyBytes_GET_SIZE(digits))
            return self.put(",", 1)
        self.reserve(24)
        if v < 0:
            self.data[self.n] = b'-'
            self.n += 1
            # -(v + 1) + 1: also right for the smallest long long
            self.n += _decimal(self.data + self.n, <unsigned long long>(-(v + 1)) + 1)
        else:
            self.n += _decimal(self.data + self.n, <unsigned long long>v)
        self.data[self.n] = b','
        self.n += 1
        return 0

    cdef Py_ssize_t begin(self) except -1:
        """Start a nested list in place: room for its header, written by end()."""
        cdef Py_ssize_t start = self.n
        self.reserve(_HEADER)
        self.n += _HEADER
        return start

    cdef int end(self, Py_ssize_t start) except -1:
        """Close the nested list begun at `start`: <payload length>:<payload>, with
        the payload moved back against its header."""
        cdef Py_ssize_t body = start + _HEADER
        cdef Py_ssize_t k = self.n - body
        cdef Py_ssize_t h = _decimal(self.data + start, <unsigned long long>k)
        self.data[start + h] = b':'
        memmove(self.data + start + h + 1, self.data + body, k)
        self.n = start + h + 1 + k
        return self.put(",", 1)

    cdef int strings(self, object items, str field) except -1:
        cdef Py_ssize_t start
        if not items:
            return self.put("0:,", 3)
        start = self.begin()
        for x in items:
            self.string(x, field)
        return self.end(start)

    cdef int mapping(self, object d, bint int_values, str field) except -1:
        """A dict as the list key1, value1, key2, value2, ... sorted by key: labels
        (str values) or units (int values)."""
        cdef Py_ssize_t start
        if not d:
            return self.put("0:,", 3)
        start = self.begin()
        for k in sorted(d):
            self.string(k, field)
            if int_values:
                self.integer(d[k], field)
            else:
                self.string(d[k], field)
        return self.end(start)

    cdef int charges(self, object charges, str field) except -1:
        cdef Py_ssize_t start, pair
        if not charges:
            return self.put("0:,", 3)
        start = self.begin()
        for b, p in charges:
            pair = self.begin()
            self.string(b, field)
            self.integer(p, field)
            self.end(pair)
        return self.end(start)


def event_bytes(ev):
    """The canonical encoding of a ledger event (`_ledger_py.event_bytes`)."""
    cdef _Buf b = _Buf(512)
    units = ev.units
    tier = ev.service_tier
    cdef bint v2 = bool(units) or bool(tier)
    b.put(b"p402.event.v2\n" if v2 else b"p402.event.v1\n", 14)
    b.string(ev.tenant_id, "tenant_id")
    b.string(ev.event_id, "event_id")
    b.integer(ev.event_ms, "event_ms")
    b.integer(ev.recorded_ms, "recorded_ms")
    b.string(ev.kind, "kind")
    b.string(ev.reservation_id, "reservation_id")
    b.string(ev.customer, "customer")
    b.string(ev.feature, "feature")
    b.string(ev.workflow, "workflow")
    b.string(ev.task, "task")
    b.string(ev.department, "department")
    b.string(ev.employee, "employee")
    b.mapping(ev.labels, False, "labels")
    b.string(ev.provider, "provider")
    b.string(ev.model, "model")
    b.integer(ev.input_tokens, "input_tokens")
    b.integer(ev.cached_input_tokens, "cached_input_tokens")
    b.integer(ev.cache_write_tokens, "cache_write_tokens")
    b.integer(ev.output_tokens, "output_tokens")
    b.integer(ev.reasoning_tokens, "reasoning_tokens")
    b.integer(ev.cost_nanos, "cost_nanos")
    b.integer(ev.estimated_cost_nanos, "estimated_cost_nanos")
    b.integer(ev.overrun_nanos, "overrun_nanos")
    b.integer(ev.revenue_nanos, "revenue_nanos")
    b.integer(ev.decision, "decision")
    b.strings(ev.reasons, "reasons")
    b.strings(ev.rule_ids, "rule_ids")
    b.strings(ev.budget_ids, "budget_ids")
    b.charges(ev.budget_charges, "budget_charges")
    b.integer(ev.outcome, "outcome")
    b.integer(ev.evidence, "evidence")
    b.integer(ev.privacy_mode, "privacy_mode")
    b.integer(ev.attempt, "attempt")
    b.string(ev.retry_of, "retry_of")
    b.string(ev.catalog_version, "catalog_version")
    b.optional(ev.duplicate_of, "duplicate_of")
    b.optional(ev.prompt_fingerprint, "prompt_fingerprint")
    b.optional(ev.response_fingerprint, "response_fingerprint")
    if v2:
        b.string(tier, "service_tier")
        b.mapping(units, True, "units")
    return PyBytes_FromStringAndSize(b.data, b.n)


def event_text(ev):
    """The event's canonical encoding as text (`_ledger_py.event_text`)."""
    return event_bytes(ev).decode("utf-8", "surrogatepass")


cdef bint _str_ok(str s):
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(s), i
    cdef const unsigned char* p
    cdef Py_UCS4 ch
    if n > _MAX_STRING:
        return False
    if PyUnicode_IS_ASCII(s):
        p = <const unsigned char*>PyUnicode_1BYTE_DATA(s)
        for i in range(n):
            if p[i] < 0x20 or p[i] == 0x7f:
                return False
        return True
    for ch in s:
        if ch < 0x20 or 0x7f <= ch <= 0x9f or 0xd800 <= ch <= 0xdfff:
            return False
    return True


def strings_ok(values):
    """True when every value is exactly a str that p402core.contract accepts as an id
    or a name (`_ledger_py.strings_ok`)."""
    for v in values:
        if type(v) is not str or not _str_ok(<str>v):
            return False
    return True


cdef inline bint _id_ok(object v):
    """Exactly a str the contract accepts as an id or a name."""
    return type(v) is str and _str_ok(<str>v)


cdef inline bint _int64_ok(object v) except -1:
    """Exactly an int or a member of the core's IntEnums, within int64."""
    cdef int overflow = 0
    if type(v) is not int and type(v) not in _INT_ENUMS:
        return False
    PyLong_AsLongLongAndOverflow(v, &overflow)
    return overflow == 0


cdef inline bint _optional_ok(object v):
    return v is None or type(v) is str and PyUnicode_GET_LENGTH(v) <= _MAX_STRING


cdef inline bint _str_tuple(object t):
    if type(t) is not tuple:
        return False
    for x in <tuple>t:
        if type(x) is not str:
            return False
    return True


cdef bint _charges_ok(object charges) except -1:
    cdef int overflow = 0
    cdef long long start
    if type(charges) is not tuple:
        return False
    for charge in <tuple>charges:
        if type(charge) is not tuple or len(<tuple>charge) != 2:
            return False
        budget_id, period = (<tuple>charge)[0], (<tuple>charge)[1]
        if type(budget_id) is not str or not <str>budget_id or type(period) is not int:
            return False
        start = PyLong_AsLongLongAndOverflow(period, &overflow)
        if overflow or start < 0:
            return False
    return True


cdef bint _labels_ok(object labels):
    if type(labels) is not dict or len(<dict>labels) > _MAX_LABELS:
        return False
    for k, v in (<dict>labels).items():
        if not _id_ok(k) or not _id_ok(v):
            return False
    return True


cdef bint _units_ok(object units, object tier) except -1:
    cdef int overflow = 0
    cdef long long n
    if type(units) is not dict or type(tier) is not str or tier not in _TIERS:
        return False
    for name, count in (<dict>units).items():
        if name not in _UNIT_NAMES or type(count) is not int:
            return False
        n = PyLong_AsLongLongAndOverflow(count, &overflow)
        if overflow or n <= 0 or n > _MAX_TOKENS:
            return False
    return True


def event_ok(ev):
    """True when every field of the ledger event is what the store takes, in its
    plainest form (`_ledger_py.event_ok`)."""
    tenant_id, event_id, event_ms = ev.tenant_id, ev.event_id, ev.event_ms
    if not (_id_ok(tenant_id) and <str>tenant_id and _id_ok(event_id) and <str>event_id
            and _id_ok(ev.kind) and _id_ok(ev.reservation_id)
            and _id_ok(ev.customer) and _id_ok(ev.feature) and _id_ok(ev.workflow)
            and _id_ok(ev.task) and _id_ok(ev.department) and _id_ok(ev.employee)
            and _id_ok(ev.provider) and _id_ok(ev.model) and _id_ok(ev.retry_of)
            and _id_ok(ev.catalog_version)):
        return False
    if not (_int64_ok(event_ms) and event_ms >= 0 and _int64_ok(ev.recorded_ms)
            and _int64_ok(ev.input_tokens) and _int64_ok(ev.cached_input_tokens)
            and _int64_ok(ev.cache_write_tokens) and _int64_ok(ev.output_tokens)
            and _int64_ok(ev.reasoning_tokens) and _int64_ok(ev.cost_nanos)
            and _int64_ok(ev.estimated_cost_nanos) and _int64_ok(ev.overrun_nanos)
            and _int64_ok(ev.revenue_nanos) and _int64_ok(ev.decision)
            and _int64_ok(ev.outcome) and _int64_ok(ev.evidence)
            and _int64_ok(ev.privacy_mode) and _int64_ok(ev.attempt)
            and _int64_ok(ev.chain_index)):
        return False
    return bool(
        _optional_ok(ev.duplicate_of) and _optional_ok(ev.chain_hash)
        and _optional_ok(ev.prompt_fingerprint) and _optional_ok(ev.response_fingerprint)
        and _labels_ok(ev.labels)
        and _str_tuple(ev.reasons) and _str_tuple(ev.rule_ids) and _str_tuple(ev.budget_ids)
        and _charges_ok(ev.budget_charges)
        and _units_ok(ev.units, ev.service_tier))


__all__ = ["event_bytes", "event_text", "strings_ok", "event_ok"]
