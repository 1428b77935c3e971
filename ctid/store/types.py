"""Column types shared by the store's models.

The one that matters is :class:`UTCDateTime`. SQLite has no timestamp type:
SQLAlchemy stores a datetime there as text and silently drops the UTC offset,
so an aware ``12:00+09:00`` written naively would come back as a naive
``12:00`` and be nine hours wrong. PostgreSQL's ``timestamptz`` keeps the
instant but returns it in the session's time zone. ``UTCDateTime`` makes both
dialects behave the same: only aware datetimes go in, UTC is what is stored,
and aware UTC datetimes come out.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

__all__ = ["UTCDateTime"]


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp column that accepts only aware datetimes and returns aware UTC.

    Binding a naive datetime raises ``ValueError``: ctid never guesses the zone of
    a timestamp. (Through a session, SQLAlchemy wraps it in ``StatementError``
    whose ``orig`` is that ``ValueError``.)
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"UTCDateTime expects a datetime, got {type(value).__name__}")
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            raise ValueError(f"naive datetime {value.isoformat()} refused: attach a time zone")
        utc = value.astimezone(UTC)
        if dialect.name == "sqlite":
            # SQLite's DATETIME storage is text without an offset; storing the UTC
            # wall clock keeps values comparable and sortable as strings.
            return utc.replace(tzinfo=None)
        return utc

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"UTCDateTime column returned {type(value).__name__}")
        if value.tzinfo is None:
            # Only this type writes the column, and it always writes UTC.
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
