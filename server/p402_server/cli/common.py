"""What every command shares: default addresses, the vocabularies of flags, the
parsing of flag values (USD amounts exactly to nano-USD, times, key=value pairs,
scopes, integers) into UsageError naming the flag, and the plumbing to the server
(an SDK client from --target / --api-key) or to a local database."""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import re
import sys
import time
from decimal import Decimal, InvalidOperation
from typing import Any, Sequence

DEFAULT_DB = "sqlite+aiosqlite:///p402.db"
DEFAULT_LISTEN = "127.0.0.1:4020"
DEFAULT_TARGET = "127.0.0.1:4020"
INT64_MAX = (1 << 63) - 1
OWNER_KEYS = ("customer", "feature", "workflow", "task", "department", "employee")
GROUP_KEYS = OWNER_KEYS + ("provider", "model", "outcome", "decision", "evidence",
                           "hour", "day", "month")
OUTCOMES = ("success", "provider_error", "timeout", "cancelled", "denied", "expired")
DECISIONS = ("allow", "warn", "deny")
EVIDENCES = ("estimated", "reported", "fingerprinted", "attested")
PRIVACY_MODES = ("metadata_only", "fingerprint_only", "redacted_trace",
                 "private_gateway", "full_trace")
EFFECTS = ("deny", "warn", "require_owners", "allow_models", "max_output_tokens",
           "max_cost_per_request", "rate_limit", "privacy")
PERIODS = ("day", "week", "month", "total")


class UsageError(Exception):
    """Bad input on the command line: exit 2 with `flag: message`."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.message = message


def parse_usd(flag: str, text: str) -> int:
    """USD decimal string -> int nano-USD, exactly ("25", "25.00", "$0.000000001")."""
    raw = text.strip()
    if raw.startswith("$"):
        raw = raw[1:]
    try:
        amount = Decimal(raw)
    except InvalidOperation:
        raise UsageError(flag, f"{text!r} is not a USD amount (e.g. 25.00)") from None
    if not amount.is_finite():
        raise UsageError(flag, f"{text!r} is not a USD amount (e.g. 25.00)")
    if amount < 0:
        raise UsageError(flag, f"{text!r} must not be negative")
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -9:
        raise UsageError(flag, f"{text!r} has more than 9 decimals (nano-USD is the unit)")
    nanos = int(amount.scaleb(9))
    if nanos > INT64_MAX:
        raise UsageError(flag, f"{text!r} is too large")
    return nanos


_RELATIVE = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_time(flag: str, text: str, now_ms: int | None = None) -> int:
    """30m / 24h / 7d / 2w (that long ago), "now", or an ISO-8601 date or datetime
    (UTC when no offset is given) -> Unix ms."""
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    m = _RELATIVE.match(text)
    if m:
        return now - int(m.group(1)) * _UNIT_MS[m.group(2).lower()]
    if text.strip().lower() == "now":
        return now
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(flag, f"{text!r} is not a time (30m, 24h, 7d, 2w, or an ISO-8601"
                               " date such as 2025-06-01 or 2025-06-01T12:00:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp() * 1000)


def parse_kv(flag: str, text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(flag, f"{text!r} is not KEY=VALUE (e.g. customer=acme)")
    return key.strip(), value.strip()


def parse_scope(flag: str, items: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        key, value = parse_kv(flag, item)
        if key not in OWNER_KEYS and not key.startswith("label."):
            raise UsageError(flag, f"{key!r} is not an owner dimension "
                                   f"({', '.join(OWNER_KEYS)}) or label.<key>")
        out[key] = value
    return out


def parse_int(flag: str, text: str, *, minimum: int = 0) -> int:
    try:
        if not text.isascii():  # int() also reads "٣" as 3
            raise ValueError(text)
        value = int(text)
    except (AttributeError, TypeError, ValueError):
        raise UsageError(flag, f"{text!r} is not an integer") from None
    if value < minimum:
        raise UsageError(flag, f"must be >= {minimum}, got {value}")
    if value > INT64_MAX:
        raise UsageError(flag, f"{text!r} is too large")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) instead of the full usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # The same "p402: error: " prefix as every other error of the CLI.
        self.exit(2, f"p402: error: {message} (see {self.prog} --help)\n")


def _fmt(description: str, example: str) -> dict[str, Any]:
    return {"description": description, "epilog": "example:\n  " + example,
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def command_group(sub, name: str, **kw) -> argparse._SubParsersAction:
    """`p402 NAME ACTION …`: add the command NAME (``sub.add_parser``'s keywords) and
    return the subparsers its actions are added to."""
    return sub.add_parser(name, **kw).add_subparsers(dest="action", metavar="ACTION",
                                                     required=True, parser_class=_Parser)


def _remote(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server connection")
    g.add_argument("--target", default=os.environ.get("P402_TARGET", DEFAULT_TARGET),
                   help="HOST:PORT of a running p402 server (env P402_TARGET; "
                        f"default {DEFAULT_TARGET})")
    g.add_argument("--api-key", default=os.environ.get("P402_API_KEY", ""),
                   help="API key (env P402_API_KEY); required")
    g.add_argument("--timeout", type=float, default=10.0,
                   help="deadline per call in seconds (default 10)")


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")


def _filters(p: argparse.ArgumentParser, *, since_default: str | None = None) -> None:
    g = p.add_argument_group("filters")
    g.add_argument("--since", default=since_default,
                   help="start: 30m, 24h, 7d, 2w or an ISO-8601 date/time (UTC)"
                        + (f" (default {since_default})" if since_default else ""))
    g.add_argument("--until", help="end (exclusive), same forms as --since")
    for dim in OWNER_KEYS:
        g.add_argument(f"--{dim}", help=f"only this {dim}")
    g.add_argument("--label", action="append", metavar="KEY=VALUE",
                   help="only events with this label (repeatable)")
    g.add_argument("--model", action="append", help="only this model (repeatable)")
    g.add_argument("--provider", action="append", help="only this provider (repeatable)")
    g.add_argument("--outcome", action="append", choices=OUTCOMES, type=str.lower,
                   help="only this outcome (repeatable)")
    g.add_argument("--decision", action="append", choices=DECISIONS, type=str.lower,
                   help="only this decision (repeatable)")
    g.add_argument("--evidence", action="append", choices=EVIDENCES, type=str.lower,
                   help="only this evidence status (repeatable)")


def _listen_check(flag: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise UsageError(flag, f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:4020)")


def _redact_url(url: str) -> str:
    # Never log a database password.
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)


def _run_store(db: str, coro: Any, *, read_only: bool = False) -> Any:
    """Run a store coroutine; a bad URL is bad input naming --db. `read_only`
    commands (verify, contents purge) never create or migrate a database, so a
    database without P402's tables is bad input too, not a raw SQL error."""
    try:
        return asyncio.run(coro)
    except ValueError as exc:
        field = getattr(exc, "field", None) or str(exc).split(":", 1)[0]
        if field == "db":
            raise UsageError("--db", getattr(exc, "message", None)
                             or str(exc).split(": ", 1)[-1]) from None
        raise
    except Exception as exc:
        from sqlalchemy.exc import SQLAlchemyError

        if read_only and isinstance(exc, SQLAlchemyError):
            detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise UsageError("--db", f"{_redact_url(db)} is not a P402 database this "
                                     f"command can read ({detail})") from None
        raise


def _existing_db(flag: str, url: str) -> None:
    """Commands that read a database never create one: a SQLite URL must name an
    existing file (a typo is bad input, not a new empty database)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UsageError(flag, f"{url!r} is not a database URL (e.g. "
                               "sqlite+aiosqlite:///p402.db)") from None
    if parsed.get_backend_name() != "sqlite":
        return
    path = parsed.database or ""
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    if not os.path.isfile(path):
        raise UsageError(flag, f"no database at {os.path.abspath(path)} (check the path; "
                               "this command never creates one)")


def _api_key(raw: str) -> str:
    """The key without surrounding whitespace (a pasted or file-read key often ends in
    a newline); whitespace or control characters inside it are refused."""
    key = (raw or "").strip()
    if not key:
        raise UsageError("--api-key", "is required (or set P402_API_KEY)")
    if any(c.isspace() or not c.isprintable() for c in key):
        raise UsageError("--api-key", "contains whitespace or control characters; a "
                                      "P402 key is p402_ followed by letters and digits")
    return key


def _client(args: argparse.Namespace):
    from p402_client import P402Client

    args.api_key = _api_key(args.api_key)
    if args.timeout <= 0:
        raise UsageError("--timeout", "must be > 0 seconds")
    return P402Client(args.target, api_key=args.api_key, timeout=args.timeout)


def _filter_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if args.since:
        kw["since"] = parse_time("--since", args.since)
    if args.until:
        kw["until"] = parse_time("--until", args.until)
    if kw.get("since") and kw.get("until") and kw["until"] <= kw["since"]:
        raise UsageError("--until", "must be after --since")
    owners = {dim: getattr(args, dim) for dim in OWNER_KEYS if getattr(args, dim)}
    if owners:
        kw["owners"] = owners
    if args.label:
        kw["labels"] = dict(parse_kv("--label", item) for item in args.label)
    for flag, key in (("model", "models"), ("provider", "providers"),
                      ("outcome", "outcomes"), ("decision", "decisions"),
                      ("evidence", "evidences")):
        if getattr(args, flag):
            kw[key] = getattr(args, flag)
    return kw


def _read_text(flag: str, path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(flag, f"{path}: {getattr(exc, 'strerror', None) or exc}") from None


def parse_group_by(text: str) -> list[str]:
    keys = [k.strip().lower() for k in text.split(",") if k.strip()]
    if not keys:
        raise UsageError("--by", "give at least one key, e.g. customer,feature")
    for key in keys:
        if key not in GROUP_KEYS:
            raise UsageError("--by", f"{key!r} is not one of {', '.join(GROUP_KEYS)}")
    if len(set(keys)) != len(keys):
        raise UsageError("--by", "a key appears twice")
    return keys
