"""Call records: what the call model hands to storage, and the repository for them.

:class:`CallRecord` and :class:`LegRecord` are plain frozen dataclasses with
no SQLAlchemy types in them, so the pure call model builds them from its own
state. A record is always the *whole* current state of a call: writing it
again replaces what was stored.

:class:`CallStore` writes them with one ``INSERT ... ON CONFLICT DO UPDATE``
per table (SQLite and PostgreSQL both have it), in one transaction, so
repeated or concurrent writes of the same call converge on the last record
written, with no duplicate rows and no select-then-insert race.
:meth:`CallStore.upsert_calls` writes a batch of calls the same way, in one
transaction: one statement per table, executed for every row (``executemany``),
so the call recorder's flush costs one transaction, not one per call.

Legs are matched by ``(call_id, uniqueid)``. A leg stored earlier but absent
from a newer record is kept, not deleted: after a reconnect the model may
rebuild a call from ``CoreShowChannels`` without the legs that already hung
up, and that must not erase them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import Select, Table, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import selectinload

from ctid.store.models import CALL_DIRECTIONS, CALL_ID_LEN, Call, CallLeg

__all__ = ["CallRecord", "CallStore", "LegRecord"]


def _require_aware(name: str, value: datetime | None) -> None:
    if value is not None and (value.tzinfo is None or value.utcoffset() is None):
        raise ValueError(f"{name} must be timezone-aware, got naive {value.isoformat()}")


@dataclass(frozen=True, slots=True)
class LegRecord:
    """One Asterisk channel of a call. ``role``: "caller", "agent", "transfer", "other"."""

    channel: str
    uniqueid: str
    role: str
    created_at: datetime
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    hangup_cause: int | None = None

    def __post_init__(self) -> None:
        if not self.uniqueid:
            raise ValueError("leg uniqueid must not be empty")
        _require_aware("created_at", self.created_at)
        _require_aware("answered_at", self.answered_at)
        _require_aware("ended_at", self.ended_at)


@dataclass(frozen=True, slots=True)
class CallRecord:
    """The full state of one call as it is stored.

    ``direction`` is "inbound", "outbound" or "internal". ``hangup_by`` says who
    ended it ("caller", "ctid", "agent", "system", or "unknown" when the channels
    vanished while the AMI link was down) and is None while the call is up.
    ``data`` holds JSON-serialisable values such as IVR variables. Timestamps
    must be timezone-aware; they come back from the store in UTC.
    """

    call_id: str
    tenant: str
    direction: str
    state: str
    created_at: datetime
    service_line: str | None = None
    caller_number: str | None = None
    caller_name: str | None = None
    dnis: str | None = None
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    hangup_cause: int | None = None
    hangup_by: str | None = None
    linkedid: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    legs: tuple[LegRecord, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < len(self.call_id) <= CALL_ID_LEN:
            raise ValueError(f"call_id must be 1..{CALL_ID_LEN} characters: {self.call_id!r}")
        if self.direction not in CALL_DIRECTIONS:
            raise ValueError(f"direction must be one of {CALL_DIRECTIONS}: {self.direction!r}")
        _require_aware("created_at", self.created_at)
        _require_aware("answered_at", self.answered_at)
        _require_aware("ended_at", self.ended_at)
        uniqueids = [leg.uniqueid for leg in self.legs]
        if len(set(uniqueids)) != len(uniqueids):
            raise ValueError(f"call {self.call_id} lists a leg uniqueid twice: {uniqueids}")

    @property
    def active(self) -> bool:
        """Whether the call has not ended yet."""
        return self.ended_at is None


_CALL_FIELDS = (
    "tenant",
    "service_line",
    "direction",
    "state",
    "caller_number",
    "caller_name",
    "dnis",
    "created_at",
    "answered_at",
    "ended_at",
    "hangup_cause",
    "hangup_by",
    "linkedid",
)
_LEG_FIELDS = ("channel", "role", "created_at", "answered_at", "ended_at", "hangup_cause")


def _call_row(record: CallRecord) -> dict[str, Any]:
    row: dict[str, Any] = {name: getattr(record, name) for name in _CALL_FIELDS}
    row["call_id"] = record.call_id
    row["data"] = dict(record.data)
    return row


def _leg_row(call_id: str, leg: LegRecord) -> dict[str, Any]:
    row: dict[str, Any] = {name: getattr(leg, name) for name in _LEG_FIELDS}
    row["call_id"] = call_id
    row["uniqueid"] = leg.uniqueid
    return row


@cache
def _upsert(dialect: str, table: Table, key: tuple[str, ...],
                 update: tuple[str, ...]) -> postgresql.Insert | sqlite.Insert:
    """``INSERT ON CONFLICT (key) DO UPDATE SET update = excluded.update`` without
    values, for ``executemany``; built once per dialect and table (the compiled form is
    then found in SQLAlchemy's cache)."""
    stmt: postgresql.Insert | sqlite.Insert
    if dialect == "postgresql":
        stmt = postgresql.insert(table)
    elif dialect == "sqlite":
        stmt = sqlite.insert(table)
    else:  # create_engine refuses other URLs
        raise NotImplementedError(f"no upsert for dialect {dialect}")
    return stmt.on_conflict_do_update(
        index_elements=list(key),
        set_={name: stmt.excluded[name] for name in update},
    )


def _to_record(call: Call) -> CallRecord:
    return CallRecord(
        call_id=call.call_id,
        tenant=call.tenant,
        service_line=call.service_line,
        direction=call.direction,
        state=call.state,
        caller_number=call.caller_number,
        caller_name=call.caller_name,
        dnis=call.dnis,
        created_at=call.created_at,
        answered_at=call.answered_at,
        ended_at=call.ended_at,
        hangup_cause=call.hangup_cause,
        hangup_by=call.hangup_by,
        linkedid=call.linkedid,
        data=dict(call.data),
        legs=tuple(
            LegRecord(
                channel=leg.channel,
                uniqueid=leg.uniqueid,
                role=leg.role,
                created_at=leg.created_at,
                answered_at=leg.answered_at,
                ended_at=leg.ended_at,
                hangup_cause=leg.hangup_cause,
            )
            for leg in call.legs
        ),
    )


class CallStore:
    """Reads and writes call records. Safe to share; each call opens its own session."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def upsert_call(self, record: CallRecord) -> None:
        """Store ``record``: insert the call, or replace the stored one; same for each leg.

        Idempotent: writing the same record again changes nothing.
        """
        await self.upsert_calls([record])

    async def upsert_calls(self, records: Sequence[CallRecord]) -> None:
        """Store every record as :meth:`upsert_call` does, all in one transaction.

        All or nothing: if the database refuses one record, nothing of the batch is
        stored and the error is raised (write them one by one to find the culprit).
        The call ids must be distinct. Idempotent, like :meth:`upsert_call`.
        """
        if not records:
            return
        calls = Call.__table__
        legs = CallLeg.__table__
        assert isinstance(calls, Table) and isinstance(legs, Table)
        leg_rows = [_leg_row(record.call_id, leg) for record in records for leg in record.legs]
        async with self._sessions.begin() as session:
            dialect = (await session.connection()).dialect.name
            # The calls first: the legs' foreign key needs them.
            await session.execute(
                _upsert(dialect, calls, ("call_id",), (*_CALL_FIELDS, "data")),
                [_call_row(record) for record in records],
            )
            if leg_rows:
                await session.execute(
                    _upsert(dialect, legs, ("call_id", "uniqueid"), _LEG_FIELDS),
                    leg_rows,
                )

    async def get_call(self, call_id: str) -> CallRecord | None:
        """The stored call with its legs (in the order first stored), or None."""
        async with self._sessions() as session:
            call = await session.scalar(_with_legs().where(Call.call_id == call_id))
            return None if call is None else _to_record(call)

    async def list_calls(
        self, tenant: str | None = None, active: bool | None = None, limit: int = 100
    ) -> list[CallRecord]:
        """Calls newest first. ``active=True``: not ended; ``False``: ended; None: all."""
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        query = _with_legs()
        if tenant is not None:
            query = query.where(Call.tenant == tenant)
        if active is True:
            query = query.where(Call.ended_at.is_(None))
        elif active is False:
            query = query.where(Call.ended_at.is_not(None))
        query = query.order_by(Call.created_at.desc(), Call.call_id.desc()).limit(limit)
        async with self._sessions() as session:
            return [_to_record(call) for call in (await session.scalars(query)).all()]


    async def queue_outcomes_since(self, since: datetime, limit: int = 500_000) -> list[QueueOutcome]:
        """The calls answered or ended at or after ``since`` whose data names a queue:
        what the day's service level is rebuilt from after a restart (no legs loaded)."""
        query = (select(Call.tenant, Call.answered_at, Call.ended_at, Call.hangup_by, Call.data)
                 .where(or_(Call.answered_at >= since, Call.ended_at >= since))
                 .order_by(Call.created_at).limit(limit))
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
        out: list[QueueOutcome] = []
        for tenant, answered_at, ended_at, hangup_by, data in rows:
            if isinstance(data, Mapping) and isinstance(data.get("queue"), str):
                out.append(QueueOutcome(tenant, answered_at, ended_at, hangup_by, dict(data)))
        return out


@dataclass(frozen=True, slots=True)
class QueueOutcome:
    """What :meth:`CallStore.queue_outcomes_since` gives for one call."""

    tenant: str
    answered_at: datetime | None
    ended_at: datetime | None
    hangup_by: str | None
    data: dict[str, Any]


def _with_legs() -> Select[Call]:
    return select(Call).options(selectinload(Call.legs))
