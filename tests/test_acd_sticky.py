"""Sticky agents: the caller's last agent from the call records, with a bounded lookup."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ctid.acd.history import Previous, StickyHistory, store_query
from ctid.store.calls import CallRecord, CallStore
from ctid.store.db import Database
from tests import services
from tests.test_acd_e2e import make_config, make_sim, until
from tests.test_acd_stats import login, wired

# -- the history, pure ------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_a_remembered_agent_is_found_without_the_database() -> None:
    clock = Clock()

    asked: list[str] = []

    async def query(tenant: str, queue: str, numbers: tuple[str, ...], since: float) -> Previous | None:
        asked.append(queue)
        return None

    history = StickyHistory(query, clock)
    history.remember("acme", "support", "+15551230001", "1001")
    clock.now += 3600
    assert await history.lookup("acme", "support", "+15551230001", ("+15551230001",), 7 * 86400) == "1001"
    assert asked == []  # the cache answered
    # Another queue: sticky is per queue, so the records are asked (and say no one).
    assert await history.lookup("acme", "sales", "+15551230001", ("+15551230001",), 7 * 86400) is None
    assert asked == ["sales"]
    assert await history.lookup("acme", "sales", "+15551230001", ("+15551230001",), 7 * 86400) is None
    assert asked == ["sales"], "a negative answer is cached"
    clock.now += 8 * 86400  # older than the window: no sticky agent
    assert history.cached("acme", "support", "+15551230001", 7 * 86400) is None


async def test_a_slow_database_never_holds_the_call_longer_than_the_bound() -> None:
    clock = Clock()
    release = asyncio.Event()
    calls: list[tuple[str, ...]] = []

    async def slow(tenant: str, queue: str, numbers: tuple[str, ...], since: float) -> Previous | None:
        calls.append(numbers)
        await release.wait()
        return Previous("1002", clock.now - 60)

    history = StickyHistory(slow, clock, bound_s=0.05)
    started = time.perf_counter()
    assert await history.lookup("acme", "support", "+15551230002", ("+15551230002",), 86400) is None
    assert time.perf_counter() - started < 0.5
    assert history.timeouts == 1
    release.set()
    await asyncio.sleep(0.01)  # the query finished in the background and filled the cache
    assert await history.lookup("acme", "support", "+15551230002", ("+15551230002",), 86400) == "1002"
    assert len(calls) == 1
    await history.close()


async def test_a_failing_database_means_no_sticky_agent() -> None:
    async def broken(tenant: str, queue: str, numbers: tuple[str, ...], since: float) -> Previous | None:
        raise OSError("database down")

    history = StickyHistory(broken, Clock())
    assert await history.lookup("acme", "support", "+15551230003", ("+15551230003",), 86400) is None


async def test_the_store_query_finds_the_last_agent_of_the_caller_in_the_queue(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    await db.start()
    try:
        store = CallStore(db.sessions)
        now = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

        def record(call_id: str, ago: timedelta, queue: str, agent: str, number: str = "+15551230004") -> CallRecord:
            start = now - ago
            return CallRecord(call_id=call_id, tenant="acme", direction="inbound", state="ended", created_at=start,
                              caller_number=number, answered_at=start + timedelta(seconds=5),
                              ended_at=start + timedelta(seconds=65), hangup_by="caller",
                              data={"queue": queue, "agent_id": agent})

        for rec in (record("c1", timedelta(days=3), "support", "1001"),
                    record("c2", timedelta(days=1), "support", "1002"),
                    record("c3", timedelta(hours=1), "sales", "1003"),
                    record("c4", timedelta(minutes=5), "support", "1004", number="+15559999999"),
                    record("c5", timedelta(days=20), "support", "1005", number="+15558888888")):
            await store.upsert_call(rec)
        query = store_query(db.sessions)
        since = (now - timedelta(days=7)).timestamp()
        found = await query("acme", "support", ("+15551230004",), since)
        assert found is not None and found.agent_id == "1002"  # the latest in this queue
        assert (await query("acme", "sales", ("+15551230004",), since) or Previous("", 0)).agent_id == "1003"
        assert await query("other", "support", ("+15551230004",), since) is None
        assert await query("acme", "support", ("+15558888888",), since) is None  # outside the window
    finally:
        await db.close()


# -- through the daemon ----------------------------------------------------------------------


async def _second_call_goes_to(tmp_path: Path, *, sticky: bool) -> str:
    sim = make_sim()
    extra = {"sticky": {"days": 7, "wait_s": 20}} if sticky else {}
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", services.free_port(), **extra)
    caller = "+15551230120"
    try:
        async with wired(sim, config) as (daemon, recorder):
            login(daemon, "1001")
            login(daemon, "1002")  # 1001 has been idle longest: it takes the first call
            first = sim.inbound_call(dnis="200", caller=caller)
            await until(lambda: daemon.agents.get("1001").state.value == "on_call")
            await sim.caller_hangup(first)
            await until(lambda: daemon.agents.get("1001").state.value == "ready")
            # Now 1002 has been idle longest; the same caller calls back.
            second = sim.inbound_call(dnis="200", caller=caller)
            await until(lambda: len(recorder.of("call.offered")) == 2)
            offered = recorder.of("call.offered")[1]
            await until(lambda: daemon.agents.get(offered["agent_id"]).state.value == "on_call")
            await sim.caller_hangup(second)
            return str(offered["agent_id"])
    finally:
        await sim.stop()


@pytest.mark.parametrize("sticky", [True, False])
async def test_a_caller_who_calls_back_gets_their_previous_agent(tmp_path: Path, sticky: bool) -> None:
    assert await _second_call_goes_to(tmp_path, sticky=sticky) == ("1001" if sticky else "1002")


async def test_the_previous_agent_is_found_in_the_call_records_after_a_restart(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", services.free_port(),
                         sticky={"days": 7, "wait_s": 20})
    caller = "+15551230121"
    try:
        async with wired(sim, config) as (daemon, _):
            login(daemon, "1002")
            chan = sim.inbound_call(dnis="200", caller=caller)
            await until(lambda: daemon.agents.get("1002").state.value == "on_call")
            await sim.caller_hangup(chan)
            await until(lambda: daemon.agents.get("1002").state.value == "ready")
        # A new ctid: its cache is empty, the call records know who handled the caller.
        async with wired(sim, config) as (daemon, recorder):
            daemon.acd.history.bound_s = 2.0  # a cold SQLite file on a busy CI host
            login(daemon, "1002")
            login(daemon, "1001")  # 1002 has been idle longest, but 1001 ...
            daemon.agents.pause("1002", "break")
            chan = sim.inbound_call(dnis="200", caller=caller)
            await until(lambda: daemon.acd.router.depth("support") == 1)
            await asyncio.sleep(0.1)
            # ... is not offered the call: it waits for 1002 (sticky, up to 20 s).
            assert daemon.agents.get("1001").state.value == "ready"
            assert daemon.acd.history.queries == 1
            daemon.agents.ready("1002")
            await until(lambda: daemon.agents.get("1002").state.value == "on_call")
            assert recorder.of("call.offered")[0]["agent_id"] == "1002"
            await sim.caller_hangup(chan)
    finally:
        await sim.stop()
