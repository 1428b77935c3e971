"""The event bus and its outbox, against real databases (a SQLite file and PostgreSQL).

Tests that take ``db_url`` run once per dialect: a SQLite file, and a fresh database on
the session's PostgreSQL server. The outage tests use a private PostgreSQL server that
they stop (``pause()``) and start again. The ``queue.stats`` snapshotter is tested here
too, since it is a bus producer.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import URL, make_url
from structlog.testing import capture_logs

from ctid.config import EventsConfig
from ctid.events.bus import EventBus, EventBusError, ReplayError
from ctid.events.schema import Event
from ctid.events.stats import StatsSnapshotter
from ctid.store.db import Database
from ctid.store.models import EventOutbox
from tests import services

NOW = datetime(2026, 3, 10, 14, 30, 0, tzinfo=UTC)


# -- helpers ----------------------------------------------------------------------------


def _run_detached(make_coro: Callable[[], Awaitable[None]]) -> None:
    """Admin SQL on an event loop of its own thread, away from the test's loop."""

    async def main() -> None:
        await make_coro()

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, main()).result(timeout=60)


async def _admin(server: URL, sql: str) -> None:
    conn = await asyncpg.connect(host=server.host, port=server.port, user=server.username,
                                 password=server.password, database="postgres", timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def fresh_pg_database() -> Callable[[str], Generator[str, None, None]]:
    def make(server_url: str) -> Generator[str, None, None]:
        server = make_url(server_url)
        name = f"t_{uuid.uuid4().hex}"
        _run_detached(lambda: _admin(server, f'CREATE DATABASE "{name}"'))
        try:
            yield server.set(database=name).render_as_string(hide_password=False)
        finally:
            _run_detached(lambda: _admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return make


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path,
           fresh_pg_database: Callable[[str], Generator[str, None, None]]) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'ctid.db'}"
        return
    yield from fresh_pg_database(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    await database.start()
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture(scope="module")
def outage_server() -> Iterator[services.Postgres]:
    """A private PostgreSQL that tests may stop and start (a database outage)."""
    with services.postgres() as server:
        yield server


@pytest.fixture
async def outage_db(outage_server: services.Postgres,
                    fresh_pg_database: Callable[[str], Generator[str, None, None]]) -> AsyncIterator[Database]:
    urls = fresh_pg_database(outage_server.url)
    url = next(urls)
    database = Database(url)
    await database.start()
    try:
        yield database
    finally:
        await database.close()
        if not _listening(outage_server.port):  # a failed test left it stopped
            await asyncio.to_thread(outage_server.start)
        urls.close()


def _listening(port: int) -> bool:
    try:
        services.wait_for_port(port, timeout=0.2)
    except RuntimeError:
        return False
    return True


def _config(**changes: Any) -> EventsConfig:
    base: dict[str, Any] = {"outbox_batch_ms": 5, "outbox_max_buffer": 1000, "publish_timeout_ms": 150}
    base.update(changes)
    return EventsConfig(**base)


def _event(type_: str = "call.started", *, tenant: str | None = "acme", call_id: str | None = "c-1",
           agent_id: str | None = None, queue: str | None = None, ts: datetime = NOW,
           **data: Any) -> Event:
    return Event(type=type_, tenant=tenant, ts=ts, data=dict(data), call_id=call_id, agent_id=agent_id,
                 queue=queue)


class RecordingSink:
    """Delivers at once (returns None) and remembers what it was offered, in order."""

    def __init__(self, name: str = "recorder") -> None:
        self.name = name
        self.offered: list[tuple[Event, str]] = []

    def offer(self, event: Event, payload: str) -> Awaitable[None] | None:
        self.offered.append((event, payload))
        return None

    @property
    def seqs(self) -> list[int]:
        return [e.seq for e, _ in self.offered]


class FutureSink:
    """Returns a future per event; ``resolve`` decides when (None: never)."""

    def __init__(self, name: str, resolve: Callable[[asyncio.Future[None]], object] | None) -> None:
        self.name = name
        self._resolve = resolve

    def offer(self, event: Event, payload: str) -> Awaitable[None] | None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._resolve is not None:
            self._resolve(future)
        return future


@pytest.fixture
async def started() -> AsyncIterator[Callable[..., Awaitable[EventBus]]]:
    """Builds and starts buses; stops them all at the end."""
    buses: list[EventBus] = []

    async def make(db: Database | None, **changes: Any) -> EventBus:
        clock = changes.pop("clock", lambda: NOW)
        kwargs = {k: changes.pop(k) for k in ("prune_batch", "prune_interval") if k in changes}
        bus = EventBus(db, config=_config(**changes), clock=clock, **kwargs)
        await bus.start()
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.stop(timeout=2)


async def _wait_until(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 20.0) -> None:
    """Poll an observable outcome (a counter, rows in a table) until it holds, at most ``timeout`` s.

    Only for outcomes that have no event to await (a retry happened, a background
    prune deleted rows); it never stands in for ordering between test steps.
    """
    step = 0.01
    for _ in range(int(timeout / step)):
        outcome = predicate()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        await asyncio.sleep(step)
    raise AssertionError(f"condition still false after {timeout} s")


async def _outbox_seqs(db: Database) -> list[int]:
    async with db.engine.connect() as conn:
        return list((await conn.execute(select(EventOutbox.seq).order_by(EventOutbox.seq))).scalars())


async def _outbox_count(db: Database) -> int:
    async with db.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(EventOutbox))).scalar_one())


# -- sequence ---------------------------------------------------------------------------


async def test_seq_is_strictly_increasing_and_continues_after_a_restart(db: Database) -> None:
    first = EventBus(db, config=_config(), clock=lambda: NOW)
    await first.start()
    stamped = [first.publish(_event(n=n)) for n in range(5)]
    assert [e.seq for e in stamped] == [1, 2, 3, 4, 5]
    await first.stop()
    assert await _outbox_seqs(db) == [1, 2, 3, 4, 5]

    second = EventBus(db, config=_config(), clock=lambda: NOW)
    await second.start()
    try:
        assert second.last_seq == 5
        assert second.publish(_event()).seq == 6
    finally:
        await second.stop()
    assert await _outbox_seqs(db) == [1, 2, 3, 4, 5, 6]


async def test_an_unclean_stop_never_reuses_a_seq_delivered_live(db: Database) -> None:
    # A long batch interval keeps the second group in memory: a crash loses it from the outbox.
    crashed = EventBus(db, config=_config(outbox_batch_ms=10_000, outbox_max_buffer=100), clock=lambda: NOW)
    await crashed.start()
    crashed.publish(_event())
    await asyncio.wait_for(crashed.drain(), 10)
    live_only = [crashed.publish(_event()).seq for _ in range(3)]
    # Simulated crash: the tasks die, nothing is flushed.
    for task in (crashed._writer_task, crashed._pruner_task):
        assert task is not None
        task.cancel()
    assert await _outbox_seqs(db) == [1]

    restarted = EventBus(db, config=_config(), clock=lambda: NOW)
    await restarted.start()
    try:
        assert restarted.publish(_event()).seq > max(live_only)
    finally:
        await restarted.stop()


# -- live delivery ----------------------------------------------------------------------


async def test_sinks_get_each_event_live_in_seq_order_before_the_outbox_write(
        db: Database, started: Callable[..., Awaitable[EventBus]]) -> None:
    bus = await started(db, outbox_batch_ms=10_000)
    sink = RecordingSink()
    bus.add_sink(sink)
    bus.publish(_event())
    await asyncio.wait_for(bus.drain(), 10)  # the first commit goes out at once; the next waits 10 s

    stamped = [bus.publish(_event("call.answered", agent_id="1001")) for _ in range(3)]

    assert sink.seqs == [1, 2, 3, 4]  # offered inside publish(), before it returned
    assert [p for _, p in sink.offered[1:]] == [e.to_json() for e in stamped]
    assert bus.outbox_pending == 3
    assert await _outbox_seqs(db) == [1]  # not written yet, delivered all the same
    await bus.stop()
    assert await _outbox_seqs(db) == [1, 2, 3, 4]


async def test_a_sink_that_raises_does_not_stop_the_others(started: Callable[..., Awaitable[EventBus]]) -> None:
    class Broken:
        name = "broken"

        def offer(self, event: Event, payload: str) -> Awaitable[None] | None:
            raise RuntimeError("boom")

    bus = await started(None)
    good = RecordingSink()
    bus.add_sink(Broken())
    bus.add_sink(good)
    result = await bus.publish_and_wait(_event())
    assert result.delivered
    assert good.seqs == [1]
    assert bus.registry.get_sample_value("ctid_events_sink_errors_total", {"sink": "broken"}) == 1


async def test_removed_sinks_get_nothing_more(started: Callable[..., Awaitable[EventBus]]) -> None:
    bus = await started(None)
    sink = RecordingSink()
    bus.add_sink(sink)
    bus.add_sink(sink)  # twice: still one offer per event
    bus.publish(_event())
    bus.remove_sink(sink)
    bus.publish(_event())
    assert sink.seqs == [1]


async def test_publishing_outside_the_bus_lifetime_is_an_error() -> None:
    bus = EventBus(None, config=_config(), clock=lambda: NOW)
    with pytest.raises(EventBusError):
        bus.publish(_event())
    await bus.start()
    stamped = bus.publish(_event())
    with pytest.raises(EventBusError):
        bus.publish(stamped)  # already has a seq
    await bus.stop()
    with pytest.raises(EventBusError):
        bus.publish(_event())


# -- replay -----------------------------------------------------------------------------


def _mixed_events() -> list[Event]:
    events = []
    for n in range(20):
        tenant = "acme" if n % 3 else "globex"
        agent = "1001" if n % 2 else ("1002" if n % 5 == 0 else None)
        type_ = ("call.offered", "call.answered", "agent.state", "call.ended")[n % 4]
        events.append(_event(type_, tenant=tenant, call_id=f"c-{n % 4}", agent_id=agent, n=n))
    return events


async def test_replay_returns_exactly_the_later_events_from_table_and_memory(
        db: Database, started: Callable[..., Awaitable[EventBus]]) -> None:
    bus = await started(db, outbox_batch_ms=10_000)
    published = [bus.publish(e) for e in _mixed_events()[:10]]
    await asyncio.wait_for(bus.drain(), 10)
    published += [bus.publish(e) for e in _mixed_events()[10:]]
    assert bus.outbox_pending == 10  # half in the table, half still in memory

    replayed = await bus.replay(5)
    assert [e.seq for e in replayed] == list(range(6, 21))
    assert [e.envelope() for e in replayed] == [e.envelope() for e in published[5:]]

    def expect(after: int, keep: Callable[[Event], bool]) -> list[int]:
        return [e.seq for e in published if e.seq > after and keep(e)]

    assert [e.seq for e in await bus.replay(0, tenant="globex")] == expect(0, lambda e: e.tenant == "globex")
    assert [e.seq for e in await bus.replay(3, agent_id="1001")] == expect(3, lambda e: e.agent_id == "1001")
    assert [e.seq for e in await bus.replay(0, types={"agent.state", "call.ended"})] == expect(
        0, lambda e: e.type in {"agent.state", "call.ended"})
    assert [e.seq for e in await bus.replay(2, call_id="c-1", tenant="acme")] == expect(
        2, lambda e: e.call_id == "c-1" and e.tenant == "acme")
    assert await bus.replay(0, types=()) == []
    assert [e.seq for e in await bus.replay(0, limit=7)] == list(range(1, 8))
    assert [e.seq for e in await bus.replay(8, limit=4)] == [9, 10, 11, 12]  # across the table/memory edge
    assert await bus.replay(20) == []


async def test_replay_while_the_writer_commits_has_no_gap_and_no_duplicate(
        db: Database, started: Callable[..., Awaitable[EventBus]]) -> None:
    bus = await started(db, outbox_batch_ms=1)
    total = 0
    for _ in range(15):
        for _ in range(20):
            bus.publish(_event())
            total += 1
        # The writer runs while these reads await: events move from memory to the table.
        results = await asyncio.gather(*(bus.replay(0, limit=10_000) for _ in range(3)))
        for replayed in results:
            assert [e.seq for e in replayed] == list(range(1, total + 1))
    await asyncio.wait_for(bus.drain(), 10)
    assert [e.seq for e in await bus.replay(0, limit=10_000)] == list(range(1, total + 1))


async def test_a_memory_only_bus_replays_its_window(started: Callable[..., Awaitable[EventBus]]) -> None:
    bus = await started(None, outbox_max_buffer=100)
    for _ in range(150):
        bus.publish(_event())
    assert bus.outbox_pending == 0
    assert [e.seq for e in await bus.replay(0, limit=1000)] == list(range(51, 151))
    assert [e.seq for e in await bus.replay(140)] == list(range(141, 151))


# -- database outage --------------------------------------------------------------------


async def test_a_database_outage_never_blocks_publishing_and_loses_nothing(
        outage_server: services.Postgres, outage_db: Database,
        started: Callable[..., Awaitable[EventBus]]) -> None:
    bus = await started(outage_db, outbox_batch_ms=5)
    sink = RecordingSink()
    bus.add_sink(sink)
    for _ in range(5):
        bus.publish(_event())
    await asyncio.wait_for(bus.drain(), 10)

    with capture_logs() as logs:
        await asyncio.to_thread(outage_server.pause)
        loop = asyncio.get_running_loop()
        began = loop.time()
        for n in range(40):
            bus.publish(_event("call.offered", agent_id="1001", n=n))
        pop = await bus.publish_and_wait(_event("call.offered", agent_id="1002"))  # never waits for the DB
        elapsed = loop.time() - began
        assert pop.delivered and pop.event.seq == 46
        assert elapsed < 0.5
        assert sink.seqs == list(range(1, 47))  # every event went out live
        assert bus.outbox_pending == 41

        await _wait_until(lambda: bus.outbox_write_failures >= 3)
        assert bus.outbox_pending == 41
        with pytest.raises(ReplayError):
            await bus.replay(0)

        await asyncio.to_thread(outage_server.start)
        await asyncio.wait_for(bus.drain(), 30)

    assert bus.outbox_pending == 0
    assert bus.outbox_dropped == 0
    assert await _outbox_seqs(outage_db) == list(range(1, 47))
    assert [e.seq for e in await bus.replay(0, limit=100)] == list(range(1, 47))
    names = [entry["event"] for entry in logs]
    assert names.count("events.outbox_write_failed") == 1  # once per outage, not once per retry
    assert names.count("events.outbox_recovered") == 1


async def test_a_full_buffer_drops_the_oldest_from_the_outbox_and_counts_them(
        outage_server: services.Postgres, outage_db: Database,
        started: Callable[..., Awaitable[EventBus]]) -> None:
    bus = await started(outage_db, outbox_max_buffer=100)
    sink = RecordingSink()
    bus.add_sink(sink)
    for _ in range(5):
        bus.publish(_event())
    await asyncio.wait_for(bus.drain(), 10)

    await asyncio.to_thread(outage_server.pause)
    for _ in range(130):
        bus.publish(_event())
    assert bus.outbox_pending == 100
    assert bus.outbox_dropped == 30
    assert bus.registry.get_sample_value("ctid_events_outbox_dropped_total") == 30
    assert bus.registry.get_sample_value("ctid_events_outbox_pending") == 100
    assert len(sink.offered) == 135  # dropped from the outbox only: all delivered live

    await asyncio.to_thread(outage_server.start)
    await asyncio.wait_for(bus.drain(), 30)
    assert await _outbox_seqs(outage_db) == [*range(1, 6), *range(36, 136)]


# -- retention --------------------------------------------------------------------------


async def test_retention_prunes_old_rows_in_small_batches(
        db: Database, started: Callable[..., Awaitable[EventBus]]) -> None:
    # The bus prunes once at start, with the time then; the test moves time on afterwards.
    now = [NOW - timedelta(days=30)]
    bus = await started(db, retention_days=7, prune_batch=3, clock=lambda: now[0])
    old = [bus.publish(_event(ts=NOW - timedelta(days=8))) for _ in range(7)]
    recent = [bus.publish(_event(ts=NOW - timedelta(days=6))) for _ in range(4)]
    await asyncio.wait_for(bus.drain(), 10)
    now[0] = NOW

    assert await bus.prune() == len(old)
    assert await _outbox_seqs(db) == [e.seq for e in recent]
    assert [e.seq for e in await bus.replay(0)] == [e.seq for e in recent]
    assert await bus.prune() == 0
    await bus.stop()

    # A bus that starts later prunes at start, and the sequence still continues.
    later = await started(db, retention_days=7, clock=lambda: NOW + timedelta(days=2))
    async def table_empty() -> bool:
        return await _outbox_count(db) == 0

    await _wait_until(table_empty)
    assert later.publish(_event()).seq == recent[-1].seq + 1


# -- publish_and_wait -------------------------------------------------------------------


async def test_publish_and_wait_returns_within_its_bound_and_names_the_slow_sink(
        started: Callable[..., Awaitable[EventBus]]) -> None:
    bus = await started(None, publish_timeout_ms=40)
    loop = asyncio.get_running_loop()
    bus.add_sink(RecordingSink("websocket"))
    bus.add_sink(FutureSink("prompt", lambda f: loop.call_soon(f.set_result, None)))
    bus.add_sink(FutureSink("slow", None))

    began = loop.time()
    result = await bus.publish_and_wait(_event("call.offered", agent_id="1001"), timeout=0.05)
    elapsed = loop.time() - began
    assert 0.04 <= elapsed < 1.0
    assert result.event.seq == 1
    assert not result.delivered
    assert result.timed_out == ["slow"]

    began = loop.time()
    result = await bus.publish_and_wait(_event())  # default bound: publish_timeout_ms
    elapsed = loop.time() - began
    assert 0.03 <= elapsed < 1.0
    assert result.timed_out == ["slow"]
    assert bus.publish_timeouts == 2
    assert bus.registry.get_sample_value("ctid_events_publish_timeouts_total", {"sink": "slow"}) == 2


async def test_publish_and_wait_reports_delivery_and_failure(started: Callable[..., Awaitable[EventBus]]) -> None:
    bus = await started(None)
    loop = asyncio.get_running_loop()
    prompt = FutureSink("prompt", lambda f: loop.call_soon(f.set_result, None))
    bus.add_sink(prompt)
    assert (await bus.publish_and_wait(_event())).delivered

    bus.add_sink(FutureSink("bad", lambda f: loop.call_soon(f.set_exception, OSError("gone"))))
    result = await bus.publish_and_wait(_event())
    assert not result.delivered
    assert result.failed == ["bad"]
    assert result.timed_out == []
    assert bus.publish_timeouts == 0


async def test_every_bus_has_its_own_metrics_registry(started: Callable[..., Awaitable[EventBus]]) -> None:
    one = await started(None)
    two = await started(None)
    one.publish(_event("call.offered"))
    assert one.registry is not two.registry
    assert one.registry.get_sample_value("ctid_events_published_total", {"type": "call.offered"}) == 1
    assert two.registry.get_sample_value("ctid_events_published_total", {"type": "call.offered"}) is None
    assert one.registry.get_sample_value("ctid_events_last_seq") == 1


# -- queue.stats snapshots --------------------------------------------------------------


class FakeTimers:
    """A ``call_later`` whose time only moves when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pending: list[tuple[float, Callable[[], None], FakeTimers.Handle]] = []

    class Handle:
        def __init__(self) -> None:
            self.cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimers.Handle:
        handle = FakeTimers.Handle()
        self.pending.append((self.now + delay, callback, handle))
        return handle

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while True:
            due = [p for p in self.pending if p[0] <= self.now]
            if not due:
                return
            first = min(due, key=lambda p: p[0])
            self.pending.remove(first)
            if not first[2].cancelled:
                first[1]()


async def test_stats_are_published_at_most_once_per_interval_and_only_on_change(
        started: Callable[..., Awaitable[EventBus]]) -> None:
    bus = await started(None)
    sink = RecordingSink()
    bus.add_sink(sink)
    timers = FakeTimers()
    stats = StatsSnapshotter(bus, 5.0, lambda: NOW, call_later=timers.call_later)

    def published(queue: str) -> list[dict[str, Any]]:
        return [e.data for e, _ in sink.offered if e.queue == queue]

    snapshot = {"waiting": 1, "longest_wait_s": 3}
    stats.update("acme", "support", snapshot)
    assert published("support") == [{"waiting": 1, "longest_wait_s": 3}]  # the first change goes at once
    snapshot["waiting"] = 99  # the caller's dict is copied, not kept
    assert published("support") == [{"waiting": 1, "longest_wait_s": 3}]

    for waiting in (2, 3, 4):
        stats.update("acme", "support", {"waiting": waiting, "longest_wait_s": 3})
    stats.update("acme", "sales", {"waiting": 7})  # another queue has its own window
    timers.advance(4.9)
    assert len(published("support")) == 1
    timers.advance(0.1)
    assert published("support")[-1] == {"waiting": 4, "longest_wait_s": 3}  # the latest wins
    assert len(published("support")) == 2
    assert published("sales") == [{"waiting": 7}]

    # Unchanged: nothing at the next boundary, nor after.
    stats.update("acme", "support", {"waiting": 4, "longest_wait_s": 3})
    timers.advance(5.0)
    timers.advance(60.0)
    assert len(published("support")) == 2

    # A change then back to what consumers already have: the boundary stays quiet.
    stats.update("acme", "support", {"waiting": 5, "longest_wait_s": 3})
    assert len(published("support")) == 3
    stats.update("acme", "support", {"waiting": 6, "longest_wait_s": 3})
    stats.update("acme", "support", {"waiting": 5, "longest_wait_s": 3})
    timers.advance(5.0)
    assert len(published("support")) == 3
    assert all(e.type == "queue.stats" and e.tenant == "acme" for e, _ in sink.offered)

    stats.update("acme", "sales", {"waiting": 8})
    stats.close()
    timers.advance(100.0)
    assert published("sales") == [{"waiting": 7}, {"waiting": 8}]


async def test_stats_window_ends_on_the_event_loop_timer(started: Callable[..., Awaitable[EventBus]]) -> None:
    bus = await started(None)
    loop = asyncio.get_running_loop()
    arrived: list[tuple[float, Event]] = []
    second = loop.create_future()

    class Watcher:
        name = "watcher"

        def offer(self, event: Event, payload: str) -> Awaitable[None] | None:
            arrived.append((loop.time(), event))
            if len(arrived) == 2:
                second.set_result(None)
            return None

    bus.add_sink(Watcher())
    stats = StatsSnapshotter(bus, 0.05, lambda: NOW)
    stats.update("acme", "support", {"waiting": 1})
    stats.update("acme", "support", {"waiting": 2})
    stats.update("acme", "support", {"waiting": 3})
    await asyncio.wait_for(second, 5)
    stats.close()
    assert [e.data for _, e in arrived] == [{"waiting": 1}, {"waiting": 3}]
    assert arrived[1][0] - arrived[0][0] >= 0.045
