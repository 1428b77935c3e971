"""The database schema, as SQLAlchemy 2 declarative models.

These models describe the schema that the Alembic migrations in
``ctid/store/migrations/versions`` build; a test compares the two on both
dialects, so a change here without a migration (or the reverse) fails CI.

Constraint names come from :data:`NAMING_CONVENTION`. Alembic's batch mode on
SQLite rebuilds a table to alter it and can only drop or alter a constraint it
can name, so every constraint gets a predictable name.

Timestamps are :class:`~ctid.store.types.UTCDateTime` (aware UTC in, aware UTC
out). JSON columns are ``JSONB`` on PostgreSQL and SQLite's JSON text elsewhere.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
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
    "CALL_DIRECTIONS",
    "NAMING_CONVENTION",
    "Base",
    "Call",
    "CallLeg",
    "EventOutbox",
    "Meta",
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

# Lengths. call_id is ctid's own id. Asterisk allows a UNIQUEID/LINKEDID of up
# to 150 characters when the originator sets ChannelId, so those are wider.
CALL_ID_LEN = 64
NAME_LEN = 64
ASTERISK_ID_LEN = 150
CHANNEL_LEN = 255


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
