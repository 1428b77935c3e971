"""The whole daemon's events, end to end: the simulator runs the shipped dialplan, ctid
publishes over a real mosquitto and a websocket, agents act over REST. Every event a
subscriber receives is validated against the contract in docs/schema."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from ctid.app import Daemon
from ctid.config import Config, CRMConfig, parse
from ctid.events.contract import validate
from ctid.simulator import Simulator
from tests import services
from tests.test_app import make_sim

SUPERVISOR = "supervisor-token-for-tests"
SECRET = "test-secret"


def make_config(ami_port: int, db_url: str, mqtt_port: int) -> Config:
    return parse({
        "instance": {"id": "ctid-test"},
        "database": {"url": db_url},
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port},
        "agi": {"port": 0},
        "http": {"port": 0},
        "events": {"stats_interval": 0.2, "identify_grace": 3.0},
        "asterisk": [{"id": "sim", "port": ami_port or 1, "secret": SECRET, "reconnect_min": 0.05,
                      "reconnect_max": 0.2}],
        "tenants": [{"id": "acme", "timezone": "Europe/London"}],
        "service_lines": [{"id": "acme-support", "tenant": "acme", "dnis": ["200"], "recording": "always"}],
        "agents": [{"id": "1001", "tenant": "acme", "name": "Alice"}],
        "queues": [{"id": "support", "tenant": "acme"}],
        "tokens": [{"name": "boss", "role": "supervisor", "tenant": "acme",
                    "token_sha256": hashlib.sha256(SUPERVISOR.encode()).hexdigest()}],
    }, env={})


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - bounded poll of state owned by other tasks
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def daemon_with(sim: Simulator, config: Config) -> AsyncIterator[Daemon]:
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
        await sim.stop()


async def test_call_agent_and_queue_events_reach_mqtt_and_websocket_and_fit_the_contract(
        tmp_path: Path, mqtt_broker: services.Mosquitto) -> None:
    sim = make_sim()
    config = make_config(0, f"sqlite+aiosqlite:///{tmp_path / 'e.db'}", mqtt_broker.port)
    mqtt_seen: list[tuple[str, bool, dict[str, Any] | str]] = []
    ws_seen: list[dict[str, Any]] = []
    async with aiomqtt.Client("127.0.0.1", mqtt_broker.port, identifier="test-sub") as sub:
        await sub.subscribe("ctid/v1/#", qos=1)

        async def read_mqtt() -> None:
            async for message in sub.messages:
                payload = message.payload.decode() if isinstance(message.payload, bytes) else str(message.payload)
                body: dict[str, Any] | str = json.loads(payload) if payload.startswith("{") else payload
                mqtt_seen.append((str(message.topic), bool(message.retain), body))

        reader = asyncio.create_task(read_mqtt())
        try:
            async with daemon_with(sim, config) as daemon, aiohttp.ClientSession() as http:
                base = f"http://127.0.0.1:{daemon.api.port}"
                auth = {"Authorization": f"Bearer {SUPERVISOR}"}
                async with http.ws_connect(f"{base}/ws", headers=auth) as ws:
                    await ws.send_json({"op": "subscribe", "req_id": 1})
                    ack = await ws.receive_json(timeout=5)
                    assert ack["type"] == "ack", ack

                    async def read_ws() -> None:
                        async for frame in ws:
                            body = json.loads(frame.data)
                            if "seq" in body:
                                ws_seen.append(body)

                    ws_reader = asyncio.create_task(read_ws())
                    # An agent signs in to a device and becomes ready (REST).
                    for path, body in (("login", {"device": "PJSIP/1001"}), ("ready", {})):
                        async with http.post(f"{base}/api/v1/agents/1001/{path}", json=body, headers=auth) as r:
                            assert r.status == 200, await r.text()
                    # The queue's snapshot follows the agent (rate-limited to one per interval).
                    await until(lambda: any(e["type"] == "queue.stats" and e["data"]["agents"]["ready"] == 1
                                            for e in ws_seen))
                    # A caller comes in and hangs up after the fallback queue's agent answered.
                    chan = sim.inbound_call(dnis="200", caller="+15551230040", caller_name="Zoë")
                    await until(lambda: any(e["type"] == "call.answered" for e in ws_seen))
                    await sim.caller_hangup(chan)
                    await until(lambda: any(e["type"] == "call.ended" for e in ws_seen))
                    await until(lambda: any(t.endswith("/calls/" + chan.variables["__CTID_CALL_ID"])
                                            and isinstance(b, dict) and b["type"] == "call.ended"
                                            for t, _, b in mqtt_seen))
                    async with http.get(f"{base}/healthz") as r:
                        health = await r.json()
                        assert r.status == 200, health
                        assert health["broker"]["connected"] is True
                    ws_reader.cancel()
                    await asyncio.gather(ws_reader, return_exceptions=True)
            # After a graceful stop, the retained status says offline.
            await until(lambda: any(t == "ctid/v1/status/ctid-test" and b == "offline" for t, _, b in mqtt_seen))
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    call_id = chan.variables["__CTID_CALL_ID"]
    # Websocket: the whole call under ctid's id, in order, plus agent and queue events.
    ws_types = [e["type"] for e in ws_seen]
    call_events = [e for e in ws_seen if e["type"].startswith("call.")]
    assert [e["type"] for e in call_events] == ["call.started", "call.answered", "call.ended"]
    assert {e["call_id"] for e in call_events} == {call_id}
    assert call_events[0]["data"]["caller"] == {"number": "+15551230040", "name": "Zoë", "e164": "+15551230040"}
    assert {"agent.state", "queue.stats"} <= set(ws_types)
    seqs = [e["seq"] for e in ws_seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    for event in ws_seen:
        validate(event, strict=True)
    # MQTT: the same events on the documented topics, retained state and stats.
    envelopes = [(t, r, b) for t, r, b in mqtt_seen if isinstance(b, dict)]
    for _, _, body in envelopes:
        validate(body, strict=True)
    topics = {t for t, _, _ in envelopes}
    assert f"ctid/v1/acme/calls/{call_id}" in topics
    assert "ctid/v1/acme/agents/1001/state" in topics
    assert "ctid/v1/acme/queues/support/stats" in topics
    by_id = {b["id"] for _, _, b in envelopes}
    assert {e["id"] for e in ws_seen} <= by_id  # the same events, deduped by id
    states = [b["data"]["state"] for t, _, b in envelopes if t.endswith("/agents/1001/state")]
    assert states[-2:] == ["ready", "logged_out"] or states[-1] == "ready"


async def test_events_survive_a_restart_with_the_broker_down(tmp_path: Path) -> None:
    """ctid publishes while the broker is down, then restarts: seq continues and the
    outbox still has every event for REST replay."""
    broker_port = services.free_port()
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'e.db'}"
    seen_ids: list[str] = []
    for round_ in range(2):
        sim = make_sim()
        async with daemon_with(sim, make_config(0, db_url, broker_port)) as daemon:
            chan = sim.inbound_call(dnis="200", caller=f"+1555123005{round_}")
            model = daemon.links["sim"].model
            await until(lambda: model.get(chan.variables.get("__CTID_CALL_ID", "-")) is not None)  # noqa: B023
            await sim.caller_hangup(chan)
            await until(lambda: not daemon.links["sim"].model.calls)
            await daemon.bus.drain()
            async with aiohttp.ClientSession() as http, http.get(
                    f"http://127.0.0.1:{daemon.api.port}/api/v1/events?after_seq=0&limit=1000",
                    headers={"Authorization": f"Bearer {SUPERVISOR}"}) as r:
                assert r.status == 200, await r.text()
                events = (await r.json())["events"]
            assert not daemon.mqtt.connected
        ids = [e["id"] for e in events]
        assert ids[:len(seen_ids)] == seen_ids  # nothing from before the restart is lost
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert sum(1 for e in events if e["type"] == "call.ended") == round_ + 1
        seen_ids = ids


@pytest.fixture
def mqtt_broker(mqtt_broker: services.Mosquitto) -> services.Mosquitto:
    return mqtt_broker


async def test_events_published_while_the_broker_was_down_reach_it_after_a_restart(tmp_path: Path) -> None:
    """Round 1 runs with no broker and stops; round 2 starts with the broker up and
    publishes round 1's events from the outbox before its own."""
    broker_port = services.free_port()
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'e.db'}"
    sim = make_sim()
    async with daemon_with(sim, make_config(0, db_url, broker_port)) as daemon:
        chan = sim.inbound_call(dnis="200", caller="+15551230060")
        await until(lambda: "__CTID_CALL_ID" in chan.variables)
        await sim.caller_hangup(chan)
        await until(lambda: not daemon.links["sim"].model.calls)
        first_call = chan.variables["__CTID_CALL_ID"]
    broker = services.start_mosquitto(broker_port)
    try:
        received: list[dict[str, Any]] = []
        async with aiomqtt.Client("127.0.0.1", broker_port, identifier="late-sub") as sub:
            await sub.subscribe("ctid/v1/acme/calls/#", qos=1)

            async def read() -> None:
                async for message in sub.messages:
                    assert isinstance(message.payload, bytes)
                    received.append(json.loads(message.payload))

            reader = asyncio.create_task(read())
            try:
                sim = make_sim()
                async with daemon_with(sim, make_config(0, db_url, broker_port)):
                    await until(lambda: any(e["type"] == "call.ended" and e["call_id"] == first_call
                                            for e in received), 15)
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
        first = [e["type"] for e in received if e["call_id"] == first_call]
        assert first == ["call.started", "call.abandoned", "call.ended"] or first == ["call.started", "call.ended"]
        seqs = [e["seq"] for e in received]
        assert seqs == sorted(seqs)
    finally:
        broker.stop()


async def test_the_crm_lookup_runs_when_the_call_starts_and_its_result_rides_on_the_call(tmp_path: Path) -> None:
    from aiohttp import web

    asked: list[str] = []

    async def lookup(request: web.Request) -> web.Response:
        asked.append(request.query["ani"])
        return web.json_response({"name": "Zoë Customer", "tier": "gold"})

    app = web.Application()
    app.router.add_get("/lookup", lookup)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        config = make_config(0, f"sqlite+aiosqlite:///{tmp_path / 'e.db'}", services.free_port())
        line = config.service_lines[0].model_copy(update={"crm": CRMConfig(
            url=f"http://127.0.0.1:{port}/lookup?ani={{caller}}", timeout_ms=2000)})
        config = config.model_copy(update={"service_lines": [line]})
        sim = make_sim()
        async with daemon_with(sim, config) as daemon:
            chan = sim.inbound_call(dnis="200", caller="+44 20&x=1")
            model = daemon.links["sim"].model

            def crm_data() -> object:
                calls = list(model.calls.values())
                return calls[0].data.get("crm") if calls else None

            await until(lambda: crm_data() is not None)
            (call,) = model.calls.values()
            assert call.data["crm"] == {"name": "Zoë Customer", "tier": "gold"} and call.data["crm_error"] is None
            assert asked == ["+44 20&x=1"]  # URL-encoded on the way, decoded exactly by the server
            await sim.caller_hangup(chan)
    finally:
        await runner.cleanup()


async def test_a_crm_that_is_down_leaves_an_error_not_a_stuck_call(tmp_path: Path) -> None:
    config = make_config(0, f"sqlite+aiosqlite:///{tmp_path / 'e.db'}", services.free_port())
    line = config.service_lines[0].model_copy(update={"crm": CRMConfig(
        url=f"http://127.0.0.1:{services.free_port()}/lookup?ani={{caller}}", timeout_ms=300)})
    config = config.model_copy(update={"service_lines": [line]})
    sim = make_sim()
    async with daemon_with(sim, config) as daemon:
        sim.inbound_call(dnis="200", caller="+15551230070")
        model = daemon.links["sim"].model
        await until(lambda: any(c.data.get("crm_error") not in (None, "pending") for c in model.calls.values()))
        (call,) = model.calls.values()
        assert call.data["crm"] is None and call.data["crm_error"] == "unreachable"
