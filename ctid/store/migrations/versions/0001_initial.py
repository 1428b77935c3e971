"""Initial schema: calls, call_legs, event_outbox, meta.

Hand-written so it stays deterministic. Constraint names are spelled out and
follow ``ctid.store.models.NAMING_CONVENTION``; a later batch migration on
SQLite relies on finding them by these names. ``op.f()`` marks each name as
final, so Alembic does not run it through the naming convention a second time
(``ck_calls_direction`` would otherwise become ``ck_calls_ck_calls_direction``).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# Frozen copies of the column types: a migration must not change meaning when
# the models module changes later.
_TS = sa.DateTime(timezone=True)
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("call_id", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("service_line", sa.String(64), nullable=True),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("caller_number", sa.Text(), nullable=True),
        sa.Column("caller_name", sa.Text(), nullable=True),
        sa.Column("dnis", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("answered_at", _TS, nullable=True),
        sa.Column("ended_at", _TS, nullable=True),
        sa.Column("hangup_cause", sa.Integer(), nullable=True),
        sa.Column("hangup_by", sa.String(16), nullable=True),
        sa.Column("linkedid", sa.String(150), nullable=True),
        sa.Column("data", _JSON, nullable=False),
        sa.PrimaryKeyConstraint("call_id", name=op.f("pk_calls")),
        sa.CheckConstraint("direction IN ('inbound', 'outbound', 'internal')", name=op.f("ck_calls_direction")),
    )
    op.create_index(op.f("ix_calls_tenant_created_at"), "calls", ["tenant", "created_at"])
    op.create_index(op.f("ix_calls_linkedid"), "calls", ["linkedid"])

    op.create_table(
        "call_legs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("call_id", sa.String(64), nullable=False),
        sa.Column("channel", sa.String(255), nullable=False),
        sa.Column("uniqueid", sa.String(150), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("answered_at", _TS, nullable=True),
        sa.Column("ended_at", _TS, nullable=True),
        sa.Column("hangup_cause", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_call_legs")),
        sa.ForeignKeyConstraint(
            ["call_id"],
            ["calls.call_id"],
            name=op.f("fk_call_legs_call_id_calls"),
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("call_id", "uniqueid", name=op.f("uq_call_legs_call_id_uniqueid")),
    )

    op.create_table(
        "event_outbox",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("ts", _TS, nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=True),
        sa.Column("call_id", sa.String(64), nullable=True),
        sa.Column("agent_id", sa.String(64), nullable=True),
        sa.Column("queue", sa.String(64), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_event_outbox")),
        sa.UniqueConstraint("id", name=op.f("uq_event_outbox_id")),
    )
    op.create_index(op.f("ix_event_outbox_tenant_seq"), "event_outbox", ["tenant", "seq"])
    op.create_index(op.f("ix_event_outbox_ts"), "event_outbox", ["ts"])

    op.create_table(
        "meta",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_meta")),
    )


def downgrade() -> None:
    op.drop_table("meta")
    op.drop_index(op.f("ix_event_outbox_ts"), table_name="event_outbox")
    op.drop_index(op.f("ix_event_outbox_tenant_seq"), table_name="event_outbox")
    op.drop_table("event_outbox")
    op.drop_table("call_legs")
    op.drop_index(op.f("ix_calls_linkedid"), table_name="calls")
    op.drop_index(op.f("ix_calls_tenant_created_at"), table_name="calls")
    op.drop_table("calls")
