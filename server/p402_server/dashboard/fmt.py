"""Display formatting for the dashboard: money, tokens, times and enum names.

Owns how a number from the ledger becomes text on a page. Money is exact: nano-USD
ints are split with integer arithmetic (never a float) and nothing is rounded, so
what finance reads is what the ledger holds ($0.000123456 stays $0.000123456; 1.5
USD is $1.50); a table column shows all its amounts with the same decimals (the
longest one's), so they align and add up.
"""
from __future__ import annotations

import datetime as _dt

from p402_server import amounts
from p402core._enums import Decision, Evidence, Outcome, PrivacyMode
from p402core.contract import reportable_ms

NANOS_PER_USD = 1_000_000_000


def usd(nanos: int, places: int | None = None) -> str:
    """Exact USD text of a nano-USD int: "$1,234.50", "$0.000123456", "-$0.25";
    `places` pads to a column's decimals (`column_places`). The CLI's rule
    (p402_server.amounts), so both show the same text for the same amount."""
    return amounts.usd(nanos, places)


def column_places(values) -> int:
    """The decimals that show every amount of a column exactly (≥ 2)."""
    return amounts.column_decimals(int(v) for v in values)


def usd_plain(nanos: int) -> str:
    """Exact machine USD (9 decimals, no separators): "1234.500000000"."""
    nanos = int(nanos)
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    return f"{sign}{whole}.{frac:09d}"


def tokens(n: int) -> str:
    """A token count with thousands separators."""
    return f"{int(n):,}"


def ms_to_utc(ms: int, *, seconds: bool = True, zone: bool = True) -> str:
    """Unix ms -> "2026-05-04 13:07:09 UTC" ("" for 0); `zone=False` drops " UTC"
    (for columns whose header says UTC)."""
    if not ms:
        return ""
    t = _dt.datetime.fromtimestamp(reportable_ms(ms) // 1000, tz=_dt.timezone.utc)
    text = t.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")
    return text + " UTC" if zone else text


def ms_to_date(ms: int) -> str:
    """Unix ms -> "2026-05-04" (UTC)."""
    t = _dt.datetime.fromtimestamp(reportable_ms(ms) // 1000, tz=_dt.timezone.utc)
    return t.strftime("%Y-%m-%d")


def ms_to_iso(ms: int) -> str:
    """Unix ms -> ISO 8601 UTC with milliseconds ("" for 0), for machine output."""
    if not ms:
        return ""
    t = _dt.datetime.fromtimestamp(reportable_ms(ms) // 1000, tz=_dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def bucket_label(ms: int, bucket: str) -> str:
    """The label of a time bucket's start: hour "05-04 13:00", day "2026-05-04",
    month "2026-05"."""
    t = _dt.datetime.fromtimestamp(reportable_ms(ms) / 1000, tz=_dt.timezone.utc)
    if bucket == "hour":
        return t.strftime("%m-%d %H:00")
    if bucket == "month":
        return t.strftime("%Y-%m")
    return t.strftime("%Y-%m-%d")


def _namer(enum):
    def name(value) -> str:
        # The store gives ints on events and the enum's NAME in spend groups.
        try:
            if isinstance(value, str) and not value.isdigit():
                member = enum[value.upper()]
            else:
                member = enum(int(value))
        except (ValueError, KeyError):
            return str(value)
        if member.value == 0:
            return "—"
        return member.name.lower().replace("_", " ")
    return name


decision_name = _namer(Decision)
outcome_name = _namer(Outcome)
evidence_name = _namer(Evidence)
privacy_name = _namer(PrivacyMode)


def pct(part: int, whole: int) -> str:
    """part/whole as a percentage with one decimal, in integer arithmetic."""
    if whole <= 0:
        return ""
    tenths = (abs(part) * 1000 + whole // 2) // whole
    sign = "-" if part < 0 else ""
    if tenths == 0 and part:
        return f"{sign}<0.1%"  # not "0.0%": something was spent
    return f"{sign}{tenths // 10}.{tenths % 10}%"


__all__ = ["usd", "column_places", "usd_plain", "tokens", "ms_to_utc", "ms_to_date", "ms_to_iso", "bucket_label",
           "decision_name", "outcome_name", "evidence_name", "privacy_name", "pct"]
