"""Read-side SQL: event filters, keyset pagination, spend aggregation (rollups or events).

Owns how an ``EventFilter`` becomes WHERE clauses, the opaque page tokens, and the
choice between ``rollups_hourly`` and ``events`` for a spend query:

A spend query reads ``rollups_hourly`` when the rollups can answer it exactly: no
``labels`` and no ``kinds`` condition (rollups keep neither) and ``since_ms`` /
``until_ms`` on hour boundaries (rollups keep hours). Otherwise it aggregates
``events`` with the same SELECT shape (same groups, sums and order), so both paths
return identical rows for any filter both can answer (a test holds them to that).
"""
from __future__ import annotations

import base64
import binascii
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from p402_server.ledger import schema as S
from p402_server.ledger.model import EventFilter, SpendRow
from p402core._enums import OWNER_KEYS, Decision, Evidence, InvalidArgument, Outcome
from p402core.contract import REPORTABLE_MAX_MS

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

# What a spend query may group by.
TIME_GROUPS = ("hour", "day", "month")
GROUPS = (*OWNER_KEYS, "provider", "model", "outcome", "decision", "evidence", *TIME_GROUPS)

# Group values of these are the enum's NAME ("ALLOW", "SUCCESS", "REPORTED"), as on the
# wire and in the CLI: one name for one concept. A number no enum member has (a newer
# server's value in an older reader) stays its decimal text.
ENUM_GROUPS = {"outcome": Outcome, "decision": Decision, "evidence": Evidence}


def _enum_name(cls, value) -> str:
    try:
        return cls(int(value)).name
    except ValueError:
        return str(int(value))


SPEND_SUMS = (
    "events",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_nanos",
    "estimated_cost_nanos",
    "revenue_nanos",
)


# -- page sizes and tokens ----------------------------------------------------------


def page_size_of(page_size: int) -> int:
    """0 → default (100); negative → InvalidArgument; above 1000 → 1000 (AIP-158)."""
    if not isinstance(page_size, int) or isinstance(page_size, bool):
        raise InvalidArgument("page_size", "must be an int")
    if page_size < 0:
        raise InvalidArgument("page_size", "must be >= 0")
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    return min(page_size, MAX_PAGE_SIZE)


def encode_token(kind: str, value: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{value}".encode()).decode().rstrip("=")


def decode_token(token: str, kind: str) -> int | None:
    """The position in ``token`` (None for ""), or InvalidArgument naming page_token.

    ``kind`` ties a token to the query and order that issued it, so a token from an
    ascending walk cannot silently skip rows of a descending one."""
    if not token:
        return None
    if not isinstance(token, str):
        raise InvalidArgument("page_token", "must be a str")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        got_kind, _, value = raw.rpartition(":")
        position = int(value)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("page_token", "not a token this server issued") from None
    if got_kind != kind or not 0 <= position < 2**63:  # a seq is a signed 64-bit int
        raise InvalidArgument("page_token", "not a token for this query and order")
    return position


# -- filters ------------------------------------------------------------------------


def _label_condition(dialect: str, labels_col, key: str, value: str):
    if dialect == "sqlite":
        # json_each handles any key text; json_extract paths would need quoting.
        each = sa.func.json_each(labels_col).table_valued("key", "value").alias("lbl")
        return sa.exists(
            sa.select(sa.literal_column("1")).select_from(each).where(
                each.c.key == key, each.c.value == value
            )
        )
    return sa.func.json_extract_path_text(sa.cast(labels_col, postgresql.JSON), key) == value


def conditions(table: sa.Table, dialect: str, tenant_id: str, flt: EventFilter, *, time_col: str):
    """WHERE clauses of ``flt`` over ``table`` (events, or rollups_hourly)."""
    c = table.c
    out = [c.tenant_id == tenant_id]
    if flt.since_ms:
        out.append(c[time_col] >= flt.since_ms)
    if flt.until_ms:
        out.append(c[time_col] < flt.until_ms)
    for dim, value in flt.owners.items():
        out.append(c[dim] == value)
    if flt.labels:
        for key, value in flt.labels.items():
            out.append(_label_condition(dialect, c.labels, key, value))
    for col, values in (
        ("model", flt.models),
        ("provider", flt.providers),
        ("outcome", flt.outcomes),
        ("decision", flt.decisions),
        ("evidence", flt.evidences),
        ("kind", flt.kinds),
    ):
        if values:
            if col in ("outcome", "decision", "evidence"):
                values = [int(v) for v in values]
            out.append(c[col].in_(list(values)))
    return out


def event_conditions(dialect: str, tenant_id: str, flt: EventFilter):
    flt.validate()
    return conditions(S.events, dialect, tenant_id, flt, time_col="event_ms")


# What spend_daily keeps: the customer and the UTC day.
DAILY_GROUPS = frozenset({"customer", "day", "month"})


def daily_can_answer(flt: EventFilter, group_by) -> bool:
    """True when spend_daily (per tenant, UTC day and customer) gives exactly what
    events would: grouping by customer/day/month only, filtering by nothing but
    day-aligned time bounds and the customer."""
    return (
        DAILY_GROUPS.issuperset(group_by)
        and not flt.labels
        and not flt.kinds
        and not flt.models
        and not flt.providers
        and not flt.outcomes
        and not flt.decisions
        and not flt.evidences
        and all(dim == "customer" for dim in flt.owners)
        and flt.since_ms % DAY_MS == 0
        and flt.until_ms % DAY_MS == 0
    )


def rollups_can_answer(flt: EventFilter) -> bool:
    """True when rollups_hourly gives exactly what events would (see module docstring)."""
    return (
        not flt.labels
        and not flt.kinds
        and flt.since_ms % HOUR_MS == 0
        and flt.until_ms % HOUR_MS == 0
    )


# -- spend --------------------------------------------------------------------------


def _lit(n: int):
    # Literal SQL, not a bound parameter: PostgreSQL must see the same expression in
    # SELECT and GROUP BY, and two bound parameters are two different expressions.
    return sa.literal_column(str(int(n)))


def _month_start(dialect: str, ms):
    # Clamped into 1970 .. 9999 (p402core.contract.reportable_ms): a ledger may hold
    # any int64 time, and neither database's calendar goes that far.
    if dialect == "sqlite":
        ms = sa.func.max(sa.func.min(ms, _lit(REPORTABLE_MAX_MS)), _lit(0))
        return (
            sa.cast(
                sa.func.strftime("%s", ms / _lit(1000), "unixepoch", "start of month"),
                sa.Integer,
            )
            * _lit(1000)
        )
    ms = sa.func.greatest(sa.func.least(ms, _lit(REPORTABLE_MAX_MS)), _lit(0))
    ts = sa.func.timezone("UTC", sa.func.to_timestamp(ms / _lit(1000)))
    return sa.cast(sa.extract("epoch", sa.func.date_trunc("month", ts)) * _lit(1000), sa.BigInteger)


_TIME_COL = {"events": "event_ms", "rollups": "hour_ms", "daily": "day_ms"}
_TABLE = {"events": S.events, "rollups": S.rollups_hourly, "daily": S.spend_daily}


def _group_expr(name: str, table: sa.Table, dialect: str, source: str):
    c = table.c
    if name in TIME_GROUPS:
        ms = c[_TIME_COL[source]]
        if name == "hour":
            return ms if source == "rollups" else ms - ms % _lit(HOUR_MS)
        if name == "day":
            return ms if source == "daily" else ms - ms % _lit(DAY_MS)
        return _month_start(dialect, ms)
    return c[name]


def check_group_by(group_by) -> list[str]:
    if isinstance(group_by, str):
        group_by = [g for g in group_by.split(",") if g]
    group_by = list(group_by)
    for name in group_by:
        if name not in GROUPS:
            raise InvalidArgument(
                "group_by", f"unknown group {name!r} (one of {', '.join(GROUPS)})"
            )
    if len(set(group_by)) != len(group_by):
        raise InvalidArgument("group_by", "a group is named twice")
    return group_by


def spend_select(
    dialect: str,
    tenant_id: str,
    flt: EventFilter,
    group_by: list[str],
    *,
    source: str,
    limit: int | None,
    offset: int,
):
    """SELECT group values and sums, ordered by cost desc then the groups. ``source``:
    "events", "rollups" (rollups_hourly) or "daily" (spend_daily); the caller checked
    that the table can answer (rollups_can_answer / daily_can_answer)."""
    flt.validate()
    table = _TABLE[source]
    where = conditions(table, dialect, tenant_id, flt, time_col=_TIME_COL[source])
    if source == "events":
        sums = [sa.func.count()] + [sa.func.sum(table.c[name]) for name in SPEND_SUMS[1:]]
    else:
        sums = [sa.func.sum(table.c[name]) for name in SPEND_SUMS]
    groups = [_group_expr(g, table, dialect, source).label(f"g_{g}") for g in group_by]
    sums = [s.label(name) for s, name in zip(sums, SPEND_SUMS)]
    stmt = sa.select(*groups, *sums).select_from(table).where(*where)
    n = len(groups)
    cost_pos = n + SPEND_SUMS.index("cost_nanos") + 1
    if groups:
        stmt = stmt.group_by(*[_lit(i + 1) for i in range(n)])
    stmt = stmt.order_by(
        sa.desc(_lit(cost_pos)), *[sa.asc(_lit(i + 1)) for i in range(n)]
    )
    if limit is not None:
        stmt = stmt.limit(limit).offset(offset)
    return stmt


def spend_rows(result_rows, group_by: list[str]) -> list[SpendRow]:
    out = []
    n = len(group_by)
    for row in result_rows:
        group: dict[str, Any] = {}
        for name, value in zip(group_by, row[:n]):
            if name in TIME_GROUPS:
                group[name] = int(value)
            elif name in ENUM_GROUPS:
                group[name] = _enum_name(ENUM_GROUPS[name], value)
            else:
                group[name] = value
        # PostgreSQL's sum(bigint) is numeric (Decimal); int() is exact.
        sums = [int(v or 0) for v in row[n:]]
        if sums[0] == 0:  # the no-group aggregate over nothing
            continue
        kw = dict(zip(SPEND_SUMS, sums))
        out.append(SpendRow(group=group, **kw, margin_nanos=kw["revenue_nanos"] - kw["cost_nanos"]))
    return out


__all__ = [
    "GROUPS",
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "page_size_of",
    "encode_token",
    "decode_token",
    "event_conditions",
    "rollups_can_answer",
    "daily_can_answer",
    "spend_select",
    "spend_rows",
    "check_group_by",
]
