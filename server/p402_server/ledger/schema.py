"""The store's tables, as SQLAlchemy Core metadata (the single description of the schema).

Owns the column names and types; migrations in ``p402_server/migrations`` create the
same tables (a test compares the migrated database against this metadata, so the two
cannot drift apart silently).

Conventions (DESIGN §4, §10):
- money is ``BigInteger`` nano-USD, times ``BigInteger`` Unix milliseconds;
- enums are ``SmallInteger`` holding the values of ``p402core._enums``;
- JSON is stored as text the store encodes itself (``json.dumps``), so SQLite and
  PostgreSQL store byte-identical values and nothing depends on a JSON column type;
- owner dimensions are six ``str`` columns, ``''`` when absent (never NULL), so they
  can be part of unique keys and compared with ``=``.
"""
from __future__ import annotations

import sqlalchemy as sa

from p402core._enums import OWNER_KEYS

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only auto-assigns a key for exactly "INTEGER PRIMARY KEY" (the rowid alias);
# BIGINT PRIMARY KEY would be a plain column. Both are 64-bit.
SeqType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _str(name: str, **kw) -> sa.Column:
    return sa.Column(name, sa.String(), nullable=False, server_default="", **kw)


def _int(name: str) -> sa.Column:
    return sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")


def _enum(name: str) -> sa.Column:
    return sa.Column(name, sa.SmallInteger(), nullable=False, server_default="0")


tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("tenant_id", sa.String(), primary_key=True),
    sa.Column("name", sa.String(), nullable=False),
    sa.Column("created_ms", sa.BigInteger(), nullable=False),
    sa.Column("settings", sa.Text(), nullable=False, server_default="{}"),
    # Migration 0004 (scale-out): bumped in the same transaction as every
    # write of the tenant's budgets, policies, prices or settings (engine.py), so a
    # process sharing the store sees with one cheap read that its engine is stale.
    sa.Column("config_version", sa.BigInteger(), nullable=False, server_default="0"),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String(), primary_key=True),
    sa.Column(
        "tenant_id",
        sa.String(),
        sa.ForeignKey("tenants.tenant_id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("name", sa.String(), nullable=False, server_default=""),
    sa.Column("prefix", sa.String(), nullable=False, index=True),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("scopes", sa.String(), nullable=False),
    sa.Column("created_ms", sa.BigInteger(), nullable=False),
    sa.Column("revoked_ms", sa.BigInteger(), nullable=True),
    sa.Column("last_used_ms", sa.BigInteger(), nullable=True),
)


def _config_table(name: str) -> sa.Table:
    """budgets / policies / prices: an opaque spec (the core object's to_dict()) by id.

    ``id`` is the budget_id, the policy's id, or the model name of a price."""
    return sa.Table(
        name,
        metadata,
        sa.Column(
            "tenant_id",
            sa.String(),
            sa.ForeignKey("tenants.tenant_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("id", sa.String(), primary_key=True),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
    )


budgets = _config_table("budgets")
policies = _config_table("policies")
prices = _config_table("prices")

# The event kinds the ledger knows (column `kind`).
KINDS = ("record", "denied", "expired", "released")

events = sa.Table(
    "events",
    metadata,
    sa.Column("seq", SeqType, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.String(), nullable=False),
    sa.Column("event_id", sa.String(), nullable=False),
    sa.Column("event_ms", sa.BigInteger(), nullable=False),
    sa.Column("recorded_ms", sa.BigInteger(), nullable=False),
    sa.Column("kind", sa.String(), nullable=False),
    _str("reservation_id"),
    *[_str(dim) for dim in OWNER_KEYS],
    sa.Column("labels", sa.Text(), nullable=False, server_default="{}"),
    _str("provider"),
    _str("model"),
    _int("input_tokens"),
    _int("cached_input_tokens"),
    _int("cache_write_tokens"),
    _int("output_tokens"),
    _int("reasoning_tokens"),
    _int("cost_nanos"),
    _int("estimated_cost_nanos"),
    _int("overrun_nanos"),
    _int("revenue_nanos"),
    _enum("decision"),
    sa.Column("reasons", sa.Text(), nullable=False, server_default="[]"),
    sa.Column("rule_ids", sa.Text(), nullable=False, server_default="[]"),
    sa.Column("budget_ids", sa.Text(), nullable=False, server_default="[]"),
    # Added to the brief's column list: [[budget_id, period_start_ms], …] the cost was
    # committed to, so budget_periods can be recomputed from the ledger alone.
    sa.Column("budget_charges", sa.Text(), nullable=False, server_default="[]"),
    # Migration 0007: the service tier billed ("" = standard) and the usage beyond
    # the five token columns, a JSON object {Usage field: count} ("{}" = none).
    sa.Column("service_tier", sa.String(), nullable=False, server_default=""),
    sa.Column("units", sa.Text(), nullable=False, server_default="{}"),
    _enum("outcome"),
    _enum("evidence"),
    _enum("privacy_mode"),
    sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"),
    _str("retry_of"),
    _str("catalog_version"),
    sa.Column("duplicate_of", sa.String(), nullable=True),
    sa.Column("chain_hash", sa.String(), nullable=True),
    # Migration 0002: the event's position in its tenant's hash chain (1, 2, …; the
    # writer assigns it with chain_hash; canonical.py) and the content fingerprints
    # (hex, salted; fingerprint_only and above) that find_duplicate looks up.
    sa.Column("chain_index", sa.BigInteger(), nullable=True),
    sa.Column("prompt_fingerprint", sa.String(), nullable=True),
    sa.Column("response_fingerprint", sa.String(), nullable=True),
    sa.UniqueConstraint("tenant_id", "event_id"),
    sa.Index(None, "tenant_id", "event_ms"),
    sa.Index(None, "tenant_id", "customer", "event_ms"),
    sa.Index(None, "tenant_id", "reservation_id"),
    # One event per chain position (a second writer cannot fork the chain), and the
    # head lookup (ORDER BY chain_index DESC LIMIT 1).
    sa.Index("uq_events_tenant_id_chain_index", "tenant_id", "chain_index", unique=True),
    # Partial: events without fingerprints (metadata_only, the default) cost nothing.
    sa.Index(
        None,
        "tenant_id",
        "prompt_fingerprint",
        sqlite_where=sa.text("prompt_fingerprint IS NOT NULL"),
        postgresql_where=sa.text("prompt_fingerprint IS NOT NULL"),
    ),
)

# The dimensions of an hourly rollup row, after tenant_id and hour_ms.
ROLLUP_DIMS = (*OWNER_KEYS, "provider", "model", "outcome", "decision", "evidence")
# What a rollup row sums.
ROLLUP_SUMS = (
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
ROLLUP_KEY = ("tenant_id", "hour_ms", *ROLLUP_DIMS)

rollups_hourly = sa.Table(
    "rollups_hourly",
    metadata,
    sa.Column("tenant_id", sa.String(), nullable=False),
    sa.Column("hour_ms", sa.BigInteger(), nullable=False),
    *[_str(dim) for dim in OWNER_KEYS],
    _str("provider"),
    _str("model"),
    _enum("outcome"),
    _enum("decision"),
    _enum("evidence"),
    *[_int(name) for name in ROLLUP_SUMS],
    sa.UniqueConstraint(*ROLLUP_KEY, name="uq_rollups_hourly_key"),
)

# Daily spend per customer (migration 0002): the billing question ("what did each
# customer cost this month") must not scan one hourly rollup row per (customer,
# feature, model, …) combination, which at realistic cardinality is close to one per
# event. Same sums, one row per (tenant, UTC day, customer); written by the writer in
# the same transaction as the events and hourly rollups.
SPEND_DAILY_KEY = ("tenant_id", "day_ms", "customer")

spend_daily = sa.Table(
    "spend_daily",
    metadata,
    sa.Column("tenant_id", sa.String(), nullable=False),
    sa.Column("day_ms", sa.BigInteger(), nullable=False),
    _str("customer"),
    *[_int(name) for name in ROLLUP_SUMS],
    # The key is the primary key and, on SQLite, the table is WITHOUT ROWID: a month's
    # rows are one sequential range of the key's b-tree, sums included (no row
    # lookup per index entry).
    sa.PrimaryKeyConstraint(*SPEND_DAILY_KEY, name="pk_spend_daily"),
    sqlite_with_rowid=False,
)

# Content kinds (column `kind` of contents).
CONTENT_KINDS = ("prompt", "response")

# Prompts and responses kept under redacted_trace / full_trace (DESIGN §8): their own
# table with their own retention, so metadata queries and exports never read them and
# a purge never touches the ledger (or its hash chain). Migration 0002.
contents = sa.Table(
    "contents",
    metadata,
    sa.Column("tenant_id", sa.String(), primary_key=True),
    sa.Column("event_id", sa.String(), primary_key=True),
    sa.Column("kind", sa.String(), primary_key=True),
    # The privacy mode it was kept under (PrivacyMode value).
    _enum("mode"),
    sa.Column("text", sa.Text(), nullable=False),
    sa.Column("created_ms", sa.BigInteger(), nullable=False),
    # 0 = no expiry; purge_contents(now) deletes rows with 0 < expires_ms <= now.
    sa.Column("expires_ms", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Index(None, "expires_ms"),
)

budget_periods = sa.Table(
    "budget_periods",
    metadata,
    sa.Column("tenant_id", sa.String(), primary_key=True),
    sa.Column("budget_id", sa.String(), primary_key=True),
    sa.Column("period_start_ms", sa.BigInteger(), primary_key=True),
    sa.Column("committed_nanos", sa.BigInteger(), nullable=False, server_default="0"),
)

holds = sa.Table(
    "holds",
    metadata,
    sa.Column("tenant_id", sa.String(), primary_key=True),
    sa.Column("reservation_id", sa.String(), primary_key=True),
    sa.Column("expires_ms", sa.BigInteger(), nullable=False),
    sa.Column("data", sa.Text(), nullable=False),
    # The process (leases.LeaseManager.holder_id) that made the hold; "" without leases.
    sa.Column("maker", sa.String(), nullable=False, server_default=""),
    # What the hold holds, on which budgets (a JSON list): status is a grouped sum.
    sa.Column("amount_nanos", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("budget_ids", sa.String(), nullable=False, server_default="[]"),
    sa.Index("ix_holds_maker", "maker", "expires_ms"),
)

# Migration 0003 (scale-out; p402_server/runtime/leases.py owns every statement on
# these two): per budget and period, how much headroom is leased out to processes,
# and each process's lease (epoch-fenced).
budget_allocations = sa.Table(
    "budget_allocations",
    metadata,
    sa.Column("tenant_id", sa.String(), primary_key=True),
    sa.Column("budget_id", sa.String(), primary_key=True),
    sa.Column("period_start_ms", sa.BigInteger(), primary_key=True),
    sa.Column("limit_nanos", sa.BigInteger(), nullable=False),
    sa.Column("committed_nanos", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("leased_nanos", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("epoch", sa.BigInteger(), nullable=False, server_default="0"),
)

budget_leases = sa.Table(
    "budget_leases",
    metadata,
    sa.Column("tenant_id", sa.String(), primary_key=True),
    sa.Column("budget_id", sa.String(), primary_key=True),
    sa.Column("period_start_ms", sa.BigInteger(), primary_key=True),
    sa.Column("holder_id", sa.String(), primary_key=True),
    sa.Column("epoch", sa.BigInteger(), nullable=False),
    sa.Column("granted_nanos", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("used_nanos", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("expires_ms", sa.BigInteger(), nullable=False),
    sa.Index(None, "tenant_id", "expires_ms"),
)

# Migration 0005 (scale-out): with leases on, the one event that settles a
# reservation (written by the group-commit writer in that event's transaction; a
# settling event with another event_id is refused: ledger/writer.py).
hold_claims = sa.Table(
    "hold_claims",
    metadata,
    sa.Column("tenant_id", sa.String(), primary_key=True),
    sa.Column("reservation_id", sa.String(), primary_key=True),
    sa.Column("event_id", sa.String(), nullable=False),
    sa.Column("claimed_ms", sa.BigInteger(), nullable=False),
    sa.Index(None, "claimed_ms"),
)

# Migration 0008: the spend a budget found in the ledger when it was created in the
# middle of a period (events of its scope and period from before it existed, which
# carry no charge of it): budget_periods starts from this, and recomputing the totals
# from the events adds it back (Store.recompute_budget_totals).
budget_openings = sa.Table(
    "budget_openings",
    metadata,
    sa.Column("tenant_id", sa.String(), primary_key=True),
    sa.Column("budget_id", sa.String(), primary_key=True),
    sa.Column("period_start_ms", sa.BigInteger(), primary_key=True),
    sa.Column("opening_nanos", sa.BigInteger(), nullable=False),
    # The last event counted (events.seq) and when: what the opening covers.
    sa.Column("through_seq", sa.BigInteger(), nullable=False),
    sa.Column("created_ms", sa.BigInteger(), nullable=False),
)

# Migration 0009: closed period statements, one per (tenant, period, customer),
# immutable once written (statements.py owns the document).
statements = sa.Table(
    "statements",
    metadata,
    sa.Column("tenant_id", sa.String(), primary_key=True),
    sa.Column("period", sa.String(), primary_key=True),       # "YYYY-MM" (UTC)
    sa.Column("customer", sa.String(), primary_key=True),     # "" = no customer
    sa.Column("closed_ms", sa.BigInteger(), nullable=False),
    # The tenant's chain head when it was closed: the events it covers have a
    # chain_index at most this; later ones are adjustments of a later statement.
    sa.Column("through_index", sa.BigInteger(), nullable=False),
    sa.Column("document", sa.Text(), nullable=False),          # the signed JSON
)

# Migration 0006: the processes serving with leases on (alive while `expires_ms` is
# renewed), and the notices a process leaves a reservation's maker when it settled
# that reservation from its saved hold (runtime/foreign.py).
processes = sa.Table(
    "processes",
    metadata,
    sa.Column("process_id", sa.String(), primary_key=True),
    sa.Column("started_ms", sa.BigInteger(), nullable=False),
    sa.Column("expires_ms", sa.BigInteger(), nullable=False),
)

settle_notices = sa.Table(
    "settle_notices",
    metadata,
    sa.Column("tenant_id", sa.String(), primary_key=True),
    sa.Column("reservation_id", sa.String(), primary_key=True),
    sa.Column("maker", sa.String(), nullable=False),
    sa.Column("event_id", sa.String(), nullable=False),
    sa.Column("cost_nanos", sa.BigInteger(), nullable=False),
    sa.Column("created_ms", sa.BigInteger(), nullable=False),
    sa.Index("ix_settle_notices_maker", "maker"),
)

__all__ = [
    "metadata",
    "processes",
    "settle_notices",
    "budget_allocations",
    "budget_leases",
    "tenants",
    "api_keys",
    "budgets",
    "policies",
    "prices",
    "events",
    "rollups_hourly",
    "budget_periods",
    "holds",
    "hold_claims",
    "contents",
    "spend_daily",
    "SPEND_DAILY_KEY",
    "KINDS",
    "CONTENT_KINDS",
    "ROLLUP_DIMS",
    "ROLLUP_SUMS",
    "ROLLUP_KEY",
]
