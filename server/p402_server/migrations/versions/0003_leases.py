"""Leased budget slices (scale-out): budget_allocations and budget_leases.

p402_server/runtime/leases.py owns every statement on them (its docstring is the design).
Both start empty: a process that leases creates its rows on first use.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budget_allocations",
        sa.Column("tenant_id", sa.String(), nullable=False),
        sa.Column("budget_id", sa.String(), nullable=False),
        sa.Column("period_start_ms", sa.BigInteger(), nullable=False),
        sa.Column("limit_nanos", sa.BigInteger(), nullable=False),
        sa.Column("committed_nanos", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("leased_nanos", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("epoch", sa.BigInteger(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("tenant_id", "budget_id", "period_start_ms"),
    )
    op.create_table(
        "budget_leases",
        sa.Column("tenant_id", sa.String(), nullable=False),
        sa.Column("budget_id", sa.String(), nullable=False),
        sa.Column("period_start_ms", sa.BigInteger(), nullable=False),
        sa.Column("holder_id", sa.String(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("granted_nanos", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("used_nanos", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("expires_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "budget_id", "period_start_ms", "holder_id"),
    )
    op.create_index("ix_budget_leases_tenant_id_expires_ms", "budget_leases",
                    ["tenant_id", "expires_ms"])


def downgrade() -> None:
    op.drop_index("ix_budget_leases_tenant_id_expires_ms", table_name="budget_leases")
    op.drop_table("budget_leases")
    op.drop_table("budget_allocations")
