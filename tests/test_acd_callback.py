"""Callback in queue, end to end: the simulator runs the shipped dialplan (ctid-hold's
check-in, ctid-callback), ctid stores the callback, keeps the caller's place and calls
back through an Originate of the agent's device when their turn comes."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import update

from ctid.acd.callbacks import CallbackRecord
from ctid.app import Daemon
from ctid.config import Config, parse
from ctid.events.contract import validate
from ctid.simulator import Simulator
from ctid.store.models import Callback
from tests import services
from tests.test_acd_e2e import SECRET, SUPERVISOR, _login, acd, make_sim, until

NUMBER = "+15551230090"


def make_config(db_url: str, **queue: Any) -> Config:
    callback = {"enabled": True, "retry_s": 1, **queue.pop("callback", {})}
    return parse({
        "instance": {"id": "callback-test"},
        "database": {"url": db_url},
        "mqtt": {"host": "127.0.0.1", "port": services.free_port()},
        "agi": {"port": 0}, "http": {"port": 0},
        "asterisk": [{"id": "sim", "port": 1, "secret": SECRET, "reconnect_min": 0.05, "reconnect_max": 0.2}],
        "tenants": [{"id": "acme"}],
        "service_lines": [{"id": "support-line", "tenant": "acme", "dnis": ["200"], "queue": "support"}],
        "agents": [{"id": "1001", "tenant": "acme", "skills": {"lang:en": 8}},
                   {"id": "1002", "tenant": "acme", "skills": {"lang:en": 3}}],
        "queues": [{"id": "support", "tenant": "acme", "requires": "lang:en>=2", "wrapup_s": 0,
                    "ring_timeout_s": 10, "checkin_s": 1, "callback": callback, **queue}],
        "tokens": [{"name": "boss", "role": "supervisor", "tenant": "acme",
                    "token_sha256": hashlib.sha256(SUPERVISOR.encode()).hexdigest()}],
        "dialing": {"allowed_prefixes": ["+1555"]},
    }, env={})


async def stored(daemon: Daemon, callback_id: str, state: str, timeout: float = 5.0) -> CallbackRecord:
    """The stored callback once it is in ``state`` (writes are asynchronous)."""
    async with asyncio.timeout(timeout):
        while True:
            record = await daemon.acd.callbacks.get(callback_id)
            if record is not None and record.state == state:
                return record
            await asyncio.sleep(0.01)


def trunk_dials(sim: Simulator) -> list[str]:
    return [m.get("DialString", "") for m in sim.events
            if m.name == "DialBegin" and "@trunk" in m.get("DialString", "")]


def agent_originates(sim: Simulator, device: str = "1001") -> int:
    """Originates of the agent's device (DialBegin with no caller, DialString = the device)."""
    return sum(1 for m in sim.events if m.name == "DialBegin" and m.get("DialString") == device
               and m.get("DestChannel", "").startswith(f"PJSIP/{device}-"))


async def leave_callback(sim: Simulator, daemon: Daemon, caller: str = NUMBER) -> CallbackRecord:
    """A caller waits in the queue, presses the callback key, and is released."""
    before = {r.id for r in daemon.acd.open_callbacks()}
    chan = sim.inbound_call(dnis="200", caller=caller)
    await until(lambda: daemon.acd.waiting(chan.variables.get("__CTID_CALL_ID", "")) is not None)
    await sim.send_dtmf(chan, "1")
    await until(lambda: chan.hungup, 10)
    new = [r for r in daemon.acd.open_callbacks() if r.id not in before]
    assert len(new) == 1
    assert new[0].call_id == chan.variables["__CTID_CALL_ID"] and new[0].number == caller
    return new[0]


async def test_a_caller_presses_the_key_hangs_up_and_is_called_back(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'cb.db'}")
    published: list[dict[str, Any]] = []
    try:
        async with acd(sim, config) as daemon, aiohttp.ClientSession() as http:
            daemon.bus.add_sink(type("S", (), {"name": "t", "offer": lambda self, e, p: published.append(
                e.envelope())})())
            record = await leave_callback(sim, daemon)
            assert daemon.acd.router.depth("support") == 0  # the live call left; the callback waits
            assert daemon.acd.router.is_waiting(record.id)
            assert daemon.acd.longest_wait_s("support") > 0  # a callback in queue counts in the queue's wait
            waiting = await stored(daemon, record.id, "waiting")
            assert waiting.enqueued_at == record.enqueued_at and waiting.priority == 5
            assert not trunk_dials(sim)
            await _login(http, f"http://127.0.0.1:{daemon.api.port}", "1001")
            await until(lambda: daemon.agents.get("1001").state.value == "on_call", 15)
            assert agent_originates(sim) == 1
            assert trunk_dials(sim) == [f"{NUMBER}@trunk"]
            customer = sim.channel("PJSIP/trunk")
            assert customer is not None and customer.bridge is not None
            await until(lambda: daemon.acd.callback(record.id) is None)
            done = await stored(daemon, record.id, "done")
            assert done.attempts == 1 and done.last_status == "ANSWER"
            await sim.caller_hangup(customer)
            await until(lambda: daemon.agents.get("1001").state.value == "ready", 10)
            await until(lambda: (_done(sim, "CtidCallback")) == ["ANSWER"], 10)
    finally:
        await sim.stop()
    offered = next(e for e in published if e["type"] == "call.offered")
    assert offered["call_id"] == record.id and offered["agent_id"] == "1001" and offered["queue"] == "support"
    attempt_id = offered["data"]["uniqueid"].removesuffix(".agent")
    assert attempt_id.startswith(f"{record.id}.1.") and offered["data"]["direction"] == "outbound"
    assert offered["data"]["caller"]["number"] == NUMBER and offered["data"]["device"] == "PJSIP/1001"
    assert offered["data"]["callback"] == {"id": record.id, "number": NUMBER, "attempt": 1,
                                           "original_call_id": record.call_id}
    attempt = [e for e in published if e.get("call_id") == attempt_id]
    assert [e["type"] for e in attempt][:2] == ["call.started", "call.answered"]
    assert {e["tenant"] for e in attempt} == {"acme"}
    left = [e["type"] for e in published if e.get("call_id") == record.call_id]
    assert "call.abandoned" not in left and left[-1] == "call.ended", left
    for event in published:
        validate(event, strict=True)


def _done(sim: Simulator, name: str) -> list[str]:
    return [m.get("DialStatus", "") for m in sim.events if m.name == "UserEvent" and m.get("UserEvent") == name]


async def test_a_callback_keeps_its_place_ahead_of_a_later_call(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'cb.db'}")
    try:
        async with acd(sim, config) as daemon, aiohttp.ClientSession() as http:
            record = await leave_callback(sim, daemon)
            later = sim.inbound_call(dnis="200", caller="+15551230091")
            await until(lambda: daemon.acd.router.depth("support") == 1)
            later_id = later.variables["__CTID_CALL_ID"]
            await _login(http, f"http://127.0.0.1:{daemon.api.port}", "1001")
            await until(lambda: daemon.agents.get("1001").state.value == "on_call", 15)
            assert trunk_dials(sim) == [f"{NUMBER}@trunk"]  # the callback went first
            assert daemon.acd.router.is_waiting(later_id)  # the later caller still waits
            assert daemon.acd.callback(record.id) is None
            await _login(http, f"http://127.0.0.1:{daemon.api.port}", "1002")
            await until(lambda: daemon.agents.get("1002").state.value == "on_call", 15)
            await sim.caller_hangup(later)
    finally:
        await sim.stop()


async def test_a_number_outside_the_allow_list_is_refused_and_the_caller_keeps_waiting(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'cb.db'}")
    try:
        async with acd(sim, config) as daemon:
            chan = sim.inbound_call(dnis="200", caller="+442071234567")
            await until(lambda: daemon.acd.router.depth("support") == 1)
            await sim.send_dtmf(chan, "1")
            await until(lambda: daemon.acd.callbacks_refused == 1, 10)
            assert not chan.hungup
            assert daemon.acd.router.is_waiting(chan.variables["__CTID_CALL_ID"])
            assert daemon.acd.open_callbacks() == []
            assert await daemon.acd.callbacks.open_callbacks() == []
            await sim.caller_hangup(chan)
            await until(lambda: daemon.acd.router.depth("support") == 0)
    finally:
        await sim.stop()


async def test_a_failed_callback_is_retried_then_fails_after_its_attempts(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'cb.db'}", callback={"attempts": 2, "retry_s": 1})
    try:
        async with acd(sim, config) as daemon, aiohttp.ClientSession() as http:
            record = await leave_callback(sim, daemon)
            sim.pbx.endpoints["trunk"].busy = True  # the customer's line is busy from now on
            await _login(http, f"http://127.0.0.1:{daemon.api.port}", "1001")
            await until(lambda: len(_done(sim, "CtidCallback")) == 1, 10)
            await until(lambda: daemon.agents.get("1001").state.value == "ready", 10)
            await until(lambda: daemon.acd.callback(record.id) is not None
                        and daemon.acd.callback(record.id).attempts == 1)  # type: ignore[union-attr]
            first = await stored(daemon, record.id, "waiting")
            assert first.attempts == 1
            assert first.last_status == "BUSY" and first.next_attempt_at > first.created_at
            await until(lambda: daemon.acd.callback(record.id) is None, 15)
            assert _done(sim, "CtidCallback") == ["BUSY", "BUSY"]
            assert trunk_dials(sim) == [f"{NUMBER}@trunk"] * 2
            failed = await stored(daemon, record.id, "failed")
            assert failed.attempts == 2 and failed.last_status == "BUSY"
            await until(lambda: daemon.agents.get("1001").state.value == "ready", 10)
            assert not daemon.acd.router.is_waiting(record.id)
    finally:
        await sim.stop()


async def test_callbacks_survive_a_ctid_restart(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'cb.db'}")
    try:
        async with acd(sim, config) as first:
            record = await leave_callback(sim, first)
            await until(lambda: first.acd.router.is_waiting(record.id))
        async with acd(sim, config) as second, aiohttp.ClientSession() as http:
            loaded = second.acd.callback(record.id)
            assert loaded is not None and loaded.enqueued_at == record.enqueued_at
            assert second.acd.router.is_waiting(record.id)
            await _login(http, f"http://127.0.0.1:{second.api.port}", "1001")
            await until(lambda: second.agents.get("1001").state.value == "on_call", 15)
            assert trunk_dials(sim) == [f"{NUMBER}@trunk"]
            await until(lambda: second.acd.callback(record.id) is None)
            await stored(second, record.id, "done")
            await sim.caller_hangup(sim.channel("PJSIP/trunk"))  # type: ignore[arg-type]
    finally:
        await sim.stop()


async def test_an_overflow_to_callback_releases_the_caller_and_calls_back(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'cb.db'}",
                         overflow={"after_s": 1, "target": "callback"})
    try:
        async with acd(sim, config) as daemon, aiohttp.ClientSession() as http:
            chan = sim.inbound_call(dnis="200", caller=NUMBER)
            await until(lambda: chan.hungup, 10)
            [record] = daemon.acd.open_callbacks()
            assert record.call_id == chan.variables["__CTID_CALL_ID"]
            await until(lambda: daemon.acd.router.is_waiting(record.id))
            await _login(http, f"http://127.0.0.1:{daemon.api.port}", "1001")
            await until(lambda: daemon.agents.get("1001").state.value == "on_call", 15)
            assert trunk_dials(sim) == [f"{NUMBER}@trunk"]
            await sim.caller_hangup(sim.channel("PJSIP/trunk"))  # type: ignore[arg-type]
    finally:
        await sim.stop()


async def test_an_agent_who_does_not_answer_the_callback_is_rona_and_the_next_agent_calls_back(
        tmp_path: Path) -> None:
    sim = make_sim(answering=False)  # 1001 rings and never answers; 1002 answers
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'cb.db'}", ring_timeout_s=2)
    try:
        async with acd(sim, config) as daemon, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{daemon.api.port}"
            record = await leave_callback(sim, daemon)
            await _login(http, base, "1001")
            await until(lambda: daemon.agents.get("1001").state.value == "reserved")
            await _login(http, base, "1002")  # ready, but 1001 holds the offer
            await until(lambda: daemon.agents.get("1001").state.value == "paused", 15)
            assert daemon.agents.get("1001").reason == "rona"
            assert not trunk_dials(sim)  # the customer was not called: no attempt used
            await until(lambda: daemon.agents.get("1002").state.value == "on_call", 15)
            assert trunk_dials(sim) == [f"{NUMBER}@trunk"]
            done = await stored(daemon, record.id, "done")
            assert done.attempts == 1 and daemon.acd.ronas == 1
            await sim.caller_hangup(sim.channel("PJSIP/trunk"))  # type: ignore[arg-type]
    finally:
        await sim.stop()


async def test_a_stored_callback_past_its_expiry_expires_at_the_restart(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'cb.db'}", callback={"expiry_s": 600})
    try:
        async with acd(sim, config) as first:
            record = await leave_callback(sim, first)
            old = datetime.now(UTC) - timedelta(seconds=601)
            async with first.db.sessions.begin() as session:
                await session.execute(update(Callback).where(Callback.id == record.id).values(created_at=old))
        async with acd(sim, config) as second:
            assert second.acd.callback(record.id) is None
            assert not second.acd.router.is_waiting(record.id)
            await stored(second, record.id, "expired")
    finally:
        await sim.stop()


async def test_a_failed_attempt_whose_retry_would_pass_the_expiry_expires(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'cb.db'}",
                         callback={"attempts": 3, "retry_s": 20, "expiry_s": 10})
    try:
        async with acd(sim, config) as daemon, aiohttp.ClientSession() as http:
            record = await leave_callback(sim, daemon)
            sim.pbx.endpoints["trunk"].busy = True
            await _login(http, f"http://127.0.0.1:{daemon.api.port}", "1001")
            expired = await stored(daemon, record.id, "expired", 10)
            assert expired.attempts == 1 and expired.last_status == "BUSY"
            assert daemon.acd.callback(record.id) is None and not daemon.acd.router.is_waiting(record.id)
            await until(lambda: daemon.agents.get("1001").state.value == "ready", 10)
    finally:
        await sim.stop()


async def test_an_overflow_to_callback_with_a_refused_number_goes_to_the_native_queue(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'cb.db'}",
                         overflow={"after_s": 1, "target": "callback"})
    try:
        async with acd(sim, config) as daemon:
            sim.inbound_call(dnis="200", caller="+442071234567")
            join = await sim.wait_event("QueueCallerJoin", timeout=10, Queue="ctid-fallback")
            assert join is not None
            assert daemon.acd.callbacks_refused == 1 and daemon.acd.open_callbacks() == []
    finally:
        await sim.stop()
