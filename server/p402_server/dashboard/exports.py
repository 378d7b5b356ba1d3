"""Export streams for the dashboard's download buttons (CSV, JSONL, FOCUS).

Owns turning the store's events into export text, chunk by chunk. The rows and the
three formats are the CLI's (`p402 export`): `p402_server.evidence.event_row` of
the event as the wire has it (`convert.event_to_proto`), written by
`evidence.ExportWriter` (CSV columns, JSON lines, FinOps FOCUS columns plus x_
columns), so a dashboard download and a CLI export of the same events have the same
rows. (The CLI's signed digest is produced inside the gRPC ExportEvents call; the
dashboard's downloads carry none until that is a function both can call.)

Without the evidence module (a build before it), CSV and JSONL fall back to the
dashboard's own flat row (`row`: every stored field, money as `*_nanos` and exact
`*_usd`, enums by name) and FOCUS is unavailable (the button says so).
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from typing import Any

from ..store import LedgerEvent
from . import fmt

MONEY = ("cost_nanos", "estimated_cost_nanos", "overrun_nanos", "revenue_nanos")
ENUM_NAMES = {"decision": fmt.decision_name, "outcome": fmt.outcome_name,
              "evidence": fmt.evidence_name, "privacy_mode": fmt.privacy_name}

COLUMNS = (
    "seq", "event_id", "event_time", "event_ms", "recorded_time", "recorded_ms", "kind",
    "reservation_id", "customer", "feature", "workflow", "task", "department", "employee",
    "labels", "provider", "model", "input_tokens", "cached_input_tokens",
    "cache_write_tokens", "output_tokens", "reasoning_tokens",
    "cost_usd", "cost_nanos", "estimated_cost_usd", "estimated_cost_nanos",
    "overrun_usd", "overrun_nanos", "revenue_usd", "revenue_nanos",
    "decision", "reasons", "rule_ids", "budget_ids", "budget_charges", "outcome",
    "evidence", "privacy_mode", "attempt", "retry_of", "duplicate_of", "catalog_version",
    "chain_hash",
)


def _enum_text(name: str, value: int) -> str:
    text = ENUM_NAMES[name](value)
    return "" if text == "—" else text.upper().replace(" ", "_")


def row(ev: LedgerEvent) -> dict[str, Any]:
    """The export row of one event (module docstring); keys are `COLUMNS`."""
    d = ev.to_dict()
    out: dict[str, Any] = {}
    for col in COLUMNS:
        if col == "event_time":
            out[col] = fmt.ms_to_iso(ev.event_ms)
        elif col == "recorded_time":
            out[col] = fmt.ms_to_iso(ev.recorded_ms)
        elif col.endswith("_usd"):
            out[col] = fmt.usd_plain(d[col[:-4] + "_nanos"])
        elif col in ENUM_NAMES:
            out[col] = _enum_text(col, d[col])
        elif col == "budget_charges":
            out[col] = [f"{b}@{p}" for b, p in ev.budget_charges]
        elif col in ("duplicate_of", "chain_hash"):
            out[col] = d[col] or ""
        else:
            out[col] = d[col]
    return out


def _csv_cell(value: Any) -> Any:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False) if value else ""
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        # Spreadsheet formula injection: owner values are free-form caller strings.
        # A leading apostrophe makes a spreadsheet show the text, not run it.
        if not _is_number(value):
            return "'" + value
    return value


def _is_number(text: str) -> bool:
    try:
        int(text.replace(".", "", 1))
        return True
    except ValueError:
        return False


def shared_formats():
    """(evidence, convert) when the CLI's export formats are available, else None."""
    try:
        from .. import convert, evidence
    except ImportError:
        return None
    if not (hasattr(evidence, "event_row") and hasattr(evidence, "ExportWriter")
            and hasattr(convert, "event_to_proto")):
        return None
    return evidence, convert


def available(fmt_name: str) -> bool:
    """Whether this build can export `fmt_name` (FOCUS needs the evidence module)."""
    return fmt_name in ("csv", "jsonl") or shared_formats() is not None


def stream(events: AsyncIterator[LedgerEvent], fmt_name: str) -> AsyncIterator[str]:
    """Export text chunks (about 64 KiB each) of `events` in `fmt_name`."""
    shared = shared_formats()
    if shared is None:
        if fmt_name == "jsonl":
            return stream_jsonl(events)
        if fmt_name == "csv":
            return stream_csv(events)
        raise ValueError(f"format: {fmt_name} is not available in this build")
    return _stream_shared(events, fmt_name, *shared)


async def _stream_shared(events, fmt_name: str, evidence, convert) -> AsyncIterator[str]:
    buf = io.StringIO()
    writer = evidence.ExportWriter(buf, fmt_name)  # writes the CSV header, if any
    async for ev in events:
        writer.row(evidence.event_row(convert.event_to_proto(ev)))
        if buf.tell() >= 65536:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    if buf.tell():
        yield buf.getvalue()


async def stream_csv(events: AsyncIterator[LedgerEvent], to_row=row,
                     columns=COLUMNS) -> AsyncIterator[str]:
    """CSV text chunks: the header, then about 64 KiB of rows at a time."""
    buf = io.StringIO()
    w = None
    if columns is not None:
        w = csv.DictWriter(buf, fieldnames=list(columns))
        w.writeheader()
    async for ev in events:
        r = to_row(ev)
        if w is None:
            w = csv.DictWriter(buf, fieldnames=list(r))
            w.writeheader()
        w.writerow({k: _csv_cell(v) for k, v in r.items()})
        if buf.tell() >= 65536:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    if buf.tell():
        yield buf.getvalue()


async def stream_jsonl(events: AsyncIterator[LedgerEvent]) -> AsyncIterator[str]:
    """JSON Lines chunks, one object per event (the `row`)."""
    parts: list[str] = []
    size = 0
    async for ev in events:
        line = json.dumps(row(ev), ensure_ascii=False, separators=(",", ":")) + "\n"
        parts.append(line)
        size += len(line)
        if size >= 65536:
            yield "".join(parts)
            parts, size = [], 0
    if parts:
        yield "".join(parts)


__all__ = ["COLUMNS", "row", "stream", "stream_csv", "stream_jsonl", "available",
           "shared_formats"]
