"""Alembic environment for ctid's schema.

ctid runs migrations itself (``ctid.store.db.upgrade`` and ``Database.start``):
it opens an async connection, takes the migration lock, and hands the
connection's synchronous face to Alembic through
``config.attributes["connection"]``. This file then only configures the
migration context on that connection, so the migrations share ctid's engine
settings (SQLite pragmas, asyncpg pool) and its single transaction.

Without a ``connection`` attribute (someone driving Alembic by hand with
``sqlalchemy.url`` set on the Config) it builds its own async engine and runs
the same code through ``run_sync``. Offline mode (``--sql``) renders SQL for
the URL's dialect.

``render_as_batch`` is on for SQLite, whose ALTER TABLE cannot drop or alter
columns or constraints: Alembic then rebuilds the table instead.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from ctid.store.models import metadata

config = context.config


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_own_engine(url: str) -> None:
    from ctid.store.db import create_engine

    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_configure_and_run)
            await connection.commit()
    finally:
        await engine.dispose()


def _run_online() -> None:
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        _configure_and_run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection attribute and no sqlalchemy.url for migrations")
    asyncio.run(_run_with_own_engine(url))


def _run_offline() -> None:
    url = config.get_main_option("sqlalchemy.url")
    context.configure(
        url=url,
        target_metadata=metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=bool(url and url.startswith("sqlite")),
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _run_offline()
else:
    _run_online()
