"""Hash chain positions, content fingerprints, the contents table.

- events.chain_index (the position in the tenant's hash chain), unique per tenant;
- events.prompt_fingerprint / response_fingerprint, with a partial index on
  (tenant_id, prompt_fingerprint) for duplicate lookups;
- contents (prompts and responses kept under redacted_trace / full_trace, with their
  own retention);
- spend_daily (tenant, UTC day, customer → the rollup sums), filled from the hourly
  rollups of existing events;
- existing events are chained: per tenant, in seq order (their commit order), with
  the version 1 canonical encoding (p402_server/ledger/canonical.py, which never
  changes: a later encoding is a new version).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""
from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_NOT_NULL_FP = "prompt_fingerprint IS NOT NULL"
_SUMS = ("events", "input_tokens", "cached_input_tokens", "cache_write_tokens",
         "output_tokens", "reasoning_tokens", "cost_nanos", "estimated_cost_nanos",
         "revenue_nanos")


def upgrade() -> None:
    op.add_column("events", sa.Column("chain_index", sa.BigInteger(), nullable=True))
    op.add_column("events", sa.Column("prompt_fingerprint", sa.String(), nullable=True))
    op.add_column("events", sa.Column("response_fingerprint", sa.String(), nullable=True))
    _chain_existing_events()
    op.create_index(
        "uq_events_tenant_id_chain_index", "events", ["tenant_id", "chain_index"], unique=True
    )
    op.create_index(
        "ix_events_tenant_id_prompt_fingerprint",
        "events",
        ["tenant_id", "prompt_fingerprint"],
        sqlite_where=sa.text(_NOT_NULL_FP),
        postgresql_where=sa.text(_NOT_NULL_FP),
    )
    op.create_table(
        "contents",
        sa.Column("tenant_id", sa.String(), nullable=False),
        sa.Column("event_id", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("mode", sa.SmallInteger(), nullable=False, server_default="0"),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("expires_ms", sa.BigInteger(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("tenant_id", "event_id", "kind", name="pk_contents"),
    )
    op.create_index("ix_contents_expires_ms", "contents", ["expires_ms"])
    op.create_table(
        "spend_daily",
        sa.Column("tenant_id", sa.String(), nullable=False),
        sa.Column("day_ms", sa.BigInteger(), nullable=False),
        sa.Column("customer", sa.String(), nullable=False, server_default=""),
        *[sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")
          for name in _SUMS],
        sa.PrimaryKeyConstraint("tenant_id", "day_ms", "customer", name="pk_spend_daily"),
        sqlite_with_rowid=False,
    )
    # Existing events count too (their hourly rollups hold the customer and hour).
    sums = ", ".join(_SUMS)
    op.execute(
        f"INSERT INTO spend_daily (tenant_id, day_ms, customer, {sums}) "
        f"SELECT tenant_id, hour_ms - hour_ms % 86400000, customer, "
        + ", ".join(f"sum({c})" for c in _SUMS)
        + " FROM rollups_hourly GROUP BY tenant_id, hour_ms - hour_ms % 86400000, customer"
    )


def _chain_existing_events() -> None:
    """Give every event already in the ledger its chain position and hash."""
    from p402_server.ledger.canonical import canonical_bytes
    from p402_server.ledger.model import from_row

    conn = op.get_bind()
    events = sa.table("events", sa.column("seq"), sa.column("chain_index"),
                      sa.column("chain_hash"))
    tenants = [t for (t,) in conn.execute(sa.text("SELECT DISTINCT tenant_id FROM events"))]
    for tenant_id in sorted(tenants):
        prev, index, after = bytes(32), 0, 0
        while True:
            rows = conn.execute(
                sa.text("SELECT * FROM events WHERE tenant_id = :t AND seq > :after "
                        "ORDER BY seq LIMIT 5000"),
                {"t": tenant_id, "after": after},
            ).mappings().all()
            if not rows:
                break
            updates = []
            for row in rows:
                ev = from_row(row)
                prev = hashlib.sha256(prev + canonical_bytes(ev)).digest()
                index += 1
                updates.append({"s": int(row["seq"]), "i": index, "h": prev.hex()})
            conn.execute(
                events.update()
                .where(events.c.seq == sa.bindparam("s"))
                .values(chain_index=sa.bindparam("i"), chain_hash=sa.bindparam("h")),
                updates,
            )
            after = int(rows[-1]["seq"])


def downgrade() -> None:
    op.drop_table("spend_daily")
    op.drop_index("ix_contents_expires_ms", table_name="contents")
    op.drop_table("contents")
    op.drop_index("ix_events_tenant_id_prompt_fingerprint", table_name="events")
    op.drop_index("uq_events_tenant_id_chain_index", table_name="events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("response_fingerprint")
        batch.drop_column("prompt_fingerprint")
        batch.drop_column("chain_index")
