"""Engine creation, schema migrations and the :class:`Database` lifetime owner.

Supported URLs:

- ``sqlite+aiosqlite:///path/to/ctid.db``: the embedded default. Every new
  connection gets ``journal_mode=WAL`` (readers never block the writer),
  ``busy_timeout=5000`` (a writer waits for the lock instead of failing at
  once), ``foreign_keys=ON`` (SQLite ignores foreign keys, and so ON DELETE
  CASCADE, unless told otherwise, per connection) and ``synchronous=NORMAL``
  (safe in WAL mode; a power cut can lose the last commits but never corrupts).
- ``postgresql+asyncpg://user:password@host:port/db``: production, with a
  bounded pool, pre-ping (connections survive a database restart) and recycling.

Migrations are Alembic revisions shipped inside the package
(``ctid/store/migrations``). :func:`upgrade` and :meth:`Database.start` bring a
database to head; both are idempotent and safe when two ctid processes start at
once (a PostgreSQL advisory lock, or ``BEGIN IMMEDIATE`` on SQLite, serialises
them).

Every failure to reach the database surfaces as :class:`StoreError`, whose
message names the URL with the password masked.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.util import CommandError
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

__all__ = [
    "MIGRATIONS_DIR",
    "Database",
    "StoreError",
    "alembic_config",
    "create_engine",
    "redact_url",
    "upgrade",
]

log = structlog.get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

SQLITE_BUSY_TIMEOUT_MS = 5000
SQLITE_PRAGMAS: tuple[tuple[str, str], ...] = (
    ("busy_timeout", str(SQLITE_BUSY_TIMEOUT_MS)),  # first: the others may wait on locks
    ("journal_mode", "WAL"),
    ("foreign_keys", "ON"),
    ("synchronous", "NORMAL"),
)

# Switching a fresh file to WAL needs an exclusive lock. When two connections
# switch at once, SQLite reports the deadlock as "database is locked" at once,
# without waiting for busy_timeout; the loser succeeds when it retries, because
# by then the file is in WAL mode. Measured: at most 4 attempts in 4,000 races.
_WAL_SWITCH_ATTEMPTS = 50

# asyncpg's own connect timeout is 60 s; a health check or a start-up should
# learn much sooner that the server is gone.
PG_CONNECT_TIMEOUT_S = 10.0

# A health check that takes longer than this is a failed health check.
PING_TIMEOUT_S = 2.0

# Any constant works; it only has to be the same for every ctid process.
_PG_MIGRATION_LOCK_KEY = 0x637469645F6462  # "ctid_db"

_SUPPORTED = ("sqlite+aiosqlite", "postgresql+asyncpg")

# What a failed connect looks like: SQLAlchemy-wrapped driver errors, plus the
# raw socket errors and timeouts asyncpg raises before SQLAlchemy can wrap them.
_CONNECT_ERRORS = (SQLAlchemyError, OSError, TimeoutError)


class StoreError(Exception):
    """The database is unusable: unreachable, misconfigured, or its schema failed.

    ``url`` is the database URL with the password masked; the message never
    contains the password.
    """

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


def redact_url(url: str | URL) -> str:
    """The URL as text with any password replaced by ``***``."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return "<unparseable database URL>"
    return parsed.render_as_string(hide_password=True)


def _parse(url: str) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(
            "invalid database URL (expected sqlite+aiosqlite:///path or postgresql+asyncpg://user@host/db)",
            url=redact_url(url),
        ) from exc
    if parsed.drivername not in _SUPPORTED:
        raise StoreError(
            f"unsupported database URL {redact_url(parsed)}: use sqlite+aiosqlite:///path or postgresql+asyncpg://...",
            url=redact_url(parsed),
        )
    return parsed


def _describe(exc: BaseException, parsed: URL) -> str:
    """A one-line reason for ``exc`` that is safe to log (no password)."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    line = (lines[0] if lines else "") or type(exc).__name__
    if parsed.password:
        line = line.replace(str(parsed.password), "***")
    return line


def _apply_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        for name, value in SQLITE_PRAGMAS:
            if name == "journal_mode":
                _set_journal_mode(cursor, value)
            else:
                cursor.execute(f"PRAGMA {name}={value}")
    finally:
        cursor.close()


def _set_journal_mode(cursor: Any, mode: str) -> None:
    for attempt in range(1, _WAL_SWITCH_ATTEMPTS + 1):
        try:
            cursor.execute(f"PRAGMA journal_mode={mode}")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == _WAL_SWITCH_ATTEMPTS:
                raise


def create_engine(url: str) -> AsyncEngine:
    """An :class:`AsyncEngine` for ``url`` with ctid's connection settings.

    Does not connect. Raises :class:`StoreError` for a URL that is not
    ``sqlite+aiosqlite`` or ``postgresql+asyncpg``.
    """
    parsed = _parse(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_async_engine(parsed)
        event.listen(engine.sync_engine, "connect", _apply_sqlite_pragmas)
        return engine
    return create_async_engine(
        parsed,
        pool_size=5,
        max_overflow=10,
        pool_timeout=10,
        pool_recycle=1800,
        pool_pre_ping=True,
        connect_args={"timeout": PG_CONNECT_TIMEOUT_S},
    )


def alembic_config() -> Config:
    """An Alembic :class:`Config` for ctid's migrations, built without an ini file.

    To drive Alembic by hand, set ``sqlalchemy.url`` on it; ctid itself passes a
    connection in ``config.attributes["connection"]`` instead.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _missing_sqlite_directory(url: URL) -> Path | None:
    """The directory a SQLite file URL needs but that does not exist, if any.

    Checked before connecting because it is the usual misconfiguration, and
    because aiosqlite leaves a worker thread behind when its connect fails.
    """
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    if url.database.startswith("file:"):  # URI filenames: leave them to SQLite
        return None
    parent = Path(url.database).parent
    return None if parent.is_dir() else parent


@asynccontextmanager
async def _connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection from ``engine``; a failure to connect becomes :class:`StoreError`."""
    missing = _missing_sqlite_directory(engine.url)
    if missing is not None:
        safe = redact_url(engine.url)
        raise StoreError(f"cannot connect to database {safe}: directory {missing} does not exist", url=safe)
    conn = engine.connect()
    try:
        await conn.start()
    except _CONNECT_ERRORS as exc:
        safe = redact_url(engine.url)
        raise StoreError(f"cannot connect to database {safe}: {_describe(exc, engine.url)}", url=safe) from exc
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def _migration_connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection in one transaction that holds the migration lock.

    PostgreSQL: a transaction-scoped advisory lock, so concurrent starters queue
    and the later ones find the schema at head. SQLite: ``BEGIN IMMEDIATE`` takes
    the write lock up front (the pysqlite driver would otherwise autocommit each
    DDL statement), and ``foreign_keys`` is switched off first, because a batch
    migration rebuilds a table by dropping it, and with foreign keys on, that
    DROP would cascade-delete every child row. The connection is discarded
    afterwards rather than returned to the pool with foreign keys off.

    Commits when the block succeeds, rolls back when it raises.
    """
    async with _connection(engine) as conn:
        sqlite = conn.dialect.name == "sqlite"
        try:
            if sqlite:
                await conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK_KEY})
            yield conn
            if sqlite:
                broken = (await conn.exec_driver_sql("PRAGMA foreign_key_check")).all()
                if broken:
                    safe = redact_url(engine.url)
                    raise StoreError(
                        f"migration left {len(broken)} foreign key violations in {safe}",
                        url=safe,
                    )
            await conn.commit()
        except BaseException:
            # The original error is what matters; a dead connection may also
            # refuse the rollback.
            with suppress(SQLAlchemyError, OSError):
                await conn.rollback()
            raise
        finally:
            if sqlite:
                await conn.invalidate()


def _upgrade_sync(connection: Connection, config: Config) -> str | None:
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
    return MigrationContext.configure(connection).get_current_revision()


async def _upgrade_engine(engine: AsyncEngine) -> str | None:
    config = alembic_config()
    safe = redact_url(engine.url)
    async with _migration_connection(engine) as conn:
        try:
            revision = await conn.run_sync(_upgrade_sync, config)
        except (SQLAlchemyError, CommandError) as exc:
            # CommandError is how Alembic says, among others, that the database
            # is at a revision this ctid does not know (a newer ctid migrated it).
            raise StoreError(f"schema upgrade of {safe} failed: {_describe(exc, engine.url)}", url=safe) from exc
    log.info("store.schema_at_head", url=safe, revision=revision)
    return revision


async def upgrade(url: str) -> str | None:
    """Migrate the database at ``url`` to the newest schema; return its revision.

    Idempotent. Uses a short-lived engine of its own (for the CLI); a running
    daemon calls :meth:`Database.start` instead.
    """
    engine = create_engine(url)
    try:
        return await _upgrade_engine(engine)
    finally:
        await engine.dispose()


class Database:
    """Owns the engine and the session factory for one database URL.

    Lifetime: ``await start()`` (connects and migrates to head; raises
    :class:`StoreError` if the database is unreachable), use :attr:`sessions`,
    then ``await close()``. Also usable as ``async with Database(url) as db``.
    """

    def __init__(self, url: str) -> None:
        self._engine = create_engine(url)
        self._sessions = async_sessionmaker(self._engine, expire_on_commit=False)
        self._safe_url = redact_url(self._engine.url)

    @property
    def url(self) -> str:
        """The database URL with the password masked (safe to log)."""
        return self._safe_url

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._engine.dialect.name

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        """The session factory; ``async with db.sessions.begin() as s:`` for a unit of work."""
        return self._sessions

    async def start(self) -> None:
        """Connect and migrate the schema to head."""
        await _upgrade_engine(self._engine)

    async def close(self) -> None:
        """Close every pooled connection. Safe to call more than once."""
        await self._engine.dispose()

    async def ping(self) -> bool:
        """Whether the database answers ``SELECT 1`` within :data:`PING_TIMEOUT_S`.

        Never raises for an unreachable database; meant for ``/healthz``.
        """
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                async with _connection(self._engine) as conn:
                    await conn.execute(text("SELECT 1"))
        except (StoreError, *_CONNECT_ERRORS) as exc:
            log.debug("store.ping_failed", url=self._safe_url, error=str(exc))
            return False
        return True

    async def __aenter__(self) -> Database:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()
