"""IVR: the ``ivr_sessions`` table (one row per flow run) and ``survey_results``.

Hand-written, like 0001-0003: every constraint name is spelled out with ``op.f()``
and follows ``ctid.store.models.NAMING_CONVENTION``.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

# Frozen copies of the column types (see 0001).
_TS = sa.DateTime(timezone=True)
_ID = sa.String(64)
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "ivr_sessions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("call_id", _ID, nullable=False),
        sa.Column("tenant", _ID, nullable=False),
        sa.Column("flow", _ID, nullable=False),
        sa.Column("service_line", _ID, nullable=True),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("ended_at", _TS, nullable=False),
        sa.Column("exit_reason", sa.String(16), nullable=False),
        sa.Column("exit_node", _ID, nullable=True),
        sa.Column("error", sa.String(500), nullable=True),
        sa.Column("steps", _JSON, nullable=False),
        sa.Column("variables", _JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ivr_sessions")),
    )
    op.create_index(op.f("ix_ivr_sessions_call_id"), "ivr_sessions", ["call_id"])
    op.create_index(op.f("ix_ivr_sessions_tenant_started_at"), "ivr_sessions", ["tenant", "started_at"])
    op.create_table(
        "survey_results",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("call_id", _ID, nullable=False),
        sa.Column("tenant", _ID, nullable=False),
        sa.Column("agent_id", _ID, nullable=True),
        sa.Column("queue", _ID, nullable=True),
        sa.Column("flow", _ID, nullable=False),
        sa.Column("question", _ID, nullable=False),
        sa.Column("score", sa.Integer(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_survey_results")),
        sa.CheckConstraint("score BETWEEN 1 AND 5", name=op.f("ck_survey_results_score")),
        sa.UniqueConstraint("call_id", "question", name=op.f("uq_survey_results_call_id_question")),
    )
    op.create_index(op.f("ix_survey_results_agent_id"), "survey_results", ["agent_id", "created_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_survey_results_agent_id"), table_name="survey_results")
    op.drop_table("survey_results")
    op.drop_index(op.f("ix_ivr_sessions_tenant_started_at"), table_name="ivr_sessions")
    op.drop_index(op.f("ix_ivr_sessions_call_id"), table_name="ivr_sessions")
    op.drop_table("ivr_sessions")
