"""Query-string filters of the dashboard pages -> a store `EventFilter`.

Owns the names of the filter fields (the same names as the store's and the CLI's:
customer … employee, model, provider, outcome, decision, evidence) and their
validation. A bad value is a `FilterError` naming the field, shown above the form;
it never becomes a 500. Times in forms are UTC (`datetime-local` values, or a
relative `range` such as 24h).
"""
from __future__ import annotations

import datetime as _dt
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlencode

from p402_server.ledger import EventFilter
from p402core._enums import MAX_STRING, OWNER_KEYS, Decision, Evidence, Outcome
from p402core.contract import reportable_ms

HOUR_MS = 3_600_000
RANGES = {"1h": HOUR_MS, "24h": 24 * HOUR_MS, "7d": 7 * 24 * HOUR_MS,
          "30d": 30 * 24 * HOUR_MS, "90d": 90 * 24 * HOUR_MS}
# Every page (ledger, spend, downloads) opens on the same range.
DEFAULT_RANGE = "30d"
RANGE_LABELS = {"": "All time", "1h": "Last hour", "24h": "Last 24 hours",
                "7d": "Last 7 days", "30d": "Last 30 days", "90d": "Last 90 days"}

ENUMS = {"outcome": Outcome, "decision": Decision, "evidence": Evidence}
# The choices offered in the selects: every member but UNSPECIFIED, by lower name.
CHOICES = {name: [m.name.lower() for m in enum if m.value] for name, enum in ENUMS.items()}
TEXT_FIELDS = (*OWNER_KEYS, "model", "provider")
FIELDS = ("range", "from", "until", *TEXT_FIELDS, *ENUMS)

_LOCAL = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?$")


class FilterError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def parse_utc(field_name: str, text: str) -> int:
    """"2026-05-04T13:07" (UTC, as a datetime-local input sends it) -> Unix ms."""
    if not _LOCAL.match(text):
        raise FilterError(field_name, f"{text!r} is not a date and time (YYYY-MM-DDTHH:MM, UTC)")
    try:
        t = _dt.datetime.fromisoformat(text).replace(tzinfo=_dt.timezone.utc)
    except ValueError:
        raise FilterError(field_name, f"{text!r} is not a valid date") from None
    ms = int(t.timestamp()) * 1000
    if ms < 0:
        raise FilterError(field_name, "must be after 1970")
    return ms


def utc_input(ms: int) -> str:
    """Unix ms -> the value of a datetime-local input (UTC, minutes)."""
    t = _dt.datetime.fromtimestamp(reportable_ms(ms) // 1000, tz=_dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M")


@dataclass
class Filters:
    """The parsed filter form: `values` to refill the form, `flt` for the store."""

    values: dict[str, str] = field(default_factory=dict)
    flt: EventFilter = field(default_factory=EventFilter)

    def query(self, **extra: str) -> str:
        """The filters (non-empty ones) plus `extra` as a query string."""
        # "range" is kept even when empty: "" (all time) differs from the default.
        items = {k: v for k, v in self.values.items() if v or k == "range"}
        items.update({k: v for k, v in extra.items() if v})
        return urlencode(items)

    @property
    def active(self) -> bool:
        return any(v for v in self.values.values())

    @property
    def open(self) -> bool:
        """Whether the folded filter panel opens: a filter beyond the range is set."""
        return any(v for k, v in self.values.items() if k != "range")

    @property
    def summary(self) -> str:
        """One line for the folded panel: "Last 30 days · customer acme"."""
        v = self.values
        when = RANGE_LABELS.get(v.get("range", ""), v.get("range", ""))
        if v.get("from") or v.get("until"):
            when = f"{v.get('from') or '…'} – {v.get('until') or 'now'} UTC"
        parts = [when] + [f"{k} {v[k]}" for k in FIELDS
                          if k not in ("range", "from", "until") and v.get(k)]
        return " · ".join(parts)


def parse(query: Mapping[str, str], *, default_range: str = DEFAULT_RANGE,
          now: int | None = None, align_hours: bool = False) -> Filters:
    """Parse the filter fields of `query`. `align_hours` rounds a relative range's
    start down to the hour, so spend queries can be answered from hourly rollups."""
    values = {name: (query.get(name) or "").strip() for name in FIELDS}
    if "range" not in query:
        values["range"] = default_range
    for name, value in values.items():
        if len(value) > MAX_STRING:
            raise FilterError(name, f"longer than {MAX_STRING} characters")
    now = now_ms() if now is None else now
    since = until = 0
    rng = values["range"]
    if rng:
        if rng not in RANGES:
            raise FilterError("range", f"{rng!r} is not one of {', '.join(RANGES)}")
        since = now - RANGES[rng]
        if align_hours:
            since -= since % HOUR_MS
    if values["from"]:
        since = parse_utc("from", values["from"])
    if values["until"]:
        until = parse_utc("until", values["until"])
        if since and until <= since:
            raise FilterError("until", "must be after the start of the range")
    owners = {k: values[k] for k in OWNER_KEYS if values[k]}
    enums: dict[str, tuple[int, ...]] = {}
    for name, enum in ENUMS.items():
        v = values[name]
        if v:
            if v not in CHOICES[name]:
                raise FilterError(name, f"{v!r} is not one of {', '.join(CHOICES[name])}")
            enums[name] = (int(enum[v.upper()]),)
    flt = EventFilter(
        since_ms=since,
        until_ms=until,
        owners=owners,
        models=(values["model"],) if values["model"] else (),
        providers=(values["provider"],) if values["provider"] else (),
        outcomes=enums.get("outcome", ()),
        decisions=enums.get("decision", ()),
        evidences=enums.get("evidence", ()),
    )
    return Filters(values=values, flt=flt)


__all__ = ["Filters", "FilterError", "parse", "parse_utc", "utc_input", "RANGES",
           "DEFAULT_RANGE",
           "RANGE_LABELS", "CHOICES", "TEXT_FIELDS", "FIELDS", "HOUR_MS", "now_ms"]
