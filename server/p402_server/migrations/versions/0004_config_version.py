"""A per-tenant config version (scale-out): tenants.config_version.

Bumped by the store in the same transaction as every write of the tenant's budgets,
policies, prices or settings; processes sharing the store poll it (runtime.py) and
reload a tenant's config when it moved. Existing tenants start at 0.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A constant default: SQLite's ADD COLUMN takes it as is (no table rebuild), and
    # every existing row reads 0.
    op.add_column("tenants", sa.Column("config_version", sa.BigInteger(), nullable=False,
                                       server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("config_version")
