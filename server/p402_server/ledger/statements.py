"""Statements: a period's spend of one customer, closed once, signed, and provable
against the ledger — what a tenant that resells AI features bills its customers from.

Owns the statement document (version 1, below), `close` (the rules of what a statement
covers), `verify_document` (the signature, offline) and `recompute` (the same lines
from the ledger, to check a stored or exported statement), and the CSV rendering.

What a statement covers
-----------------------
Closing period P (a UTC calendar month, "YYYY-MM") for customer c at the tenant's
chain head T (its last chain_index) takes:

- lines: c's events with event_time in P and chain_index <= T that no earlier
  statement took;
- adjustments: c's events committed since c's previous close (chain_index in (L, T],
  L = the highest head any earlier statement of c was closed at) whose period was
  already closed for c: late events of a closed period, which never change the
  closed statement (statements are immutable) and land in the next one instead.

So every event is on exactly one statement: its own period's, if that period was
closed after the event was committed, else the first statement of c closed after it.
Closing (P, c) twice gives the first statement, byte for byte. Events that cost
nothing and sold nothing (denied, released) are left out.

Document, version 1: canonical JSON (sorted keys, no whitespace, UTF-8) of

    v 1, typ "p402.statement", tenant_id, period, customer, period_start_ms,
    period_end_ms, closed_ms, through_index (T), after_index (L),
    first_index / last_index (the lowest and highest chain_index it includes),
    head_hash (the chain hash at T), closed_before (the customer's months already
    closed when it was closed: the months whose late events are adjustments),
    lines [{feature, model, events, cost_nanos, revenue_nanos, usage {unit: total}}],
    adjustments [{period, feature, model, events, cost_nanos, revenue_nanos, usage}],
    totals {events, cost_nanos, revenue_nanos, margin_nanos},
    price_book_version (the tenant's price book when it was closed, "" if none),
    kid, sig (Ed25519 over the canonical JSON without sig, with the tenant's evidence
    key, as receipts are signed: receipts.py; verify with the same public key set).
"""
from __future__ import annotations

import calendar
import csv
import datetime as dt
import io
import json
import re
from typing import Iterable

from p402_server.ledger import receipts
from p402core import InvalidArgument

VERSION = 1
TYPE = "p402.statement"
_PERIOD = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
_TOKENS = ("input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens",
           "reasoning_tokens")
CSV_COLUMNS = ("section", "period", "feature", "model", "events", "cost_usd", "revenue_usd",
               "usage")


def period_bounds(period: str) -> tuple[int, int]:
    """[start, end) of a "YYYY-MM" period in Unix ms (UTC); InvalidArgument("period")."""
    m = _PERIOD.match(period or "")
    if not m:
        raise InvalidArgument("period", f"must be a month as YYYY-MM, got {period!r}")
    y, mo = int(m.group(1)), int(m.group(2))
    start = dt.datetime(y, mo, 1, tzinfo=dt.timezone.utc)
    end = start + dt.timedelta(days=calendar.monthrange(y, mo)[1])
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def period_of(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m")


def _group(events: Iterable, with_period: bool) -> list[dict]:
    lines: dict[tuple, dict] = {}
    for ev in events:
        if not ev.cost_nanos and not ev.revenue_nanos:
            continue
        key = ((period_of(ev.event_ms),) if with_period else ()) + (ev.feature, ev.model)
        line = lines.get(key)
        if line is None:
            line = lines[key] = {"feature": ev.feature, "model": ev.model, "events": 0,
                                 "cost_nanos": 0, "revenue_nanos": 0, "usage": {}}
            if with_period:
                line["period"] = key[0]
        line["events"] += 1
        line["cost_nanos"] += ev.cost_nanos
        line["revenue_nanos"] += ev.revenue_nanos
        usage = line["usage"]
        for name in _TOKENS:
            n = getattr(ev, name)
            if n:
                usage[name] = usage.get(name, 0) + n
        for name, n in (ev.units or {}).items():
            usage[name] = usage.get(name, 0) + n
    return [lines[k] for k in sorted(lines)]


def _counted(events: Iterable) -> list:
    return [e for e in events if e.cost_nanos or e.revenue_nanos]


def select(doc: dict, events: Iterable) -> tuple[list, list]:
    """(lines' events, adjustments' events) of the statement `doc` among `events` (any
    superset of them: the ledger's, or an export's rows), by the rules above."""
    start, end = doc["period_start_ms"], doc["period_end_ms"]
    through, after = int(doc["through_index"]), int(doc["after_index"])
    closed = set(doc["closed_before"])
    regular, late = [], []
    for e in events:
        if e.customer != doc["customer"] or not e.chain_index or e.chain_index > through:
            continue
        if start <= e.event_ms < end:
            regular.append(e)
        elif e.chain_index > after and period_of(e.event_ms) in closed:
            late.append(e)
    key = (lambda e: e.chain_index)
    return sorted(regular, key=key), sorted(late, key=key)


def recompute(doc: dict, events: Iterable) -> dict:
    """The statement `doc` built again from `events` (compare with `differences`)."""
    regular, late = select(doc, events)
    return body(tenant_id=doc["tenant_id"], period=doc["period"], customer=doc["customer"],
                closed_ms=doc["closed_ms"], through=int(doc["through_index"]),
                after=int(doc["after_index"]), head_hash=doc["head_hash"],
                regular=regular, late=late, closed_before=doc["closed_before"],
                price_book_version=doc["price_book_version"])


def body(*, tenant_id: str, period: str, customer: str, closed_ms: int, through: int,
         after: int, head_hash: str, regular: list, late: list, closed_before,
         price_book_version: str) -> dict:
    """The unsigned document of a statement from its events (module docstring)."""
    start, end = period_bounds(period)
    lines, adjustments = _group(regular, False), _group(late, True)
    included = _counted(regular) + _counted(late)
    cost = sum(x["cost_nanos"] for x in lines + adjustments)
    revenue = sum(x["revenue_nanos"] for x in lines + adjustments)
    return {
        "v": VERSION, "typ": TYPE, "tenant_id": tenant_id, "period": period,
        "customer": customer, "period_start_ms": start, "period_end_ms": end,
        "closed_ms": closed_ms, "through_index": through, "after_index": after,
        "first_index": min((e.chain_index for e in included), default=0),
        "last_index": max((e.chain_index for e in included), default=0),
        "head_hash": head_hash, "closed_before": sorted(closed_before),
        "lines": lines, "adjustments": adjustments,
        "totals": {"events": len(included), "cost_nanos": cost, "revenue_nanos": revenue,
                   "margin_nanos": revenue - cost},
        "price_book_version": price_book_version,
    }


def sign(doc: dict, signer: "receipts.Signer") -> str:
    return signer.sign_document(doc)


def verify_document(text: str, keys: dict[str, str]) -> tuple[bool, str, dict | None]:
    """The statement's signature against a key set ({kid: public hex}), offline."""
    return receipts.verify_signed(text, keys, TYPE, VERSION)


def differences(stored: dict, recomputed: dict) -> list[str]:
    """The fields where a statement and the same statement recomputed from the ledger
    differ (empty: it matches the ledger)."""
    keys = ("lines", "adjustments", "totals", "first_index", "last_index", "head_hash")
    return [k for k in keys if stored.get(k) != recomputed.get(k)]


def to_csv(doc: dict) -> str:
    """The statement's lines and adjustments as CSV (USD decimals; usage as JSON)."""
    from p402_server.ledger.evidence import _usd

    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(CSV_COLUMNS)
    for section, rows in (("line", doc["lines"]), ("adjustment", doc["adjustments"])):
        for r in rows:
            w.writerow([section, r.get("period", doc["period"]), r["feature"], r["model"],
                        r["events"], _usd(r["cost_nanos"]), _usd(r["revenue_nanos"]),
                        json.dumps(r["usage"], sort_keys=True, separators=(",", ":"))])
    t = doc["totals"]
    w.writerow(["total", doc["period"], "", "", t["events"], _usd(t["cost_nanos"]),
                _usd(t["revenue_nanos"]), ""])
    return out.getvalue()


__all__ = ["VERSION", "TYPE", "period_bounds", "period_of", "select", "recompute", "body",
           "sign",
           "verify_document", "differences", "to_csv", "CSV_COLUMNS"]
