"""Usage units and service tiers on events: what a call used beyond the five token
columns (images, seconds of audio, characters, audio and image tokens, …, as a JSON
object {Usage field: count}) and the service tier the provider billed. Existing
events get "{}" and "" (standard), which is what they were priced at.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("service_tier", sa.String(), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("units", sa.Text(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.drop_column("units")
        batch.drop_column("service_tier")
