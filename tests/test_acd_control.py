"""Call control end to end: a real Daemon, the simulator running the shipped dialplan,
and a real aiohttp client on the REST API (hold, resume, transfers, click-to-dial,
hangup, and the refusals)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import structlog
import structlog.testing

from ctid.app import Daemon
from ctid.asterisk.ami_protocol import Message
from ctid.calls import CHANNELVARS
from ctid.config import Config, parse
from ctid.events.contract import validate
from ctid.simulator import Simulator
from ctid.simulator.config import Endpoint, QueueConfig, QueueMember, load_features_conf
from tests import services
from tests.test_acd_e2e import until

ROOT = Path(__file__).resolve().parent.parent
DIALPLAN = ROOT / "dialplans" / "ctid.conf"
FEATURES = ROOT / "asterisk-conf" / "features.conf"
SECRET = "test-secret"
TOKENS = {"boss": ("supervisor", None), "desk1001": ("agent", "1001"), "desk1002": ("agent", "1002")}
# Extensions of the transfer context (dialing.transfer_context = from-agents): the site's own dialplan.
SITE_DIALPLAN = """
[from-agents]
exten => 1002,1,Dial(PJSIP/1002,20)
 same => n,Hangup()
exten => 1003,1,Dial(PJSIP/1003,20)
 same => n,Hangup()
"""


def make_sim(tmp_path: Path, scale: float = 0.05) -> Simulator:
    site = tmp_path / "site.conf"
    site.write_text(SITE_DIALPLAN, encoding="utf-8")
    endpoints = {"trunk": Endpoint("trunk", context="ctid-inbound", ring_s=0.0)}
    for n in ("1001", "1002", "1003"):
        endpoints[n] = Endpoint(n, context="from-agents", callerid_num=n, callerid_name=f"Agent {n}", ring_s=0.5)
    queues = {"ctid-fallback": QueueConfig("ctid-fallback", members=[QueueMember("PJSIP/1003", "Agent 1003")])}
    return Simulator(dialplan=[DIALPLAN, site], users={"ctid": SECRET}, channelvars=CHANNELVARS,
                     endpoints=endpoints, queues=queues, time_scale=scale, features=load_features_conf(FEATURES))


def make_config(db_url: str) -> Config:
    tokens = [{"name": name, "role": role, "tenant": "acme", **({"agent_id": agent} if agent else {}),
               "token_sha256": hashlib.sha256(name.encode()).hexdigest()} for name, (role, agent) in TOKENS.items()]
    return parse({
        "instance": {"id": "control-test"},
        "database": {"url": db_url},
        "mqtt": {"host": "127.0.0.1", "port": services.free_port()},
        "agi": {"port": 0}, "http": {"port": 0},
        "asterisk": [{"id": "sim", "port": 1, "secret": SECRET, "reconnect_min": 0.05, "reconnect_max": 0.2}],
        "tenants": [{"id": "acme"}],
        "service_lines": [{"id": "support-line", "tenant": "acme", "dnis": ["200"], "queue": "support"}],
        "agents": [{"id": "1001", "tenant": "acme", "skills": {"lang:en": 8}},
                   {"id": "1002", "tenant": "acme", "skills": {"lang:en": 3, "billing": 5}},
                   {"id": "1003", "tenant": "acme", "skills": {"lang:en": 3}}],
        "queues": [{"id": "support", "tenant": "acme", "requires": "lang:en>=5", "wrapup_s": 0,
                    "ring_timeout_s": 10, "checkin_s": 1},
                   {"id": "billing", "tenant": "acme", "requires": "billing>=1", "wrapup_s": 0,
                    "ring_timeout_s": 10, "checkin_s": 1}],
        "tokens": tokens,
        "dialing": {"allowed_prefixes": ["+1555"], "denied_prefixes": ["+1555900"]},
    }, env={})


class Harness:
    def __init__(self, sim: Simulator, daemon: Daemon, http: aiohttp.ClientSession) -> None:
        self.sim = sim
        self.daemon = daemon
        self.http = http
        self.base = f"http://127.0.0.1:{daemon.api.port}"
        self.events: list[dict[str, Any]] = []
        daemon.bus.add_sink(type("Sink", (), {"name": "test", "offer": lambda _, e, p: self.events.append(
            e.envelope())})())

    async def post(self, path: str, body: dict[str, Any] | None = None, token: str = "boss") -> tuple[int, Any]:
        async with self.http.post(f"{self.base}{path}", json=body,
                                  headers={"Authorization": f"Bearer {token}"}) as r:
            return r.status, await r.json()

    async def login(self, agent: str) -> None:
        status, body = await self.post(f"/api/v1/agents/{agent}/login", {"device": f"PJSIP/{agent}"})
        assert status == 200, body

    def state(self, agent: str) -> str:
        return self.daemon.agents.get(agent).state.value

    def types(self, call_id: str) -> list[str]:
        return [e["type"] for e in self.events if e.get("call_id") == call_id and e["type"].startswith("call.")]

    def event(self, call_id: str, type_: str) -> dict[str, Any]:
        return next(e for e in self.events if e.get("call_id") == call_id and e["type"] == type_)

    async def answered_call(self, agent: str = "1001", caller: str = "+15551230100") -> str:
        """An inbound call routed to ``agent`` and answered; returns its call id."""
        chan = self.sim.inbound_call(dnis="200", caller=caller)
        await until(lambda: "__CTID_CALL_ID" in chan.variables)
        call_id = chan.variables["__CTID_CALL_ID"]
        await until(lambda: self.state(agent) == "on_call")
        await until(lambda: self.call_state(call_id) == "connected")
        return call_id

    def call_state(self, call_id: str) -> str | None:
        call = self.daemon.links["sim"].model.get(call_id)
        return None if call is None else call.state.value

    def bridged(self, *prefixes: str) -> bool:
        chans = [self.sim.channel(p) for p in prefixes]
        return all(c is not None and c.bridge is not None for c in chans) and len(
            {id(c.bridge) for c in chans if c is not None}) == 1


@contextlib.asynccontextmanager
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    sim = make_sim(tmp_path)
    await sim.start()
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    config = config.model_copy(update={"asterisk": [config.asterisk[0].model_copy(update={"port": sim.ami_port})]})
    daemon = Daemon(config)
    await daemon.start()
    sim.pbx.agi_address = ("127.0.0.1", daemon.agi.port)
    try:
        await daemon.links["sim"].client.wait_logged_in(5)
        async with aiohttp.ClientSession() as http:
            yield Harness(sim, daemon, http)
    finally:
        await daemon.stop()
        await sim.stop()


async def test_hold_and_resume_bridge_both_legs_again(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await h.login("1001")
        call_id = await h.answered_call()
        status, body = await h.post(f"/api/v1/calls/{call_id}/hold", token="desk1001")
        assert status == 200, body
        assert body["state"] == "held"
        await until(lambda: not h.bridged("PJSIP/trunk", "PJSIP/1001"))
        caller, agent = h.sim.channel("PJSIP/trunk"), h.sim.channel("PJSIP/1001")
        assert caller is not None and agent is not None
        await until(lambda: caller.context == "ctid-onhold" and agent.context == "ctid-onhold")
        assert agent.exten == "agent"
        status, body = await h.post(f"/api/v1/calls/{call_id}/hold")  # already held
        assert status == 409 and body["error"]["state"] == "held", body
        status, body = await h.post(f"/api/v1/calls/{call_id}/resume", token="desk1001")
        assert status == 200, body
        await until(lambda: h.bridged("PJSIP/trunk", "PJSIP/1001"))
        await until(lambda: "call.resumed" in h.types(call_id))
        assert h.call_state(call_id) == "connected"
        held, resumed = h.event(call_id, "call.held"), h.event(call_id, "call.resumed")
        assert held["data"]["by"] == "agent" and held["data"]["by_id"] == "1001" and held["agent_id"] == "1001"
        assert resumed["data"]["state"] == "connected"
        assert caller.variables.get("__CTID_CALL_ID") == call_id and agent.variables.get("CTID_CALL_ID", call_id)
        await h.sim.caller_hangup(caller)
        await until(lambda: "call.ended" in h.types(call_id))
        await until(lambda: h.state("1001") == "ready")
        for event in h.events:
            validate(event, strict=True)


async def test_caller_hangs_up_on_hold_and_ctid_hangs_up_the_agent_leg(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await h.login("1001")
        call_id = await h.answered_call()
        assert (await h.post(f"/api/v1/calls/{call_id}/hold"))[0] == 200
        await until(lambda: h.sim.channel("PJSIP/trunk") is not None
                    and h.sim.channel("PJSIP/trunk").context == "ctid-onhold")  # type: ignore[union-attr]
        await h.sim.caller_hangup(h.sim.channel("PJSIP/trunk"))  # type: ignore[arg-type]
        await until(lambda: "call.ended" in h.types(call_id))
        assert h.sim.channel("PJSIP/1001") is None
        await until(lambda: h.state("1001") == "ready")


async def test_blind_transfer_to_an_extension(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await h.login("1001")
        call_id = await h.answered_call()
        status, body = await h.post(f"/api/v1/calls/{call_id}/transfer", {"target": "1002"}, token="desk1001")
        assert status == 200, body
        await until(lambda: h.bridged("PJSIP/trunk", "PJSIP/1002"))
        assert h.sim.channel("PJSIP/1001") is None
        await until(lambda: h.state("1001") == "ready")  # wrap-up 0: released at once
        transferred = h.event(call_id, "call.transferred")
        assert transferred["data"]["kind"] == "blind" and transferred["data"]["target"] == "1002"
        assert any(m.name == "BlindTransfer" for m in h.sim.events)
        await until(lambda: h.call_state(call_id) == "connected")  # the same call id goes on
        await h.sim.caller_hangup(h.sim.channel("PJSIP/trunk"))  # type: ignore[arg-type]
        await until(lambda: "call.ended" in h.types(call_id))
        for event in h.events:
            validate(event, strict=True)


async def test_blind_transfer_to_a_queue_keeps_the_enqueue_time(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await h.login("1001")
        call_id = await h.answered_call()
        first = h.daemon.acd.waiting(call_id)
        assert first is not None
        enqueued = first.enqueued_at
        status, body = await h.post(f"/api/v1/calls/{call_id}/transfer", {"target": "queue:billing"})
        assert status == 200, body
        await until(lambda: h.daemon.acd.router.depth("billing") == 1)
        again = h.daemon.acd.waiting(call_id)
        assert again is not None and again.queue == "billing" and again.enqueued_at == enqueued
        await until(lambda: h.state("1001") == "ready")
        await h.login("1002")  # the billing agent
        await until(lambda: h.state("1002") == "on_call", 15)
        await until(lambda: h.bridged("PJSIP/trunk", "PJSIP/1002"))
        queued = [e for e in h.events if e["type"] == "call.queued" and e.get("call_id") == call_id]
        assert [e["data"]["reason"] for e in queued] == ["entered", "transfer"]
        transferred = h.event(call_id, "call.transferred")
        assert transferred["data"]["kind"] == "queue" and transferred["data"]["target"] == "billing"
        await h.sim.caller_hangup(h.sim.channel("PJSIP/trunk"))  # type: ignore[arg-type]
        await until(lambda: "call.ended" in h.types(call_id))
        await until(lambda: h.state("1002") == "ready")
        for event in h.events:
            validate(event, strict=True)


async def test_click_to_dial_has_the_outbound_lifecycle_and_attended_transfer(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await h.login("1001")
        status, body = await h.post("/api/v1/agents/1001/dial", {"number": "+1 555 765 4321"}, token="desk1001")
        assert status == 200, body
        call_id = body["call_id"]
        assert body["number"] == "+15557654321"
        await until(lambda: h.bridged("PJSIP/1001", "PJSIP/trunk"))
        await until(lambda: h.call_state(call_id) == "connected")
        assert h.state("1001") == "busy"  # not routable while on its own call
        originate = next(m for m in h.sim.events if m.name == "DialBegin" and "@trunk" in m.get("DialString", ""))
        assert originate.get("DialString") == "+15557654321@trunk"
        # Attended transfer of the customer to 1002 (ctid-outbound dials with T: the agent may transfer).
        status, body = await h.post(f"/api/v1/calls/{call_id}/atxfer", {"exten": "1002"}, token="desk1001")
        assert status == 200, body
        await until(lambda: h.sim.channel("PJSIP/1002") is not None, 10)
        await until(lambda: any(m.name == "DialEnd" and m.get("DestChannel", "").startswith("PJSIP/1002")
                                and m.get("DialStatus") == "ANSWER" for m in h.sim.events), 10)
        await h.sim.caller_hangup(h.sim.channel("PJSIP/1001"))  # the agent completes the transfer
        await until(lambda: h.bridged("PJSIP/trunk", "PJSIP/1002"), 10)
        assert any(m.name == "AttendedTransfer" for m in h.sim.events)
        await until(lambda: h.state("1001") == "ready")
        await h.sim.caller_hangup(h.sim.channel("PJSIP/trunk"))  # type: ignore[arg-type]
        await until(lambda: "call.ended" in h.types(call_id))
        types = h.types(call_id)
        assert types[0] == "call.started" and types[-1] == "call.ended", types
        assert "call.answered" in types and "call.transferred" in types
        for type_ in ("call.started", "call.answered", "call.ended"):
            assert h.event(call_id, type_)["data"]["direction"] == "outbound", type_
        assert h.event(call_id, "call.transferred")["data"]["kind"] == "attended"
        for event in h.events:
            validate(event, strict=True)


async def test_click_to_dial_refuses_a_number_outside_the_allow_list(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await h.login("1001")
        with structlog.testing.capture_logs() as logs:
            for number in ("+442071234567", "+15559001234"):  # not allowed; denied prefix
                status, body = await h.post("/api/v1/agents/1001/dial", {"number": number}, token="desk1001")
                assert status == 403 and body["error"]["code"] == "number_not_allowed", body
        refused = [e for e in logs if e["event"] == "control.number_refused"]
        assert [e["number"] for e in refused] == ["+4420***4567", "+1555***1234"]
        assert "2071234567" not in repr(logs) and "5559001234" not in repr(logs)
        status, body = await h.post("/api/v1/agents/1001/dial", {"number": "555-CALL-NOW"})
        assert status == 400, body
        status, body = await h.post("/api/v1/agents/1002/dial", {"number": "+15557654321"}, token="desk1001")
        assert status == 403, body  # another agent's device
        status, body = await h.post("/api/v1/agents/1002/dial", {"number": "+15557654321"})
        assert status == 409 and body["error"]["state"] == "logged_out", body
        assert h.daemon.control.refused_numbers == 2
        assert not any(m.name in ("Originate", "DialBegin", "Newchannel") for m in h.sim.events)
        assert h.state("1001") == "ready"


async def test_supervisor_hangup_and_the_refusals(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await h.login("1001")
        call_id = await h.answered_call()
        status, body = await h.post(f"/api/v1/calls/{call_id}/hold", token="desk1002")
        assert status == 403, body  # another agent's call
        status, body = await h.post(f"/api/v1/calls/{call_id}/resume")
        assert status == 409 and body["error"] == {"code": "wrong_state", "message": body["error"]["message"],
                                                   "state": "connected"}, body
        status, body = await h.post("/api/v1/calls/nosuchcall/hold")
        assert status == 404, body
        status, body = await h.post(f"/api/v1/calls/{call_id}/transfer", {"target": "queue:nosuch"})
        assert status == 404, body
        status, body = await h.post(f"/api/v1/calls/{call_id}/transfer", {"target": "+442071234567"})
        assert status == 403 and body["error"]["code"] == "number_not_allowed", body
        status, body = await h.post(f"/api/v1/calls/{call_id}/transfer", {})
        assert status == 400, body
        status, body = await h.post(f"/api/v1/calls/{call_id}/hangup")
        assert status == 200, body
        await until(lambda: "call.ended" in h.types(call_id))
        assert h.event(call_id, "call.ended")["data"]["hangup_by"] == "ctid"
        await until(lambda: h.state("1001") == "ready")
        status, body = await h.post(f"/api/v1/calls/{call_id}/hold")
        assert status == 409 and body["error"]["state"] == "ended", body


async def test_a_redirect_to_a_channel_already_gone_ends_the_call_and_frees_the_agent(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await h.login("1001")
        call_id = await h.answered_call()
        # The caller vanishes and ctid misses it (AMI events lost): the model still has it bridged.
        emit = h.sim.pbx._emit
        hidden = ("PJSIP/trunk", "PJSIP/1001")

        def lossy(msg: Message) -> None:
            if not msg.get("Channel", "").startswith(hidden):
                emit(msg)

        h.sim.pbx._emit = lossy
        await h.sim.caller_hangup(h.sim.channel("PJSIP/trunk"))  # type: ignore[arg-type]
        await until(lambda: h.sim.channel("PJSIP/trunk") is None and h.sim.channel("PJSIP/1001") is None)
        h.sim.pbx._emit = emit
        assert h.call_state(call_id) == "connected"
        status, body = await h.post(f"/api/v1/calls/{call_id}/hold")
        assert status == 409 and body["error"]["code"] == "gone" and body["error"]["state"] == "ended", body
        await until(lambda: "call.ended" in h.types(call_id))
        await until(lambda: h.state("1001") == "ready")


async def test_agent_hangs_up_on_hold_and_the_caller_goes_back_to_its_queue(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await h.login("1001")
        call_id = await h.answered_call()
        enqueued = h.daemon.acd.waiting(call_id).enqueued_at  # type: ignore[union-attr]
        assert (await h.post(f"/api/v1/calls/{call_id}/hold"))[0] == 200
        agent = h.sim.channel("PJSIP/1001")
        assert agent is not None
        await until(lambda: agent.context == "ctid-onhold")
        await h.sim.caller_hangup(agent)
        # Requeued with its place kept; 1001 (wrap-up 0) is the only agent with lang:en>=5.
        await until(lambda: h.daemon.acd.offers == 2, 15)
        await until(lambda: h.state("1001") == "on_call", 15)
        await until(lambda: h.bridged("PJSIP/trunk", "PJSIP/1001"))
        states = [e["data"]["state"] for e in h.events if e["type"] == "agent.state"]
        assert states == ["ready", "reserved", "on_call", "wrap_up", "ready", "reserved", "on_call"], states
        again = h.daemon.acd.waiting(call_id)
        assert again is not None and again.queue == "support" and again.enqueued_at == enqueued
        assert h.event(call_id, "call.transferred")["data"]["by"] == "ctid"
        await h.sim.caller_hangup(h.sim.channel("PJSIP/trunk"))  # type: ignore[arg-type]
        await until(lambda: "call.ended" in h.types(call_id))
        await until(lambda: h.state("1001") == "ready")


async def test_websocket_ops_and_blind_transfer_to_a_number(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await h.login("1001")
        call_id = await h.answered_call()
        async with h.http.ws_connect(f"{h.base}/ws", headers={"Authorization": "Bearer desk1001"}) as ws:
            await ws.send_json({"op": "hold", "req_id": 1, "call_id": call_id})
            ack = await ws.receive_json(timeout=5)
            assert ack["type"] == "ack" and ack["op"] == "hold" and ack["state"] == "held", ack
            await ws.send_json({"op": "hold", "req_id": 2, "call_id": call_id})
            err = await ws.receive_json(timeout=5)
            assert err["type"] == "error" and err["error"]["state"] == "held", err
            await ws.send_json({"op": "resume", "req_id": 3, "call_id": call_id})
            ack = await ws.receive_json(timeout=5)
            assert ack["type"] == "ack", ack
            await until(lambda: h.bridged("PJSIP/trunk", "PJSIP/1001"))
            await until(lambda: h.call_state(call_id) == "connected")
            await ws.send_json({"op": "dial", "req_id": 4, "number": "+449999999999"})
            err = await ws.receive_json(timeout=5)
            assert err["type"] == "error" and err["error"]["code"] == "number_not_allowed", err
            await ws.send_json({"op": "transfer", "req_id": 5, "call_id": call_id, "target": "+15557654321"})
            ack = await ws.receive_json(timeout=5)
            assert ack["type"] == "ack", ack
        # The caller now dials the number out of the trunk (ctid-outbound), same call id.
        await until(lambda: any(m.name == "DialBegin" and m.get("DialString") == "+15557654321@trunk"
                                for m in h.sim.events))
        transferred = h.event(call_id, "call.transferred")
        assert transferred["data"]["kind"] == "blind" and transferred["data"]["target"] == "+1555***4321"
        await until(lambda: h.state("1001") == "ready")
        for chan in list(h.sim.channels.values()):
            await h.sim.caller_hangup(chan)
        await until(lambda: "call.ended" in h.types(call_id))
