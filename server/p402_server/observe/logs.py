"""Logging for operators: plain text (the default) or one JSON object per line
(`--log-format json`), with the id of the request each line was logged under.

Owns the JSON line format — {"time" (ISO 8601 UTC, ms), "level", "logger", "message",
"request_id" (when logged inside an RPC), "exc" (a traceback, when any)} — the
request id (`REQUEST_ID`, a context variable the RPC wrappers in errors.py set from
the caller's `x-request-id` metadata, else a new id, only while request ids are on,
so text logging costs nothing per call) and `configure`.
"""
from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("p402_request_id",
                                                                  default="")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
enabled = False  # request ids are kept (errors.py reads it on every RPC)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
               .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
               "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        rid = REQUEST_ID.get()
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """The root logger's level and format ("text" or "json"); json turns request ids
    on."""
    global enabled
    if fmt not in FORMATS:
        raise ValueError(f"--log-format: {fmt!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    enabled = fmt == "json"


def request_id_from(metadata) -> str:
    """The caller's x-request-id (printable, at most 128 characters), else a new id."""
    for k, v in metadata or ():
        if k == "x-request-id" and isinstance(v, str) and 0 < len(v) <= 128 \
                and v.isprintable():
            return v
    from p402_client.ids import new_ulid

    return "req_" + new_ulid()


__all__ = ["REQUEST_ID", "FORMATS", "JsonFormatter", "configure", "request_id_from",
           "enabled"]
