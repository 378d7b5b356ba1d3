"""Budget openings: a budget created in the middle of a period starts from the spend
already in the ledger for its scope and period; this table keeps that opening (and
the last event it counted), so the budget totals can still be recomputed from the
ledger alone.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budget_openings",
        sa.Column("tenant_id", sa.String(), nullable=False),
        sa.Column("budget_id", sa.String(), nullable=False),
        sa.Column("period_start_ms", sa.BigInteger(), nullable=False),
        sa.Column("opening_nanos", sa.BigInteger(), nullable=False),
        sa.Column("through_seq", sa.BigInteger(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "budget_id", "period_start_ms"),
    )


def downgrade() -> None:
    op.drop_table("budget_openings")
