"""The event bus: one sequence, live delivery from memory, and the outbox.

Theory of operation
-------------------

Every event in ctid passes through :meth:`EventBus.publish`, which does three
things synchronously, without awaiting anything:

1. stamps the event with the next ``seq`` (strictly increasing for this ctid
   instance, and continued across restarts);
2. serialises it once (:meth:`Event.to_json`) and *offers* it to every sink
   (the MQTT publisher, the websocket hub) in ``seq`` order; sinks must never
   block: they enqueue;
3. appends it to the outbox buffer in memory.

One writer task drains the buffer into the ``event_outbox`` table, in batched
commits at most every ``outbox_batch_ms``. Because delivery is live from
memory, a slow or dead database never delays a screen pop or stalls routing:
while the database is down the buffer grows (bounded by
``outbox_max_buffer``; past it the *oldest* events are dropped from the outbox,
counted in ``outbox_dropped``; they were still delivered live), the writer
retries with backoff, logs once per outage and once on recovery, and then
flushes what it kept, in order.

The outbox serves :meth:`EventBus.replay`: websocket ``resume``, REST
``/api/v1/events?after_seq=N``, and the MQTT publisher's catch-up after a
broker outage. Replay reads the table *and* the events still buffered in
memory, so an event is replayable from the moment it is published. Rows older
than ``retention_days`` are pruned in small batches, at start and every ten
minutes.

Delivery contract (tell consumers)
----------------------------------

* **At least once.** A consumer can receive the same event twice (a replay
  overlapping the live stream, a republish after a broker reconnect).
  Consumers dedupe by ``id``.
* **Gaps are normal.** A consumer sees a filtered slice of the global ``seq``
  (its tenant, its agent, its topics), and the sequence may jump after an
  unclean restart (see below). Resuming means "everything after N that I may
  see", never "N+1 must come next".
* **Order.** Every sink receives events in ``seq`` order; replay returns them in
  ``seq`` order.

Sequence across restarts
------------------------

:meth:`EventBus.start` continues from the highest ``seq`` in the outbox. Every
outbox commit also records a *lease* in the ``meta`` table (``events.seq_lease``:
the current ``seq`` plus ``outbox_max_buffer``), and a clean :meth:`EventBus.stop`
resets the lease to the last ``seq``. After a crash, the next start continues
above the lease, so the numbers of events that were delivered live but never
reached the table are not reused (unless more than ``outbox_max_buffer``
events were dropped during an outage just before the crash). Pruning every row
cannot rewind the sequence either.

``db=None`` runs the bus in memory only (tests, or a deployment without a
database): the buffer is then a window of the last ``outbox_max_buffer`` events
and replay serves only that window.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import islice
from typing import Any, Final, Protocol

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import Table, delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.sql.dml import Insert

from ctid.config import EventsConfig
from ctid.events.schema import Event, EventError
from ctid.store.db import Database, StoreError
from ctid.store.models import EventOutbox, Meta

__all__ = [
    "EventBus",
    "EventBusError",
    "PublishResult",
    "ReplayError",
    "Sink",
]

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]

SEQ_LEASE_KEY: Final = "events.seq_lease"

# Rows per outbox commit. At the default 50 ms batch interval this still
# allows 100,000 events/s, far above what a single Asterisk produces.
MAX_BATCH_ROWS: Final = 5000
# A write or replay that takes longer than this is a failed one.
WRITE_TIMEOUT_S: Final = 10.0
REPLAY_TIMEOUT_S: Final = 10.0
# Writer retry backoff while the database is down.
MAX_BACKOFF_S: Final = 5.0
PRUNE_INTERVAL_S: Final = 600.0
PRUNE_BATCH_ROWS: Final = 1000
STOP_FLUSH_TIMEOUT_S: Final = 5.0

_OUTBOX: Final[Table] = EventOutbox.__table__  # type: ignore[assignment]
_META: Final[Table] = Meta.__table__  # type: ignore[assignment]


class EventBusError(RuntimeError):
    """The bus was used outside its lifetime, or given an event it cannot take."""


class ReplayError(Exception):
    """Replay needs the outbox table and the database did not answer.

    The API answers 503 and the client retries; returning only the in-memory
    part would silently hide a gap.
    """


class Sink(Protocol):
    """A live consumer of the bus (the MQTT publisher, the websocket hub).

    :meth:`offer` is called synchronously by :meth:`EventBus.publish` for every
    event, in ``seq`` order, with the envelope JSON serialised once. It must
    never block. It returns an awaitable that completes when the sink has
    delivered the event (MQTT: PUBACK), for :meth:`EventBus.publish_and_wait`,
    or ``None`` when it is delivered already (websocket hub: enqueued). An
    awaitable returned as a future is never cancelled by the bus, so the sink
    may resolve it later without checking.
    """

    name: str

    def offer(self, event: Event, payload: str) -> Awaitable[None] | None: ...


@dataclass
class PublishResult:
    """What :meth:`EventBus.publish_and_wait` saw within its bound."""

    event: Event
    """The event as stamped (with its ``seq``)."""
    delivered: bool
    """Every sink delivered it within the bound."""
    timed_out: list[str] = field(default_factory=list)
    """Names of the sinks that had not delivered when the bound expired."""
    failed: list[str] = field(default_factory=list)
    """Names of the sinks whose delivery raised."""


@dataclass(frozen=True, slots=True)
class _Buffered:
    event: Event
    payload: str


def _matches(event: Event, tenant: str | None, agent_id: str | None, types: frozenset[str] | None,
             call_id: str | None) -> bool:
    return ((tenant is None or event.tenant == tenant)
            and (agent_id is None or event.agent_id == agent_id)
            and (types is None or event.type in types)
            and (call_id is None or event.call_id == call_id))


class EventBus:
    """Assigns ``seq``, offers events live to the sinks, and keeps the outbox.

    Lifetime: ``await start()`` (reads where the sequence stands, starts the
    writer and the pruner), :meth:`publish` from the event loop, then
    ``await stop()`` (flushes the buffer, bounded). Metrics live on
    :attr:`registry`, which the bus owns unless one is passed in.
    """

    def __init__(self, db: Database | None, *, config: EventsConfig, clock: Clock,
                 registry: CollectorRegistry | None = None,
                 prune_interval: float = PRUNE_INTERVAL_S, prune_batch: int = PRUNE_BATCH_ROWS) -> None:
        self._db = db
        self._config = config
        self._clock = clock
        self._interval = config.outbox_batch_ms / 1000
        self._max_buffer = config.outbox_max_buffer
        self._prune_interval = prune_interval
        self._prune_batch = prune_batch
        self._default_timeout = config.publish_timeout_ms / 1000
        self._sinks: tuple[Sink, ...] = ()
        # Without a database the buffer is the replay window: old events fall out.
        self._buffer: deque[_Buffered] = deque(maxlen=self._max_buffer if db is None else None)
        self._seq = 0
        self._state = "new"  # new -> started -> stopping -> stopped
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._writer_task: asyncio.Task[None] | None = None
        self._pruner_task: asyncio.Task[None] | None = None
        self._outage: str | None = None
        self._outage_started = 0.0
        self._dropping_logged = False
        self.written = 0
        self._dropped = 0
        self._write_failures = 0
        self._publish_timeouts = 0

        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._m_published = Counter("ctid_events_published", "Events published on the bus", ["type"],
                                    registry=self.registry)
        self._m_dropped = Counter("ctid_events_outbox_dropped",
                                  "Events dropped from the outbox buffer while the database was down "
                                  "(they were still delivered live)", registry=self.registry)
        self._m_write_failures = Counter("ctid_events_outbox_write_failures", "Failed outbox commits",
                                         registry=self.registry)
        self._m_timeouts = Counter("ctid_events_publish_timeouts",
                                   "publish_and_wait bounds that expired, by sink", ["sink"],
                                   registry=self.registry)
        self._m_sink_errors = Counter("ctid_events_sink_errors", "Sink offers that raised", ["sink"],
                                      registry=self.registry)
        pending = Gauge("ctid_events_outbox_pending", "Events waiting to be written to the outbox",
                        registry=self.registry)
        pending.set_function(lambda: float(self.outbox_pending))
        last = Gauge("ctid_events_last_seq", "The last seq assigned", registry=self.registry)
        last.set_function(lambda: float(self._seq))

    # -- metrics -----------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The last ``seq`` assigned (0 before any event ever)."""
        return self._seq

    @property
    def outbox_pending(self) -> int:
        """Events published but not yet committed to the outbox (0 without a database)."""
        return len(self._buffer) if self._db is not None else 0

    @property
    def outbox_dropped(self) -> int:
        """Events dropped from the outbox because the buffer was full (delivered live all the same)."""
        return self._dropped

    @property
    def outbox_write_failures(self) -> int:
        return self._write_failures

    @property
    def publish_timeouts(self) -> int:
        """Calls of :meth:`publish_and_wait` whose bound expired before every sink delivered."""
        return self._publish_timeouts

    @property
    def sinks(self) -> tuple[Sink, ...]:
        return self._sinks

    # -- lifetime ----------------------------------------------------------------------

    async def start(self) -> None:
        """Continue the sequence from the outbox and start the writer and the pruner.

        Raises :class:`~ctid.store.db.StoreError` when the database does not
        answer: without it the bus cannot know which ``seq`` comes next.
        """
        if self._state != "new":
            raise EventBusError(f"event bus cannot start: it is {self._state}")
        if self._db is not None:
            self._seq = await self._read_sequence(self._db)
            self._writer_task = asyncio.create_task(self._write_loop(), name="events-outbox-writer")
            self._pruner_task = asyncio.create_task(self._prune_loop(), name="events-outbox-pruner")
        self._state = "started"
        log.info("events.bus_started", last_seq=self._seq,
                 outbox=self._db.url if self._db is not None else "memory only")

    @staticmethod
    async def _read_sequence(db: Database) -> int:
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S), db.engine.connect() as conn:
                max_seq = (await conn.execute(select(func.max(_OUTBOX.c.seq)))).scalar()
                lease = (await conn.execute(select(_META.c.value).where(_META.c.key == SEQ_LEASE_KEY))).scalar()
        except (StoreError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise StoreError(f"cannot read the event sequence from {db.url}: {type(exc).__name__}: {exc}",
                             url=db.url) from exc
        lease_seq = 0
        if lease is not None:
            with contextlib.suppress(ValueError):
                lease_seq = int(lease)
        return max(int(max_seq or 0), lease_seq)

    async def stop(self, timeout: float = STOP_FLUSH_TIMEOUT_S) -> None:
        """Stop accepting events, flush the outbox buffer (at most ``timeout`` seconds), stop the tasks.

        Events still buffered when the bound expires (the database is down) are
        logged with their ``seq`` range; they were delivered live but are not
        replayable.
        """
        if self._state in ("stopping", "stopped"):
            return
        started = self._state == "started"
        self._state = "stopping"
        self._closing.set()
        self._wake.set()
        if self._pruner_task is not None:
            self._pruner_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner_task
        writer = self._writer_task
        if writer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(writer), timeout)
            except TimeoutError:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
        if self._db is not None and started:
            if self._buffer:
                log.error("events.outbox_unflushed", events=len(self._buffer),
                          first_seq=self._buffer[0].event.seq, last_seq=self._buffer[-1].event.seq,
                          reason=self._outage)
            else:
                await self._release_lease(self._db)
        self._state = "stopped"
        log.info("events.bus_stopped", last_seq=self._seq, written=self.written, dropped=self._dropped)

    async def _release_lease(self, db: Database) -> None:
        """A clean stop: the next start continues at exactly ``last_seq + 1``."""
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S), db.engine.begin() as conn:
                await conn.execute(self._lease_statement(db, self._seq))
        except Exception as exc:
            log.warning("events.seq_lease_not_released", reason=f"{type(exc).__name__}: {exc}")

    # -- sinks -------------------------------------------------------------------------

    def add_sink(self, sink: Sink) -> None:
        """Offer every later event to ``sink``. Adding a sink twice does nothing."""
        if sink not in self._sinks:
            self._sinks = (*self._sinks, sink)

    def remove_sink(self, sink: Sink) -> None:
        self._sinks = tuple(s for s in self._sinks if s is not sink)

    # -- publishing --------------------------------------------------------------------

    def publish(self, event: Event) -> Event:
        """Stamp ``event`` with the next ``seq``, offer it to every sink, queue it for the outbox.

        Synchronous: never awaits the database or a sink. Returns the stamped
        event. Raises :class:`EventBusError` before :meth:`start`, after
        :meth:`stop` began, or for an event that was published already.
        """
        stamped, _ = self._publish(event)
        return stamped

    async def publish_and_wait(self, event: Event, timeout: float | None = None) -> PublishResult:
        """Publish, then wait until every sink has delivered it, at most ``timeout`` seconds.

        This is the pop-before-ring wait: it returns when the MQTT broker has
        acknowledged the event and the websocket hub has enqueued it, or when
        the bound (default ``publish_timeout_ms``) expires, whichever comes
        first. It never waits for the database. An expired bound is counted
        in :attr:`publish_timeouts` and names the late sinks.
        """
        stamped, waits = self._publish(event)
        if not waits:
            return PublishResult(stamped, delivered=True)
        bound = self._default_timeout if timeout is None else timeout
        futures: list[tuple[str, asyncio.Future[None]]] = []
        created: list[asyncio.Future[None]] = []
        for name, awaitable in waits:
            future: asyncio.Future[None] = asyncio.ensure_future(awaitable)
            if future is not awaitable:  # a coroutine we wrapped: ours to cancel
                created.append(future)
            futures.append((name, future))
        done, _pending = await asyncio.wait([f for _, f in futures], timeout=max(bound, 0.0))
        for mine in created:
            if not mine.done():
                mine.cancel()
        timed_out = [name for name, f in futures if f not in done]
        failed: list[str] = []
        for name, settled in futures:
            if settled in done and (settled.cancelled() or settled.exception() is not None):
                failed.append(name)
                log.warning("events.sink_delivery_failed", sink=name, seq=stamped.seq,
                            reason="cancelled" if settled.cancelled() else repr(settled.exception()))
        if timed_out:
            self._publish_timeouts += 1
            for name in timed_out:
                self._m_timeouts.labels(sink=name).inc()
            log.warning("events.publish_wait_timed_out", seq=stamped.seq, type=stamped.type,
                        sinks=timed_out, timeout_ms=round(bound * 1000))
        return PublishResult(stamped, delivered=not timed_out and not failed, timed_out=timed_out,
                             failed=failed)

    def _publish(self, event: Event) -> tuple[Event, list[tuple[str, Awaitable[None]]]]:
        if self._state != "started":
            raise EventBusError(f"cannot publish: the event bus is {self._state}")
        if event.seq != 0:
            raise EventBusError(f"event {event.id} was published already (seq {event.seq})")
        self._seq += 1
        stamped = event.with_seq(self._seq)
        payload = stamped.to_json()
        waits: list[tuple[str, Awaitable[None]]] = []
        # Live first: a pop must not wait behind anything, least of all the outbox.
        for sink in self._sinks:
            try:
                result = sink.offer(stamped, payload)
            except Exception:
                self._m_sink_errors.labels(sink=sink.name).inc()
                log.exception("events.sink_offer_failed", sink=sink.name, seq=stamped.seq)
                continue
            if result is not None:
                waits.append((sink.name, result))
        self._m_published.labels(type=stamped.type).inc()
        self._buffer_event(_Buffered(stamped, payload))
        return stamped, waits

    def _buffer_event(self, item: _Buffered) -> None:
        if self._db is None:
            self._buffer.append(item)  # a bounded window: the deque drops the oldest
            return
        self._buffer.append(item)
        self._drained.clear()
        if len(self._buffer) > self._max_buffer:
            oldest = self._buffer.popleft()
            self._dropped += 1
            self._m_dropped.inc()
            if not self._dropping_logged:
                self._dropping_logged = True
                log.error("events.outbox_dropping", reason=self._outage, max_buffer=self._max_buffer,
                          first_dropped_seq=oldest.event.seq)
        self._wake.set()

    async def drain(self) -> None:
        """Wait until every event published so far is committed to the outbox.

        Unbounded: wrap it in :func:`asyncio.timeout`. Returns at once without a database.
        """
        if self._db is None:
            return
        while self._buffer:
            self._drained.clear()
            await self._drained.wait()

    # -- the outbox writer -------------------------------------------------------------

    async def _write_loop(self) -> None:
        assert self._db is not None
        loop = asyncio.get_running_loop()
        backoff = self._interval
        last_commit = -math.inf
        while True:
            if not self._buffer:
                if self._closing.is_set():
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # Batch: commit at most every outbox_batch_ms; a stop cuts the wait short.
            wait = last_commit + self._interval - loop.time()
            if wait > 0 and not self._closing.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), wait)
            last_commit = loop.time()
            if await self._write_batch(self._db):
                backoff = self._interval
            else:
                await asyncio.sleep(backoff)
                backoff = min(max(backoff * 2, 0.05), MAX_BACKOFF_S)

    async def _write_batch(self, db: Database) -> bool:
        batch = list(islice(self._buffer, MAX_BATCH_ROWS))
        rows = [{"seq": b.event.seq, "id": b.event.id, "ts": b.event.ts, "type": b.event.type,
                 "tenant": b.event.tenant, "call_id": b.event.call_id, "agent_id": b.event.agent_id,
                 "queue": b.event.queue, "payload": b.payload} for b in batch]
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S), db.engine.begin() as conn:
                # DO NOTHING: a commit whose acknowledgement was lost is retried
                # without failing forever on its own rows.
                await conn.execute(self._insert(db, _OUTBOX).on_conflict_do_nothing(), rows)
                await conn.execute(self._lease_statement(db, self._seq + self._max_buffer))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._write_failures += 1
            self._m_write_failures.inc()
            if self._outage is None:
                self._outage = f"{type(exc).__name__}: {exc}".splitlines()[0]
                self._outage_started = asyncio.get_running_loop().time()
                log.error("events.outbox_write_failed", reason=self._outage, pending=len(self._buffer),
                          url=db.url)
            return False
        last = batch[-1].event.seq
        # By seq, not by count: the buffer may have dropped its oldest meanwhile.
        while self._buffer and self._buffer[0].event.seq <= last:
            self._buffer.popleft()
        self.written += len(rows)
        if self._outage is not None:
            log.info("events.outbox_recovered", after_s=round(asyncio.get_running_loop().time()
                                                               - self._outage_started, 3),
                     written=len(rows), pending=len(self._buffer), dropped=self._dropped)
            self._outage = None
            self._dropping_logged = False
        if not self._buffer:
            self._drained.set()
        return True

    @staticmethod
    def _insert(db: Database, table: Table) -> Any:
        insert: Callable[[Table], Insert] = pg_insert if db.dialect == "postgresql" else sqlite_insert
        return insert(table)

    def _lease_statement(self, db: Database, lease: int) -> Any:
        stmt = self._insert(db, _META).values(key=SEQ_LEASE_KEY, value=str(lease))
        return stmt.on_conflict_do_update(index_elements=[_META.c.key], set_={"value": str(lease)})

    # -- retention ---------------------------------------------------------------------

    async def _prune_loop(self) -> None:
        while True:
            try:
                await self.prune()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("events.outbox_prune_failed", reason=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self._prune_interval)

    async def prune(self) -> int:
        """Delete outbox rows older than ``retention_days``, in small batches; return how many.

        Runs at start and every ten minutes; callable directly. Each batch is its
        own short transaction, so pruning a large backlog never holds a long lock.
        """
        if self._db is None:
            return 0
        cutoff = self._clock() - timedelta(days=self._config.retention_days)
        total = 0
        while True:
            oldest = (select(_OUTBOX.c.seq).where(_OUTBOX.c.ts < cutoff).order_by(_OUTBOX.c.seq)
                      .limit(self._prune_batch).scalar_subquery())
            async with asyncio.timeout(WRITE_TIMEOUT_S), self._db.engine.begin() as conn:
                result = await conn.execute(delete(_OUTBOX).where(_OUTBOX.c.seq.in_(oldest)))
            deleted = int(result.rowcount or 0)
            total += deleted
            if deleted < self._prune_batch:
                break
            await asyncio.sleep(0)  # let the writer and replays in between batches
        if total:
            log.info("events.outbox_pruned", rows=total, older_than=cutoff.isoformat())
        return total

    # -- replay ------------------------------------------------------------------------

    async def replay(self, after_seq: int, *, limit: int = 1000, tenant: str | None = None,
                     agent_id: str | None = None, types: Collection[str] | None = None,
                     call_id: str | None = None) -> list[Event]:
        """Events with ``seq > after_seq`` that match every given filter, in ``seq`` order.

        Reads the outbox table and the events still buffered in memory, with no
        duplicates, at most ``limit`` of them; call again after the last ``seq``
        for more. Raises :class:`ReplayError` when the database does not answer.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        wanted = frozenset(types) if types is not None else None
        # Snapshot memory *before* reading the table: an event leaves memory only
        # after its commit, so it is either in this snapshot or in the table read.
        memory: list[Event] = []
        for item in self._buffer:
            if item.event.seq > after_seq and _matches(item.event, tenant, agent_id, wanted, call_id):
                memory.append(item.event)
                if len(memory) >= limit:
                    break
        stored: Sequence[Event] = []
        if self._db is not None:
            stored = await self._replay_table(self._db, after_seq, limit, tenant, agent_id, wanted, call_id)
        if not stored:
            return memory
        merged = {e.seq: e for e in stored}
        for e in memory:
            merged.setdefault(e.seq, e)
        return [merged[seq] for seq in sorted(merged)[:limit]]

    async def _replay_table(self, db: Database, after_seq: int, limit: int, tenant: str | None,
                            agent_id: str | None, types: frozenset[str] | None,
                            call_id: str | None) -> list[Event]:
        stmt = select(_OUTBOX.c.payload).where(_OUTBOX.c.seq > after_seq)
        if tenant is not None:
            stmt = stmt.where(_OUTBOX.c.tenant == tenant)
        if agent_id is not None:
            stmt = stmt.where(_OUTBOX.c.agent_id == agent_id)
        if call_id is not None:
            stmt = stmt.where(_OUTBOX.c.call_id == call_id)
        if types is not None:
            if not types:
                return []
            stmt = stmt.where(_OUTBOX.c.type.in_(sorted(types)))
        stmt = stmt.order_by(_OUTBOX.c.seq).limit(limit)
        try:
            async with asyncio.timeout(REPLAY_TIMEOUT_S), db.engine.connect() as conn:
                payloads = (await conn.execute(stmt)).scalars().all()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise ReplayError(f"outbox unavailable: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
        events: list[Event] = []
        for payload in payloads:
            try:
                events.append(Event.from_json(payload))
            except EventError as exc:  # a row this ctid did not write; never hide it
                log.error("events.outbox_row_unreadable", reason=str(exc))
        return events
