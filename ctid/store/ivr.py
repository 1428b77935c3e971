"""IVR records: the writer of ``ivr_sessions`` (flow runs) and ``survey_results``.

The IVR never waits for the database: :meth:`IVRStore.add` and
:meth:`IVRStore.add_survey` only append to a bounded in-memory buffer, and one writer
task (:meth:`IVRStore.run`) inserts it in batches. While the database is down the
buffer is kept and retried with backoff; past ``max_pending`` rows the oldest are
dropped, logged and counted in ``dropped``. A row the database refuses for its content
is logged, counted in ``rejected`` and set aside, so it cannot block the rows behind
it. :meth:`IVRStore.flush` is called once more on stop.

Survey rows are unique per ``(call_id, question)``: a replayed batch (a commit whose
answer was lost) is inserted row by row, skipping the ones already there.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ctid.store.models import IVRSession, SurveyResult
from ctid.store.recorder import write_loop

log = structlog.get_logger(__name__)

_Row = tuple[str, dict[str, Any]]  # (table, values)


class IVRStore:
    """Buffered writer and small reader of the IVR tables (see the module docstring)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession] | None, *, interval: float = 0.2,
                 max_pending: int = 50_000, batch: int = 500) -> None:
        self._sessions = sessions
        self._interval = interval
        self._max_pending = max_pending
        self._batch = batch
        self._pending: deque[_Row] = deque()
        self._wake = asyncio.Event()
        self.written = 0
        self.dropped = 0
        self.rejected = 0
        self.last_error: str | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, row: Mapping[str, Any]) -> None:
        """One finished flow run (:meth:`ctid.ivr.runner.IVRRun.record`)."""
        self._append(("ivr", dict(row)))

    def add_survey(self, *, call_id: str, tenant: str, agent_id: str | None, queue: str | None, flow: str,
                   scores: Mapping[str, int], at: datetime) -> None:
        """The answered questions of one survey, one row each."""
        for question, score in scores.items():
            self._append(("survey", {"call_id": call_id, "tenant": tenant, "agent_id": agent_id, "queue": queue,
                                     "flow": flow, "question": question, "score": score, "created_at": at}))

    def _append(self, row: _Row) -> None:
        if self._sessions is None:
            return
        self._pending.append(row)
        if len(self._pending) > self._max_pending:
            table, values = self._pending.popleft()
            self.dropped += 1
            log.error("store.ivr_row_dropped", table=table, call_id=values.get("call_id"), pending=self.pending)
        self._wake.set()

    async def run(self) -> None:
        await write_loop(self._wake, self.flush, self._interval)

    async def flush(self) -> bool:
        """Write everything buffered; True when all of it was written."""
        while self._pending:
            rows = [self._pending[i] for i in range(min(self._batch, len(self._pending)))]
            try:
                await self._insert(rows)
            except Exception as exc:
                if not _is_row_error(exc):
                    reason = f"{type(exc).__name__}: {exc}"
                    if reason != self.last_error:
                        log.error("store.ivr_write_failed", reason=reason, pending=self.pending)
                    self.last_error = reason
                    return False
                await self._one_by_one(rows)
            for _ in rows:
                self._pending.popleft()
        if self.last_error is not None:
            log.info("store.ivr_recovered", written=self.written)
            self.last_error = None
        return True

    async def _insert(self, rows: list[_Row]) -> None:
        assert self._sessions is not None
        runs = [values for table, values in rows if table == "ivr"]
        surveys = [values for table, values in rows if table == "survey"]
        async with self._sessions.begin() as session:
            if runs:
                await session.execute(insert(IVRSession), runs)
            if surveys:
                await session.execute(insert(SurveyResult), surveys)
        self.written += len(rows)

    async def _one_by_one(self, rows: list[_Row]) -> None:
        """A batch the database refused: find the bad rows (or the duplicates)."""
        for row in rows:
            try:
                await self._insert([row])
            except Exception as exc:
                if not _is_row_error(exc):
                    raise
                table, values = row
                self.rejected += 1
                log.error("store.ivr_row_rejected", table=table, call_id=values.get("call_id"),
                          reason=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")

    # -- reads (tests, KPIs) ----------------------------------------------------------

    async def runs_for(self, call_id: str) -> list[IVRSession]:
        assert self._sessions is not None
        async with self._sessions() as session:
            result = await session.execute(select(IVRSession).where(IVRSession.call_id == call_id)
                                           .order_by(IVRSession.id))
            return list(result.scalars())

    async def last_variables(self, call_id: str) -> dict[str, Any] | None:
        """The public variables of the call's latest flow run (None: no run stored): what
        a restarted ctid puts back on the pop of a call it recovers from ``[ctid-hold]``."""
        if self._sessions is None:
            return None
        async with self._sessions() as session:
            result = await session.execute(select(IVRSession.variables).where(IVRSession.call_id == call_id)
                                           .order_by(IVRSession.id.desc()).limit(1))
            row = result.scalar_one_or_none()
        return dict(row) if isinstance(row, Mapping) else None

    async def surveys_for(self, call_id: str) -> dict[str, int]:
        assert self._sessions is not None
        async with self._sessions() as session:
            result = await session.execute(select(SurveyResult.question, SurveyResult.score)
                                           .where(SurveyResult.call_id == call_id))
            return {question: score for question, score in result.all()}

    async def agent_average(self, agent_id: str) -> tuple[int, float | None]:
        """``(answers, mean score)`` of one agent's surveys."""
        assert self._sessions is not None
        async with self._sessions() as session:
            result = await session.execute(select(func.count(), func.avg(SurveyResult.score))
                                           .where(SurveyResult.agent_id == agent_id))
            count, mean = result.one()
            return int(count), None if mean is None else float(mean)


def _is_row_error(exc: Exception) -> bool:
    """True when the database refused a row's content (retrying cannot help)."""
    if isinstance(exc, (sa_exc.DataError, sa_exc.IntegrityError)):
        return True
    return isinstance(exc, sa_exc.StatementError) and not isinstance(exc, sa_exc.DBAPIError)
