"""Provisioning: agents, agent_skills, queues, the skills catalogue, audit_log.

Hand-written, like 0001: every constraint name is spelled out with ``op.f()``
and follows ``ctid.store.models.NAMING_CONVENTION``. ``skills`` is created
before ``agent_skills``, whose ``skill`` column refers to it.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

# Frozen copies of the column types (see 0001).
_TS = sa.DateTime(timezone=True)
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_NULLABLE_JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
_ID = sa.String(64)
_SKILL = sa.String(129)


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("id", _ID, nullable=False),
        sa.Column("tenant", _ID, nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("pin_hash", sa.Text(), nullable=False),
        sa.Column("max_calls", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
        sa.CheckConstraint("source IN ('config', 'api')", name=op.f("ck_agents_source")),
        sa.CheckConstraint("max_calls BETWEEN 1 AND 10", name=op.f("ck_agents_max_calls")),
    )
    op.create_index(op.f("ix_agents_tenant"), "agents", ["tenant"])

    op.create_table(
        "skills",
        sa.Column("name", _SKILL, nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_skills")),
    )

    op.create_table(
        "agent_skills",
        sa.Column("agent_id", _ID, nullable=False),
        sa.Column("skill", _SKILL, nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("agent_id", "skill", name=op.f("pk_agent_skills")),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name=op.f("fk_agent_skills_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(["skill"], ["skills.name"], name=op.f("fk_agent_skills_skill_skills")),
        sa.CheckConstraint("level BETWEEN 1 AND 10", name=op.f("ck_agent_skills_level")),
    )

    op.create_table(
        "queues",
        sa.Column("id", _ID, nullable=False),
        sa.Column("tenant", _ID, nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("options", _JSON, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_queues")),
        sa.CheckConstraint("source IN ('config', 'api')", name=op.f("ck_queues_source")),
    )
    op.create_index(op.f("ix_queues_tenant"), "queues", ["tenant"])

    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("ts", _TS, nullable=False),
        sa.Column("actor", _ID, nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("entity", sa.String(16), nullable=False),
        sa.Column("entity_id", _SKILL, nullable=False),
        sa.Column("before", _NULLABLE_JSON, nullable=True),
        sa.Column("after", _NULLABLE_JSON, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_ts"), "audit_log", ["ts"])
    op.create_index(op.f("ix_audit_log_entity_entity_id"), "audit_log", ["entity", "entity_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_audit_log_entity_entity_id"), table_name="audit_log")
    op.drop_index(op.f("ix_audit_log_ts"), table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_index(op.f("ix_queues_tenant"), table_name="queues")
    op.drop_table("queues")
    op.drop_table("agent_skills")
    op.drop_table("skills")
    op.drop_index(op.f("ix_agents_tenant"), table_name="agents")
    op.drop_table("agents")
