"""What the CLI (and the demo, which prints the same tables) shows: the Output
sink (tables that fit the terminal, JSON, plain lines), money and time as text, the
ledger's event rows and the spend table."""
from __future__ import annotations

import datetime as dt
import json
import os
import sys
from decimal import Decimal
from typing import Any, Iterable, Sequence

from p402_server.amounts import (
    NO_REVENUE_MARK,
    NO_REVENUE_NOTE,
    Money,
    format_column,
    revenue_cell,
)
from p402_server.amounts import usd as usd_text
from p402core.contract import reportable_ms

NANOS_PER_USD = 1_000_000_000


def usd(nanos: int) -> str:
    """Exact USD string of nano-USD (9 decimals), for machine output."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    return f"{sign}{whole}.{frac:09d}"


def usd_short(nanos: int) -> str:
    """Human USD, exact (amounts.usd): "$0.05", "$0.000760", "-$0.01587415"; in tables
    a column of `Money` cells shares its decimals."""
    return usd_text(nanos)


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
    if key in _TIME_GROUPS and value.isascii() and value.lstrip("-").isdigit():
        when = dt.datetime.fromtimestamp(reportable_ms(int(value)) / 1000,
                                              tz=dt.timezone.utc)
        return when.strftime(_TIME_GROUPS[key])
    return value


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


def _csv_value(value: Any) -> Any:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False) if value else ""
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    return value
