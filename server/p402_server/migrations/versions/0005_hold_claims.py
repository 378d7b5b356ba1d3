"""Hold claims (scale-out): who settles a reservation when several processes
share one ledger.

One row per reservation settled with leases on: the event_id of the one event
that settles it. The group-commit writer inserts it in the same transaction as the
event (store/writer.py, events with ``claim`` set); a second settling event with
another event_id finds the row and is not written (its writer reports who won).
Old rows are pruned by ``Store.prune_hold_claims``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hold_claims",
        sa.Column("tenant_id", sa.String(), nullable=False),
        sa.Column("reservation_id", sa.String(), nullable=False),
        sa.Column("event_id", sa.String(), nullable=False),
        sa.Column("claimed_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "reservation_id"),
    )
    op.create_index("ix_hold_claims_claimed_ms", "hold_claims", ["claimed_ms"])


def downgrade() -> None:
    op.drop_index("ix_hold_claims_claimed_ms", table_name="hold_claims")
    op.drop_table("hold_claims")
