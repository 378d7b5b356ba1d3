"""Hold claims (issue 7, scale-out): who settles a reservation when several processes
share one ledger.

One row per reservation whose settlement was claimed: by the process that expires
it, or by a process that settles a reservation another process made (a gateway that
retried its Record elsewhere). The primary key makes the claim atomic: the INSERT
that inserts the row owns the settlement; any other claimant finds it there and
leaves the settlement to the owner. runtime.py and store/engine.py (`claim_holds`)
own every statement; old rows are pruned by `prune_hold_claims`.

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
        sa.Column("claimed_ms", sa.BigInteger(), nullable=False),
        sa.Column("holder_id", sa.String(), nullable=False, server_default=""),
        sa.PrimaryKeyConstraint("tenant_id", "reservation_id"),
    )
    op.create_index("ix_hold_claims_claimed_ms", "hold_claims", ["claimed_ms"])


def downgrade() -> None:
    op.drop_index("ix_hold_claims_claimed_ms", table_name="hold_claims")
    op.drop_table("hold_claims")
