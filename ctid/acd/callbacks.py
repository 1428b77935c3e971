"""Callback in queue: the stored callbacks and the rules of their attempts.

A waiting caller who presses the queue's ``callback.dtmf`` at a hold check-in, or whose
wait overflows to the target ``callback``, leaves a number (their caller ID, checked by
the :class:`~ctid.asterisk.safety.DialPolicy`) and hangs up. The dispatcher
(``ctid.acd.dispatcher``) keeps their place: the callback waits in the router under
its own id with the original call's priority and enqueue time. When it is offered, the
dispatcher reserves the agent, publishes ``call.offered`` and ``Originate``\\ s the
agent's device into ``[ctid-callback]``, which dials the customer.

States (``callbacks.state``)::

    waiting --offered--> dialing --customer answered--> done
       ^                    |
       +-- retry_s later ---+--(attempts used up)--> failed
    waiting/dialing --expiry_s after it was left--> expired

An attempt counts when the customer's leg was dialled (``UserEvent CtidCallback``); an
agent who does not answer the Originate is a RONA and costs the callback nothing.

This module is the repository (:class:`CallbackStore`, over the ``callbacks`` table of
migration 0003, or in memory without a database) and the record
(:class:`CallbackRecord`, times in epoch seconds). Every row that is ``waiting`` or
``dialing`` when ctid starts is loaded back into the router (a ``dialing`` one lost its
outcome with the old process and waits again).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal

import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ctid.store.models import Callback

__all__ = ["OPEN_STATES", "CallbackRecord", "CallbackState", "CallbackStore", "new_callback_id"]

log = structlog.get_logger(__name__)

CallbackState = Literal["waiting", "dialing", "done", "failed", "expired"]
OPEN_STATES: Final = ("waiting", "dialing")


def new_callback_id() -> str:
    return "cb" + uuid.uuid4().hex


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


@dataclass(slots=True)
class CallbackRecord:
    """One callback. ``enqueued_at`` is the original call's (its place in the queue);
    ``created_at`` is when the number was left (``expiry_s`` runs from it)."""

    id: str
    tenant: str
    queue: str
    call_id: str
    number: str
    priority: int
    enqueued_at: float
    created_at: float
    attempts: int = 0
    next_attempt_at: float = 0.0
    state: CallbackState = "waiting"
    last_status: str | None = None
    updated_at: float = field(default=0.0)

    @property
    def open(self) -> bool:
        return self.state in OPEN_STATES

    def expires_at(self, expiry_s: float) -> float:
        return self.created_at + expiry_s

    def to_row(self) -> dict[str, Any]:
        return {"id": self.id, "tenant": self.tenant, "queue": self.queue, "call_id": self.call_id,
                "number": self.number, "priority": self.priority, "enqueued_at": _dt(self.enqueued_at),
                "attempts": self.attempts, "next_attempt_at": _dt(self.next_attempt_at or self.created_at),
                "state": self.state, "last_status": self.last_status, "created_at": _dt(self.created_at),
                "updated_at": _dt(self.updated_at or self.created_at)}

    @classmethod
    def from_row(cls, row: Callback) -> CallbackRecord:
        state: CallbackState = row.state  # type: ignore[assignment]  # the CHECK constraint keeps it one of them
        return cls(row.id, row.tenant, row.queue, row.call_id, row.number, row.priority,
                   row.enqueued_at.timestamp(), row.created_at.timestamp(), row.attempts,
                   row.next_attempt_at.timestamp(), state, row.last_status, row.updated_at.timestamp())


class CallbackStore:
    """The ``callbacks`` table; with ``sessions=None``, an in-memory table (tests, no DB)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession] | None) -> None:
        self._sessions = sessions
        self._memory: dict[str, CallbackRecord] = {}
        self._lock = asyncio.Lock()  # FIFO: writes land in the order they were made

    @property
    def persistent(self) -> bool:
        return self._sessions is not None

    async def add(self, record: CallbackRecord) -> None:
        if self._sessions is None:
            self._memory[record.id] = replace(record)
            return
        async with self._lock, self._sessions.begin() as session:
            session.add(Callback(**record.to_row()))

    async def save(self, record: CallbackRecord) -> None:
        """Write the record's mutable fields (state, attempts, next attempt, status), as
        they are when the write runs (writes are serialised, so the last one wins)."""
        if self._sessions is None:
            self._memory[record.id] = replace(record)
            return
        async with self._lock, self._sessions.begin() as session:
            await session.execute(update(Callback).where(Callback.id == record.id).values(
                state=record.state, attempts=record.attempts, next_attempt_at=_dt(record.next_attempt_at
                                                                                  or record.created_at),
                last_status=record.last_status, updated_at=_dt(record.updated_at or record.created_at)))

    async def get(self, callback_id: str) -> CallbackRecord | None:
        if self._sessions is None:
            found = self._memory.get(callback_id)
            return None if found is None else replace(found)
        async with self._sessions() as session:
            row = await session.get(Callback, callback_id)
            return None if row is None else CallbackRecord.from_row(row)

    async def open_callbacks(self) -> list[CallbackRecord]:
        """The callbacks still to serve (``waiting`` or ``dialing``), oldest place first."""
        if self._sessions is None:
            found = [replace(r) for r in self._memory.values() if r.open]
        else:
            async with self._sessions() as session:
                rows = (await session.execute(select(Callback).where(Callback.state.in_(OPEN_STATES)))).scalars()
                found = [CallbackRecord.from_row(row) for row in rows]
        return sorted(found, key=lambda r: (-r.priority, r.enqueued_at, r.id))
