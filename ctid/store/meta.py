"""Small key/value facts kept in the ``meta`` table (e.g. the MQTT publisher's cursor)."""

from __future__ import annotations

from sqlalchemy import Table, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ctid.store.db import Database
from ctid.store.models import Meta

_META: Table = Meta.__table__  # type: ignore[assignment]


async def get_meta(db: Database, key: str) -> str | None:
    async with db.engine.connect() as conn:
        value = (await conn.execute(select(_META.c.value).where(_META.c.key == key))).scalar()
    return None if value is None else str(value)


async def set_meta(db: Database, key: str, value: str) -> None:
    insert = pg_insert if db.dialect == "postgresql" else sqlite_insert
    stmt = insert(_META).values(key=key, value=value)
    stmt = stmt.on_conflict_do_update(index_elements=[_META.c.key], set_={"value": value})
    async with db.engine.begin() as conn:
        await conn.execute(stmt)
