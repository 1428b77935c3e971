"""``[acd] sync_fallback_members``: ctid keeps the native ``ctid-fallback`` queue's members
equal to its logged-in agents (``ctid.acd.fallback``).

The end-to-end tests drive the simulator, which answers ``QueueStatus``, ``QueueAdd``,
``QueueRemove`` and ``QueuePause`` as app_queue does (with its error messages); they
record every queue action ctid sends. The unit tests drive :class:`FallbackSync` with a
recording fake AMI client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ctid.acd.fallback import FallbackSync
from ctid.agents import AgentRegistry
from ctid.asterisk.ami import AMIActionError
from ctid.asterisk.ami_protocol import ActionCompletion, Message
from ctid.config import AcdConfig, AgentConfig, ConfigError, parse
from ctid.events.schema import Event
from ctid.simulator import Simulator
from ctid.simulator.config import QueueMember
from tests import services
from tests.test_acd_e2e import SUPERVISOR, _login, acd, make_config, make_sim, until

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


# -- unit: a recording AMI client ------------------------------------------------------------


class FakeAMI:
    """Records actions; answers QueueStatus from ``members``; ``errors[action]`` fails one."""

    def __init__(self, members: list[dict[str, str]] | None = None) -> None:
        self.connected = True
        self.members = members or []
        self.sent: list[tuple[str, dict[str, str]]] = []
        self.errors: dict[tuple[str, str], str] = {}  # (action, interface) -> Message

    async def action(self, name: str, fields: Any = (), **_: Any) -> ActionCompletion:
        fields = dict(fields)
        if name != "QueueStatus":
            self.sent.append((name, fields))
        error = self.errors.pop((name, fields.get("Interface", "")), None)
        if error is not None:
            raise AMIActionError(name, ActionCompletion("1", Message.response("Error", [("Message", error)])))
        completion = ActionCompletion("1", Message.response("Success"))
        if name == "QueueStatus":
            completion.events = [Message.event("QueueParams", [("Queue", "ctid-fallback")])]
            completion.events += [Message.event("QueueMember", [("Queue", "ctid-fallback"), *m.items()])
                                  for m in self.members]
        return completion


def agent_event(agent_id: str, state: str, device: str | None = "auto") -> Event:
    if device == "auto":
        device = None if state == "logged_out" else f"PJSIP/{agent_id}"
    return Event("agent.state", "acme", NOW, {"state": state, "device": device, "reason": None,
                                              "previous": None, "calls": 0}, agent_id=agent_id)


def make_sync(client: FakeAMI, known: frozenset[str] | None = None) -> FallbackSync:
    registry = AgentRegistry([AgentConfig(id="1001", tenant="acme", name="Alice\r\nAction: Hangup"),
                              AgentConfig(id="1002", tenant="acme")], lambda e: e, lambda: NOW)
    return FallbackSync(client=client, agents=registry, known_endpoints=lambda: known)  # type: ignore[arg-type]


async def settle(sync: FallbackSync, client: FakeAMI, count: int, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while len(client.sent) < count or sync._wake.is_set():  # noqa: ASYNC110 - the worker task's progress
            await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)


async def test_login_reconciles_the_queue_with_queuestatus() -> None:
    client = FakeAMI(members=[
        {"Name": "Gone", "Location": "PJSIP/1009", "Membership": "dynamic", "Paused": "0"},  # stale
        {"Name": "Desk", "Location": "PJSIP/1004", "Membership": "static", "Paused": "0"},  # not ours
        {"Name": "Alice", "Location": "PJSIP/1001", "Membership": "dynamic", "Paused": "1"},
    ])
    sync = make_sync(client)
    sync.on_agent_state(agent_event("1001", "ready"))
    sync.on_agent_state(agent_event("1002", "on_call"))
    await sync.start()
    try:
        sync.on_login()
        await settle(sync, client, 3)
    finally:
        await sync.stop()
    assert client.sent[:3] == [
        ("QueueRemove", {"Queue": "ctid-fallback", "Interface": "PJSIP/1009"}),
        ("QueuePause", {"Queue": "ctid-fallback", "Interface": "PJSIP/1001", "Paused": "false"}),
        ("QueueAdd", {"Queue": "ctid-fallback", "Interface": "PJSIP/1002", "MemberName": "1002",
                      "StateInterface": "PJSIP/1002", "Penalty": "0", "Paused": "true"}),
    ]
    # The static member is never touched; stop() unpauses the on-call agent's member.
    assert all(f.get("Interface") != "PJSIP/1004" for _, f in client.sent)
    assert client.sent[3:] == [("QueuePause", {"Queue": "ctid-fallback", "Interface": "PJSIP/1002",
                                               "Paused": "false"})]


async def test_agent_states_drive_add_pause_and_remove() -> None:
    client = FakeAMI()
    sync = make_sync(client)
    await sync.start()
    try:
        sync.on_login()
        await settle(sync, client, 0)
        steps: list[tuple[str, list[tuple[str, str]]]] = [
            ("ready", [("QueueAdd", "false")]),
            ("reserved", [("QueuePause", "true")]),
            ("on_call", []),
            ("wrap_up", []),
            ("ready", [("QueuePause", "false")]),
            ("busy", []),  # a call outside ctid: ringinuse = no covers it
            ("paused", [("QueuePause", "true")]),
            ("logged_out", [("QueueRemove", "")]),
        ]
        for state, expected in steps:
            before = len(client.sent)
            sync.on_agent_state(agent_event("1001", state))
            await settle(sync, client, before + len(expected))
            got = [(name, fields.get("Paused", "")) for name, fields in client.sent[before:]]
            assert got == expected, (state, got)
        # The member name is one clean header value (no injected lines).
        assert client.sent[0][1]["MemberName"] == "Alice Action: Hangup"
    finally:
        await sync.stop()
    assert sync.wanted() == {}


async def test_a_hot_desk_move_removes_the_old_device_and_bad_devices_are_never_sent() -> None:
    client = FakeAMI()
    sync = make_sync(client, known=frozenset({"PJSIP/1001", "PJSIP/2001", "PJSIP/1002"}))
    await sync.start()
    try:
        sync.on_login()
        sync.on_agent_state(agent_event("1001", "ready"))
        await settle(sync, client, 1)
        sync.on_agent_state(agent_event("1001", "ready", device="PJSIP/2001"))
        await settle(sync, client, 3)
        assert [(n, f["Interface"]) for n, f in client.sent] == [
            ("QueueAdd", "PJSIP/1001"), ("QueueRemove", "PJSIP/1001"), ("QueueAdd", "PJSIP/2001")]
        before = len(client.sent)
        sync.on_agent_state(agent_event("1002", "ready", device="PJSIP/1002&PJSIP/9999"))  # injection
        sync.on_agent_state(agent_event("1002", "ready", device="PJSIP/7777"))  # not a known endpoint
        await asyncio.sleep(0.05)
        assert client.sent[before:] == []
    finally:
        await sync.stop()


async def test_asterisk_errors_are_read_as_the_state_they_describe() -> None:
    client = FakeAMI()
    client.errors[("QueueAdd", "PJSIP/1001")] = "Unable to add interface: Already there"
    client.errors[("QueueRemove", "PJSIP/1002")] = "Unable to remove interface: Not there"
    sync = make_sync(client)
    await sync.start()
    try:
        sync.on_login()
        sync.on_agent_state(agent_event("1001", "on_call"))
        await settle(sync, client, 2)
        # Already there: only its pause flag can be set.
        assert [(n, f.get("Paused")) for n, f in client.sent] == [("QueueAdd", "true"), ("QueuePause", "true")]
        client.errors[("QueueRemove", "PJSIP/1001")] = "Member not dynamic"
        sync.on_agent_state(agent_event("1001", "logged_out"))
        await settle(sync, client, 3)
        sync.on_agent_state(agent_event("1002", "ready"))
        await settle(sync, client, 4)
        sync.on_agent_state(agent_event("1002", "logged_out"))
        await settle(sync, client, 5)
        assert [n for n, _ in client.sent[2:]] == ["QueueRemove", "QueueAdd", "QueueRemove"]
        assert sync.failures == 0
    finally:
        client.connected = False  # no unpause at stop without a link
        await sync.stop()


async def test_nothing_is_sent_while_the_link_is_down_and_the_next_login_catches_up() -> None:
    client = FakeAMI()
    client.connected = False
    sync = make_sync(client)
    await sync.start()
    try:
        sync.on_agent_state(agent_event("1001", "ready"))
        await asyncio.sleep(0.05)
        assert client.sent == []
        client.connected = True
        sync.on_login()
        await settle(sync, client, 1)
        assert [(n, f["Interface"]) for n, f in client.sent] == [("QueueAdd", "PJSIP/1001")]
    finally:
        await sync.stop()


def test_the_sync_is_off_by_default() -> None:
    config = parse({}, env={})
    assert config.acd.sync_fallback_members is False and config.acd.fallback_queue == "ctid-fallback"
    with pytest.raises(ConfigError, match="fallback_queue"):
        parse({"acd": {"fallback_queue": "x\r\nAction: Hangup"}}, env={})


# -- end to end: the daemon, the simulator and the shipped dialplan ---------------------------


def install_queue_actions(sim: Simulator) -> list[tuple[str, dict[str, str]]]:
    """A record of every queue action ctid sends to the simulator (which answers them as
    app_queue does)."""
    sent: list[tuple[str, dict[str, str]]] = []
    ami = sim.ami

    def record(name: str, handler: Callable[[Any, Message], None]) -> Callable[[Any, Message], None]:
        def wrapped(session: Any, action: Message) -> None:
            sent.append((name, {k: v for k, v in action.headers if k not in ("Action", "ActionID")}))
            handler(session, action)
        return wrapped

    for name in ("QueueAdd", "QueueRemove", "QueuePause"):
        ami.actions[name.lower()] = record(name, ami.actions[name.lower()])
    return sent


def members(sim: Simulator) -> dict[str, tuple[bool, str]]:
    return {m.interface: (m.paused, m.membership) for m in sim.pbx.queues["ctid-fallback"].members}


async def test_the_fallback_queue_follows_an_agent_through_a_routed_call(tmp_path: Path) -> None:
    sim = make_sim()
    sim.pbx.queues["ctid-fallback"].members.append(QueueMember("PJSIP/1009", "Gone", membership="dynamic"))
    sent = install_queue_actions(sim)
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'f.db'}", services.free_port())
    config = config.model_copy(update={"acd": AcdConfig(sync_fallback_members=True)})
    try:
        async with acd(sim, config) as daemon, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{daemon.api.port}"
            # The login reconciles: the stale dynamic member goes, the static one stays.
            await until(lambda: "PJSIP/1009" not in members(sim))
            assert members(sim) == {"PJSIP/1002": (False, "static")}
            await _login(http, base, "1001")
            await until(lambda: members(sim).get("PJSIP/1001") == (False, "dynamic"))
            chan = sim.inbound_call(dnis="200", caller="+15551230090")
            await until(lambda: daemon.agents.get("1001").state.value == "on_call")
            await until(lambda: members(sim).get("PJSIP/1001") == (True, "dynamic"))  # on a ctid call
            await sim.caller_hangup(chan)
            await until(lambda: daemon.agents.get("1001").state.value == "ready")
            await until(lambda: members(sim).get("PJSIP/1001") == (False, "dynamic"))
            async with http.post(f"{base}/api/v1/agents/1001/logout", json={},
                                 headers={"Authorization": f"Bearer {SUPERVISOR}"}) as r:
                assert r.status == 200, await r.text()
            await until(lambda: "PJSIP/1001" not in members(sim))
    finally:
        await sim.stop()
    names = [(name, fields.get("Interface"), fields.get("Paused")) for name, fields in sent]
    assert names == [("QueueRemove", "PJSIP/1009", None), ("QueueAdd", "PJSIP/1001", "false"),
                     ("QueuePause", "PJSIP/1001", "true"), ("QueuePause", "PJSIP/1001", "false"),
                     ("QueueRemove", "PJSIP/1001", None)], names
    assert all(fields.get("Queue") == "ctid-fallback" for _, fields in sent)
    assert not sim.errors, sim.errors


async def test_a_clean_stop_leaves_the_agents_unpaused_for_the_fallback(tmp_path: Path) -> None:
    sim = make_sim()
    install_queue_actions(sim)
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'f.db'}", services.free_port())
    config = config.model_copy(update={"acd": AcdConfig(sync_fallback_members=True)})
    try:
        async with acd(sim, config) as daemon, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{daemon.api.port}"
            await _login(http, base, "1001")
            async with http.post(f"{base}/api/v1/agents/1001/pause", json={"reason": "break"},
                                 headers={"Authorization": f"Bearer {SUPERVISOR}"}) as r:
                assert r.status == 200, await r.text()
            await until(lambda: members(sim).get("PJSIP/1001") == (True, "dynamic"))
        # ctid stopped: the member stays, unpaused, and a caller now reaches the agent natively.
        assert members(sim).get("PJSIP/1001") == (False, "dynamic")
        sim.inbound_call(dnis="200", caller="+15551230091")
        called = await sim.wait_event("AgentCalled", timeout=10, Queue="ctid-fallback", Interface="PJSIP/1001")
        assert called.get("MemberName") == "1001"
    finally:
        await sim.stop()
