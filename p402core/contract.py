"""The ledger's input contract: what a string or a time may be before it is decided on
or stored. One definition, used by the server at the edge of every request
(server/p402_server/wire/convert.py, the proxy) and by the Python SDK before it sends
(clients/python/p402_client/_convert.py), so both refuse the same values with the
same words, on SQLite and on PostgreSQL alike.

Strings (ids, owners, label keys and values, model, provider, reasons, gateway ids):
- at most MAX_STRING (256) characters;
- no control characters: C0 (U+0000–U+001F, NUL included: PostgreSQL cannot store
  it), DEL (U+007F) and C1 (U+0080–U+009F). They have no business in an id or a name
  and end up in logs, CSV exports and terminals;
- valid Unicode: no lone surrogates (U+D800–U+DFFF), which no UTF-8 encoder accepts
  (a JSON body may carry one as a "\\ud800" escape).
Free text the privacy mode keeps (`content`, prompt, response) is not an id: it may
hold newlines and tabs; only NUL (which PostgreSQL cannot store in text) and lone
surrogates are refused there.

Times (`event_time_ms`, milliseconds since the Unix epoch): 0 means "now"; otherwise
not before 2000-01-01T00:00:00Z (EARLIEST_EVENT_MS) and not more than a day ahead of
the server's clock (MAX_FUTURE_MS: clock skew, never a booking into the future).

Reports: a ledger written before these rules (or by another tool) may hold any int64
time. Every reporting path (Query's hour/day/month groups, exports, the CLI, the
dashboard) shows a stored time through `reportable_ms`, which clamps it into what a
calendar can show: 1970-01-01 .. 9999-12-31T23:59:59.999Z.

Each check returns the problem as a sentence, or None when the value is fine; the
caller raises its own error type naming the field.
"""
from __future__ import annotations

import re

from ._enums import MAX_STRING

EARLIEST_EVENT_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_FUTURE_MS = 86_400_000  # one day ahead of the server's clock
MAX_CONTENT_CHARS = 64 * 1024 * 1024
REPORTABLE_MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z

_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


def _describe(ch: str) -> str:
    code = ord(ch)
    if code == 0:
        return "NUL (U+0000)"
    if 0xD800 <= code <= 0xDFFF:
        return f"a lone surrogate (U+{code:04X})"
    return f"the control character U+{code:04X}"


def _problem(value: str, max_len: int, forbidden: re.Pattern) -> str | None:
    if len(value) > max_len:
        return f"longer than {max_len} characters ({len(value)})"
    m = forbidden.search(value)
    if m is not None:
        return f"contains {_describe(m.group())} at position {m.start()}"
    return None


def string_problem(value: str, max_len: int = MAX_STRING) -> str | None:
    """Why `value` cannot be an id or a name, or None."""
    return _problem(value, max_len, _FORBIDDEN)


def strings_problem(values) -> tuple[int, str] | None:
    """(index, problem) of the first value of `values` (a sequence of str) that is not
    a valid id or name, or None. The common case where all are fine is one compiled
    pass (the core's ``strings_ok``)."""
    if _strings_ok(values):
        return None
    for i, v in enumerate(values):
        p = string_problem(v)
        if p is not None:
            return i, p
    return None  # pragma: no cover - the joined scan found a problem in one of them


def strings_ok(values) -> bool:
    """True when every value is exactly a str that is a valid id or name (the core's
    compiled check unless P402_NO_EXTENSIONS=1; ``strings_problem`` says why not)."""
    return _strings_ok(values)


def _strings_ok(values) -> bool:
    # Bound on first use: the core's twins import this module, and importing the
    # ledger must not need the compiled core (a server without it says so at start).
    global _strings_ok
    from ._impl import IMPLEMENTATION, load

    _strings_ok = load(IMPLEMENTATION).strings_ok
    return _strings_ok(values)


def text_problem(value: str, max_len: int = MAX_CONTENT_CHARS) -> str | None:
    """Why `value` cannot be kept as content text, or None."""
    return _problem(value, max_len, _NOT_TEXT)


def event_time_problem(ms: int, now_ms: int) -> str | None:
    """Why `ms` cannot be an event's time (0 = now), or None."""
    if ms == 0:
        return None
    if ms < EARLIEST_EVENT_MS:
        return ("must be 0 (now) or a time since 2000-01-01T00:00:00Z in ms since the "
                f"epoch, got {ms}")
    if ms > now_ms + MAX_FUTURE_MS:
        return f"more than a day ahead of the server's clock ({ms} > {now_ms} + 1 day)"
    return None


def reportable_ms(ms: int) -> int:
    """A stored time clamped into 1970-01-01 .. 9999-12-31 (see the module docstring)."""
    return 0 if ms < 0 else REPORTABLE_MAX_MS if ms > REPORTABLE_MAX_MS else ms


__all__ = ["REPORTABLE_MAX_MS", "reportable_ms", "EARLIEST_EVENT_MS", "MAX_FUTURE_MS", "MAX_CONTENT_CHARS", "string_problem",
           "strings_problem", "strings_ok", "text_problem", "event_time_problem"]
