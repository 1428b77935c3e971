"""Queue statistics (service level, waiting, EWT, AHT), short abandons and device state.

The service-level arithmetic and the midnight reset are tested pure, with an injected
clock; the rest runs through the daemon with the simulator running the shipped dialplan.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from ctid.acd.expr import Expression, parse_expression
from ctid.agents import AgentRegistry
from ctid.agents.registry import AgentCommandError
from ctid.app import Daemon
from ctid.config import Config, parse
from ctid.events.contract import validate
from ctid.events.queues import QueueStatsFeed, ServiceLevelDay
from ctid.events.schema import Event
from ctid.simulator import Simulator
from tests import services
from tests.test_acd_e2e import acd, make_config, make_sim, until

NY = ZoneInfo("America/New_York")


# -- the service level, pure -------------------------------------------------------------


def test_service_level_counts_answers_within_t_over_answered_plus_abandoned() -> None:
    day = ServiceLevelDay(ZoneInfo("UTC"))
    now = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    assert day.snapshot(now, 20.0)["value"] is None  # nothing counts yet
    day.record_answered(now, 5.0, 20.0)
    day.record_answered(now, 20.0, 20.0)  # exactly T is within
    day.record_answered(now, 20.5, 20.0)
    day.record_abandoned(now, 30.0, 5.0)
    day.record_abandoned(now, 4.9, 5.0)  # short: left out of both terms
    snap = day.snapshot(now, 20.0)
    assert snap == {"answered": 3, "abandoned": 1, "within_threshold": 2, "short_abandoned": 1,
                    "threshold_s": 20.0, "value": 0.5, "date": "2026-12-01"}


def test_only_short_abandons_leave_the_value_unknown() -> None:
    day = ServiceLevelDay(ZoneInfo("UTC"))
    now = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    day.record_abandoned(now, 1.0, 5.0)
    assert day.snapshot(now, 20.0)["value"] is None
    assert day.short_abandoned == 1 and day.abandoned == 0


def test_counters_reset_at_the_tenants_local_midnight_not_utc() -> None:
    day = ServiceLevelDay(NY)
    # 23:30 UTC on Dec 1 is 18:30 in New York; 00:30 UTC on Dec 2 is still Dec 1 there.
    day.record_answered(datetime(2026, 12, 1, 23, 30, tzinfo=UTC), 3.0, 20.0)
    day.record_answered(datetime(2026, 12, 2, 0, 30, tzinfo=UTC), 3.0, 20.0)
    assert day.answered == 2 and day.day is not None and day.day.isoformat() == "2026-12-01"
    # 04:59 UTC is 23:59 in New York: the same day; 05:01 UTC is 00:01 on Dec 2 there.
    day.record_abandoned(datetime(2026, 12, 2, 4, 59, tzinfo=UTC), 30.0, 5.0)
    assert (day.answered, day.abandoned) == (2, 1)
    after = datetime(2026, 12, 2, 5, 1, tzinfo=UTC)
    assert day.snapshot(after, 20.0) == {"answered": 0, "abandoned": 0, "within_threshold": 0,
                                         "short_abandoned": 0, "threshold_s": 20.0, "value": None,
                                         "date": "2026-12-02"}


def test_midnight_reset_follows_dst_changes() -> None:
    day = ServiceLevelDay(NY)
    # 2027-03-14: New York moves to UTC-4, so that night's midnight is 04:00 UTC.
    day.record_answered(datetime(2027, 3, 14, 3, 59, tzinfo=UTC), 1.0, 20.0)  # 23:59 EST on Mar 13
    day.record_answered(datetime(2027, 3, 14, 23, 0, tzinfo=UTC), 1.0, 20.0)  # 19:00 EDT on Mar 14
    assert day.answered == 1 and day.day is not None and day.day.isoformat() == "2027-03-14"
    day.roll(datetime(2027, 3, 15, 3, 59, tzinfo=UTC))  # 23:59 EDT, still Mar 14
    assert day.answered == 1
    day.roll(datetime(2027, 3, 15, 4, 0, tzinfo=UTC))  # midnight EDT
    assert day.answered == 0


class _Figures:
    def __init__(self, requires: str) -> None:
        self.requires = parse_expression(requires)

    def queue_ids(self) -> Iterable[tuple[str, str]]:
        return [("support", "acme")]

    def requirement(self, queue_id: str) -> Expression | None:
        return self.requires

    def sl_threshold_s(self, queue_id: str) -> float:
        return 15.0

    def waiting_count(self, queue_id: str) -> int:
        return 3

    def longest_wait_s(self, queue_id: str) -> float:
        return 42.1234

    def ewt_s(self, queue_id: str) -> float | None:
        return 12.5


class _Snapshots:
    def __init__(self) -> None:
        self.updates: list[tuple[str, str, dict[str, Any]]] = []

    def update(self, tenant: str, queue: str, snapshot: dict[str, Any]) -> None:
        self.updates.append((tenant, queue, snapshot))


def _config(zone: str = "America/New_York") -> Config:
    return parse({
        "instance": {"id": "stats"}, "database": {"url": "sqlite+aiosqlite:///:memory:"},
        "asterisk": [{"id": "sim", "port": 1, "secret": "x"}],
        "tenants": [{"id": "acme", "timezone": zone}],
        "agents": [{"id": "1001", "tenant": "acme", "skills": {"lang:en": 8}},
                   {"id": "1002", "tenant": "acme", "skills": {"lang:en": 3}}],
        "queues": [{"id": "support", "tenant": "acme", "requires": "lang:en>=5"}],
    }, env={})


def test_the_feed_counts_agents_eligible_for_the_base_requirement_and_validates() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    config = _config()
    agents = AgentRegistry(config.agents, lambda e: e, lambda: now)
    agents.login("1001", "PJSIP/1001")
    agents.login("1002", "PJSIP/1002")  # lang:en 3 does not serve lang:en>=5
    snaps = _Snapshots()
    feed = QueueStatsFeed(config, agents, snaps)  # type: ignore[arg-type]
    feed.attach(_Figures("lang:en>=5"))
    feed.record_answered("support", "acme", now, 10.0)
    feed.record_answered("support", "acme", now, 16.0)
    feed.record_abandoned("support", "acme", now, 2.0, 5.0)
    feed.refresh(now)
    tenant, queue, data = snaps.updates[-1]
    assert (tenant, queue) == ("acme", "support")
    assert data["waiting"] == 3 and data["longest_wait_s"] == 42.123 and data["ewt_s"] == 12.5
    assert data["agents"]["ready"] == 1 and data["agents"]["logged_in"] == 1
    assert data["sl_today"] == {"answered": 2, "abandoned": 0, "within_threshold": 1, "short_abandoned": 1,
                                "threshold_s": 15.0, "value": 0.5, "date": "2026-12-01"}
    event = Event("queue.stats", "acme", now, data, queue="support")
    validate(event.with_seq(1).envelope(), strict=True)
    # New York's midnight (05:00 UTC) starts a new day at zero.
    feed.refresh(datetime(2026, 12, 2, 5, 0, 1, tzinfo=UTC))
    assert snaps.updates[-1][2]["sl_today"]["answered"] == 0
    assert snaps.updates[-1][2]["sl_today"]["date"] == "2026-12-02"


async def test_refreshes_on_a_running_loop_make_one_snapshot_per_queue_at_the_next_iteration() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    config = _config()
    agents = AgentRegistry(config.agents, lambda e: e, lambda: now)
    snaps = _Snapshots()
    feed = QueueStatsFeed(config, agents, snaps)  # type: ignore[arg-type]
    feed.attach(_Figures("lang:en>=5"))
    for _ in range(3):
        feed.refresh_queue("support", "acme", now)
    agents.login("1001", "PJSIP/1001")  # a change after the refreshes: the snapshot sees it
    feed.refresh(now + timedelta(seconds=1), "acme")
    assert snaps.updates == []  # nothing taken synchronously, off the caller's path
    await asyncio.sleep(0)
    assert len(snaps.updates) == 1
    tenant, queue, data = snaps.updates[0]
    assert (tenant, queue) == ("acme", "support") and data["agents"]["ready"] == 1
    feed.refresh_queue("support", "acme", now)
    await asyncio.sleep(0)
    assert len(snaps.updates) == 2  # a later iteration's refresh is a new snapshot


async def test_a_failing_snapshot_is_logged_and_the_other_queues_still_refresh() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    config = _config()
    agents = AgentRegistry(config.agents, lambda e: e, lambda: now)
    snaps = _Snapshots()
    feed = QueueStatsFeed(config, agents, snaps)  # type: ignore[arg-type]
    figures = _Figures("lang:en>=5")

    def broken(queue_id: str) -> int:
        if queue_id == "broken":
            raise RuntimeError("boom")
        return 3

    figures.waiting_count = broken  # type: ignore[method-assign]
    feed.attach(figures)
    feed.refresh_queue("broken", "acme", now)
    feed.refresh_queue("support", "acme", now)
    await asyncio.sleep(0)
    assert [queue for _, queue, _ in snaps.updates] == ["support"]


# -- through the daemon ---------------------------------------------------------------------


class Recorder:
    """A bus sink that keeps every event's envelope."""

    name = "test-recorder"

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def offer(self, event: Event, payload: Any = None) -> None:
        self.events.append(event.envelope())

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type_]


@contextlib.asynccontextmanager
async def wired(sim: Simulator, config: Config) -> AsyncIterator[tuple[Daemon, Recorder]]:
    """The daemon as ``ctid.app`` wires it (``acd.wire``, device states to the ACD,
    ``DeviceStateList`` after each AMI login), with a recorder of every event."""
    async with acd(sim, config) as daemon:
        recorder = Recorder()
        daemon.bus.add_sink(recorder)
        await until(lambda: daemon.acd.known_endpoints() is not None)
        yield daemon, recorder


def login(daemon: Daemon, agent: str) -> None:
    """What the API's login does once it passes ``acd.known_endpoints``."""
    daemon.agents.login(agent, f"PJSIP/{agent}", daemon.acd.known_endpoints())


def _latest_stats(recorder: Recorder) -> dict[str, Any]:
    stats = recorder.of("queue.stats")
    return dict(stats[-1]["data"]) if stats else {"waiting": None, "sl_today": {}, "agents": {}}


def _db(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"


async def test_stats_follow_an_abandoned_then_an_answered_call(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(_db(tmp_path), services.free_port(), short_abandon_s=0, requires="lang:en>=5")
    config = config.model_copy(update={"events": config.events.model_copy(update={"stats_interval": 0.05})})
    try:
        async with wired(sim, config) as (daemon, recorder):
            feed = daemon.queue_stats
            first = sim.inbound_call(dnis="200", caller="+15551230100")
            await until(lambda: daemon.acd.router.depth("support") == 1)
            await until(lambda: _latest_stats(recorder)["waiting"] == 1)
            await sim.caller_hangup(first)
            await until(lambda: bool(recorder.of("call.abandoned")))
            abandoned = recorder.of("call.abandoned")[0]
            assert abandoned["data"]["short"] is False and abandoned["queue"] == "support"
            login(daemon, "1001")
            login(daemon, "1002")  # lang:en 3: not an agent of this queue (lang:en>=5)
            second = sim.inbound_call(dnis="200", caller="+15551230101")
            await until(lambda: daemon.agents.get("1001").state.value == "on_call")
            await sim.caller_hangup(second)
            await until(lambda: daemon.agents.get("1001").state.value == "ready"
                        and daemon.acd.aht_s("support") is not None)
            day = feed.service_level("support")
            assert day is not None
            assert (day.answered, day.abandoned, day.within_threshold, day.short_abandoned) == (1, 1, 1, 0)
            await until(lambda: _latest_stats(recorder)["sl_today"].get("answered") == 1
                        and _latest_stats(recorder)["agents"].get("ready") == 1)
            stats = _latest_stats(recorder)
            assert stats["sl_today"]["value"] == 0.5 and stats["sl_today"]["abandoned"] == 1
            assert stats["agents"]["logged_in"] == 1, "only agents eligible for the queue count"
            assert stats["waiting"] == 0 and stats["longest_wait_s"] == 0
            aht = daemon.acd.aht_s("support")
            assert aht is not None and aht > 0
            assert stats["ewt_s"] is not None  # the measured AHT is known: a new call's EWT (0 here)
        for event in recorder.of("queue.stats") + recorder.of("call.abandoned"):
            validate(event | {"seq": 1}, strict=True)
    finally:
        await sim.stop()


async def test_the_days_service_level_survives_a_restart(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(_db(tmp_path), services.free_port(), short_abandon_s=0, requires="lang:en>=5")
    try:
        async with wired(sim, config) as (daemon, _):
            first = sim.inbound_call(dnis="200", caller="+15551230100")
            await until(lambda: daemon.acd.router.depth("support") == 1)
            await sim.caller_hangup(first)  # abandoned in the queue
            await until(lambda: daemon.acd.abandons == 1)
            login(daemon, "1001")
            second = sim.inbound_call(dnis="200", caller="+15551230101")
            await until(lambda: daemon.agents.get("1001").state.value == "on_call")
            await sim.caller_hangup(second)
            await until(lambda: daemon.agents.get("1001").state.value == "ready")
            day = daemon.queue_stats.service_level("support")
            assert day is not None
            before = (day.answered, day.abandoned, day.within_threshold, day.short_abandoned)
        assert before == (1, 1, 1, 0)
        async with wired(sim, config) as (daemon, _):  # a new ctid on the same database
            day = daemon.queue_stats.service_level("support")
            assert day is not None
            assert (day.answered, day.abandoned, day.within_threshold, day.short_abandoned) == before
    finally:
        await sim.stop()


async def test_waiting_and_longest_wait_while_calls_queue(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(_db(tmp_path), services.free_port())
    try:
        async with wired(sim, config) as (daemon, _):
            chans = [sim.inbound_call(dnis="200", caller=f"+1555123011{i}") for i in range(2)]
            await until(lambda: daemon.acd.router.depth("support") == 2)
            snap = daemon.queue_stats.snapshot_queue("support", "acme", daemon.clock())
            assert snap["waiting"] == 2 and snap["longest_wait_s"] > 0
            assert snap["ewt_s"] is None  # no AHT measured yet
            for chan in chans:
                await sim.caller_hangup(chan)
            await until(lambda: daemon.acd.router.depth("support") == 0)
    finally:
        await sim.stop()


async def test_a_caller_who_leaves_quickly_is_a_short_abandon(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(_db(tmp_path), services.free_port(), short_abandon_s=600)
    try:
        async with wired(sim, config) as (daemon, recorder):
            chan = sim.inbound_call(dnis="200", caller="+15551230102")
            await until(lambda: daemon.acd.router.depth("support") == 1)
            await sim.caller_hangup(chan)
            await until(lambda: bool(recorder.of("call.ended")))
            abandoned = recorder.of("call.abandoned")[0]
            assert abandoned["data"]["short"] is True and abandoned["data"]["where"] == "queue"
            assert abandoned["queue"] == "support" and abandoned["data"]["wait_s"] < 600
            day = daemon.queue_stats.service_level("support")
            assert day is not None and (day.short_abandoned, day.abandoned) == (1, 0)
            assert daemon.queue_stats.snapshot_queue("support", "acme", daemon.clock())["sl_today"]["value"] is None
    finally:
        await sim.stop()


# -- devices ----------------------------------------------------------------------------------


async def test_a_call_the_agent_makes_outside_ctid_makes_them_busy_until_it_ends(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(_db(tmp_path), services.free_port())
    try:
        async with wired(sim, config) as (daemon, recorder):
            login(daemon, "1001")
            # The agent dials out from the phone, not through ctid.
            own = sim.pbx.new_channel("1001", context="from-agents", exten="5550000", caller_num="1001",
                                      caller_name="Agent 1001", state=4)
            sim.pbx.set_state(own, 6)
            await until(lambda: daemon.agents.get("1001").state.value == "busy")
            assert daemon.acd.device_state("PJSIP/1001") == "INUSE"
            chan = sim.inbound_call(dnis="200", caller="+15551230103")
            await until(lambda: daemon.acd.router.depth("support") == 1)
            await sim.caller_hangup(own)
            # Idle again: ready, and the waiting call is offered at once.
            await until(lambda: daemon.agents.get("1001").state.value in ("reserved", "on_call"))
            assert daemon.agents.get("1001").previous is not None
            states = [e["data"]["state"] for e in recorder.of("agent.state") if e["agent_id"] == "1001"]
            assert states[:3] == ["ready", "busy", "ready"], states
            await until(lambda: daemon.agents.get("1001").state.value == "on_call")
            await sim.caller_hangup(chan)
    finally:
        await sim.stop()


async def test_an_agent_who_logs_in_on_a_phone_already_in_use_is_busy(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(_db(tmp_path), services.free_port())
    try:
        async with wired(sim, config) as (daemon, _):
            own = sim.pbx.new_channel("1001", context="from-agents", exten="5550000", caller_num="1001",
                                      caller_name="Agent 1001", state=4)
            sim.pbx.set_state(own, 6)
            await until(lambda: daemon.acd.device_state("PJSIP/1001") == "INUSE")
            login(daemon, "1001")
            await until(lambda: daemon.agents.get("1001").state.value == "busy")
            await sim.caller_hangup(own)
            await until(lambda: daemon.agents.get("1001").state.value == "ready")
    finally:
        await sim.stop()


async def test_ctids_own_calls_do_not_make_the_agent_busy(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(_db(tmp_path), services.free_port())
    try:
        async with wired(sim, config) as (daemon, recorder):
            login(daemon, "1001")
            chan = sim.inbound_call(dnis="200", caller="+15551230104")
            await until(lambda: daemon.agents.get("1001").state.value == "on_call")
            await sim.caller_hangup(chan)
            await until(lambda: daemon.agents.get("1001").state.value == "ready"
                        and daemon.acd.device_state("PJSIP/1001") == "NOT_INUSE")
            states = [e["data"]["state"] for e in recorder.of("agent.state") if e["agent_id"] == "1001"]
            assert "busy" not in states, states
    finally:
        await sim.stop()


async def test_login_is_checked_against_the_devices_asterisk_knows(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(_db(tmp_path), services.free_port())
    try:
        async with wired(sim, config) as (daemon, _):
            known = daemon.acd.known_endpoints()
            assert known is not None and {"PJSIP/1001", "PJSIP/1002"} <= known
            with pytest.raises(AgentCommandError) as info:
                daemon.agents.login("1001", "PJSIP/9999", known)
            assert info.value.field == "device"
            assert daemon.agents.get("1001").state.value == "logged_out"
            login(daemon, "1001")
            assert daemon.agents.get("1001").device == "PJSIP/1001"
    finally:
        await sim.stop()


def test_known_endpoints_are_unknown_before_the_first_device_list() -> None:
    config = _config()
    from ctid.acd.dispatcher import Dispatcher

    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    agents = AgentRegistry(config.agents, lambda e: e, lambda: now)
    dispatcher = Dispatcher(config, client=None, model=None, agents=agents, bus=None,  # type: ignore[arg-type]
                            clock=lambda: now + timedelta(0))
    assert dispatcher.known_endpoints() is None
