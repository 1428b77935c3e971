"""Call records: the single writer that persists the call model's calls.

The model (``ctid.calls``) is the truth in memory; this writer keeps the database in
step without ever making the model wait for it (see :class:`CallRecorder`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from sqlalchemy import exc as sa_exc

from ctid.calls import Call
from ctid.store.calls import CallRecord, CallStore

log = structlog.get_logger(__name__)


class CallRecorder:
    """Persists call records through one writer task, batched and deduplicated.

    The model hands over calls that changed (:meth:`mark`); the writer upserts the
    latest state of each every ``interval`` seconds, up to ``batch`` calls per
    transaction (one transaction per call cost a round trip to the database's thread
    per statement, and at 200 calls/s that work stole the event loop from the pops). While the database is down the
    dirty set is kept (bounded by ``max_pending``; past it the oldest ended calls, then the
    oldest calls, are dropped, logged and counted in ``dropped``) and retried with
    backoff. A record the database refuses for its content is logged and counted in
    ``rejected``. Routing never waits for it.
    """

    def __init__(self, store: CallStore, *, interval: float = 0.2, max_pending: int = 50_000,
                 batch: int = 500) -> None:
        self._store = store
        self._interval = interval
        self._batch = batch
        self._max_pending = max_pending
        self._dirty: dict[str, Call] = {}
        self._writing = 0
        self._wake = asyncio.Event()
        self.written = 0
        self.dropped = 0
        self.rejected = 0
        self.failures = 0
        self.last_error: str | None = None

    @property
    def pending(self) -> int:
        """Calls whose latest state is not in the database yet (queued or being written)."""
        return len(self._dirty) + self._writing

    def mark(self, call: Call) -> None:
        self._dirty.pop(call.call_id, None)
        self._dirty[call.call_id] = call  # re-insert: dict order is age of last change
        if len(self._dirty) > self._max_pending:
            # Over the bound (the database has been down for long): drop the oldest ended
            # call, or the oldest of all if every pending call is still up.
            victim = next((cid for cid, old in self._dirty.items() if not old.active), None)
            if victim is None:
                victim = next(iter(self._dirty))
            del self._dirty[victim]
            self.dropped += 1
            log.error("store.record_dropped", call_id=victim, pending=len(self._dirty))
        self._wake.set()

    def forget(self, call_id: str) -> None:
        """A provisional call was merged into another under a new id."""
        self._dirty.pop(call_id, None)

    async def run(self) -> None:
        await write_loop(self._wake, self.flush, self._interval)

    async def flush(self) -> bool:
        """Write everything dirty; True when all of it was written.

        The calls go in batches of ``batch`` records, each one transaction
        (:meth:`CallStore.upsert_calls`). A record the database refuses for its content
        (a constraint, a bad value) fails its whole batch: that batch is then written
        one record at a time, and the refused one is logged and set aside, so it cannot
        block the records behind it. Any other failure (the database is down), or a
        cancellation during shutdown, puts the unwritten rest back, where newer states
        of the same calls win."""
        batch, self._dirty = self._dirty, {}
        unwritten = dict(batch)  # what goes back if the flush stops short
        self._writing = len(unwritten)
        try:
            records: list[CallRecord] = []
            for call_id, call in batch.items():
                try:
                    records.append(call.to_record())
                except ValueError as exc:  # the record itself is invalid (CallRecord checks)
                    self._reject(call_id, exc)
                    self._done(unwritten, call_id)
            for start in range(0, len(records), self._batch):
                await self._write(records[start:start + self._batch], unwritten)
        except BaseException as exc:
            unwritten.update(self._dirty)
            self._dirty = unwritten
            self._writing = 0
            if not isinstance(exc, Exception):
                raise  # cancelled: the caller flushes again
            self.failures += 1
            reason = f"{type(exc).__name__}: {exc}"
            if reason != self.last_error:
                log.error("store.write_failed", reason=reason, pending=len(self._dirty))
            self.last_error = reason
            return False
        if self.last_error is not None:
            log.info("store.recovered", written=self.written)
            self.last_error = None
        return True

    async def _write(self, records: list[CallRecord], unwritten: dict[str, Call]) -> None:
        try:
            await self._store.upsert_calls(records)
        except Exception as exc:
            if not _is_record_error(exc):
                raise
        else:
            self.written += len(records)
            for record in records:
                self._done(unwritten, record.call_id)
            return
        for record in records:  # one of them is refused: find it
            try:
                await self._store.upsert_call(record)
                self.written += 1
            except Exception as exc:
                if not _is_record_error(exc):
                    raise
                self._reject(record.call_id, exc)
            self._done(unwritten, record.call_id)

    def _done(self, unwritten: dict[str, Call], call_id: str) -> None:
        del unwritten[call_id]
        self._writing -= 1

    def _reject(self, call_id: str, exc: Exception) -> None:
        self.rejected += 1
        log.error("store.record_rejected", call_id=call_id, reason=f"{type(exc).__name__}: {exc}")


async def write_loop(wake: asyncio.Event, flush: Callable[[], Awaitable[bool]], interval: float) -> None:
    """A writer task: once ``wake`` is set, wait ``interval`` (batching what else comes),
    then ``flush()``; a failed flush retries with backoff (doubling, 0.5 s to 30 s)."""
    delay = interval
    while True:
        await wake.wait()
        await asyncio.sleep(delay)
        wake.clear()
        if await flush():
            delay = interval
        else:
            wake.set()
            delay = min(30.0, max(delay * 2, 0.5))


def _is_record_error(exc: Exception) -> bool:
    """True when the database refused this record's content (retrying cannot help)."""
    if isinstance(exc, (sa_exc.DataError, sa_exc.IntegrityError)):
        return True
    if isinstance(exc, sa_exc.StatementError) and not isinstance(exc, sa_exc.DBAPIError):
        return True  # raised while binding parameters, before the database was asked
    return isinstance(exc, ValueError)  # the record itself is invalid (CallRecord checks)
