"""Initial schema: tenants, keys, config, events ledger, hourly rollups, budget periods, holds.

A snapshot written out by hand (not imported from schema.py), so later changes to
schema.py need a new revision; tests/server/test_store.py checks that the migrated
database matches schema.py exactly.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

OWNERS = ("customer", "feature", "workflow", "task", "department", "employee")
SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _str(name: str) -> sa.Column:
    return sa.Column(name, sa.String(), nullable=False, server_default="")


def _int(name: str) -> sa.Column:
    return sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")


def _enum(name: str) -> sa.Column:
    return sa.Column(name, sa.SmallInteger(), nullable=False, server_default="0")


def _tenant_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["tenant_id"],
        ["tenants.tenant_id"],
        name=f"fk_{table}_tenant_id_tenants",
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("tenant_id", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("settings", sa.Text(), nullable=False, server_default="{}"),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_tenants"),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(), nullable=False),
        sa.Column("tenant_id", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False, server_default=""),
        sa.Column("prefix", sa.String(), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("scopes", sa.String(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("revoked_ms", sa.BigInteger(), nullable=True),
        sa.Column("last_used_ms", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("key_id", name="pk_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
        _tenant_fk("api_keys"),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    op.create_index("ix_api_keys_prefix", "api_keys", ["prefix"])

    for table in ("budgets", "policies", "prices"):
        op.create_table(
            table,
            sa.Column("tenant_id", sa.String(), nullable=False),
            sa.Column("id", sa.String(), nullable=False),
            sa.Column("spec", sa.Text(), nullable=False),
            sa.Column("updated_ms", sa.BigInteger(), nullable=False),
            sa.PrimaryKeyConstraint("tenant_id", "id", name=f"pk_{table}"),
            _tenant_fk(table),
        )

    op.create_table(
        "events",
        sa.Column("seq", SEQ, nullable=False, autoincrement=True),
        sa.Column("tenant_id", sa.String(), nullable=False),
        sa.Column("event_id", sa.String(), nullable=False),
        sa.Column("event_ms", sa.BigInteger(), nullable=False),
        sa.Column("recorded_ms", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        _str("reservation_id"),
        *[_str(dim) for dim in OWNERS],
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
        sa.Column("budget_charges", sa.Text(), nullable=False, server_default="[]"),
        _enum("outcome"),
        _enum("evidence"),
        _enum("privacy_mode"),
        sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"),
        _str("retry_of"),
        _str("catalog_version"),
        sa.Column("duplicate_of", sa.String(), nullable=True),
        sa.Column("chain_hash", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("seq", name="pk_events"),
        sa.UniqueConstraint("tenant_id", "event_id", name="uq_events_tenant_id_event_id"),
    )
    op.create_index("ix_events_tenant_id_event_ms", "events", ["tenant_id", "event_ms"])
    op.create_index(
        "ix_events_tenant_id_customer_event_ms", "events", ["tenant_id", "customer", "event_ms"]
    )
    op.create_index(
        "ix_events_tenant_id_reservation_id", "events", ["tenant_id", "reservation_id"]
    )

    dims = (*OWNERS, "provider", "model")
    sums = (
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
    op.create_table(
        "rollups_hourly",
        sa.Column("tenant_id", sa.String(), nullable=False),
        sa.Column("hour_ms", sa.BigInteger(), nullable=False),
        *[_str(dim) for dim in dims],
        _enum("outcome"),
        _enum("decision"),
        _enum("evidence"),
        *[_int(name) for name in sums],
        sa.UniqueConstraint(
            "tenant_id", "hour_ms", *dims, "outcome", "decision", "evidence",
            name="uq_rollups_hourly_key",
        ),
    )
    op.create_table(
        "budget_periods",
        sa.Column("tenant_id", sa.String(), nullable=False),
        sa.Column("budget_id", sa.String(), nullable=False),
        sa.Column("period_start_ms", sa.BigInteger(), nullable=False),
        sa.Column("committed_nanos", sa.BigInteger(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint(
            "tenant_id", "budget_id", "period_start_ms", name="pk_budget_periods"
        ),
    )
    op.create_table(
        "holds",
        sa.Column("tenant_id", sa.String(), nullable=False),
        sa.Column("reservation_id", sa.String(), nullable=False),
        sa.Column("expires_ms", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "reservation_id", name="pk_holds"),
    )


def downgrade() -> None:
    for table in (
        "holds",
        "budget_periods",
        "rollups_hourly",
        "events",
        "prices",
        "policies",
        "budgets",
        "api_keys",
        "tenants",
    ):
        op.drop_table(table)
