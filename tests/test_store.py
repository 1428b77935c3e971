"""ctid.store against real databases: SQLite files and a real PostgreSQL.

Every test that takes ``db_url`` (or ``db``/``store``) runs once per dialect. The
PostgreSQL server comes from the session fixture ``postgres_url`` in
``conftest.py``; each test gets a fresh database on it, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Connection, delete, func, insert, inspect, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, StatementError

from ctid.store.calls import CallRecord, CallStore, LegRecord
from ctid.store.db import (
    Database,
    StoreError,
    _migration_connection,
    create_engine,
    upgrade,
)
from ctid.store.models import Call, CallLeg, EventOutbox, Meta, metadata
from ctid.store.types import UTCDateTime

EXPECTED_TABLES = {"alembic_version", "calls", "call_legs", "event_outbox", "meta",
                   "agents", "agent_skills", "queues", "skills", "audit_log", "callbacks",
                   "ivr_sessions", "survey_results"}
HEAD = "0004"
T0 = datetime(2024, 3, 10, 14, 30, 0, tzinfo=UTC)


# -- fixtures ---------------------------------------------------------------------------


def _run_detached(make_coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run admin SQL on an event loop of its own thread, away from the test's loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, make_coro()).result(timeout=30)


async def _admin(server: URL, sql: str) -> None:
    conn = await asyncpg.connect(
        host=server.host,
        port=server.port,
        user=server.username,
        password=server.password,
        database="postgres",
        timeout=10,
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database URL: a SQLite file, or a fresh database on the test server."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'ctid.db'}"
        return
    server = make_url(request.getfixturevalue("postgres_url"))
    name = f"t_{uuid.uuid4().hex}"
    _run_detached(lambda: _admin(server, f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        _run_detached(lambda: _admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    await database.start()
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
def store(db: Database) -> CallStore:
    return CallStore(db.sessions)


@pytest.fixture
def closed_port() -> int:
    """A local TCP port with nothing listening: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _call(call_id: str = "c-1", **changes: Any) -> CallRecord:
    base = CallRecord(
        call_id=call_id,
        tenant="acme",
        service_line="support",
        direction="inbound",
        state="ivr",
        caller_number="+3225551234",
        caller_name="Ada",
        dnis="+3228000000",
        created_at=T0,
        linkedid="1710081000.1",
        data={"lang": "fr", "account": "A-17", "menu": [1, 2]},
        legs=(
            LegRecord(
                channel="PJSIP/trunk-00000001",
                uniqueid="1710081000.1",
                role="caller",
                created_at=T0,
            ),
        ),
    )
    return replace(base, **changes)


async def _count(db: Database, model: type[Any]) -> int:
    async with db.sessions() as session:
        total = await session.scalar(select(func.count()).select_from(model))
    assert total is not None
    return total


async def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda c: inspect(c).get_table_names())
    finally:
        await engine.dispose()
    return set(names)


async def _revision(db: Database) -> str | None:
    async with db.engine.connect() as conn:
        return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())


# -- migrations -------------------------------------------------------------------------


async def test_upgrade_creates_the_schema_in_an_empty_database(db_url: str) -> None:
    assert await _tables(db_url) == set()

    assert await upgrade(db_url) == HEAD

    assert await _tables(db_url) == EXPECTED_TABLES


async def test_upgrading_an_up_to_date_database_changes_nothing(db_url: str) -> None:
    await upgrade(db_url)
    async with Database(db_url) as db:
        async with db.sessions.begin() as session:
            session.add(Meta(key="instance", value="ctid-a"))

    assert await upgrade(db_url) == HEAD
    async with Database(db_url) as db:
        assert await _revision(db) == HEAD
        async with db.sessions() as session:
            assert await session.get(Meta, "instance") is not None


async def test_concurrent_upgrades_are_serialised_and_all_succeed(db_url: str) -> None:
    revisions = await asyncio.gather(*(upgrade(db_url) for _ in range(3)))

    assert revisions == [HEAD, HEAD, HEAD]
    assert await _tables(db_url) == EXPECTED_TABLES


async def test_migrated_schema_matches_the_models(db: Database) -> None:
    def diff(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))

    async with db.engine.connect() as conn:
        assert await conn.run_sync(diff) == []


def _model_constraint_names() -> set[tuple[str, str]]:
    names: set[tuple[str, str]] = set()
    for table in metadata.tables.values():
        names.update((table.name, str(c.name)) for c in table.constraints)
        names.update((table.name, str(i.name)) for i in table.indexes)
    return names


def _reflected_constraint_names(conn: Connection) -> set[tuple[str, str]]:
    inspector = inspect(conn)
    names: set[tuple[str, str]] = set()
    for table in metadata.tables:
        found: list[Mapping[str, Any]] = [inspector.get_pk_constraint(table)]
        found += inspector.get_foreign_keys(table)
        found += inspector.get_unique_constraints(table)
        found += inspector.get_check_constraints(table)
        found += [i for i in inspector.get_indexes(table) if "duplicates_constraint" not in i]
        names.update((table, str(c["name"])) for c in found)
    return names


async def test_migrated_constraints_carry_the_names_of_the_naming_convention(
    db: Database,
) -> None:
    # Batch migrations on SQLite find constraints by name; compare_metadata does
    # not look at CHECK constraints or names, so this does.
    async with db.engine.connect() as conn:
        reflected = await conn.run_sync(_reflected_constraint_names)

    assert reflected == _model_constraint_names()
    assert ("calls", "ck_calls_direction") in reflected


async def test_sqlite_batch_rebuild_during_migration_keeps_child_rows(tmp_path: Path) -> None:
    # A batch migration on SQLite drops and recreates the table. With foreign
    # keys on, dropping `calls` would cascade-delete every leg.
    url = f"sqlite+aiosqlite:///{tmp_path / 'ctid.db'}"
    async with Database(url) as db:
        await CallStore(db.sessions).upsert_call(_call())

        def rebuild_calls(conn: Connection) -> None:
            ops = Operations(MigrationContext.configure(conn, opts={"render_as_batch": True}))
            with ops.batch_alter_table("calls", recreate="always") as batch:
                batch.alter_column("state", comment=None)

        async with _migration_connection(db.engine) as conn:
            await conn.run_sync(rebuild_calls)

        assert await _count(db, CallLeg) == 1
        async with db.engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1


# -- UTC timestamps ---------------------------------------------------------------------


async def test_aware_datetime_comes_back_as_the_same_instant_in_utc(db: Database) -> None:
    new_york = timezone(timedelta(hours=-5))
    created = datetime(2024, 3, 10, 9, 30, 15, 250_000, tzinfo=new_york)
    store = CallStore(db.sessions)

    await store.upsert_call(_call(created_at=created, legs=()))
    stored = await store.get_call("c-1")

    assert stored is not None
    assert stored.created_at == created
    assert stored.created_at.tzinfo is UTC
    assert stored.created_at.hour == 14
    assert stored.created_at.microsecond == 250_000


async def test_timestamp_filters_compare_instants_across_zones(db: Database) -> None:
    tokyo = timezone(timedelta(hours=9))
    async with db.sessions.begin() as session:
        for seq, ts in enumerate((T0 - timedelta(hours=1), T0 + timedelta(hours=1)), start=1):
            session.add(EventOutbox(seq=seq, id=str(uuid.uuid4()), ts=ts, type="x", payload="{}"))

    async with db.sessions() as session:
        # T0 written in Tokyo time is still T0: only the later event is after it.
        later = await session.scalars(select(EventOutbox.seq).where(EventOutbox.ts > T0.astimezone(tokyo)))
        assert later.all() == [2]


def test_naive_datetime_is_refused_by_the_column_type() -> None:
    naive = datetime(2024, 3, 10, 14, 30)
    dialect = create_engine("sqlite+aiosqlite://").dialect

    with pytest.raises(ValueError, match="naive"):
        UTCDateTime().process_bind_param(naive, dialect)


async def test_naive_datetime_is_refused_by_the_database_layer(db: Database) -> None:
    row = {"seq": 1, "id": "e-1", "ts": datetime(2024, 3, 10), "type": "x", "payload": "{}"}

    with pytest.raises(StatementError) as caught:
        async with db.sessions.begin() as session:
            await session.execute(insert(EventOutbox).values(row))

    assert isinstance(caught.value.orig, ValueError)
    assert await _count(db, EventOutbox) == 0


def test_call_record_refuses_naive_timestamps() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        _call(created_at=datetime(2024, 3, 10))
    with pytest.raises(ValueError, match="timezone-aware"):
        LegRecord(channel="SIP/x", uniqueid="1.1", role="caller", created_at=datetime(2024, 1, 1))


# -- call records -----------------------------------------------------------------------


async def test_upsert_stores_a_new_call_with_its_legs(store: CallStore) -> None:
    record = _call()

    await store.upsert_call(record)

    assert await store.get_call("c-1") == record


async def test_upsert_replaces_call_fields_and_updates_legs_in_place(db: Database, store: CallStore) -> None:
    await store.upsert_call(_call())
    async with db.sessions() as session:
        caller_leg_id = await session.scalar(select(CallLeg.id))

    answered = T0 + timedelta(seconds=42)
    ended = T0 + timedelta(minutes=5)
    caller = replace(_call().legs[0], answered_at=answered, ended_at=ended, hangup_cause=16)
    agent = LegRecord(
        channel="PJSIP/agent-7-00000002",
        uniqueid="1710081042.2",
        role="agent",
        created_at=answered,
        answered_at=answered,
    )
    updated = _call(
        state="ended",
        answered_at=answered,
        ended_at=ended,
        hangup_cause=16,
        hangup_by="caller",
        data={"lang": "fr", "crm": {"tier": "gold"}},
        legs=(caller, agent),
    )

    await store.upsert_call(updated)

    assert await store.get_call("c-1") == updated
    async with db.sessions() as session:
        ids = (await session.scalars(select(CallLeg.id).order_by(CallLeg.id))).all()
    assert ids[0] == caller_leg_id
    assert len(ids) == 2


async def test_repeating_an_upsert_changes_nothing(db: Database, store: CallStore) -> None:
    record = _call()

    for _ in range(3):
        await store.upsert_call(record)

    assert await store.get_call("c-1") == record
    assert await _count(db, Call) == 1
    assert await _count(db, CallLeg) == 1


async def test_concurrent_upserts_of_a_new_call_leave_one_row(db: Database, store: CallStore) -> None:
    record = _call()

    await asyncio.gather(*(store.upsert_call(record) for _ in range(5)))

    assert await _count(db, Call) == 1
    assert await _count(db, CallLeg) == 1


async def test_upsert_keeps_stored_legs_that_a_newer_record_omits(store: CallStore) -> None:
    first = _call()
    agent = LegRecord(channel="PJSIP/agent-7-2", uniqueid="1710081042.2", role="agent", created_at=T0)
    await store.upsert_call(replace(first, legs=(*first.legs, agent)))

    await store.upsert_call(replace(first, state="talking", legs=(agent,)))

    stored = await store.get_call("c-1")
    assert stored is not None
    assert [leg.uniqueid for leg in stored.legs] == ["1710081000.1", "1710081042.2"]


async def test_deleting_a_call_deletes_its_legs(db: Database, store: CallStore) -> None:
    extra = LegRecord(channel="Local/1@q-1;1", uniqueid="1710081001.5", role="other", created_at=T0)
    await store.upsert_call(_call(legs=(*_call().legs, extra)))
    await store.upsert_call(_call("c-2"))
    assert await _count(db, CallLeg) == 3

    async with db.sessions.begin() as session:
        await session.execute(delete(Call).where(Call.call_id == "c-1"))

    assert await _count(db, CallLeg) == 1
    assert await store.get_call("c-1") is None


async def test_a_batch_upsert_stores_and_replaces_calls_and_legs_like_one_by_one(
    db: Database, store: CallStore
) -> None:
    agent = LegRecord(channel="PJSIP/agent-7-2", uniqueid="1710081042.2", role="agent", created_at=T0)
    first = [_call("c-1"), _call("c-2", legs=(*_call().legs, agent)), _call("c-3", legs=())]
    await store.upsert_calls(first)
    for record in first:
        assert await store.get_call(record.call_id) == record

    ended = T0 + timedelta(minutes=5)
    caller = replace(_call().legs[0], ended_at=ended, hangup_cause=16)
    second = [_call("c-2", state="ended", ended_at=ended, hangup_by="caller", legs=(caller,)), _call("c-4")]
    await store.upsert_calls(second)
    await store.upsert_calls(second)  # idempotent

    stored = await store.get_call("c-2")
    assert stored is not None and stored.state == "ended" and stored.ended_at == ended
    assert stored.legs == (caller, agent)  # updated in place; the leg the record omits is kept
    assert await store.get_call("c-4") == second[1]
    assert await _count(db, Call) == 4
    assert await _count(db, CallLeg) == 4  # c-1: 1, c-2: 2, c-3: none, c-4: 1
    await store.upsert_calls([])


async def test_a_batch_the_database_refuses_stores_none_of_it(db: Database, store: CallStore) -> None:
    refused = replace(_call("c-2"), tenant=None)  # type: ignore[arg-type]  # tenant is NOT NULL
    with pytest.raises(IntegrityError):
        await store.upsert_calls([_call("c-1"), refused, _call("c-3")])
    assert await _count(db, Call) == 0
    assert await _count(db, CallLeg) == 0


async def test_get_call_of_an_unknown_id_returns_none(store: CallStore) -> None:
    assert await store.get_call("nope") is None


async def test_list_calls_filters_by_tenant_and_activity_newest_first(
    store: CallStore,
) -> None:
    await store.upsert_call(_call("old", created_at=T0))
    await store.upsert_call(_call("done", created_at=T0 + timedelta(minutes=1), ended_at=T0 + timedelta(minutes=2)))
    await store.upsert_call(_call("new", created_at=T0 + timedelta(minutes=3)))
    await store.upsert_call(_call("other", tenant="globex", created_at=T0 + timedelta(hours=1)))

    def ids(records: list[CallRecord]) -> list[str]:
        return [r.call_id for r in records]

    assert ids(await store.list_calls()) == ["other", "new", "done", "old"]
    assert ids(await store.list_calls(tenant="acme")) == ["new", "done", "old"]
    assert ids(await store.list_calls(tenant="acme", active=True)) == ["new", "old"]
    assert ids(await store.list_calls(active=False)) == ["done"]
    assert ids(await store.list_calls(limit=2)) == ["other", "new"]
    listed = await store.list_calls(tenant="globex")
    assert listed[0].legs == _call().legs


def test_call_record_refuses_values_the_schema_would_reject() -> None:
    with pytest.raises(ValueError, match="direction"):
        _call(direction="sideways")
    with pytest.raises(ValueError, match="call_id"):
        _call("x" * 65)
    with pytest.raises(ValueError, match="twice"):
        _call(legs=(_call().legs[0], _call().legs[0]))


async def test_event_outbox_keeps_app_assigned_64_bit_sequence_numbers(db: Database) -> None:
    seq = 2**40 + 7
    async with db.sessions.begin() as session:
        session.add(
            EventOutbox(
                seq=seq,
                id=str(uuid.uuid4()),
                ts=T0,
                type="call.offered",
                tenant="acme",
                call_id="c-1",
                payload='{"v":1}',
            )
        )

    async with db.sessions() as session:
        assert await session.scalar(select(EventOutbox.seq)) == seq


# -- connection settings ----------------------------------------------------------------


async def test_sqlite_pragmas_are_set_on_every_connection(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'ctid.db'}")
    try:
        async with engine.connect() as first, engine.connect() as second:
            for conn in (first, second):

                async def pragma(name: str, conn: Any = conn) -> Any:
                    return (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()

                assert await pragma("journal_mode") == "wal"
                assert await pragma("busy_timeout") == 5000
                assert await pragma("foreign_keys") == 1
                assert await pragma("synchronous") == 1  # NORMAL
    finally:
        await engine.dispose()


async def test_sqlite_fresh_file_opened_by_many_engines_at_once_ends_in_wal(
    tmp_path: Path,
) -> None:
    # Concurrent switches to WAL on a new file collide with "database is locked"
    # without waiting for busy_timeout; the connect hook must retry, not fail.
    url = f"sqlite+aiosqlite:///{tmp_path / 'ctid.db'}"
    engines = [create_engine(url) for _ in range(6)]

    async def journal_mode(engine: Any) -> Any:
        async with engine.connect() as conn:
            return (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar()

    try:
        modes = await asyncio.gather(*(journal_mode(e) for e in engines))
    finally:
        for engine in engines:
            await engine.dispose()

    assert modes == ["wal"] * len(engines)


def test_postgresql_engine_uses_a_bounded_pre_pinged_pool() -> None:
    engine = create_engine("postgresql+asyncpg://ctid@db.invalid/ctid")
    pool: Any = engine.sync_engine.pool

    assert pool.size() == 5
    assert pool._pre_ping is True


def test_urls_without_a_supported_async_driver_are_refused() -> None:
    with pytest.raises(StoreError, match="aiosqlite"):
        create_engine("sqlite:///ctid.db")
    with pytest.raises(StoreError, match="unsupported"):
        create_engine("mysql+aiomysql://ctid:hunter2@db/ctid")


# -- unreachable databases and health ---------------------------------------------------


async def test_unreachable_postgres_raises_store_error_without_the_password(
    closed_port: int,
) -> None:
    url = f"postgresql+asyncpg://ctid:s3cret-pw@127.0.0.1:{closed_port}/ctid"

    with pytest.raises(StoreError) as from_start:
        await Database(url).start()
    with pytest.raises(StoreError) as from_upgrade:
        await upgrade(url)

    for caught in (from_start, from_upgrade):
        message = str(caught.value)
        assert "cannot connect" in message
        assert f"ctid:***@127.0.0.1:{closed_port}/ctid" in message
        assert "s3cret-pw" not in message
        assert "s3cret-pw" not in caught.value.url


async def test_missing_postgres_database_raises_store_error(postgres_url: str) -> None:
    url = make_url(postgres_url).set(database=f"absent_{uuid.uuid4().hex}", password="pw-x1")

    with pytest.raises(StoreError, match="does not exist") as caught:
        await Database(url.render_as_string(hide_password=False)).start()

    assert "pw-x1" not in str(caught.value)


async def test_unopenable_sqlite_file_raises_store_error(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'no-such-dir' / 'ctid.db'}"

    with pytest.raises(StoreError, match="cannot connect"):
        await Database(url).start()


async def test_ping_is_true_for_a_live_database(db: Database) -> None:
    assert await db.ping() is True


async def test_ping_is_false_for_an_unreachable_database(closed_port: int, tmp_path: Path) -> None:
    for url in (
        f"postgresql+asyncpg://ctid:pw@127.0.0.1:{closed_port}/ctid",
        f"sqlite+aiosqlite:///{tmp_path / 'no-such-dir' / 'ctid.db'}",
    ):
        database = Database(url)
        try:
            assert await database.ping() is False
        finally:
            await database.close()
