"""IVR flows end to end: the simulator runs the shipped dialplan and plays the caller
(keys as RFC 4733 DTMF), ctid runs the flow over FastAGI, the events arrive on a real
websocket, the records land in the database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ctid.app import Daemon
from ctid.calls import CHANNELVARS
from ctid.config import Config, parse
from ctid.events.contract import validate
from ctid.simulator import Simulator
from tests import services
from tests.test_acd_e2e import DIALPLAN, SECRET, SUPERVISOR, _login, acd, make_sim, until
from tests.test_events_bus import fresh_pg_database  # noqa: F401 - a fixture

NUMBER = "+15551230110"


def flow_config(db_url: str, crm_port: int, *, nodes: dict[str, Any] | None = None, start: str = "hours",
                queue: dict[str, Any] | None = None, flows: dict[str, Any] | None = None,
                line: dict[str, Any] | None = None, max_steps: int = 200) -> Config:
    main_nodes = nodes if nodes is not None else {
        "hours": {"type": "hours", "schedule": {d: ["00:00-24:00"] for d in
                                                ("mon", "tue", "wed", "thu", "fri", "sat", "sun")},
                  "if_open": "welcome", "if_closed": "closed"},
        "welcome": {"type": "play", "prompts": ["welcome"], "next": "menu"},
        "menu": {"type": "menu", "prompts": ["main-menu"], "choices": {"1": "account", "2": "agent", "9": "bye"},
                 "retries": 1, "timeout_s": 2, "on_fail": "bye"},
        "account": {"type": "input", "prompts": ["enter-account"], "variable": "account", "min_length": 4,
                    "max_length": 8, "pattern": "[0-9]+", "next": "pin", "on_fail": "bye"},
        "pin": {"type": "input", "prompts": ["enter-pin"], "variable": "pin", "min_length": 4, "max_length": 4,
                "sensitive": True, "next": "lookup", "on_fail": "bye"},
        "lookup": {"type": "lookup", "url": f"http://127.0.0.1:{crm_port}/customer?account={{account}}",
                   "method": "POST", "timeout_ms": 300, "map": {"tier": "customer.tier"},
                   "on_success": "vip", "on_failure": "agent", "on_timeout": "slow"},
        "slow": {"type": "set", "values": {"crm": "timeout"}, "next": "agent"},
        "vip": {"type": "set", "when": 'tier == "gold"', "otherwise": "agent", "priority": 9,
                "values": {"note": "gold customer {account}", "pin_copy": "pin {pin}"}, "next": "agent"},
        "agent": {"type": "queue", "queue": "support"},
        "bye": {"type": "hangup", "prompts": ["goodbye"]},
        "closed": {"type": "voicemail", "context": "ctid-voicemail", "prompts": ["closed"]},
    }
    all_flows = {"main": {"tenant": "acme", "start": start, "max_steps": max_steps, "nodes": main_nodes},
                 **(flows or {})}
    return parse({
        "instance": {"id": "ivr-test"},
        "database": {"url": db_url},
        "agi": {"port": 0}, "http": {"port": 0},
        "asterisk": [{"id": "sim", "port": 1, "secret": SECRET, "reconnect_min": 0.05, "reconnect_max": 0.2}],
        "tenants": [{"id": "acme", "timezone": "Europe/Paris"}],
        "service_lines": [{"id": "ivr-line", "tenant": "acme", "dnis": ["300"], "flow": "main", **(line or {})}],
        "agents": [{"id": "1001", "tenant": "acme", "skills": {"lang:en": 8}}],
        "queues": [{"id": "support", "tenant": "acme", "requires": "lang:en>=2", "wrapup_s": 0,
                    "ring_timeout_s": 10, "checkin_s": 1, **(queue or {})},
                   {"id": "backup", "tenant": "acme", "requires": "lang:en>=2", "wrapup_s": 0, "checkin_s": 1}],
        "flows": all_flows,
        "tokens": [{"name": "boss", "role": "supervisor", "tenant": "acme",
                    "token_sha256": __import__("hashlib").sha256(SUPERVISOR.encode()).hexdigest()}],
        "dialing": {"allowed_prefixes": ["+1555"]},
    }, env={})


class CRM:
    """A local CRM: answers, is slow, or returns garbage."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.bodies: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        if self.mode == "slow":
            await asyncio.sleep(2)
        if self.mode == "garbage":
            return web.Response(text="<html>oops", content_type="text/html")
        return web.json_response({"customer": {"tier": "gold", "name": "Alice"}})

    async def __aenter__(self) -> CRM:
        app = web.Application()
        app.router.add_post("/customer", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


class Watcher:
    """A supervisor's websocket: every event of the tenant, validated against the schema."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self, http: aiohttp.ClientSession, base: str) -> None:
        ws = await http.ws_connect(f"{base}/ws", headers={"Authorization": f"Bearer {SUPERVISOR}"})
        await ws.send_json({"op": "subscribe", "req_id": 1})
        assert (await ws.receive_json(timeout=5))["type"] == "ack"

        async def read() -> None:
            async for frame in ws:
                body = json.loads(frame.data)
                if "seq" in body:
                    validate(body, strict=True)
                    self.events.append(body)

        self._task = asyncio.create_task(read())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def of(self, type_: str, **data: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type_
                and all(e["data"].get(k) == v for k, v in data.items())]

    def nodes(self) -> list[str]:
        return [e["data"]["node"] for e in self.of("call.ivr", event="node")]

    def exit(self) -> dict[str, Any] | None:
        exits = self.of("call.ivr", event="exit")
        return exits[-1]["data"] if exits else None


@contextlib.asynccontextmanager
async def running(config: Config, sim: Simulator | None = None) -> AsyncIterator[tuple[Daemon, Simulator, Watcher,
                                                                                         aiohttp.ClientSession, str]]:
    sim = sim or make_sim()
    watcher = Watcher()
    try:
        async with acd(sim, config) as daemon, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{daemon.api.port}"
            await watcher.start(http, base)
            try:
                yield daemon, sim, watcher, http, base
            finally:
                await watcher.stop()
    finally:
        await sim.stop()


def agi_commands(sim: Simulator, channel: str | None = None) -> list[str]:
    return [m.get("Command", "") for m in sim.events if m.name == "AGIExecStart"
            and (channel is None or m.get("Channel") == channel)]


def contexts(sim: Simulator, channel_prefix: str = "PJSIP/trunk") -> list[str]:
    return [m.get("Context", "") for m in sim.events
            if m.name == "Newexten" and m.get("Channel", "").startswith(channel_prefix)]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path,
           fresh_pg_database: Callable[[str], Generator[str, None, None]]) -> Iterator[str]:  # noqa: F811
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'ivr.db'}"
        return
    yield from fresh_pg_database(request.getfixturevalue("postgres_url"))


def sqlite(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'ivr.db'}"


# -- the main path ---------------------------------------------------------------------


async def test_menu_input_lookup_and_queue_reach_the_pop_without_the_pin(db_url: str) -> None:
    async with CRM() as crm:
        config = flow_config(db_url, crm.port)
        async with running(config) as (daemon, sim, watcher, http, base):
            await _login(http, base, "1001")
            # 1: account menu; 12345#: the account; 4321: the PIN (4 keys = max_length, no '#').
            chan = sim.inbound_call(dnis="300", caller=NUMBER, dtmf="112345#4321", dtmf_after=0.5)
            await until(lambda: bool(watcher.of("call.offered")), 15)
            call_id = chan.variables["__CTID_CALL_ID"]
            await sim.caller_hangup(chan)
            await until(lambda: bool(watcher.of("call.ended")), 10)
            await until(lambda: daemon.ivr_store.pending == 0 and daemon.ivr_store.written >= 1, 5)
            runs = await daemon.ivr_store.runs_for(call_id)

    assert watcher.nodes() == ["hours", "welcome", "menu", "account", "pin", "lookup", "vip", "agent"]
    inputs = {e["data"]["node"]: e["data"] for e in watcher.of("call.ivr", event="input")}
    assert inputs["menu"]["value"] == "1"
    assert inputs["account"]["value"] == "12345" and inputs["account"]["variable"] == "account"
    assert inputs["pin"]["value"] == "***" and inputs["pin"]["sensitive"] is True
    exit_ = watcher.exit()
    assert exit_ is not None and exit_["exit_reason"] == "queued" and exit_["node"] == "agent"
    offered = watcher.of("call.offered")[0]
    assert offered["data"]["ivr"] == {"account": "12345", "tier": "gold", "note": "gold customer 12345"}
    assert offered["data"]["priority"] == 9  # set by the vip node (tier == "gold")
    # The PIN went to the CRM (POST body), and nowhere else: not a channel variable, not
    # an AGI argument, not an event, not the stored record.
    assert crm.bodies[0]["pin"] == "4321" and crm.bodies[0]["account"] == "12345"
    assert not any("4321" in c for c in agi_commands(sim))
    assert not any("4321" in str(m.headers) for m in sim.events if m.name == "VarSet")
    assert not any("4321" in json.dumps(e) for e in watcher.events)
    [run] = runs
    assert run.exit_reason == "queued" and run.flow == "main" and run.service_line == "ivr-line"
    assert "4321" not in json.dumps(run.steps) and "pin" not in run.variables
    assert [s["node"] for s in run.steps] == watcher.nodes()
    # Input used STREAM FILE with escape digits and WAIT FOR DIGIT, never GET DATA.
    commands = agi_commands(sim)
    assert any(c.startswith('STREAM FILE "enter-account" "0123456789*#"') for c in commands)
    assert any(c.startswith("WAIT FOR DIGIT") for c in commands)
    assert not any(c.startswith("GET DATA") for c in commands)


# -- bad input -------------------------------------------------------------------------


async def test_an_invalid_key_plays_the_invalid_prompt_then_retries_then_fails(tmp_path: Path) -> None:
    async with CRM() as crm, running(flow_config(sqlite(tmp_path), crm.port)) as (_daemon, sim, watcher, _, _):
        chan = sim.inbound_call(dnis="300", caller=NUMBER)
        await until(lambda: "menu" in watcher.nodes(), 15)
        await sim.send_dtmf(chan, "7")  # during the menu prompt: no such choice
        await until(lambda: watcher.exit() is not None, 15)
        await until(lambda: chan.name not in sim.pbx.channels, 5)
    commands = agi_commands(sim)
    assert sum(c.startswith('STREAM FILE "main-menu"') for c in commands) == 2  # the first try and one retry
    assert any(c.startswith('STREAM FILE "option-is-invalid"') for c in commands)
    assert watcher.nodes()[-1] == "bye"
    exit_ = watcher.exit()
    assert exit_ is not None and exit_["exit_reason"] == "timeout"  # no valid input after the retries
    assert "Hangup" in [m.get("Application") for m in sim.events if m.name == "Newexten"
                        and m.get("Context") == "ctid-inbound"]


async def test_no_input_times_out_and_retries(tmp_path: Path) -> None:
    nodes = {"menu": {"type": "menu", "prompts": ["main-menu"], "choices": {"1": "agent"}, "retries": 2,
                      "timeout_s": 1, "timeout_prompts": ["are-you-there"], "on_fail": "bye"},
             "agent": {"type": "queue", "queue": "support"},
             "bye": {"type": "hangup"}}
    config = flow_config(sqlite(tmp_path), 1, nodes=nodes, start="menu")
    async with running(config) as (_daemon, sim, watcher, _, _):
        sim.inbound_call(dnis="300", caller=NUMBER)
        await until(lambda: watcher.exit() is not None, 15)
    commands = agi_commands(sim)
    assert sum(c.startswith('STREAM FILE "main-menu"') for c in commands) == 3
    assert sum(c.startswith('STREAM FILE "are-you-there"') for c in commands) == 2  # not after the last try
    assert sum(c.startswith('WAIT FOR DIGIT "1000"') for c in commands) == 3
    assert watcher.exit()["exit_reason"] == "timeout"  # type: ignore[index]


async def test_a_caller_who_hangs_up_mid_flow_is_abandoned_in_the_ivr(tmp_path: Path) -> None:
    async with CRM() as crm, running(flow_config(sqlite(tmp_path), crm.port)) as (daemon, sim, watcher, _, _):
        chan = sim.inbound_call(dnis="300", caller=NUMBER, dtmf="1", dtmf_after=0.5)
        await until(lambda: "account" in watcher.nodes(), 15)
        await sim.caller_hangup(chan)
        await until(lambda: bool(watcher.of("call.ended")), 10)
        await until(lambda: daemon.agi.session_count == 0, 5)
    exit_ = watcher.exit()
    assert exit_ is not None and exit_["exit_reason"] == "abandoned" and exit_["node"] == "account"
    [abandoned] = watcher.of("call.abandoned")
    assert abandoned["data"]["where"] == "ivr"
    assert [e["type"] for e in watcher.events if e["type"].startswith("call.")][-2:] == ["call.abandoned",
                                                                                         "call.ended"]


@pytest.mark.parametrize(("mode", "branch"), [("slow", "slow"), ("garbage", "agent")])
async def test_a_lookup_that_times_out_or_returns_garbage_takes_its_branch(tmp_path: Path, mode: str,
                                                                           branch: str) -> None:
    async with CRM() as crm:
        crm.mode = mode
        async with running(flow_config(sqlite(tmp_path), crm.port)) as (_daemon, sim, watcher, _, _):
            sim.inbound_call(dnis="300", caller=NUMBER, dtmf="112345#4321", dtmf_after=0.5)
            await until(lambda: watcher.exit() is not None, 15)
    nodes = watcher.nodes()
    assert nodes[nodes.index("lookup") + 1] == branch and "vip" not in nodes
    assert watcher.exit()["exit_reason"] == "queued"  # type: ignore[index]


async def test_a_runtime_flow_error_sends_the_call_to_the_lines_fallback_queue(tmp_path: Path) -> None:
    # A menu whose "1" loops back to itself through a goto: the caller pressing 1 again and
    # again trips the loop guard (max_steps), which is a runtime error.
    nodes = {"menu": {"type": "menu", "prompts": ["main-menu"], "choices": {"1": "again"}, "on_fail": "bye"},
             "again": {"type": "goto", "next": "menu"},
             "bye": {"type": "hangup"}}
    config = flow_config(sqlite(tmp_path), 1, nodes=nodes, start="menu", max_steps=6,
                         line={"fallback_queue": "backup"})
    async with running(config) as (daemon, sim, watcher, _, _):
        chan = sim.inbound_call(dnis="300", caller=NUMBER, dtmf="1111111", dtmf_after=0.3)
        await until(lambda: bool(watcher.of("call.queued")), 15)
        await sim.caller_hangup(chan)
    exit_ = watcher.exit()
    assert exit_ is not None and exit_["exit_reason"] == "error"
    [queued] = watcher.of("call.queued")
    assert queued["queue"] == "backup"
    assert daemon.ivr.errors == 1


async def test_a_restarted_ctid_gives_a_recovered_call_its_ivr_variables_back(tmp_path: Path) -> None:
    nodes = {"account": {"type": "input", "prompts": ["enter-account"], "variable": "account", "min_length": 4,
                         "max_length": 8, "next": "agent", "on_fail": "agent"},
             "agent": {"type": "queue", "queue": "support"}}
    config = flow_config(sqlite(tmp_path), 1, nodes=nodes, start="account")
    config = config.model_copy(update={"agi": config.agi.model_copy(update={"port": services.free_port()})})
    sim = make_sim(scale=0.2)  # check-ins every 1 s simulated = 0.2 s
    watcher = Watcher()
    try:
        async with acd(sim, config) as first:
            chan = sim.inbound_call(dnis="300", caller=NUMBER, dtmf="4711#", dtmf_after=0.5)
            await until(lambda: first.acd.router.depth("support") == 1, 15)
            call_id = chan.variables["__CTID_CALL_ID"]
            await until(lambda: first.ivr_store.written >= 1, 5)
        async with acd(sim, config) as second, aiohttp.ClientSession() as http:  # same database
            base = f"http://127.0.0.1:{second.api.port}"
            await watcher.start(http, base)
            await until(lambda: second.acd.waiting(call_id) is not None, 10)
            await _login(http, base, "1001")
            await until(lambda: bool(watcher.of("call.offered")), 15)
            await sim.caller_hangup(chan)
            await watcher.stop()
    finally:
        await sim.stop()
    [offered] = watcher.of("call.offered")
    assert offered["call_id"] == call_id and offered["data"]["ivr"] == {"account": "4711"}


# -- the other nodes -------------------------------------------------------------------


async def test_closed_hours_go_to_the_voicemail_context(tmp_path: Path) -> None:
    nodes = {"hours": {"type": "hours", "schedule": {}, "if_open": "agent", "if_closed": "closed"},
             "agent": {"type": "queue", "queue": "support"},
             "closed": {"type": "voicemail", "context": "ctid-voicemail", "prompts": ["closed"]}}
    config = flow_config(sqlite(tmp_path), 1, nodes=nodes)
    async with running(config) as (_daemon, sim, watcher, _, _):
        chan = sim.inbound_call(dnis="300", caller=NUMBER)
        await until(lambda: "ctid-voicemail" in contexts(sim), 15)
        await until(lambda: chan.name not in sim.pbx.channels, 10)
    assert watcher.exit()["exit_reason"] == "voicemail"  # type: ignore[index]
    assert any(c.startswith('STREAM FILE "closed"') for c in agi_commands(sim))


@pytest.mark.parametrize(("target", "dialled"), [({"extension": "1001"}, "PJSIP/1001"),
                                                 ({"number": "+15551239999"}, "PJSIP/+15551239999@trunk")])
async def test_transfer_leaves_through_the_dialplan(tmp_path: Path, target: dict[str, str], dialled: str) -> None:
    nodes = {"out": {"type": "transfer", **target}}
    config = flow_config(sqlite(tmp_path), 1, nodes=nodes, start="out")
    site = tmp_path / "site.conf"  # the site's own extensions (dialing.transfer_context)
    site.write_text("[from-agents]\nexten => 1001,1,Dial(PJSIP/1001,20)\n same => n,Hangup()\n", encoding="utf-8")
    sim = make_sim()
    sim = Simulator(dialplan=[DIALPLAN, site], users={"ctid": SECRET}, channelvars=CHANNELVARS,
                    endpoints=sim.pbx.endpoints, queues=sim.pbx.queues, time_scale=0.05)
    async with running(config, sim) as (_daemon, sim, watcher, _, _):
        chan = sim.inbound_call(dnis="300", caller=NUMBER)
        await until(lambda: any(m.name == "DialBegin" and m.get("DialString", "") in (dialled, dialled[6:])
                                for m in sim.events), 15)
        await sim.caller_hangup(chan)
    assert "ctid-transfer" in contexts(sim)
    assert watcher.exit()["exit_reason"] == "transferred"  # type: ignore[index]


async def test_a_transfer_to_a_missing_extension_goes_to_the_fallback_queue(tmp_path: Path) -> None:
    nodes = {"out": {"type": "transfer", "extension": "1009"}}  # not in the site's dialplan
    config = flow_config(sqlite(tmp_path), 1, nodes=nodes, start="out")
    async with running(config) as (_daemon, sim, _watcher, _, _):
        chan = sim.inbound_call(dnis="300", caller=NUMBER)
        await until(lambda: "ctid-fallback" in contexts(sim), 15)
        assert chan.name in sim.pbx.channels  # the caller waits in the native queue, not dropped
        await sim.caller_hangup(chan)
    assert "ctid-transfer" in contexts(sim)


async def test_a_transfer_to_a_number_the_policy_refuses_falls_back(tmp_path: Path) -> None:
    nodes = {"out": {"type": "transfer", "number": "+4420799999"}}
    config = flow_config(sqlite(tmp_path), 1, nodes=nodes, start="out", line={"fallback_queue": "backup"})
    async with running(config) as (_daemon, sim, watcher, _, _):
        chan = sim.inbound_call(dnis="300", caller=NUMBER)
        await until(lambda: bool(watcher.of("call.queued")), 15)
        await sim.caller_hangup(chan)
    assert watcher.of("call.queued")[0]["queue"] == "backup"
    assert "ctid-transfer" not in contexts(sim)


async def test_the_callback_node_stores_a_callback_and_releases_the_caller(tmp_path: Path) -> None:
    nodes = {"cb": {"type": "callback", "queue": "support", "prompts": ["we-will-call-you"]}}
    config = flow_config(sqlite(tmp_path), 1, nodes=nodes, start="cb")
    async with running(config) as (daemon, sim, watcher, _, _):
        chan = sim.inbound_call(dnis="300", caller=NUMBER)
        await until(lambda: watcher.exit() is not None, 15)
        await until(lambda: chan.name not in sim.pbx.channels, 10)
        stored = await daemon.acd.callbacks.open_callbacks()
    assert watcher.exit()["exit_reason"] == "callback"  # type: ignore[index]
    assert [(c.number, c.queue, c.call_id) for c in stored] == [(NUMBER, "support", chan.variables["__CTID_CALL_ID"])]
    assert not watcher.of("call.abandoned")  # the IVR released the call: not an abandon


async def test_a_callback_the_dialing_policy_refuses_plays_its_prompt_and_falls_back(tmp_path: Path) -> None:
    nodes = {"cb": {"type": "callback", "queue": "support", "prompts": ["we-will-call-you"],
                    "refused_prompts": ["cannot-call-you-back"]}}
    config = flow_config(sqlite(tmp_path), 1, nodes=nodes, start="cb", line={"fallback_queue": "backup"})
    async with running(config) as (daemon, sim, watcher, _, _):
        chan = sim.inbound_call(dnis="300", caller="+442071234567")  # not on [dialing] allowed_prefixes
        await until(lambda: bool(watcher.of("call.queued")), 15)
        stored = await daemon.acd.callbacks.open_callbacks()
        await sim.caller_hangup(chan)
    assert stored == [] and daemon.acd.callbacks_refused == 1
    commands = agi_commands(sim)
    assert any(c.startswith('STREAM FILE "cannot-call-you-back"') for c in commands)
    assert not any(c.startswith('STREAM FILE "we-will-call-you"') for c in commands)
    assert watcher.exit()["exit_reason"] == "error"  # type: ignore[index]
    assert watcher.of("call.queued")[0]["queue"] == "backup"


async def test_language_and_set_nodes(tmp_path: Path) -> None:
    nodes = {"lang": {"type": "language", "language": "es", "next": "hi"},
             "hi": {"type": "play", "prompts": ["hola"], "barge_in": False, "next": "bye"},
             "bye": {"type": "hangup"}}
    config = flow_config(sqlite(tmp_path), 1, nodes=nodes, start="lang")
    async with running(config) as (_daemon, sim, watcher, _, _):
        sim.inbound_call(dnis="300", caller=NUMBER)
        await until(lambda: watcher.exit() is not None, 15)
    commands = agi_commands(sim)
    assert 'SET VARIABLE "CHANNEL(language)" "es"' in commands
    assert 'STREAM FILE "hola" ""' in commands  # no barge-in: no escape digits
    assert watcher.exit()["exit_reason"] == "contained"  # type: ignore[index]


# -- the post-call survey --------------------------------------------------------------


async def test_post_call_survey_after_the_agent_hangs_up(db_url: str) -> None:
    csat = {"tenant": "acme", "start": "q1", "nodes": {
        "q1": {"type": "survey", "question": "agent", "prompts": ["rate-agent"], "next": "q2"},
        "q2": {"type": "survey", "question": "overall", "prompts": ["rate-overall"], "next": "thanks"},
        "thanks": {"type": "hangup", "prompts": ["thank-you"]}}}
    nodes = {"agent": {"type": "queue", "queue": "support"}}
    config = flow_config(db_url, 1, nodes=nodes, start="agent", queue={"survey_flow": "csat"},
                         flows={"csat": csat})
    async with running(config) as (daemon, sim, watcher, http, base):
        await _login(http, base, "1001")
        chan = sim.inbound_call(dnis="300", caller=NUMBER)
        await until(lambda: bool(watcher.of("call.answered")), 15)
        call_id = chan.variables["__CTID_CALL_ID"]
        agent_leg = await sim.wait_channel("PJSIP/1001")
        await sim.caller_hangup(agent_leg)  # the agent hangs up; the caller stays for the survey
        await until(lambda: any(c.startswith('STREAM FILE "rate-agent"') for c in agi_commands(sim)), 10)
        await sim.send_dtmf(chan, "4")
        await until(lambda: any(c.startswith('STREAM FILE "rate-overall"') for c in agi_commands(sim)), 10)
        await sim.send_dtmf(chan, "5")
        await until(lambda: bool(watcher.of("call.survey")), 10)
        await until(lambda: bool(watcher.of("call.ended")), 10)
        await until(lambda: daemon.ivr_store.pending == 0 and daemon.ivr_store.written >= 3, 5)
        scores = await daemon.ivr_store.surveys_for(call_id)
        average = await daemon.ivr_store.agent_average("1001")
    [survey] = watcher.of("call.survey")
    assert survey["data"]["scores"] == {"agent": 4, "overall": 5}
    assert survey["agent_id"] == "1001" and survey["data"]["agent_id"] == "1001"
    assert survey["data"]["complete"] is True and survey["queue"] == "support"
    assert scores == {"agent": 4, "overall": 5}
    assert average == (2, 4.5)


# -- the ACD's figures in the IVR and at the hold check-in -----------------------------


async def test_conditions_see_the_queue_depth(tmp_path: Path) -> None:
    nodes = {"check-busy": {"type": "goto", "when": "waiting.support >= 1", "otherwise": "agent", "next": "busy"},
             "busy": {"type": "play", "prompts": ["all-agents-busy"], "barge_in": False, "next": "agent"},
             "agent": {"type": "queue", "queue": "support"}}
    config = flow_config(sqlite(tmp_path), 1, nodes=nodes, start="check-busy")
    async with running(config) as (daemon, sim, watcher, _, _):
        first = sim.inbound_call(dnis="300", caller=NUMBER)
        await until(lambda: daemon.acd.router.depth("support") == 1, 15)
        second = sim.inbound_call(dnis="300", caller="+15551230111")
        await until(lambda: daemon.acd.router.depth("support") == 2, 15)
        assert daemon.acd.queue_info("acme", "waiting", "support") == 2
        assert daemon.acd.queue_info("other-tenant", "waiting", "support") is None
        await sim.caller_hangup(first)
        await sim.caller_hangup(second)
    # A node whose condition is false is skipped, not entered: no event for it.
    assert watcher.nodes() == ["agent", "check-busy", "busy", "agent"]


async def test_the_hold_check_in_announces_the_position(tmp_path: Path) -> None:
    nodes = {"agent": {"type": "queue", "queue": "support"}}
    config = flow_config(sqlite(tmp_path), 1, nodes=nodes, start="agent",
                         queue={"announce": ["position", "ewt"], "announce_every_s": 5})
    async with running(config) as (daemon, sim, _watcher, _, _):
        first = sim.inbound_call(dnis="300", caller=NUMBER)
        await until(lambda: daemon.acd.router.depth("support") == 1, 15)
        second = sim.inbound_call(dnis="300", caller="+15551230111")
        await until(lambda: sum(c == 'STREAM FILE "queue-callswaiting" ""' for c in agi_commands(sim)) >= 1, 15)
        await sim.caller_hangup(first)
        await sim.caller_hangup(second)
    assert 'STREAM FILE "queue-youarenext" ""' in agi_commands(sim, first.name)  # the first caller
    commands = agi_commands(sim, second.name)
    i = commands.index('STREAM FILE "queue-thereare" ""')  # the second: one call ahead
    assert commands[i + 1:i + 3] == ['STREAM FILE "digits/1" ""', 'STREAM FILE "queue-callswaiting" ""']
    # No AHT measured yet: no EWT, rather than a made-up one.
    assert not any("queue-holdtime" in c for c in agi_commands(sim))
