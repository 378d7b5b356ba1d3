"""How nano-USD amounts become text for people: exact, and aligned in a column.

One rule for the CLI, the demo and the dashboard. Nothing is rounded: an amount
shows every non-zero decimal it has (at least the cents), so displayed rows add up
to the displayed total exactly, as the ledger does. In a column every amount gets
the decimals of the longest one, so decimal points line up and a reader can scan
it. Exports carry the same exact values with all nine decimals
(`dashboard.fmt.usd_plain`, `cli.usd`).

Margin is revenue − cost everywhere; a row with no revenue reported counts it as 0
(its margin is −cost), and its revenue is marked with `NO_REVENUE_MARK`.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

NANOS_PER_USD = 1_000_000_000
MIN_DECIMALS = 2
NO_REVENUE_MARK = "*"
NO_REVENUE_NOTE = (f"{NO_REVENUE_MARK} no revenue reported: counted as $0, so the "
                   "margin is −cost")


def decimals(nanos: int) -> int:
    """Decimals needed to show `nanos` exactly (2 … 9)."""
    frac = f"{abs(int(nanos)) % NANOS_PER_USD:09d}".rstrip("0")
    return max(MIN_DECIMALS, len(frac))


def column_decimals(values: Iterable[int]) -> int:
    """Decimals that show every amount of a column exactly."""
    return max((decimals(v) for v in values), default=MIN_DECIMALS)


def usd(nanos: int, places: int | None = None, *, grouping: bool = True) -> str:
    """Exact USD text: "$1,234.50", "$0.000123456", "-$0.25"; `places` (≥ what the
    value needs) pads with zeros to align it in a column."""
    nanos = int(nanos)
    places = decimals(nanos) if places is None else places
    if places < decimals(nanos):
        raise ValueError(f"{nanos} nano-USD needs {decimals(nanos)} decimals, not {places}")
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    digits = f"{frac:09d}"[:places]
    return f"{sign}${whole:,}.{digits}" if grouping else f"{sign}${whole}.{digits}"


class Money(NamedTuple):
    """A table cell holding an amount: the table formats its column together.
    `mark` is appended (e.g. NO_REVENUE_MARK); unmarked cells get a space instead,
    so a marked column stays aligned."""

    nanos: int
    mark: str = ""


def format_column(cells: list) -> list:
    """The cells of one column with every `Money` formatted to the column's
    decimals (other cells unchanged)."""
    money = [c for c in cells if isinstance(c, Money)]
    if not money:
        return cells
    places = column_decimals(m.nanos for m in money)
    marked = any(m.mark for m in money)
    out = []
    for c in cells:
        if isinstance(c, Money):
            text = usd(c.nanos, places)
            if marked:
                text += c.mark or " " * len(NO_REVENUE_MARK)
            out.append(text)
        else:
            out.append(c)
    return out


def revenue_cell(revenue_nanos: int) -> Money:
    """A revenue amount, marked when none was reported."""
    return Money(revenue_nanos, NO_REVENUE_MARK if revenue_nanos == 0 else "")


__all__ = ["Money", "NO_REVENUE_MARK", "NO_REVENUE_NOTE", "column_decimals", "decimals",
           "format_column", "revenue_cell", "usd"]
