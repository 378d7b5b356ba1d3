"""The `p402` command line: run the server, bootstrap a tenant, administer and read it.

Owns argument parsing, the exit-code contract and the human / machine output of
every command. Server work is delegated: `serve` to `p402_server.server.serve`,
`init` to the store and `server.init_tenant`, `demo` to `p402_server.demo`; every
remote command goes through the Python SDK (`p402_client.P402Client`), so the CLI
sees exactly what any gateway sees.

Exit codes: 0 success; 2 bad input — a one-line message naming the flag or field
(argparse errors included); 1 server or runtime errors, with the gRPC status and
message; 130 on Ctrl-C. Every read command takes `--json` (machine-readable: money
as exact ints of nano-USD plus exact USD strings). Money flags are USD decimal
strings, parsed with Decimal to nano-USD exactly (more than 9 decimals is an error).
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import logging
import os
import re
import subprocess
import sys
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from p402core import InvalidArgument
from p402core.contract import reportable_ms

from .amounts import NO_REVENUE_MARK, NO_REVENUE_NOTE, Money, format_column, revenue_cell
from .amounts import usd as usd_text

DEFAULT_DB = "sqlite+aiosqlite:///p402.db"
DEFAULT_LISTEN = "127.0.0.1:4020"
DEFAULT_TARGET = "127.0.0.1:4020"
NANOS_PER_USD = 1_000_000_000
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
# Where a LiteLLM price map comes from: the file bundled in the litellm package, or
# the one LiteLLM's repository publishes (the package's copy is a backup of it).
LITELLM_BUNDLED_MAP = "model_prices_and_context_window_backup.json"
LITELLM_MAP_URL = ("https://raw.githubusercontent.com/BerriAI/litellm/main/"
                   "model_prices_and_context_window.json")


class UsageError(Exception):
    """Bad input on the command line: exit 2 with `flag: message`."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.message = message


# ------------------------------------------------------------------ parsing helpers


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


def usd(nanos: int) -> str:
    """Exact USD string of nano-USD (9 decimals), for machine output."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    return f"{sign}{whole}.{frac:09d}"


def usd_short(nanos: int) -> str:
    """Human USD, exact (amounts.usd): "$0.05", "$0.000760", "-$0.01587415"; in tables
    a column of `Money` cells shares its decimals."""
    return usd_text(nanos)


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
        value = int(text)
    except (TypeError, ValueError):
        raise UsageError(flag, f"{text!r} is not an integer") from None
    if value < minimum:
        raise UsageError(flag, f"must be >= {minimum}, got {value}")
    if value > INT64_MAX:
        raise UsageError(flag, "is too large")
    return value


def _ms_str(ms: int) -> str:
    if not ms:
        return ""
    return dt.datetime.fromtimestamp(reportable_ms(ms) / 1000, tz=dt.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S")


def _per_million(pico: int) -> str:
    """pico-USD per token -> "$x.xx" per million tokens (pico/token = micro-USD/1M),
    exact, with at least two decimals ($2.50, $0.075)."""
    value = Decimal(pico).scaleb(-6).normalize()
    if value.as_tuple().exponent > -2:  # type: ignore[operator]
        value = value.quantize(Decimal("0.01"))
    return f"${value:f}"


_TIME_GROUPS = {"hour": "%Y-%m-%d %H:00", "day": "%Y-%m-%d", "month": "%Y-%m"}


def group_label(key: str, value: str) -> str:
    """A spend row's group value for people: time buckets (UTC ms) as dates."""
    if not value:
        return "(none)"
    if key in _TIME_GROUPS and value.lstrip("-").isdigit():
        when = dt.datetime.fromtimestamp(reportable_ms(int(value)) / 1000,
                                              tz=dt.timezone.utc)
        return when.strftime(_TIME_GROUPS[key])
    return value


# ------------------------------------------------------------------ output


class Output:
    """Where a command writes: a rich Console for people, plain stdout for --json."""

    def __init__(self) -> None:
        from rich.console import Console

        # Not a terminal (pipes, CI, tests): $COLUMNS when set, else a wide fixed
        # width so tables never fold. A terminal: its own width.
        columns = os.environ.get("COLUMNS", "")
        width = None if sys.stdout.isatty() else int(columns) if columns.isdigit() else 200
        self.console = Console(highlight=False, width=width, soft_wrap=False)
        self.err = Console(stderr=True, highlight=False,
                           width=None if sys.stderr.isatty() else 160)

    def json(self, value: Any) -> None:
        sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def print(self, *args: Any, **kw: Any) -> None:
        self.console.print(*args, **kw)

    def table(self, title: str | None, columns: Sequence[str | tuple[str, str]],
              rows: Iterable[Sequence[Any]], *, footer: Sequence[Any] | None = None,
              drop: Sequence[str] = (), notes: Sequence[str] = ()) -> None:
        """Print a table that fits the console. `Money` cells are formatted per
        column (amounts.format_column: exact, aligned). When the table is wider than
        the console, the columns named in `drop` are left out, first named first,
        until it fits (a line says which); cells are never cut into fragments.
        `notes` are printed under the table."""
        names = [c if isinstance(c, str) else c[0] for c in columns]
        body = [list(r) for r in rows]
        if not body:
            self.console.print(f"{title + ': ' if title else ''}(none)")
            return
        grid = body + ([list(footer)] if footer is not None else [])
        cols = [format_column([r[i] for r in grid]) for i in range(len(names))]
        grid = [[str(cols[i][j]) for i in range(len(names))] for j in range(len(grid))]
        shown = list(range(len(names)))
        hidden: list[str] = []
        table = self._rich_table(title, columns, shown, grid, footer is not None)
        # The table's natural width (measured without the console's limit).
        unbounded = self.console.options.update_width(100_000)
        for name in drop:
            if self.console.measure(table, options=unbounded).maximum <= self.console.width:
                break
            if name in names and names.index(name) in shown:
                shown.remove(names.index(name))
                hidden.append(name)
                # Narrow: a text cell that still does not fit ends in "…" on one
                # line rather than folding into fragments.
                table = self._rich_table(title, columns, shown, grid, footer is not None,
                                         overflow="ellipsis")
        self.console.print(table)
        if hidden:
            self.console.print(f"(not shown at {self.console.width} columns: "
                               f"{', '.join(hidden)}; a wider terminal or --json shows "
                               "them)", style="dim", markup=False)
        used = " ".join(" ".join(r) for r in grid)
        for note in notes:
            if not note.startswith(NO_REVENUE_MARK) or NO_REVENUE_MARK in used:
                self.console.print(note, style="dim", markup=False)

    @staticmethod
    def _rich_table(title: str | None, columns: Sequence[str | tuple[str, str]],
                    shown: list[int], grid: list[list[str]], has_footer: bool,
                    overflow: str = "fold"):
        from rich import box
        from rich.cells import cell_len
        from rich.table import Table

        table = Table(title=title, show_footer=has_footer, title_justify="left",
                      box=box.SIMPLE_HEAD, pad_edge=False)
        body = grid[:-1] if has_footer else grid
        for i in shown:
            col = columns[i]
            name, justify = (col, "left") if isinstance(col, str) else col
            # Numbers (right-aligned) are never cut or folded (their full width is
            # the column's minimum); text may fold, or end in "…" when narrow.
            number = justify == "right"
            width = max(cell_len(t) for t in [name, *(r[i] for r in grid)]) if number else None
            table.add_column(name, justify=justify,  # type: ignore[arg-type]
                             footer=grid[-1][i] if has_footer else "",
                             no_wrap=number or overflow == "ellipsis", min_width=width,
                             overflow=overflow)  # type: ignore[arg-type]
        for row in body:
            table.add_row(*(row[i] for i in shown))
        return table


# ------------------------------------------------------------------ argparse


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) instead of the full usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # The same "p402: error: " prefix as every other error of the CLI.
        self.exit(2, f"p402: error: {message} (see {self.prog} --help)\n")


def _fmt(description: str, example: str) -> dict[str, Any]:
    return {"description": description, "epilog": "example:\n  " + example,
            "formatter_class": argparse.RawDescriptionHelpFormatter}


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="p402",
        **_fmt("P402: meter every AI call as an economic event — authorize, record, "
               "query.", "p402 demo"))
    parser.add_argument("--version", action="version", version="p402 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)

    # serve
    p = sub.add_parser("serve", help="run the gRPC server", **_fmt(
        "Run the P402 gRPC server (MeterService, AdminService, health, reflection).",
        "p402 serve --db sqlite+aiosqlite:///p402.db --listen 127.0.0.1:4020"))
    p.add_argument("--db", default=os.environ.get("P402_DB", DEFAULT_DB),
                   help=f"SQLAlchemy URL (env P402_DB; default {DEFAULT_DB})")
    p.add_argument("--listen", default=os.environ.get("P402_LISTEN", DEFAULT_LISTEN),
                   help=f"HOST:PORT to listen on (env P402_LISTEN; default {DEFAULT_LISTEN})")
    p.add_argument("--max-concurrent-rpcs", type=int, default=None,
                   help="calls in flight before RESOURCE_EXHAUSTED (backpressure)")
    p.add_argument("--log-format", default=os.environ.get("P402_LOG_FORMAT", "text"),
                   choices=("text", "json"), type=str.lower,
                   help="text (default) or json: one JSON object per line with the "
                        "request id (the caller's x-request-id, else a new one); env "
                        "P402_LOG_FORMAT")
    p.add_argument("--log-level", default=os.environ.get("P402_LOG_LEVEL", "INFO"),
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper,
                   help="logging level (default INFO)")
    # -- dashboard (p402_server.dashboard) --
    p.add_argument("--http", default=os.environ.get("P402_HTTP") or None,
                   metavar="HOST:PORT",
                   help="also serve the ledger dashboard at http://HOST:PORT/dashboard/ "
                        "(env P402_HTTP; off by default)")
    p.add_argument("--http-secure-cookies", action="store_true",
                   default=os.environ.get("P402_HTTP_SECURE_COOKIES", "") in ("1", "true"),
                   help="mark dashboard cookies Secure even over plain http (use behind "
                        "a TLS-terminating proxy; env P402_HTTP_SECURE_COOKIES=1)")
    # -- Envoy ext_authz (p402_server.envoy) --
    p.add_argument("--ext-authz", action="store_true",
                   help="also serve Envoy's envoy.service.auth.v3.Authorization/Check on "
                        "the same port (needs the `envoy` extra: xds-protos)")
    p.add_argument("--ext-authz-provider", default="",
                   help="provider for price lookup when the route names none")
    p.add_argument("--ext-authz-strip-authorization", action="store_true",
                   help="remove the caller's authorization header before the upstream")
    # -- scale-out (p402_server.leases, p402_server.workers; issue 7) --
    p.add_argument("--otel-endpoint", default=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
                   metavar="URL",
                   help="send a span per Authorize/Record and the decision and latency "
                        "metrics to this OTLP/HTTP collector (pip install -e '.[otel]'; "
                        "env OTEL_EXPORTER_OTLP_ENDPOINT); default off")
    p.add_argument("--no-metrics", action="store_true",
                   help="do not count decisions, latencies and the writer's work "
                        "(metrics are served at /metrics on the --http port)")
    p.add_argument("--lease", choices=("on", "off"),
                   default=os.environ.get("P402_LEASE") or None,
                   help="lease HARD budgets from the store in slices (needed when several "
                        "processes or replicas share one ledger; env P402_LEASE; default "
                        "off, on with --workers > 1)")
    p.add_argument("--workers", type=int,
                   default=int(os.environ.get("P402_WORKERS") or 1),
                   help="worker processes sharing the port with SO_REUSEPORT, each with "
                        "its own leases (env P402_WORKERS; default 1)")
    p.set_defaults(func=cmd_serve)

    # proxy (p402_server.proxy)
    p = sub.add_parser("proxy", help="an OpenAI-compatible endpoint that meters every call",
                       **_fmt("Serve the OpenAI API (/v1/chat/completions, /v1/responses, "
                              "/v1/embeddings, /v1/models) in front of an upstream: callers "
                              "authenticate with a P402 meter key, owners come from "
                              "x-p402-* headers, every call is authorized and recorded.",
                              "OPENAI_API_KEY=sk-… p402 proxy --upstream "
                              "https://api.openai.com/v1 --listen 127.0.0.1:8402 "
                              "--target 127.0.0.1:4020"))
    p.add_argument("--upstream", required=True, metavar="URL",
                   help="the OpenAI-compatible base URL to forward to (…/v1)")
    p.add_argument("--listen", default=os.environ.get("P402_PROXY_LISTEN", "127.0.0.1:8402"),
                   help="HOST:PORT to listen on (env P402_PROXY_LISTEN; default "
                        "127.0.0.1:8402)")
    p.add_argument("--upstream-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the upstream's API key (default "
                        "OPENAI_API_KEY); callers' keys are never forwarded")
    p.add_argument("--provider", default="openai",
                   help="provider name for price lookup (default openai)")
    p.add_argument("--upstream-timeout", type=float, default=600.0,
                   help="seconds for a whole upstream answer (default 600)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target", default=None,
                   help="a running P402 server HOST:PORT (env P402_TARGET; default "
                        f"{DEFAULT_TARGET})")
    g.add_argument("--db", default=None,
                   help="embedded: P402's runtime and ledger writer in this process on "
                        "this ledger, called directly (no gRPC hop)")
    p.add_argument("--lease", choices=("on", "off"),
                   default=os.environ.get("P402_LEASE") or "off",
                   help="with --db: lease HARD budgets from the store in slices, so this "
                        "proxy shares budgets with other proxies and servers on the same "
                        "PostgreSQL ledger (env P402_LEASE; default off)")
    p.add_argument("--log-format", default=os.environ.get("P402_LOG_FORMAT", "text"),
                   choices=("text", "json"), type=str.lower,
                   help="text (default) or json: one JSON object per line with the "
                        "request id (the caller's x-request-id, else a new one); env "
                        "P402_LOG_FORMAT")
    p.add_argument("--log-level", default=os.environ.get("P402_LOG_LEVEL", "INFO"),
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper,
                   help="logging level (default INFO)")
    p.set_defaults(func=cmd_proxy)

    # init
    p = sub.add_parser("init", help="create a tenant and its first admin key", **_fmt(
        "Create a tenant and its first admin key. The key is printed once; only its "
        "hash is stored.", "p402 init --db sqlite+aiosqlite:///p402.db --name acme-corp"))
    p.add_argument("--db", default=os.environ.get("P402_DB", DEFAULT_DB),
                   help=f"SQLAlchemy URL (env P402_DB; default {DEFAULT_DB})")
    p.add_argument("--name", default="default", help="tenant name (default 'default')")
    p.add_argument("--new-tenant", action="store_true",
                   help="create another tenant in a database that already has one (its "
                        "key sees only the new tenant's ledger); without it, init on a "
                        "database with a tenant exits 2")
    _json_flag(p)
    p.set_defaults(func=cmd_init)

    # ping
    p = sub.add_parser("ping", help="check the server and the key", **_fmt(
        "Authenticated no-op: prints the key's tenant and the server's core.",
        "p402 ping --target 127.0.0.1:4020"))
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_ping)

    # keys
    keys = sub.add_parser("keys", help="API keys", **_fmt(
        "Create, list and revoke API keys (scopes: meter, read, admin).",
        "p402 keys create --scope meter --name gateway-prod"))
    ks = keys.add_subparsers(dest="action", metavar="ACTION", required=True,
                             parser_class=_Parser)
    p = ks.add_parser("create", help="create a key (printed once)", **_fmt(
        "Create a key; the key itself is printed this once.",
        "p402 keys create --scope meter --scope read --name gateway"))
    p.add_argument("--scope", action="append", choices=("meter", "read", "admin"),
                   type=str.lower, help="scope (repeatable; default meter)")
    p.add_argument("--name", default="", help="a name to recognise the key")
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_keys_create)
    p = ks.add_parser("list", help="list keys", **_fmt("List the tenant's keys.",
                                                       "p402 keys list --json"))
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_keys_list)
    p = ks.add_parser("revoke", help="revoke a key", **_fmt(
        "Revoke a key; it fails on its next call.", "p402 keys revoke key_01J…"))
    p.add_argument("key_id")
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_keys_revoke)
    p = ks.add_parser("evidence", help="the tenant's evidence keys (receipts, exports)", **_fmt(
        "The tenant's evidence keys: Ed25519 keys that sign receipts and export "
        "digests. --public prints the public key set (JSON Web Keys) anyone needs to "
        "verify them, the same as /.well-known/p402-keys.json?tenant=ID on the HTTP "
        "port; --rotate makes a new active key (admin) and keeps the old one "
        "published as retired, so what it signed still verifies.",
        "p402 keys evidence --public > keys.json"))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--public", action="store_true",
                   help="print the public key set as JSON (the default)")
    g.add_argument("--rotate", action="store_true", help="rotate the active key (admin)")
    _remote(p)
    p.set_defaults(func=cmd_keys_evidence)

    # receipts
    receipts = sub.add_parser("receipts", help="signed receipts of ledger events", **_fmt(
        "Signed receipts: one event as a compact JSON document signed with the tenant's "
        "evidence key (no content, ever). Anyone checks one offline with the public "
        "key set alone.",
        "p402 receipts get evt_01J… > r.json && p402 receipts verify r.json --keys keys.json"))
    rs = receipts.add_subparsers(dest="action", metavar="ACTION", required=True,
                                 parser_class=_Parser)
    p = rs.add_parser("get", help="print an event's receipt", **_fmt(
        "Print the signed receipt of a committed event (read scope).",
        "p402 receipts get evt_01J… > receipt.json"))
    p.add_argument("event_id")
    _remote(p)
    p.set_defaults(func=cmd_receipts_get)
    p = rs.add_parser("verify", help="check a receipt offline", **_fmt(
        "Check a receipt against a public key set: exit 0 when valid, 1 when altered "
        "or signed by a key not in the set, 2 on bad usage (unreadable file or keys). "
        "Needs no server and no API key.",
        "p402 receipts verify receipt.json --keys keys.json\n"
        "  p402 receipts verify receipt.json --keys "
        "'http://127.0.0.1:4021/.well-known/p402-keys.json?tenant=t_01J…'"))
    p.add_argument("file", metavar="FILE", help="the receipt (JSON), or - for stdin")
    p.add_argument("--keys", required=True, metavar="FILE|URL",
                   help="the public key set: a JSON file, or an http(s) URL")
    _json_flag(p)
    p.set_defaults(func=cmd_receipts_verify)

    # statements
    sts = sub.add_parser("statements", help="closed monthly statements per customer", **_fmt(
        "Statements: a month's spend of one customer, closed once and signed with the "
        "tenant's evidence key (lines by feature and model, totals of cost and revenue, "
        "the ledger range it covers). Closing again gives the same statement; events "
        "that arrive late for a closed month go into the next statement as adjustments.",
        "p402 statements close --period 2026-11 --format csv"))
    ss2 = sts.add_subparsers(dest="action", metavar="ACTION", required=True,
                             parser_class=_Parser)
    p = ss2.add_parser("close", help="close a month (admin)", **_fmt(
        "Close a month (UTC, YYYY-MM) that has ended, for one customer or every customer "
        "with spend in it; prints the statements (JSON list, or CSV).",
        "p402 statements close --period 2026-11 --customer acme"))
    p.add_argument("--period", required=True, help="the month, YYYY-MM (UTC)")
    p.add_argument("--customer", default=None, help="one customer (default: every one)")
    p.add_argument("--format", choices=("json", "csv"), default="json")
    _remote(p)
    p.set_defaults(func=cmd_statements_close)
    p = ss2.add_parser("show", help="print a closed statement", **_fmt(
        "Print one closed statement (JSON, or CSV).",
        "p402 statements show --period 2026-11 --customer acme > st.json"))
    p.add_argument("--period", required=True)
    p.add_argument("--customer", required=True)
    p.add_argument("--format", choices=("json", "csv"), default="json")
    _remote(p)
    p.set_defaults(func=cmd_statements_show)
    p = ss2.add_parser("verify", help="check a statement", **_fmt(
        "Check a statement: its signature against a public key set (--keys, offline), "
        "and with --export against an export of the ledger (`p402 export`: its chain "
        "and digest checked, every line recomputed from its rows); or, with --ledger, "
        "against the server's ledger. Exit 0 valid, 1 altered or not backed by the "
        "ledger or export, 2 bad usage.",
        "p402 statements verify st.json --keys keys.json --export ledger.jsonl\n"
        "  p402 statements verify st.json --ledger"))
    p.add_argument("file", metavar="FILE", help="the statement (JSON), or - for stdin")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--keys", metavar="FILE|URL", help="the public key set (offline check)")
    g.add_argument("--ledger", action="store_true",
                   help="recompute it from the server's ledger (read scope)")
    p.add_argument("--export", metavar="FILE", default=None,
                   help="with --keys: recompute it from this export (jsonl, csv or focus)")
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_statements_verify)

    # billing exports
    bill = sub.add_parser("billing", help="usage events for billing systems", **_fmt(
        "Billing exports: a month's (or a time range's) ledger events as Stripe Billing "
        "meter events, OpenMeter CloudEvents or Lago events, one per event that cost or "
        "sold something, keyed by the event id so re-exporting never bills twice "
        "(formats: server/p402_server/billing.py). JSON lines on stdout or --output.",
        "p402 billing export --period 2026-11 --format stripe --output meter_events.jsonl"))
    bs2 = bill.add_subparsers(dest="action", metavar="ACTION", required=True,
                              parser_class=_Parser)
    p = bs2.add_parser("export", help="export a month's events (read scope)", **_fmt(
        "Export a month's events (by event time, UTC), or exactly the events a closed "
        "statement covers (its lines and adjustments), for billing.",
        "p402 billing export --period 2026-11 --customer acme --format openmeter\n"
        "  p402 billing export --statement st.json --format stripe"))
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--period", help="the month, YYYY-MM (UTC)")
    g.add_argument("--statement", metavar="FILE",
                   help="a statement (JSON, `p402 statements show`): its events")
    p.add_argument("--customer", default=None, help="one customer (default: every one)")
    p.add_argument("--format", required=True, choices=("stripe", "openmeter", "lago"))
    p.add_argument("--name", default="", help="meter event name / CloudEvents type / "
                                              "Lago code (a default per format)")
    p.add_argument("--value", default="revenue", choices=("revenue", "cost"),
                   help="Stripe's value: revenue (default) or cost, in micro-USD")
    p.add_argument("--customer-map", default=None, metavar="FILE",
                   help="JSON {p402 customer: billing system customer id}")
    p.add_argument("--output", "-o", default="-", help="a file (default stdout)")
    _remote(p)
    p.set_defaults(func=cmd_billing_export)

    # the price book
    pb = sub.add_parser("pricebook", help="what the tenant charges its customers", **_fmt(
        "The tenant's price book: cost-plus percentages, per-model sell prices (per "
        "token and per unit), per-customer overrides and a minimum per call. A Record "
        "that carries no revenue is sold at it, so margin per customer and feature is "
        "complete. The document's format is in server/p402_server/pricebook.py.",
        "p402 pricebook set book.json && p402 pricebook show"))
    pbs = pb.add_subparsers(dest="action", metavar="ACTION", required=True,
                            parser_class=_Parser)
    p = pbs.add_parser("set", help="replace the price book (admin)", **_fmt(
        "Replace the price book with a JSON file ({} removes it). Example file: "
        '{"markup_pct": "20", "min_per_call_usd": "0.0005", "models": {"gpt-4o": '
        '{"markup_pct": "35"}}, "customers": {"acme": {"markup_pct": "10"}}}',
        "p402 pricebook set book.json"))
    p.add_argument("file", metavar="FILE", help="the price book (JSON), or - for stdin")
    _remote(p)
    p.set_defaults(func=cmd_pricebook_set)
    p = pbs.add_parser("show", help="print the price book and its version", **_fmt(
        "Print the price book (JSON) with its version.", "p402 pricebook show"))
    _remote(p)
    p.set_defaults(func=cmd_pricebook_show)

    # budgets
    budgets = sub.add_parser("budgets", help="budgets", **_fmt(
        "Create, list and delete budgets. Money in USD.",
        "p402 budgets set acme-monthly --limit 25.00 --scope customer=acme"))
    bs = budgets.add_subparsers(dest="action", metavar="ACTION", required=True,
                                parser_class=_Parser)
    p = bs.add_parser("set", help="create or replace a budget", **_fmt(
        "Create or replace a budget. A HARD budget denies calls past its limit; "
        "--soft only warns. A budget created in the middle of a period starts from the "
        "spend already in the ledger for its scope and period (not from zero); "
        "replacing one (a new limit) keeps what its period has committed.",
        "p402 budgets set acme-monthly --limit 25.00 --period month --soft-limit 20 "
        "--scope customer=acme --scope label.env=prod"))
    p.add_argument("budget_id", metavar="ID")
    p.add_argument("--limit", required=True, help="limit in USD, e.g. 25.00")
    p.add_argument("--period", default="month", choices=PERIODS, type=str.lower,
                   help="UTC calendar period (default month)")
    p.add_argument("--soft-limit", default=None, help="warn above this (USD)")
    p.add_argument("--soft", action="store_true",
                   help="enforcement SOFT: warn instead of deny at the limit")
    p.add_argument("--scope", action="append", metavar="KEY=VALUE",
                   help="owner dimension or label.<key> that must match (repeatable; "
                        "none = the whole tenant)")
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_budgets_set)
    p = bs.add_parser("list", help="list budgets and where they stand", **_fmt(
        "List budgets with committed, held and remaining amounts.",
        "p402 budgets list"))
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_budgets_list)
    p = bs.add_parser("delete", help="delete a budget", **_fmt(
        "Delete a budget.", "p402 budgets delete acme-monthly"))
    p.add_argument("budget_id", metavar="ID")
    _remote(p)
    p.set_defaults(func=cmd_budgets_delete)

    # policies
    policies = sub.add_parser("policies", help="policy rules", **_fmt(
        "Create, list, delete and load policy rules.",
        "p402 policies set rl-acme --effect rate_limit --rate-limit 60 --window 60 "
        "--per customer"))
    ps = policies.add_subparsers(dest="action", metavar="ACTION", required=True,
                                 parser_class=_Parser)
    p = ps.add_parser("set", help="create or replace a rule", **_fmt(
        "Create or replace a policy rule: a match (owners, models, providers, "
        "privacy modes; all must hold) and an effect with its parameters.",
        "p402 policies set need-customer --effect require_owners --require-owner customer"))
    p.add_argument("rule_id", metavar="ID")
    p.add_argument("--effect", required=True, choices=EFFECTS, type=str.lower)
    p.add_argument("--match", action="append", metavar="KEY=VALUE",
                   help="owner dimension or label.<key> to match (repeatable)")
    p.add_argument("--model", action="append", metavar="GLOB",
                   help="models to match (repeatable; globs)")
    p.add_argument("--provider", action="append", help="providers to match (repeatable)")
    p.add_argument("--privacy-mode", action="append", choices=PRIVACY_MODES,
                   type=str.lower, help="privacy modes to match (repeatable)")
    p.add_argument("--require-owner", action="append", choices=OWNER_KEYS,
                   help="REQUIRE_OWNERS: owner dimension that must be set (repeatable)")
    p.add_argument("--allow-model", action="append", metavar="GLOB",
                   help="ALLOW_MODELS: allowed model globs (repeatable)")
    p.add_argument("--max-output-tokens", help="MAX_OUTPUT_TOKENS: the clamp")
    p.add_argument("--max-cost", help="MAX_COST_PER_REQUEST: USD per request")
    p.add_argument("--rate-limit",
                   help="RATE_LIMIT: requests or tokens per window (USD with "
                        "--rate-unit cost)")
    p.add_argument("--rate-unit", default="requests", choices=("requests", "tokens", "cost"),
                   type=str.lower, help="RATE_LIMIT unit (default requests)")
    p.add_argument("--window", "--window-seconds", dest="window", default="60",
                   help="RATE_LIMIT window in seconds (default 60)")
    p.add_argument("--per", default="", choices=("",) + OWNER_KEYS,
                   help="RATE_LIMIT: one bucket per value of this owner dimension")
    p.add_argument("--allowed-privacy-mode", action="append", choices=PRIVACY_MODES,
                   type=str.lower, help="PRIVACY: allowed modes (repeatable)")
    p.add_argument("--message", default="", help="message shown with the decision")
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_policies_set)
    p = ps.add_parser("list", help="list rules", **_fmt("List policy rules.",
                                                        "p402 policies list --json"))
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_policies_list)
    p = ps.add_parser("delete", help="delete a rule", **_fmt(
        "Delete a policy rule.", "p402 policies delete rl-acme"))
    p.add_argument("rule_id", metavar="ID")
    _remote(p)
    p.set_defaults(func=cmd_policies_delete)
    p = ps.add_parser("load", help="load rules from a JSON file", **_fmt(
        "Put every rule of a JSON file: a list of rules, or {\"rules\": [...]}. Keys "
        "are the rule fields (rule_id, effect, owners, models, require_owners, "
        "rate_limit, rate_unit, window_seconds, per, max_cost (USD string) …).",
        "p402 policies load policies.json --replace"))
    p.add_argument("file", metavar="FILE.json")
    p.add_argument("--replace", action="store_true",
                   help="also delete rules that are not in the file")
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_policies_load)

    # prices
    prices = sub.add_parser("prices", help="model prices", **_fmt(
        "Import tenant price overrides and list the effective prices.",
        "p402 prices import --from-litellm-package"))
    prs = prices.add_subparsers(dest="action", metavar="ACTION", required=True,
                                parser_class=_Parser)
    p = prs.add_parser("import", help="import a price map", **_fmt(
        "Import a price map as tenant overrides (LiteLLM's JSON format). Where the map "
        "comes from: the `litellm` package ships one "
        f"({LITELLM_BUNDLED_MAP} inside the package: --from-litellm-package reads "
        "it), and LiteLLM's repository publishes the current one as "
        f"{LITELLM_MAP_URL} (download it, then give its path). Any file name is fine.",
        "p402 prices import --from-litellm-package\n"
        f"  curl -sSLO {LITELLM_MAP_URL}\n"
        "  p402 prices import model_prices_and_context_window.json"))
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("file", metavar="FILE", nargs="?",
                   help="a LiteLLM price-map JSON file (any name)")
    g.add_argument("--from-litellm-package", action="store_true",
                   help=f"the map bundled with the installed litellm package "
                        f"({LITELLM_BUNDLED_MAP}; pip install litellm, or "
                        "pip install -e '.[litellm]' in a checkout)")
    p.add_argument("--format", default="litellm", choices=("litellm",))
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_prices_import)
    p = prs.add_parser("list", help="list prices", **_fmt(
        "List prices per million tokens.", "p402 prices list --model gpt-4o"))
    p.add_argument("--model", default="", help="substring of the model name")
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_prices_list)

    # events
    p = sub.add_parser("events", help="recent ledger events", **_fmt(
        "Recent ledger events, newest first.",
        "p402 events --since 24h --customer acme --limit 50"))
    _filters(p)
    p.add_argument("--limit", default="20", help="at most this many events (default 20)")
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_events)

    # spend
    p = sub.add_parser("spend", help="spend grouped by owner, model, time …", **_fmt(
        "Spend grouped by the given keys, highest cost first, with a totals row. "
        f"Keys: {', '.join(GROUP_KEYS)}.",
        "p402 spend --by customer,feature --since 7d"))
    p.add_argument("--by", default="customer",
                   help="comma-separated group keys (default customer)")
    _filters(p)
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_spend)

    # export
    p = sub.add_parser("export", help="export events as CSV, JSONL or FinOps FOCUS",
                       **_fmt(
        "Every matching event in ledger order: every economic field, the hash chain "
        "(chain_index, prev_chain_hash, chain_hash) and no content. The export ends "
        "with a digest signed by the tenant's evidence key: the last line of a JSONL "
        "file ({\"digest\": ...}); for CSV and FOCUS files a sidecar FILE.digest.json "
        "(on stdout with --digest: a trailing '# digest {...}' line). Check it with "
        "`p402 verify --file`.",
        "p402 export --format focus --since 30d --output events.csv"))
    p.add_argument("--format", default="csv", choices=("csv", "jsonl", "focus"),
                   type=str.lower)
    p.add_argument("--output", "-o", default="-", help="file to write (default stdout)")
    p.add_argument("--digest", action=argparse.BooleanOptionalAction, default=None,
                   help="write the signed digest (default: yes to a file, no to stdout)")
    _filters(p)
    _remote(p)
    p.set_defaults(func=cmd_export)

    # verify
    p = sub.add_parser("verify", help="check the ledger's hash chain or an export",
                       **_fmt(
        "Check the hash chain of every tenant in a database (--db), or of an export "
        "file and its signed digest (--file). Names the first bad position. Exit 0 "
        "intact, 1 broken, 2 bad input (a missing file or database, or one that "
        "cannot be read: never created by this command).",
        "p402 verify --file events.jsonl"))
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--db", help="SQLAlchemy URL of a P402 database")
    g.add_argument("--file", help="an export file (csv, jsonl or focus)")
    p.add_argument("--tenant", help="only this tenant (with --db)")
    p.add_argument("--public-key", help="hex Ed25519 key the digest must be signed by "
                                        "(Settings.evidence_public_key); default: the "
                                        "key named in the digest")
    _json_flag(p)
    p.set_defaults(func=cmd_verify)

    # contents
    contents = sub.add_parser("contents", help="kept prompts and responses", **_fmt(
        "Content kept under redacted_trace / full_trace lives in its own table with a "
        "retention period; the server purges it in the background.",
        "p402 contents purge --db sqlite:///p402.db"))
    cs = contents.add_subparsers(dest="action", metavar="ACTION", required=True,
                                 parser_class=_Parser)
    p = cs.add_parser("purge", help="delete content past its retention now", **_fmt(
        "Delete every kept prompt/response whose retention has passed.",
        "p402 contents purge --db sqlite:///p402.db"))
    p.add_argument("--db", default=os.environ.get("P402_DB", DEFAULT_DB),
                   help=f"SQLAlchemy URL (env P402_DB; default {DEFAULT_DB})")
    _json_flag(p)
    p.set_defaults(func=cmd_contents_purge)

    # settings
    settings = sub.add_parser("settings", help="tenant settings", **_fmt(
        "Show or change the tenant's settings.", "p402 settings set --hold-ttl 600"))
    ss = settings.add_subparsers(dest="action", metavar="ACTION", required=True,
                                 parser_class=_Parser)
    p = ss.add_parser("get", help="show settings", **_fmt("Show the settings.",
                                                          "p402 settings get --json"))
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_settings_get)
    p = ss.add_parser("set", help="change settings", **_fmt(
        "Change only the settings given.",
        "p402 settings set --hold-ttl 600 --allow-clamp"))
    p.add_argument("--hold-ttl", "--hold-ttl-seconds", dest="hold_ttl_seconds",
                   help="reservation lifetime in seconds")
    p.add_argument("--default-output-tokens", help="output cap when a call gives none")
    p.add_argument("--default-privacy-mode", choices=PRIVACY_MODES, type=str.lower)
    p.add_argument("--allow-clamp", action=argparse.BooleanOptionalAction, default=None,
                   help="answer ALLOW with a smaller output cap instead of DENY")
    p.add_argument("--allow-unknown-models", action=argparse.BooleanOptionalAction,
                   default=None, help="price unknown models at the fallback price")
    p.add_argument("--fallback-input-pico-per-token",
                   help="fallback input price (pico-USD per token)")
    p.add_argument("--fallback-output-pico-per-token",
                   help="fallback output price (pico-USD per token)")
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_settings_set)

    # bench
    p = sub.add_parser("bench", help="run the benchmarks", **_fmt(
        "Run each benchmarks/bench_*.py script in its own process and report its "
        "output.", "p402 bench --quick"))
    p.add_argument("--quick", action="store_true", help="short runs (P402_BENCH_QUICK=1)")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="only scripts whose name contains NAME (repeatable)")
    p.add_argument("--dir", default=None, help="benchmarks directory")
    p.add_argument("--report-dir", default=os.environ.get("P402_BENCH_REPORTS") or None,
                   metavar="DIR",
                   help="where the Markdown report and latency SVG go (env "
                        "P402_BENCH_REPORTS; default "
                        f"{_pretty_home(default_report_dir())}, outside the source tree)")
    p.set_defaults(func=cmd_bench)

    # demo
    p = sub.add_parser("demo", help="a self-contained tour on a temporary database",
                       **_fmt("Start a server on a temporary SQLite file, create a "
                              "tenant, budgets and policies, send a realistic mix of "
                              "calls through the Python client, and print the ledger "
                              "and the spend.", "p402 demo --keep-running"))
    p.add_argument("--db", default=None,
                   help="SQLAlchemy URL (default: a temporary SQLite file)")
    p.add_argument("--listen", default=None,
                   help="HOST:PORT (default: a free port on 127.0.0.1; with "
                        f"--keep-running, P402_LISTEN or {DEFAULT_LISTEN})")
    p.add_argument("--keep-running", action="store_true",
                   help="keep serving after the tour, until Ctrl-C")
    p.add_argument("--http", default=os.environ.get("P402_HTTP") or None,
                   metavar="HOST:PORT",
                   help="also serve the ledger dashboard at http://HOST:PORT/dashboard/ "
                        "and print its URL and a read key (env P402_HTTP; with "
                        "--keep-running it stays up)")
    p.add_argument("--seed", type=int, default=402, help="random seed (default 402)")
    p.add_argument("--workflow", default=None,
                   choices=("support", "code-review", "extraction", "finance", "all"),
                   help="run a vertical workflow (p402_server.demo_workflows) instead "
                        "of the tour")
    p.set_defaults(func=cmd_demo)
    return parser


# ------------------------------------------------------------------ commands: local


def _listen_check(flag: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(flag, f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:4020)")


def cmd_serve(args: argparse.Namespace, out: Output) -> int:
    _listen_check("--listen", args.listen)
    if args.max_concurrent_rpcs is not None and args.max_concurrent_rpcs <= 0:
        raise UsageError("--max-concurrent-rpcs", "must be > 0")
    import p402core

    # Before anything starts: a build without the compiled core fails here, with
    # the way out, and the start-up log names the core that really loaded.
    core = p402core.load(p402core.IMPLEMENTATION).check()
    from . import logs

    logs.configure(args.log_level, args.log_format)
    if args.log_level != "DEBUG":  # migration chatter is not news on every start
        logging.getLogger("alembic").setLevel(logging.WARNING)
    from . import server

    kwargs: dict[str, Any] = {}
    if args.max_concurrent_rpcs is not None:
        kwargs["max_concurrent_rpcs"] = args.max_concurrent_rpcs
    if args.http:  # the dashboard, in the same process and loop
        _listen_check("--http", args.http)
        from .dashboard import DashboardConfig

        kwargs["http"] = args.http
        kwargs["dashboard_config"] = DashboardConfig(
            secure_cookies=True if args.http_secure_cookies else None)
    if args.ext_authz:  # Envoy ext_authz on the same port (p402_server.envoy)
        try:
            from .envoy import EnvoyConfig
        except ImportError as exc:
            raise UsageError("--ext-authz", f"needs xds-protos (pip install "
                             f"'p402[envoy]'): {exc}") from None
        kwargs["ext_authz"] = EnvoyConfig(
            provider=args.ext_authz_provider,
            strip_authorization=args.ext_authz_strip_authorization)
    # Scale-out (issue 7): leases on/off, and --workers N (workers.py).
    if args.workers < 1:
        raise UsageError("--workers", "must be >= 1")
    if args.workers > 1 and args.lease == "off":
        raise UsageError("--lease", "several workers share budgets: leases must be on")
    kwargs["leases"] = args.lease == "on" or args.workers > 1
    if args.no_metrics:
        kwargs["metrics"] = False
    if args.otel_endpoint:
        kwargs["otel_endpoint"] = args.otel_endpoint
    logging.getLogger("p402.cli").info("p402 serve: starting (db %s, listen %s, core: %s)",
                                       _redact_url(args.db), args.listen, core.describe())
    if args.workers > 1:
        from .workers import run_workers

        return run_workers(args.workers, args.db, args.listen, **kwargs)
    server.run(args.db, args.listen, **kwargs)
    return 0


def cmd_proxy(args: argparse.Namespace, out: Output) -> int:
    """`p402 proxy` (p402_server.proxy)."""
    _listen_check("--listen", args.listen)
    if not args.upstream.startswith(("http://", "https://")):
        raise UsageError("--upstream", f"{args.upstream!r} is not an http(s) URL")
    if args.upstream_timeout <= 0:
        raise UsageError("--upstream-timeout", "must be > 0 seconds")
    upstream_key = os.environ.get(args.upstream_key_env, "")
    target = None if args.db else (args.target or os.environ.get("P402_TARGET",
                                                                  DEFAULT_TARGET))
    if args.lease == "on" and not args.db:
        raise UsageError("--lease", "leases are held by the process that decides: use "
                         "it with --db (with --target the server holds them)")
    from . import logs

    logs.configure(args.log_level, args.log_format)
    if args.log_level != "DEBUG":
        logging.getLogger("alembic").setLevel(logging.WARNING)
    from .proxy import ProxyConfig, serve_proxy

    if not upstream_key:  # a local upstream (vLLM, Ollama) may take none
        logging.getLogger("p402.cli").warning(
            "p402 proxy: $%s is empty; forwarding without an upstream key",
            args.upstream_key_env)
    config = ProxyConfig(upstream=args.upstream, upstream_key=upstream_key,
                         provider=args.provider, upstream_timeout=args.upstream_timeout)
    logging.getLogger("p402.cli").info(
        "p402 proxy: %s -> %s (P402 %s)", args.listen, config.upstream_base,
        f"embedded on {_redact_url(args.db)}" if args.db else target)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve_proxy(config, args.listen, target=target, db=args.db,
                                leases=args.lease == "on"))
    else:
        uvloop.run(serve_proxy(config, args.listen, target=target, db=args.db,
                               leases=args.lease == "on"))
    return 0


def _redact_url(url: str) -> str:
    # Never log a database password.
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)


async def _init_tenant(db: str, name: str, new_tenant: bool = False) -> tuple[str, str]:
    from .server import init_tenant
    from .store import open_store

    store = await open_store(db)
    try:
        existing = await store.list_tenants()
        if existing and not new_tenant:
            names = ", ".join(f"{t.name} ({t.tenant_id})" for t in existing[:3])
            more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
            raise UsageError("init", (
                f"{_redact_url(db)} already has {len(existing)} tenant(s): {names}{more}. "
                "A new tenant's key would see only its own, empty ledger. For another "
                "key of an existing tenant use `p402 keys create --scope admin` with "
                "its admin key; to create another tenant anyway, add --new-tenant."))
        return await init_tenant(store, name)
    finally:
        await store.close()


def cmd_init(args: argparse.Namespace, out: Output) -> int:
    if not args.name.strip():
        raise UsageError("--name", "must not be empty")
    tenant, api_key = _run_store(args.db, _init_tenant(args.db, args.name,
                                                       args.new_tenant))
    if args.json:
        out.json({"tenant": tenant, "api_key": api_key})
        return 0
    out.print(f"[bold]Tenant[/bold] {tenant} ({args.name}) created in {_redact_url(args.db)}")
    out.print(f"[bold]Admin API key[/bold] (shown once, store it now): {api_key}")
    out.print("\nNext:\n"
              f"  export P402_API_KEY={api_key}\n"
              f"  p402 serve --db {args.db}\n"
              "  p402 budgets set monthly --limit 100.00\n"
              "  p402 keys create --scope meter --name gateway", markup=False)
    return 0


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


# ------------------------------------------------------------------ commands: remote


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


def cmd_ping(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        pong = p402.ping()
    if args.json:
        out.json(pong.to_dict())
    else:
        out.print(f"ok: tenant {pong.tenant}, core {pong.implementation}, "
                  f"server {args.target}")
    return 0


def _key_row(k: Any) -> list[Any]:
    return [k.key_id, k.name, k.prefix + "…", ",".join(s.lower() for s in k.scopes),
            _ms_str(k.create_time_ms), _ms_str(k.revoke_time_ms) or "active"]


_KEY_COLS = ["key id", "name", "prefix", "scopes", "created (UTC)", "revoked (UTC)"]


def cmd_keys_create(args: argparse.Namespace, out: Output) -> int:
    scopes = args.scope or ["meter"]
    with _client(args) as p402:
        created = p402.create_key(args.name, scopes)
    if args.json:
        out.json(created.to_dict())
        return 0
    out.print(f"Key {created.key.key_id} ({', '.join(scopes)}) created. "
              "Shown once, store it now:")
    out.print(created.api_key, markup=False)
    return 0


def cmd_keys_list(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        keys = list(p402.paginate(p402.list_keys))
    if args.json:
        out.json([k.to_dict() for k in keys])
        return 0
    out.table("API keys", _KEY_COLS, (_key_row(k) for k in keys),
              drop=("prefix", "created (UTC)"))
    return 0


def cmd_keys_revoke(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        key = p402.revoke_key(args.key_id)
    if args.json:
        out.json(key.to_dict())
    else:
        out.print(f"Key {key.key_id} revoked.")
    return 0


def cmd_billing_export(args: argparse.Namespace, out: Output) -> int:
    from . import billing, statements
    from .store.model import LedgerEvent

    doc = None
    if args.statement:
        try:
            doc = json.loads(_read_text("--statement", args.statement))
            start, end = doc["period_start_ms"], doc["period_end_ms"]
            args.customer = doc["customer"]
            # late events of the months closed before it may be adjustments
            for month in doc["closed_before"]:
                start = min(start, statements.period_bounds(month)[0])
            end = max(end, int(time.time() * 1000) + 86_400_000)  # events committed since, of closed months
        except (ValueError, KeyError, TypeError, InvalidArgument) as exc:
            raise UsageError("--statement", f"not a P402 statement: {exc}") from None
    else:
        try:
            start, end = statements.period_bounds(args.period)
        except InvalidArgument as exc:
            raise UsageError("--period", exc.message) from None
    customers = None
    if args.customer_map:
        try:
            customers = json.loads(_read_text("--customer-map", args.customer_map))
        except ValueError as exc:
            raise UsageError("--customer-map", f"not JSON: {exc}") from None
        if not isinstance(customers, dict):
            raise UsageError("--customer-map", "must be a JSON object")
    filters: dict[str, Any] = {"since": start, "until": end}
    if args.customer is not None:
        filters["owners"] = {"customer": args.customer}
    events = []
    with _client(args) as p402:
        tenant_id = p402.ping().tenant
        for e in p402.iter_query(page_size=1000, **filters):
            u = e.usage
            events.append(LedgerEvent(
                tenant_id=tenant_id, event_id=e.event_id, event_ms=e.event_time_ms,
                customer=e.owners.customer, feature=e.owners.feature,
                workflow=e.owners.workflow, model=e.model, provider=e.provider,
                input_tokens=u.input_tokens, cached_input_tokens=u.cached_input_tokens,
                cache_write_tokens=u.cache_write_tokens, output_tokens=u.output_tokens,
                reasoning_tokens=u.reasoning_tokens, units=dict(u.units),
                service_tier=u.service_tier, cost_nanos=e.cost_nanos,
                revenue_nanos=e.revenue_nanos, chain_index=e.chain_index))
    if doc is not None:
        regular, late = statements.select(doc, events)
        events = regular + late
    events.sort(key=lambda ev: (ev.event_ms, ev.event_id))
    try:
        rows = billing.export(events, args.format, tenant_id=tenant_id, name=args.name,
                              value=args.value, customers=customers)
    except InvalidArgument as exc:
        raise UsageError("--" + exc.field if exc.field != "customer" else "--customer-map",
                         exc.message) from None
    text = "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in rows)
    if args.output in ("-", ""):
        sys.stdout.write(text)
    else:
        try:
            with open(args.output, "w", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as exc:
            raise UsageError("--output", f"{args.output}: {exc.strerror}") from None
        out.err.print(f"{len(rows)} event(s) written to {args.output}")
    return 0


def _print_statements(out: Output, docs: list[dict], fmt: str) -> None:
    from .statements import to_csv

    if fmt == "csv":
        for i, d in enumerate(docs):
            text = to_csv(d)
            out.print(text if i == 0 else text.split("\n", 1)[1], markup=False,
                      soft_wrap=True, highlight=False, end="")
    else:
        out.json(docs)


def cmd_statements_close(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        docs = p402.close_statements(args.period, args.customer)
    _print_statements(out, docs, args.format)
    return 0


def cmd_statements_show(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        doc = p402.get_statement(args.period, args.customer)
    if args.format == "csv":
        _print_statements(out, [doc], "csv")
    else:
        out.json(doc)
    return 0


def cmd_statements_verify(args: argparse.Namespace, out: Output) -> int:
    """Exit 0 when the statement holds, 1 when altered or not backed by the ledger."""
    from . import statements

    text = _read_text("FILE", args.file).strip()
    if args.ledger:
        with _client(args) as p402:
            v = p402.verify_statement(text)
        ok, reason, diff = v["ok"], v["reason"], v["differences"]
    else:
        if args.export and args.ledger:
            raise UsageError("--export", "goes with --keys, not --ledger")
        ok, reason, doc = statements.verify_document(text, _key_set(args.keys))
        diff = []
        if ok and args.export:
            ok, reason, diff = _statement_vs_export(doc, args.export)
    if args.json:
        out.json({"ok": ok, "reason": reason, "differences": diff})
    else:
        out.print("OK: statement intact" + (" and backed by the ledger" if args.ledger else
                                            " (signature)") if ok else f"INVALID: {reason}",
                  markup=False)
    return 0 if ok else 1


def _statement_vs_export(doc: dict, path: str) -> tuple[bool, str, list[str]]:
    """A statement recomputed from an export's rows (whose chain and digest must hold)."""
    from . import statements
    from .evidence import BadInput, ledger_event, read_export, verify_rows

    try:
        fmt, rows, digest = read_export(path)
    except BadInput as exc:
        raise UsageError("--export", str(exc)) from None
    v = verify_rows(rows, digest, fmt=fmt)
    if not v.ok:
        return False, f"the export is broken: {v.reason}", []
    events = [ledger_event(r, doc["tenant_id"]) for r in rows]
    again = statements.recompute(doc, events)
    at = [e.chain_hash for e in events if e.chain_index == doc["through_index"]]
    again["head_hash"] = at[0] if at else doc["head_hash"]  # an export may end earlier
    diff = statements.differences(doc, again)
    if diff:
        return False, "the statement differs from the export: " + ", ".join(diff), diff
    return True, "", []


def cmd_pricebook_set(args: argparse.Namespace, out: Output) -> int:
    text = _read_text("FILE", args.file)
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise UsageError("FILE", f"not JSON: {exc}") from None
    with _client(args) as p402:
        book = p402.put_price_book(doc)
    out.json(book)
    return 0


def cmd_pricebook_show(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        out.json(p402.get_price_book())
    return 0


def cmd_keys_evidence(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        data = p402.rotate_evidence_key() if args.rotate else p402.evidence_keys()
    out.json(data)
    return 0


def cmd_receipts_get(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        receipt = p402.get_receipt(args.event_id)
    out.print(receipt, markup=False, soft_wrap=True, highlight=False)
    return 0


def _read_text(flag: str, path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(flag, f"{path}: {getattr(exc, 'strerror', None) or exc}") from None


def _key_set(source: str) -> dict[str, str]:
    """{kid: public key hex} from a key set file or URL (exit 2 when unreadable)."""
    from . import receipts

    if source.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(source, timeout=10) as resp:  # noqa: S310
                text = resp.read().decode("utf-8")
        except Exception as exc:  # noqa: BLE001 - any fetch failure is bad usage
            raise UsageError("--keys", f"cannot fetch {source}: {exc}") from None
    else:
        text = _read_text("--keys", source)
    try:
        keys = receipts.keys_from_set(json.loads(text))
    except ValueError as exc:
        raise UsageError("--keys", f"not JSON: {exc}") from None
    if not keys:
        raise UsageError("--keys", "no Ed25519 key in the key set")
    return keys


def cmd_receipts_verify(args: argparse.Namespace, out: Output) -> int:
    """Exit 0 when the receipt holds, 1 when altered or signed by an unknown key."""
    from . import receipts

    text = _read_text("FILE", args.file)
    keys = _key_set(args.keys)
    ok, reason, doc = receipts.verify(text.strip(), keys)
    if args.json:
        out.json({"ok": ok, "reason": reason, "event_id": (doc or {}).get("event_id"),
                  "kid": (doc or {}).get("kid"), "cost_nanos": (doc or {}).get("cost_nanos")})
    elif ok:
        out.print(f"OK: receipt of {doc['event_id']} ({usd(doc['cost_nanos'])} USD, "
                  f"chain index {doc['chain_index']}) signed by key {doc['kid']}",
                  markup=False)
    else:
        out.print(f"INVALID: {reason}", markup=False)
    return 0 if ok else 1


def _budget_dict(b: Any) -> dict[str, Any]:
    d = b.to_dict()
    d["limit_usd"] = usd(b.limit_nanos)
    d["soft_limit_usd"] = usd(b.soft_limit_nanos)
    return d


def cmd_budgets_set(args: argparse.Namespace, out: Output) -> int:
    limit = parse_usd("--limit", args.limit)
    soft = parse_usd("--soft-limit", args.soft_limit) if args.soft_limit else 0
    if soft and soft > limit:
        raise UsageError("--soft-limit", "must not exceed --limit")
    scope = parse_scope("--scope", args.scope)
    with _client(args) as p402:
        budget = p402.put_budget(args.budget_id, limit_nanos=limit, period=args.period,
                                 soft_limit_nanos=soft,
                                 enforcement="SOFT" if args.soft else "HARD",
                                 scope=scope)
    if args.json:
        out.json(_budget_dict(budget))
    else:
        where = ", ".join(f"{k}={v}" for k, v in budget.scope.items()) or "whole tenant"
        out.print(f"Budget {budget.budget_id}: {usd_short(budget.limit_nanos)} per "
                  f"{budget.period.lower()} ({budget.enforcement}), scope {where}.")
    return 0


def cmd_budgets_list(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        budgets = list(p402.paginate(p402.list_budgets))
    if args.json:
        out.json([_budget_dict(b) for b in budgets])
        return 0

    def row(b: Any) -> list[Any]:
        st = b.status
        return [b.budget_id,
                ", ".join(f"{k}={v}" for k, v in b.scope.items()) or "(tenant)",
                b.period.lower(), b.enforcement.lower(), Money(b.limit_nanos),
                Money(b.soft_limit_nanos) if b.soft_limit_nanos else "",
                Money(st.committed_nanos) if st else "",
                Money(st.held_nanos) if st else "",
                Money(st.remaining_nanos) if st else ""]

    out.table("Budgets", ["id", "scope", "period", "enforcement", ("limit", "right"),
                          ("soft limit", "right"), ("committed", "right"),
                          ("held", "right"), ("remaining", "right")],
              (row(b) for b in budgets), drop=("soft limit", "period", "held", "scope"))
    return 0


def cmd_budgets_delete(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        p402.delete_budget(args.budget_id)
    out.print(f"Budget {args.budget_id} deleted.")
    return 0


def _rule_dict(r: Any) -> dict[str, Any]:
    d = r.to_dict()
    d["max_cost_usd"] = usd(r.max_cost_nanos)
    return d


def cmd_policies_set(args: argparse.Namespace, out: Output) -> int:
    kw: dict[str, Any] = {
        "owners": parse_scope("--match", args.match),
        "models": args.model or (),
        "providers": args.provider or (),
        "privacy_modes": args.privacy_mode or (),
        "require_owners": args.require_owner or (),
        "allow_models": args.allow_model or (),
        "allowed_privacy_modes": args.allowed_privacy_mode or (),
        "per": args.per,
        "message": args.message,
    }
    effect = args.effect
    if args.max_output_tokens is not None:
        kw["max_output_tokens"] = parse_int("--max-output-tokens", args.max_output_tokens,
                                            minimum=1)
    if args.max_cost is not None:
        kw["max_cost_nanos"] = parse_usd("--max-cost", args.max_cost)
    if effect == "rate_limit" or args.rate_limit is not None:
        if args.rate_limit is None:
            raise UsageError("--rate-limit", "is required with --effect rate_limit")
        kw["rate_limit"] = (parse_usd("--rate-limit", args.rate_limit)
                            if args.rate_unit == "cost"
                            else parse_int("--rate-limit", args.rate_limit, minimum=1))
        kw["rate_unit"] = args.rate_unit
        kw["window_seconds"] = parse_int("--window", args.window, minimum=1)
    required = {"require_owners": "--require-owner", "allow_models": "--allow-model",
                "max_output_tokens": "--max-output-tokens",
                "max_cost_per_request": "--max-cost",
                "privacy": "--allowed-privacy-mode"}
    needs = {"require_owners": kw["require_owners"], "allow_models": kw["allow_models"],
             "max_output_tokens": kw.get("max_output_tokens"),
             "max_cost_per_request": kw.get("max_cost_nanos"),
             "privacy": kw["allowed_privacy_modes"]}
    if effect in needs and not needs[effect]:
        raise UsageError(required[effect], f"is required with --effect {effect}")
    with _client(args) as p402:
        rule = p402.put_policy_rule(args.rule_id, effect, **kw)
    if args.json:
        out.json(_rule_dict(rule))
    else:
        out.print(f"Rule {rule.rule_id} ({rule.effect}) saved.")
    return 0


def _rule_summary(r: Any) -> str:
    parts = []
    if r.require_owners:
        parts.append("require " + ",".join(r.require_owners))
    if r.allow_models:
        parts.append("models " + ",".join(r.allow_models))
    if r.max_output_tokens:
        parts.append(f"max output {r.max_output_tokens}")
    if r.max_cost_nanos:
        parts.append(f"max cost {usd_short(r.max_cost_nanos)}")
    if r.rate_limit:
        amount = usd_short(r.rate_limit) if r.rate_unit == "COST" else str(r.rate_limit)
        per = f" per {r.per}" if r.per else ""
        parts.append(f"{amount} {r.rate_unit.lower()}/{r.window_seconds}s{per}")
    if r.allowed_privacy_modes:
        parts.append("privacy " + ",".join(m.lower() for m in r.allowed_privacy_modes))
    if r.message:
        parts.append(repr(r.message))
    return "; ".join(parts)


def cmd_policies_list(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        rules = list(p402.paginate(p402.list_policy_rules))
    if args.json:
        out.json([_rule_dict(r) for r in rules])
        return 0

    def match(r: Any) -> str:
        bits = [f"{k}={v}" for k, v in r.owners.items()]
        bits += [f"model={m}" for m in r.models] + [f"provider={p}" for p in r.providers]
        bits += [f"privacy={m.lower()}" for m in r.privacy_modes]
        return ", ".join(bits) or "(all calls)"

    out.table("Policy rules", ["id", "effect", "match", "parameters"],
              ([r.rule_id, r.effect.lower(), match(r), _rule_summary(r)] for r in rules))
    return 0


def cmd_policies_delete(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        p402.delete_policy_rule(args.rule_id)
    out.print(f"Rule {args.rule_id} deleted.")
    return 0


def _load_rules(path: str) -> list[dict[str, Any]]:
    from p402_client.types import PolicyRule

    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except OSError as exc:
        raise UsageError("FILE", f"{path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UsageError("FILE", f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    rules = doc.get("rules") if isinstance(doc, dict) else doc
    if not isinstance(rules, list):
        raise UsageError("FILE", f"{path}: expected a list of rules or {{\"rules\": [...]}}")
    allowed = set(PolicyRule.__dataclass_fields__) | {"max_cost"}
    out = []
    for i, rule in enumerate(rules):
        where = f"rules[{i}]"
        if not isinstance(rule, dict):
            raise UsageError(where, "must be an object")
        unknown = sorted(set(rule) - allowed)
        if unknown:
            raise UsageError(f"{where}.{unknown[0]}", "unknown rule field")
        for key in ("rule_id", "effect"):
            if not rule.get(key):
                raise UsageError(f"{where}.{key}", "is required")
        rule = dict(rule)
        if "max_cost" in rule:  # money in files is a USD string, as on the command line
            rule["max_cost_nanos"] = parse_usd(f"{where}.max_cost", str(rule.pop("max_cost")))
        out.append(rule)
    ids = [r["rule_id"] for r in out]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise UsageError("FILE", f"rule_id {dupes[0]!r} appears twice")
    return out


def cmd_policies_load(args: argparse.Namespace, out: Output) -> int:
    from p402_client import InvalidArgument

    rules = _load_rules(args.file)
    deleted: list[str] = []
    with _client(args) as p402:
        for i, rule in enumerate(rules):
            rule = dict(rule)
            try:
                p402.put_policy_rule(rule.pop("rule_id"), rule.pop("effect"), **rule)
            except InvalidArgument as exc:
                raise UsageError(f"rules[{i}].{exc.field.removeprefix('rule.')}",
                                 exc.message.split(": ", 1)[-1]) from None
            except TypeError as exc:
                raise UsageError(f"rules[{i}]", str(exc)) from None
        if args.replace:
            keep = {r["rule_id"] for r in rules}
            for existing in list(p402.paginate(p402.list_policy_rules)):
                if existing.rule_id not in keep:
                    p402.delete_policy_rule(existing.rule_id)
                    deleted.append(existing.rule_id)
    if args.json:
        out.json({"loaded": [r["rule_id"] for r in rules], "deleted": deleted})
    else:
        out.print(f"Loaded {len(rules)} rule(s) from {args.file}"
                  + (f"; deleted {len(deleted)}: {', '.join(deleted)}" if deleted else "")
                  + ".")
    return 0


def litellm_bundled_map() -> Path:
    """The price map inside the installed `litellm` package (found without importing
    litellm, which is slow); UsageError when litellm is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("--from-litellm-package", "the litellm package is not installed "
                         "(pip install litellm, or pip install -e '.[litellm]' in a "
                         "checkout), or download LiteLLM's map: "
                         f"curl -sSLO {LITELLM_MAP_URL}")
    for where in spec.submodule_search_locations:
        path = Path(where) / LITELLM_BUNDLED_MAP
        if path.is_file():
            return path
    raise UsageError("--from-litellm-package", f"this litellm has no {LITELLM_BUNDLED_MAP}; "
                     f"download LiteLLM's map instead: curl -sSLO {LITELLM_MAP_URL}")


def cmd_prices_import(args: argparse.Namespace, out: Output) -> int:
    path = litellm_bundled_map() if args.from_litellm_package else Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        hint = ""
        if exc.errno == 2:
            hint = (f" (LiteLLM's map: --from-litellm-package, or download "
                    f"{LITELLM_MAP_URL})")
        raise UsageError("FILE", f"{path}: {exc.strerror}{hint}") from None
    with _client(args) as p402:
        result = p402.import_prices(data, format=args.format)
    if args.json:
        out.json(result.to_dict())
        return 0
    out.print(f"Imported {result.imported_count} price(s) from {path}; catalog "
              f"{result.catalog_version}; skipped {len(result.skipped)}.")
    for line in result.skipped[:10]:
        out.print(f"  skipped {line}", markup=False)
    if len(result.skipped) > 10:
        out.print(f"  … and {len(result.skipped) - 10} more (see --json)")
    return 0


def cmd_prices_list(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        prices = list(p402.paginate(p402.list_prices, model_filter=args.model))
    if args.json:
        out.json([p.to_dict() for p in prices])
        return 0
    out.table("Prices (USD per 1M tokens)",
              ["model", "provider", ("input", "right"), ("cached input", "right"),
               ("output", "right"), ("max output", "right"), "override"],
              ([p.model, p.provider, _per_million(p.input_pico_per_token),
                _per_million(p.cached_input_pico_per_token),
                _per_million(p.output_pico_per_token), p.max_output_tokens or "",
                "yes" if p.tenant_override else ""] for p in prices),
              drop=("max output", "cached input", "provider"))
    return 0


def _event_dict(e: Any) -> dict[str, Any]:
    d = e.to_dict()
    d["cost_usd"] = usd(e.cost_nanos)
    return d


EVENT_COLUMNS = ["time (UTC)", "kind", "customer", "feature", "model", "decision",
                 "outcome", ("in tok", "right"), ("out tok", "right"), ("cost", "right"),
                 "evidence", "reasons"]
# Left out first when the terminal is narrow (Output.table): what remains at 80
# columns is when, who, which model, the decision and the cost.
EVENT_DROP = ("kind", "evidence", "out tok", "in tok", "reasons", "feature", "outcome")


def event_row(e: Any) -> list[Any]:
    return [_ms_str(e.event_time_ms), e.kind, e.owners.customer, e.owners.feature,
            e.model, e.decision.lower(), e.outcome.lower(), e.usage.input_tokens,
            e.usage.output_tokens, Money(e.cost_nanos), e.evidence.lower(),
            ",".join(e.reasons)]


def cmd_events(args: argparse.Namespace, out: Output) -> int:
    limit = parse_int("--limit", args.limit, minimum=1)
    filters = _filter_kwargs(args)
    events = []
    with _client(args) as p402:
        for e in p402.iter_query(page_size=min(limit, 1000), **filters):
            events.append(e)
            if len(events) >= limit:
                break
    if args.json:
        out.json([_event_dict(e) for e in events])
        return 0
    out.table(f"Events (newest first, at most {limit})", EVENT_COLUMNS,
              (event_row(e) for e in events), drop=EVENT_DROP)
    return 0


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


def spend_totals(rows: Sequence[Any]) -> dict[str, int]:
    keys = ("event_count", "cost_nanos", "estimated_cost_nanos", "revenue_nanos",
            "margin_nanos")
    totals = {k: sum(getattr(r, k) for r in rows) for k in keys}
    for k in ("input_tokens", "cached_input_tokens", "cache_write_tokens",
              "output_tokens", "reasoning_tokens"):
        totals[k] = sum(getattr(r.usage, k) for r in rows)
    return totals


def print_spend(out: Output, title: str, group_by: Sequence[str], rows: Sequence[Any]
                ) -> None:
    """Spend rows with exact amounts: margin = revenue − cost on every row (revenue
    0, marked, where none was reported), so the rows add up to the totals."""
    t = spend_totals(rows)
    cols: list[Any] = list(group_by) + [("events", "right"), ("input tok", "right"),
                                        ("output tok", "right"), ("cost", "right"),
                                        ("revenue", "right"), ("margin", "right")]
    body = ([*(group_label(k, r.group.get(k, "")) for k in group_by), r.event_count,
             r.usage.input_tokens, r.usage.output_tokens, Money(r.cost_nanos),
             revenue_cell(r.revenue_nanos), Money(r.revenue_nanos - r.cost_nanos)]
            for r in rows)
    footer = (["total"] + [""] * (len(group_by) - 1)
              + [t["event_count"], t["input_tokens"], t["output_tokens"],
                 Money(t["cost_nanos"]), revenue_cell(t["revenue_nanos"]),
                 Money(t["revenue_nanos"] - t["cost_nanos"])])
    out.table(title, cols, body, footer=footer, notes=(NO_REVENUE_NOTE,),
              drop=("input tok", "output tok", "events"))


def cmd_spend(args: argparse.Namespace, out: Output) -> int:
    group_by = parse_group_by(args.by)
    filters = _filter_kwargs(args)
    with _client(args) as p402:
        rows = list(p402.iter_query(group_by=group_by, page_size=1000, **filters))
    if args.json:
        t = spend_totals(rows)
        out.json({
            "group_by": group_by,
            "rows": [dict(r.to_dict(), cost_usd=usd(r.cost_nanos),
                          revenue_usd=usd(r.revenue_nanos),
                          margin_usd=usd(r.margin_nanos)) for r in rows],
            "totals": dict(t, cost_usd=usd(t["cost_nanos"]),
                           revenue_usd=usd(t["revenue_nanos"]),
                           margin_usd=usd(t["margin_nanos"])),
        })
        return 0
    since = f" since {args.since}" if args.since else ""
    print_spend(out, f"Spend by {', '.join(group_by)}{since}", group_by, rows)
    return 0


def _csv_value(value: Any) -> Any:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False) if value else ""
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    return value


def _count_estimate(p402: Any, filters: dict[str, Any]) -> int | None:
    """How many events the export will send (for the progress bar), from spend rows."""
    try:
        rows = list(p402.iter_query(group_by=["month"], page_size=1000, **filters))
    except Exception:  # noqa: BLE001 - only a progress hint; the export decides
        return None
    return sum(r.event_count for r in rows)


def cmd_export(args: argparse.Namespace, out: Output) -> int:
    """ExportEvents -> rows (evidence.py formats), then the signed digest the server
    sends in the call's trailing metadata."""
    import grpc
    from p402.v1 import meter_pb2, meter_pb2_grpc
    from p402_client import _convert

    from .evidence import DIGEST_HEADER, ExportWriter, event_row

    filters = _filter_kwargs(args)
    args.api_key = _api_key(args.api_key)
    to_file = args.output not in ("-", "")
    with_digest = to_file if args.digest is None else args.digest
    sidecar = to_file and args.format in ("csv", "focus")
    if to_file:
        try:
            fh = open(args.output, "w", encoding="utf-8", newline="")
        except OSError as exc:
            raise UsageError("--output", f"{args.output}: {exc.strerror}") from None
    else:
        fh = sys.stdout
    count = 0
    progress = task = None
    try:
        with _client(args) as p402:
            if to_file:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress,
                                           TextColumn, TimeElapsedColumn)

                total = _count_estimate(p402, filters)
                progress = Progress(TextColumn("exporting"), BarColumn(),
                                    MofNCompleteColumn(), TimeElapsedColumn(),
                                    console=out.err, transient=False)
                progress.start()
                task = progress.add_task("export", total=total)
        writer = ExportWriter(fh, args.format)
        req = meter_pb2.ExportEventsRequest(filter=_convert.event_filter(**filters))
        with grpc.insecure_channel(args.target) as channel:
            call = meter_pb2_grpc.MeterServiceStub(channel).ExportEvents(
                req, metadata=(("authorization", f"Bearer {args.api_key}"),))
            try:
                for pb in call:
                    writer.row(event_row(pb))
                    count += 1
                    if progress is not None and count % 256 == 0:
                        progress.update(task, completed=count)
                trailing = dict(call.trailing_metadata() or ())
            except grpc.RpcError as err:
                from p402_client.errors import from_rpc_error

                raise from_rpc_error(err) from None
        digest = json.loads(trailing[DIGEST_HEADER]) if DIGEST_HEADER in trailing else None
        if with_digest and digest is not None:
            if sidecar:
                with open(args.output + ".digest.json", "w", encoding="utf-8") as dfh:
                    json.dump(digest, dfh, sort_keys=True, indent=2)
                    dfh.write("\n")
            else:
                writer.digest(digest)
    finally:
        if progress is not None:
            progress.update(task, completed=count, total=count)
            progress.stop()
        if to_file:
            fh.close()
        else:
            fh.flush()
    if to_file:
        out.err.print(f"Exported {count} event(s) to {args.output}.")
    return 0


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    """Exit 0 when the chain (and digest) hold, 1 when broken, 2 on bad input."""
    from .evidence import BadInput, read_export, verify_rows

    if args.file:
        try:
            fmt, rows, digest = read_export(args.file)
            sidecar = args.file + ".digest.json"
            if digest is None and os.path.exists(sidecar):
                with open(sidecar, encoding="utf-8") as fh:
                    digest = json.load(fh)
            v = verify_rows(rows, digest, public_key=args.public_key, fmt=fmt)
        except BadInput as exc:
            raise UsageError("--file", str(exc)) from None
        except ValueError as exc:
            raise UsageError("--file", f"unreadable digest: {exc}") from None
        result = {"ok": v.ok, "file": args.file, "format": v.fmt, "count": v.count,
                  "head": v.head, "first_bad_row": v.bad_row, "reason": v.reason,
                  "signed_by": v.signed_by}
        if args.json:
            out.json(result)
        elif v.ok:
            out.print(f"OK: {v.count} event(s), chain and signed digest intact "
                      + (f"(head {v.head[:16]}…, " if v.head else "(")
                      + f"signed by {v.signed_by[:16]}…)",
                      markup=False)
        else:
            where = f" at row {v.bad_row}" if v.bad_row else ""
            out.print(f"BROKEN{where}: {v.reason}", markup=False)
        return 0 if v.ok else 1
    _existing_db("--db", args.db)
    try:
        results = _run_store(args.db, _verify_db(args.db, args.tenant), read_only=True)
    except (UsageError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - exit 1 means "broken" here, nothing else
        raise UsageError("--db", f"cannot read {_redact_url(args.db)}: "
                                 f"{type(exc).__name__}: {exc}") from None
    if args.json:
        out.json(results)
    else:
        for r in results:
            if r["ok"]:
                out.print(f"OK: tenant {r['tenant_id']}: {r['count']} event(s), chain "
                          f"intact (head {r['head'][:16]}…)", markup=False)
            else:
                out.print(f"BROKEN: tenant {r['tenant_id']} at chain_index "
                          f"{r['first_bad_index']}: {r['reason']}", markup=False)
    return 0 if all(r["ok"] for r in results) else 1


async def _verify_db(db: str, tenant: str | None) -> list[dict[str, Any]]:
    from .store import open_store

    store = await open_store(db, create=False)
    try:
        tenants = [tenant] if tenant else [t.tenant_id for t in await store.list_tenants()]
        if tenant and await store.get_tenant(tenant) is None:
            raise UsageError("--tenant", f"no tenant {tenant!r} in the database")
        out = []
        for t in tenants:
            r = await store.verify_chain(t)
            out.append({"tenant_id": t, "ok": r.ok, "count": r.count, "head": r.head,
                        "first_bad_index": r.first_bad_index, "reason": r.reason})
        return out
    finally:
        await store.close()


def cmd_contents_purge(args: argparse.Namespace, out: Output) -> int:
    async def purge() -> int:
        from .store import open_store

        store = await open_store(args.db, create=False)
        try:
            return await store.purge_contents(time.time_ns() // 1_000_000)
        finally:
            await store.close()

    _existing_db("--db", args.db)
    n = _run_store(args.db, purge(), read_only=True)
    if args.json:
        out.json({"purged": n})
    else:
        out.print(f"Purged {n} content row(s) past their retention.")
    return 0


def _export_header() -> list[str]:
    """The CSV header of an empty export (same columns as Event.to_flat())."""
    from p402_client import _convert
    from p402.v1 import meter_pb2

    return list(_convert.event(meter_pb2.Event()).to_flat())


def cmd_settings_get(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        settings = p402.get_settings()
    _print_settings(args, out, settings)
    return 0


def _print_settings(args: argparse.Namespace, out: Output, settings: Any) -> None:
    if args.json:
        out.json(settings.to_dict())
        return
    out.table("Settings", ["setting", "value"],
              ([k, str(v).lower() if isinstance(v, bool) else v]
               for k, v in settings.to_dict().items()))


def cmd_settings_set(args: argparse.Namespace, out: Output) -> int:
    fields: dict[str, Any] = {}
    for name, flag in (("hold_ttl_seconds", "--hold-ttl"),
                       ("default_output_tokens", "--default-output-tokens"),
                       ("fallback_input_pico_per_token", "--fallback-input-pico-per-token"),
                       ("fallback_output_pico_per_token",
                        "--fallback-output-pico-per-token")):
        value = getattr(args, name)
        if value is not None:
            fields[name] = parse_int(flag, value, minimum=0)
    if args.default_privacy_mode:
        fields["default_privacy_mode"] = args.default_privacy_mode
    for name in ("allow_clamp", "allow_unknown_models"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if not fields:
        raise UsageError("settings set", "give at least one setting to change "
                                         "(e.g. --hold-ttl 600)")
    with _client(args) as p402:
        settings = p402.update_settings(**fields)
    _print_settings(args, out, settings)
    return 0


# ------------------------------------------------------------------ bench and demo


def default_report_dir() -> Path:
    """Where `p402 bench` writes reports unless told: the user's data directory
    ($XDG_DATA_HOME/p402/bench-reports, else ~/.local/share/p402/bench-reports),
    never the source tree."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"),
                                                           ".local", "share")
    return Path(base) / "p402" / "bench-reports"


def _pretty_home(path: Path) -> str:
    home = os.path.expanduser("~")
    text = str(path)
    return "~" + text[len(home):] if home and text.startswith(home + os.sep) else text


def _benchmarks_dir(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    # An editable install or a checkout: benchmarks/ sits at the repository root.
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "benchmarks").is_dir() and (parent / "pyproject.toml").exists():
            return parent / "benchmarks"
    return Path.cwd() / "benchmarks"


def cmd_bench(args: argparse.Namespace, out: Output) -> int:
    # Checked before minutes of benchmarks, not after.
    out_dir = Path(args.report_dir) if args.report_dir else default_report_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError("--report-dir", f"{out_dir}: {exc.strerror}") from None
    root = _benchmarks_dir(args.dir)
    scripts = sorted(root.glob("bench_*.py"))
    if not scripts:
        raise UsageError("--dir", f"no benchmark scripts (bench_*.py) found in {root}")
    if args.only:
        scripts = [s for s in scripts if any(o in s.name for o in args.only)]
        if not scripts:
            raise UsageError("--only", f"no benchmark script in {root} matches "
                                       f"{', '.join(args.only)}")
    env = dict(os.environ)
    if args.quick:
        env["P402_BENCH_QUICK"] = "1"
    results = []
    for script in scripts:
        argv = [sys.executable, str(script)]
        # Pass --quick only to scripts that declare it; all of them see the env var.
        if args.quick and "--quick" in script.read_text(encoding="utf-8", errors="replace"):
            argv.append("--quick")
        out.print(f"[bold]── {script.name}[/bold] {' '.join(argv[2:])}")
        started = time.monotonic()
        # Streamed line by line (stderr merged): a long benchmark shows progress.
        proc = subprocess.Popen(argv, cwd=root.parent, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if not line.startswith("BENCH_JSON "):  # machine-readable, for the report
                sys.stdout.write(line)
                sys.stdout.flush()
        proc.wait()
        elapsed = time.monotonic() - started
        results.append((script.name, proc.returncode, elapsed, lines))
    out.table("Benchmarks", ["script", "status", ("seconds", "right")],
              ([n, "ok" if rc == 0 else f"failed (exit {rc})", f"{s:.1f}"]
               for n, rc, s, _ in results))
    # The Markdown report and latency histogram (benchmarks/report.py, issue 6).
    report_py = root / "report.py"
    if report_py.exists():
        import importlib.util

        spec = importlib.util.spec_from_file_location("p402_bench_report", report_py)
        report = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = report  # dataclasses resolve the module by name
        spec.loader.exec_module(report)
        path = report.write_report(
            [report.Result(n, rc, sec, lines) for n, rc, sec, lines in results],
            quick=args.quick, out_dir=out_dir)
        out.print(f"report: {path}", markup=False)
    return 0 if all(rc == 0 for _, rc, _, _ in results) else 1


def cmd_demo(args: argparse.Namespace, out: Output) -> int:
    listen = args.listen
    if listen is None:
        # A server that stays up gets the well-known address the other commands
        # default to; a one-shot tour takes any free port so it never collides.
        listen = (os.environ.get("P402_LISTEN", DEFAULT_LISTEN) if args.keep_running
                  else "127.0.0.1:0")
    _listen_check("--listen", listen)
    from . import demo

    if args.workflow and args.keep_running:
        raise UsageError("--keep-running", "is for the tour, not --workflow")
    if args.http:
        if args.workflow:
            raise UsageError("--http", "is for the tour, not --workflow")
        _listen_check("--http", args.http)
    return demo.run(db=args.db, listen=listen, keep_running=args.keep_running,
                    seed=args.seed, out=out, workflow=args.workflow, http=args.http)


# ------------------------------------------------------------------ entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the `p402` script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or bad usage (2)
        return exc.code if isinstance(exc.code, int) else 2
    out = Output()
    func: Callable[[argparse.Namespace, Output], int] = args.func
    try:
        return func(args, out)
    except UsageError as exc:
        _fail(f"{exc.flag}: {exc.message}")
        return 2
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the exit-code contract needs them all
        return _runtime_error(exc)


def _runtime_error(exc: Exception) -> int:
    from p402_client import InvalidArgument, P402Error

    if isinstance(exc, InvalidArgument):
        # The server (or the client) rejected a value: still bad input, field named.
        _fail(f"{exc.field or 'argument'}: {exc.message}")
        return 2
    if isinstance(exc, P402Error):
        code = exc.code.name if exc.code is not None else "ERROR"
        _fail(f"{code}: {exc.message}")
        return 1
    try:
        from p402core import CoreNotBuilt, InvalidArgument as CoreInvalid
    except ImportError:  # pragma: no cover
        CoreInvalid = CoreNotBuilt = ()  # type: ignore[assignment]
    if isinstance(exc, CoreInvalid):
        _fail(f"{exc.field}: {exc.message}")
        return 2
    if isinstance(exc, CoreNotBuilt):
        _fail(str(exc))
        return 1
    from .listen import ListenError

    if isinstance(exc, ListenError):
        _fail(exc.strerror or str(exc))
        return 1
    _fail(f"{type(exc).__name__}: {exc}")
    if os.environ.get("P402_DEBUG"):
        raise exc
    return 1


def _fail(message: str) -> None:
    sys.stderr.write(f"p402: error: {message}\n")
    sys.stderr.flush()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
