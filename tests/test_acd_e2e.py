"""The ACD end to end: the simulator runs the shipped dialplan (ctid-hold, ctid-connect),
ctid routes over FastAGI and AMI, the pop goes out over a real mosquitto and a websocket
before the agent's phone rings."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt

from ctid.app import Daemon
from ctid.asterisk.ami_protocol import Message
from ctid.calls import CHANNELVARS
from ctid.config import Config, parse
from ctid.events.contract import validate
from ctid.simulator import Simulator
from ctid.simulator.config import Endpoint, QueueConfig, QueueMember
from tests import services

ROOT = Path(__file__).resolve().parent.parent
DIALPLAN = ROOT / "dialplans" / "ctid.conf"
SECRET = "test-secret"
SUPERVISOR = "acd-supervisor-token"


def make_sim(*, answering: bool = True, scale: float = 0.05) -> Simulator:
    endpoints = {"trunk": Endpoint("trunk", context="ctid-inbound", ring_s=0.0)}
    for n in ("1001", "1002"):
        endpoints[n] = Endpoint(n, context="from-agents", callerid_num=n, callerid_name=f"Agent {n}", ring_s=1.0,
                                answer=answering or n == "1002")
    queues = {"ctid-fallback": QueueConfig("ctid-fallback", members=[QueueMember("PJSIP/1002", "Agent 1002")])}
    return Simulator(dialplan=DIALPLAN, users={"ctid": SECRET}, channelvars=CHANNELVARS, endpoints=endpoints,
                     queues=queues, time_scale=scale)


def make_config(db_url: str, mqtt_port: int, **queue: object) -> Config:
    return parse({
        "instance": {"id": "acd-test"},
        "database": {"url": db_url},
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port},
        "agi": {"port": 0}, "http": {"port": 0},
        "asterisk": [{"id": "sim", "port": 1, "secret": SECRET, "reconnect_min": 0.05, "reconnect_max": 0.2}],
        "tenants": [{"id": "acme"}],
        "service_lines": [{"id": "support-line", "tenant": "acme", "dnis": ["200"], "queue": "support"}],
        "agents": [{"id": "1001", "tenant": "acme", "skills": {"lang:en": 8}},
                   {"id": "1002", "tenant": "acme", "skills": {"lang:en": 3}}],
        "queues": [{"id": "support", "tenant": "acme", "requires": "lang:en>=2", "wrapup_s": 0,
                    "ring_timeout_s": 10, "checkin_s": 2, **queue}],
        "tokens": [{"name": "boss", "role": "supervisor", "tenant": "acme",
                    "token_sha256": hashlib.sha256(SUPERVISOR.encode()).hexdigest()}],
    }, env={})


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - bounded poll of state owned by other tasks
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def acd(sim: Simulator, config: Config) -> AsyncIterator[Daemon]:
    if sim.ami._server is None:
        await sim.start()
    config = config.model_copy(update={"asterisk": [config.asterisk[0].model_copy(update={"port": sim.ami_port})]})
    daemon = Daemon(config)
    await daemon.start()
    sim.pbx.agi_address = ("127.0.0.1", daemon.agi.port)
    try:
        await daemon.links["sim"].client.wait_logged_in(5)
        yield daemon
    finally:
        await daemon.stop()


async def _login(http: aiohttp.ClientSession, base: str, agent: str) -> None:
    async with http.post(f"{base}/api/v1/agents/{agent}/login", json={"device": f"PJSIP/{agent}"},
                         headers={"Authorization": f"Bearer {SUPERVISOR}"}) as r:
        assert r.status == 200, await r.text()


def _record_dials(sim: Simulator) -> dict[str, float]:
    """When the simulator executed Dial to each agent device (perf_counter)."""
    dials: dict[str, float] = {}
    emit = sim.pbx._emit

    def spy(msg: Message) -> None:
        if msg.name == "DialBegin" and msg.get("DestChannel", "").startswith("PJSIP/100"):
            dials.setdefault(msg.get("DestChanVariable") or msg.get("DestChannel", ""), time.perf_counter())
            dials.setdefault("any", time.perf_counter())
        emit(msg)

    sim.pbx._emit = spy
    return dials


async def test_skills_routed_call_pops_before_the_phone_rings(tmp_path: Path, mqtt_broker: services.Mosquitto) -> None:
    sim = make_sim()
    dials = _record_dials(sim)
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", mqtt_broker.port)
    ws_seen: list[tuple[float, dict[str, Any]]] = []
    mqtt_seen: list[tuple[float, dict[str, Any]]] = []
    async with aiomqtt.Client("127.0.0.1", mqtt_broker.port, identifier="acd-sub") as sub:
        await sub.subscribe("ctid/v1/acme/#", qos=1)

        async def read_mqtt() -> None:
            async for message in sub.messages:
                if isinstance(message.payload, bytes) and message.payload.startswith(b"{"):
                    mqtt_seen.append((time.perf_counter(), json.loads(message.payload)))

        mqtt_task = asyncio.create_task(read_mqtt())
        try:
            async with acd(sim, config) as daemon, aiohttp.ClientSession() as http:
                base = f"http://127.0.0.1:{daemon.api.port}"
                async with http.ws_connect(f"{base}/ws", headers={"Authorization": f"Bearer {SUPERVISOR}"}) as ws:
                    await ws.send_json({"op": "subscribe", "req_id": 1})
                    assert (await ws.receive_json(timeout=5))["type"] == "ack"

                    async def read_ws() -> None:
                        async for frame in ws:
                            body = json.loads(frame.data)
                            if "seq" in body:
                                ws_seen.append((time.perf_counter(), body))

                    ws_task = asyncio.create_task(read_ws())
                    await _login(http, base, "1001")
                    chan = sim.inbound_call(dnis="200", caller="+15551230080", caller_name="Pop Test")
                    await until(lambda: any(e["type"] == "call.answered" for _, e in ws_seen))
                    await sim.caller_hangup(chan)
                    await until(lambda: any(e["type"] == "call.ended" for _, e in ws_seen))
                    await until(lambda: any(e["type"] == "agent.state" and e["data"]["state"] == "ready"
                                            and e["data"]["previous"] == "wrap_up" for _, e in ws_seen))
                    await until(lambda: any(e["type"] == "call.ended" for _, e in mqtt_seen))
                    ws_task.cancel()
                    await asyncio.gather(ws_task, return_exceptions=True)
        finally:
            mqtt_task.cancel()
            await asyncio.gather(mqtt_task, return_exceptions=True)
            await sim.stop()

    call_id = chan.variables["__CTID_CALL_ID"]
    types = [e["type"] for _, e in ws_seen if e.get("call_id") == call_id and e["type"].startswith("call.")]
    assert types == ["call.started", "call.queued", "call.offered", "call.answered", "call.ended", "call.wrapup"], types
    pop_ws = next(t for t, e in ws_seen if e["type"] == "call.offered")
    pop_mqtt = next(t for t, e in mqtt_seen if e["type"] == "call.offered")
    assert pop_ws < dials["any"] and pop_mqtt < dials["any"], "the pop must arrive before the agent's phone rings"
    offered = next(e for _, e in ws_seen if e["type"] == "call.offered")
    assert offered["agent_id"] == "1001" and offered["queue"] == "support"
    assert offered["data"]["caller"]["number"] == "+15551230080" and offered["data"]["device"] == "PJSIP/1001"
    states = [e["data"]["state"] for _, e in ws_seen if e["type"] == "agent.state"]
    assert states == ["ready", "reserved", "on_call", "wrap_up", "ready"], states
    for _, event in ws_seen:
        validate(event, strict=True)


async def test_the_ring_waits_pop_lead_ms_after_the_pop(tmp_path: Path) -> None:
    sim = make_sim()
    dials = _record_dials(sim)
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", services.free_port())
    config = config.model_copy(update={"acd": config.acd.model_copy(update={"pop_lead_ms": 300})})
    try:
        async with acd(sim, config) as daemon, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{daemon.api.port}"
            async with http.ws_connect(f"{base}/ws", headers={"Authorization": f"Bearer {SUPERVISOR}"}) as ws:
                await ws.send_json({"op": "subscribe", "req_id": 1, "types": ["call.offered"]})
                assert (await ws.receive_json(timeout=5))["type"] == "ack"
                await _login(http, base, "1001")
                chan = sim.inbound_call(dnis="200", caller="+15551230083")
                pop = await ws.receive_json(timeout=10)
                popped = time.perf_counter()
                assert pop["type"] == "call.offered"
                await until(lambda: "any" in dials, 10)
                await sim.caller_hangup(chan)
    finally:
        await sim.stop()
    assert dials["any"] - popped >= 0.25, "the agent's phone rang before pop_lead_ms had passed"


async def test_rona_pauses_the_agent_and_the_call_goes_to_the_next_agent(tmp_path: Path) -> None:
    sim = make_sim(answering=False)  # 1001 rings and never answers; 1002 answers
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", services.free_port(), ring_timeout_s=2)
    try:
        async with acd(sim, config) as daemon, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{daemon.api.port}"
            await _login(http, base, "1001")
            chan = sim.inbound_call(dnis="200", caller="+15551230081")
            await until(lambda: daemon.agents.get("1001").state.value == "reserved")
            await _login(http, base, "1002")  # ready, but 1001 holds the offer
            await until(lambda: daemon.agents.get("1001").state.value == "paused", 15)
            assert daemon.agents.get("1001").reason == "rona"
            await until(lambda: daemon.agents.get("1002").state.value == "on_call", 15)
            assert daemon.acd.ronas == 1
            await sim.caller_hangup(chan)
    finally:
        await sim.stop()


async def test_a_caller_who_hangs_up_while_waiting_is_abandoned_and_leaves_the_queue(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", services.free_port())
    published: list[dict[str, Any]] = []
    try:
        async with acd(sim, config) as daemon:
            daemon.bus.add_sink(type("S", (), {"name": "t", "offer": lambda self, e, p: published.append(
                e.envelope())})())
            chan = sim.inbound_call(dnis="200", caller="+15551230082")
            await until(lambda: daemon.acd.router.depth("support") == 1)
            await sim.caller_hangup(chan)
            await until(lambda: daemon.acd.router.depth("support") == 0)
            await until(lambda: any(e["type"] == "call.ended" for e in published))
            abandoned = next(e for e in published if e["type"] == "call.abandoned")
            assert abandoned["data"]["where"] == "queue"
    finally:
        await sim.stop()


async def test_callers_waiting_when_ctid_dies_go_to_the_native_queue_at_their_next_checkin(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", services.free_port())
    try:
        async with acd(sim, config) as daemon:
            sim.inbound_call(dnis="200", caller="+15551230083")
            await until(lambda: daemon.acd.router.depth("support") == 1)
        # ctid is gone (its FastAGI port is closed): the next check-in fails over.
        join = await sim.wait_event("QueueCallerJoin", timeout=10, Queue="ctid-fallback")
        assert join is not None
    finally:
        await sim.stop()


async def test_a_restarted_ctid_recovers_the_callers_waiting_in_hold(tmp_path: Path) -> None:
    sim = make_sim(scale=0.2)  # check-ins every 2 s simulated = 0.4 s: time to restart
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"
    config = make_config(db_url, services.free_port())
    agi_port = services.free_port()
    config = config.model_copy(update={"agi": config.agi.model_copy(update={"port": agi_port})})
    try:
        async with acd(sim, config) as first:
            chan = sim.inbound_call(dnis="200", caller="+15551230084")
            await until(lambda: first.acd.router.depth("support") == 1)
            call_id = chan.variables["__CTID_CALL_ID"]
        async with acd(sim, config) as second, aiohttp.ClientSession() as http:
            await until(lambda: second.acd.waiting(call_id) is not None, 10)
            await _login(http, f"http://127.0.0.1:{second.api.port}", "1001")
            await until(lambda: second.agents.get("1001").state.value == "on_call", 15)
        assert not any(m.name == "QueueCallerJoin" for m in sim.events)
    finally:
        await sim.stop()
