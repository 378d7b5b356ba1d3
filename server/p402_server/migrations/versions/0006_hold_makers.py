"""Reservation makers: which process made each saved hold, which processes are alive,
and the notices that tell a maker its hold was settled elsewhere.

- `processes`: one row per server process with leases on (its holder id), renewed
  every second; a row past `expires_ms` is a dead process, whose expired holds any
  survivor settles into the ledger (runtime.Runtime.sweep_dead_holds).
- `holds.maker`: the process that made the hold (and whose lease holds its money);
  `holds.amount_nanos` and `holds.budget_ids` (a JSON list): what it holds on which
  budgets, so budget status across processes is one grouped sum.
- `settle_notices`: a process that settled another's reservation from its saved
  hold leaves a notice for the maker, which books the settlement into its engine and
  lease (runtime.Runtime.take_notices). Lost notices only delay the booking: the
  maker's own expiry of the hold finds the settling event (the claim) then.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "processes",
        sa.Column("process_id", sa.String(), nullable=False),
        sa.Column("started_ms", sa.BigInteger(), nullable=False),
        sa.Column("expires_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("process_id"),
    )
    with op.batch_alter_table("holds") as batch:
        batch.add_column(sa.Column("maker", sa.String(), nullable=False, server_default=""))
        batch.add_column(sa.Column("amount_nanos", sa.BigInteger(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("budget_ids", sa.String(), nullable=False,
                                   server_default="[]"))
    op.create_index("ix_holds_maker", "holds", ["maker", "expires_ms"])
    op.create_table(
        "settle_notices",
        sa.Column("tenant_id", sa.String(), nullable=False),
        sa.Column("reservation_id", sa.String(), nullable=False),
        sa.Column("maker", sa.String(), nullable=False),
        sa.Column("event_id", sa.String(), nullable=False),
        sa.Column("cost_nanos", sa.BigInteger(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "reservation_id"),
    )
    op.create_index("ix_settle_notices_maker", "settle_notices", ["maker"])


def downgrade() -> None:
    op.drop_index("ix_settle_notices_maker", table_name="settle_notices")
    op.drop_table("settle_notices")
    op.drop_index("ix_holds_maker", table_name="holds")
    with op.batch_alter_table("holds") as batch:
        batch.drop_column("budget_ids")
        batch.drop_column("amount_nanos")
        batch.drop_column("maker")
    op.drop_table("processes")
