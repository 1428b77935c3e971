"""The database schema, as SQLAlchemy 2 declarative models.

These models describe the schema that the Alembic migrations in
``ctid/store/migrations/versions`` build; a test compares the two on both
dialects, so a change here without a migration (or the reverse) fails CI.

Constraint names come from :data:`NAMING_CONVENTION`. Alembic's batch mode on
SQLite rebuilds a table to alter it and can only drop or alter a constraint it
can name, so every constraint gets a predictable name.

Timestamps are :class:`~ctid.store.types.UTCDateTime` (aware UTC in, aware UTC
out). JSON columns are ``JSONB`` on PostgreSQL and SQLite's JSON text elsewhere.

Provisioning (revision 0002; the repository is :mod:`ctid.store.provisioning`):
``agents`` with their ``agent_skills``, ``queues`` (their routing options are
one JSON document that :class:`ctid.config.QueueConfig` validates), the
``skills`` catalogue, and the ``audit_log`` of every change made to them.

Callback in queue (revision 0003; the repository is :mod:`ctid.acd.callbacks`):
``callbacks``, one row per number a waiting caller left, with its place in the queue
(the original ``enqueued_at``), its attempts and its state.

IVR (revision 0004; the writer is :mod:`ctid.store.ivr`): ``ivr_sessions``, one row per
flow run (steps, inputs masked, exit reason: the containment KPI), and
``survey_results``, one row per answered survey question, by call and by agent.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from ctid.store.types import UTCDateTime

__all__ = [
    "CALLBACK_STATES",
    "CALL_DIRECTIONS",
    "NAMING_CONVENTION",
    "SOURCES",
    "AgentSkill",
    "AuditEntry",
    "Base",
    "Call",
    "CallLeg",
    "Callback",
    "EventOutbox",
    "IVRSession",
    "Meta",
    "ProvisionedAgent",
    "ProvisionedQueue",
    "Skill",
    "SurveyResult",
    "metadata",
]

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

CALL_DIRECTIONS: tuple[str, ...] = ("inbound", "outbound", "internal")

# JSON that PostgreSQL can index and compare; plain JSON text on SQLite.
JSONDocument = JSON().with_variant(JSONB(), "postgresql")
# The same, where Python None is stored as SQL NULL rather than JSON null.
NullableJSONDocument = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")

#: Where a provisioned entry's current content came from.
SOURCES: tuple[str, ...] = ("config", "api")

# Lengths. call_id is ctid's own id. Asterisk allows a UNIQUEID/LINKEDID of up
# to 150 characters when the originator sets ChannelId, so those are wider.
CALL_ID_LEN = 64
NAME_LEN = 64
ASTERISK_ID_LEN = 150
CHANNEL_LEN = 255
# A skill is NAME or NAME:VALUE, each part an id of up to 64 characters.
SKILL_LEN = 129


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


metadata = Base.metadata


class Call(Base):
    """One call as ctid knows it: the row behind a :class:`ctid.store.calls.CallRecord`."""

    __tablename__ = "calls"
    __table_args__ = (
        CheckConstraint("direction IN ('inbound', 'outbound', 'internal')", name="direction"),
        Index("ix_calls_tenant_created_at", "tenant", "created_at"),
        Index("ix_calls_linkedid", "linkedid"),
    )

    call_id: Mapped[str] = mapped_column(String(CALL_ID_LEN), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(NAME_LEN))
    service_line: Mapped[str | None] = mapped_column(String(NAME_LEN))
    direction: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(32))
    caller_number: Mapped[str | None] = mapped_column(Text)  # data from the trunk: any length
    caller_name: Mapped[str | None] = mapped_column(Text)
    dnis: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    hangup_cause: Mapped[int | None] = mapped_column(Integer)
    hangup_by: Mapped[str | None] = mapped_column(String(16))
    linkedid: Mapped[str | None] = mapped_column(String(ASTERISK_ID_LEN))
    data: Mapped[dict[str, Any]] = mapped_column(JSONDocument)

    # lazy="raise": under asyncio an implicit lazy load would be hidden I/O, so
    # every query that needs legs must ask for them (selectinload).
    legs: Mapped[list[CallLeg]] = relationship(
        back_populates="call",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="CallLeg.id",
        lazy="raise",
    )


class CallLeg(Base):
    """One Asterisk channel that took part in a call, keyed by its uniqueid."""

    __tablename__ = "call_legs"
    __table_args__ = (UniqueConstraint("call_id", "uniqueid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    call_id: Mapped[str] = mapped_column(String(CALL_ID_LEN), ForeignKey("calls.call_id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(CHANNEL_LEN))
    uniqueid: Mapped[str] = mapped_column(String(ASTERISK_ID_LEN))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    hangup_cause: Mapped[int | None] = mapped_column(Integer)

    call: Mapped[Call] = relationship(back_populates="legs", lazy="raise")


class EventOutbox(Base):
    """The persisted event stream: one row per published envelope.

    ``seq`` is assigned by the single outbox writer (never by the database), so
    it is the same number live subscribers saw. ``payload`` is the full JSON
    envelope as sent; the other columns exist to filter replays.
    """

    __tablename__ = "event_outbox"
    __table_args__ = (
        UniqueConstraint("id"),
        Index("ix_event_outbox_tenant_seq", "tenant", "seq"),
        Index("ix_event_outbox_ts", "ts"),
    )

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    id: Mapped[str] = mapped_column(String(36))
    ts: Mapped[datetime] = mapped_column(UTCDateTime())
    type: Mapped[str] = mapped_column(String(64))
    tenant: Mapped[str | None] = mapped_column(String(NAME_LEN))
    call_id: Mapped[str | None] = mapped_column(String(CALL_ID_LEN))
    agent_id: Mapped[str | None] = mapped_column(String(NAME_LEN))
    queue: Mapped[str | None] = mapped_column(String(NAME_LEN))
    payload: Mapped[str] = mapped_column(Text)


class Meta(Base):
    """Free-form key/value facts about this database (schema, instance)."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ProvisionedAgent(Base):
    """An agent as provisioned: seeded from the config or managed over the admin API.

    ``source`` says who wrote the current content: ``config`` (seeded, or
    overwritten by ``ctid seed --force``) or ``api`` (an admin changed it).
    """

    __tablename__ = "agents"
    __table_args__ = (
        CheckConstraint("source IN ('config', 'api')", name="source"),
        CheckConstraint("max_calls BETWEEN 1 AND 10", name="max_calls"),
        Index("ix_agents_tenant", "tenant"),
    )

    id: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(NAME_LEN))
    name: Mapped[str] = mapped_column(Text)
    pin_hash: Mapped[str] = mapped_column(Text)
    max_calls: Mapped[int] = mapped_column(Integer)
    enabled: Mapped[bool] = mapped_column(Boolean)
    source: Mapped[str] = mapped_column(String(16))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    skills: Mapped[list[AgentSkill]] = relationship(
        back_populates="agent",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="AgentSkill.skill",
        lazy="raise",
    )


class AgentSkill(Base):
    """One skill of an agent, at a level of 1..10. The name must be in the catalogue."""

    __tablename__ = "agent_skills"
    __table_args__ = (CheckConstraint("level BETWEEN 1 AND 10", name="level"),)

    agent_id: Mapped[str] = mapped_column(
        String(NAME_LEN), ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True
    )
    skill: Mapped[str] = mapped_column(String(SKILL_LEN), ForeignKey("skills.name"), primary_key=True)
    level: Mapped[int] = mapped_column(Integer)

    agent: Mapped[ProvisionedAgent] = relationship(back_populates="skills", lazy="raise")


class ProvisionedQueue(Base):
    """A queue as provisioned. ``options`` is everything but id, tenant and name, as
    :class:`ctid.config.QueueConfig` validates it (only the options that were set)."""

    __tablename__ = "queues"
    __table_args__ = (
        CheckConstraint("source IN ('config', 'api')", name="source"),
        Index("ix_queues_tenant", "tenant"),
    )

    id: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(NAME_LEN))
    name: Mapped[str] = mapped_column(Text)
    options: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    source: Mapped[str] = mapped_column(String(16))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Skill(Base):
    """The skill catalogue: every skill name an agent may have."""

    __tablename__ = "skills"

    name: Mapped[str] = mapped_column(String(SKILL_LEN), primary_key=True)
    description: Mapped[str] = mapped_column(Text)


class AuditEntry(Base):
    """One change to provisioning, written in the same transaction as the change.

    ``before``/``after`` are the entity as JSON (None for a create / a delete);
    PIN hashes never appear in them, only whether one is set.
    """

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_ts", "ts"),
        Index("ix_audit_log_entity_entity_id", "entity", "entity_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(NAME_LEN))
    action: Mapped[str] = mapped_column(String(32))
    entity: Mapped[str] = mapped_column(String(16))
    entity_id: Mapped[str] = mapped_column(String(SKILL_LEN))
    before: Mapped[dict[str, Any] | None] = mapped_column(NullableJSONDocument)
    after: Mapped[dict[str, Any] | None] = mapped_column(NullableJSONDocument)


#: The states of a callback (``callbacks.state``).
CALLBACK_STATES: tuple[str, ...] = ("waiting", "dialing", "done", "failed", "expired")


class Callback(Base):
    """A callback in queue: the caller left ``number`` and hung up; ctid calls back when
    their turn comes. ``enqueued_at`` is the original call's enqueue time (the place in
    the queue); ``next_attempt_at`` is when it may be offered again after a failure."""

    __tablename__ = "callbacks"
    __table_args__ = (
        CheckConstraint("state IN ('waiting', 'dialing', 'done', 'failed', 'expired')", name="state"),
        CheckConstraint("priority BETWEEN 0 AND 9", name="priority"),
        Index("ix_callbacks_state", "state"),
    )

    id: Mapped[str] = mapped_column(String(CALL_ID_LEN), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(NAME_LEN))
    queue: Mapped[str] = mapped_column(String(NAME_LEN))
    call_id: Mapped[str] = mapped_column(String(CALL_ID_LEN))
    number: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer)
    enqueued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    state: Mapped[str] = mapped_column(String(16))
    last_status: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class IVRSession(Base):
    """One call's run through one IVR flow: the steps (inputs of sensitive nodes are
    ``***``), the public variables, and how it left (``exit_reason``: contained,
    queued, transferred, callback, voicemail, abandoned, error, timeout)."""

    __tablename__ = "ivr_sessions"
    __table_args__ = (
        Index("ix_ivr_sessions_call_id", "call_id"),
        Index("ix_ivr_sessions_tenant_started_at", "tenant", "started_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    call_id: Mapped[str] = mapped_column(String(CALL_ID_LEN))
    tenant: Mapped[str] = mapped_column(String(NAME_LEN))
    flow: Mapped[str] = mapped_column(String(NAME_LEN))
    service_line: Mapped[str | None] = mapped_column(String(NAME_LEN), nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime] = mapped_column(UTCDateTime())
    exit_reason: Mapped[str] = mapped_column(String(16))
    exit_node: Mapped[str | None] = mapped_column(String(NAME_LEN), nullable=True)
    error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    steps: Mapped[Any] = mapped_column(JSONDocument)
    variables: Mapped[Any] = mapped_column(JSONDocument)


class SurveyResult(Base):
    """One answered post-call survey question: a score 1-5 for the call and its agent."""

    __tablename__ = "survey_results"
    __table_args__ = (
        CheckConstraint("score BETWEEN 1 AND 5", name="score"),
        UniqueConstraint("call_id", "question"),
        Index("ix_survey_results_agent_id", "agent_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    call_id: Mapped[str] = mapped_column(String(CALL_ID_LEN))
    tenant: Mapped[str] = mapped_column(String(NAME_LEN))
    agent_id: Mapped[str | None] = mapped_column(String(NAME_LEN), nullable=True)
    queue: Mapped[str | None] = mapped_column(String(NAME_LEN), nullable=True)
    flow: Mapped[str] = mapped_column(String(NAME_LEN))
    question: Mapped[str] = mapped_column(String(NAME_LEN))
    score: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
