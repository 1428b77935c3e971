"""The IVR records' writer: buffered while the database is down, nothing lost when it
is back, a row the database refuses set aside without blocking the others."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from ctid.store.db import Database
from ctid.store.ivr import IVRStore
from tests import services

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def run_row(call_id: str) -> dict[str, object]:
    return {"call_id": call_id, "tenant": "acme", "flow": "main", "service_line": "line", "started_at": T0,
            "ended_at": T0, "exit_reason": "queued", "exit_node": "agent", "error": None,
            "steps": [{"node": "menu", "type": "menu", "at": T0.timestamp(), "input": "1"}], "variables": {}}


async def test_rows_wait_for_a_dead_database_and_are_all_written_when_it_is_back(tmp_path: Path) -> None:
    dead = create_async_engine(f"postgresql+asyncpg://ctid:x@127.0.0.1:{services.free_port()}/ctid",
                               connect_args={"timeout": 2})
    store = IVRStore(async_sessionmaker(dead, expire_on_commit=False), interval=0.0)
    for n in range(3):
        store.add(run_row(f"call-{n}"))
    store.add_survey(call_id="call-0", tenant="acme", agent_id="1001", queue="support", flow="csat",
                     scores={"agent": 4, "solved": 5}, at=T0)
    assert not await store.flush()  # connection refused: kept, with the reason
    assert store.pending == 5 and store.last_error is not None and "call-" not in store.last_error
    await dead.dispose()
    async with Database(f"sqlite+aiosqlite:///{tmp_path / 'ivr.db'}") as db:
        store._sessions = db.sessions  # the database is back
        assert await store.flush()
        assert store.pending == 0 and store.written == 5 and store.last_error is None
        assert [r.call_id for r in await store.runs_for("call-1")] == ["call-1"]
        assert await store.surveys_for("call-0") == {"agent": 4, "solved": 5}
        assert await store.agent_average("1001") == (2, 4.5)


async def test_a_refused_row_is_set_aside_and_the_others_are_written(tmp_path: Path) -> None:
    async with Database(f"sqlite+aiosqlite:///{tmp_path / 'ivr.db'}") as db:
        store = IVRStore(db.sessions, interval=0.0)
        store.add_survey(call_id="c1", tenant="acme", agent_id="1001", queue="support", flow="csat",
                         scores={"agent": 4}, at=T0)
        store.add_survey(call_id="c2", tenant="acme", agent_id="1001", queue="support", flow="csat",
                         scores={"agent": 9}, at=T0)  # out of 1-5: the CHECK refuses it
        store.add_survey(call_id="c1", tenant="acme", agent_id="1001", queue="support", flow="csat",
                         scores={"agent": 4}, at=T0)  # a duplicate (call, question)
        store.add(run_row("c3"))
        assert await store.flush()
        assert store.rejected == 2 and store.written == 2 and store.pending == 0
        assert await store.surveys_for("c1") == {"agent": 4}
        assert await store.surveys_for("c2") == {}
        assert len(await store.runs_for("c3")) == 1
