"""Callback in queue: the ``callbacks`` table.

Hand-written, like 0001 and 0002: every constraint name is spelled out with
``op.f()`` and follows ``ctid.store.models.NAMING_CONVENTION``.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

# Frozen copies of the column types (see 0001).
_TS = sa.DateTime(timezone=True)
_ID = sa.String(64)


def upgrade() -> None:
    op.create_table(
        "callbacks",
        sa.Column("id", _ID, nullable=False),
        sa.Column("tenant", _ID, nullable=False),
        sa.Column("queue", _ID, nullable=False),
        sa.Column("call_id", _ID, nullable=False),
        sa.Column("number", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("enqueued_at", _TS, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _TS, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("last_status", sa.String(32), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callbacks")),
        sa.CheckConstraint("state IN ('waiting', 'dialing', 'done', 'failed', 'expired')",
                           name=op.f("ck_callbacks_state")),
        sa.CheckConstraint("priority BETWEEN 0 AND 9", name=op.f("ck_callbacks_priority")),
    )
    op.create_index(op.f("ix_callbacks_state"), "callbacks", ["state"])


def downgrade() -> None:
    op.drop_index(op.f("ix_callbacks_state"), table_name="callbacks")
    op.drop_table("callbacks")
