"""The HTTP API on a real server: agent commands, lists, event replay, OpenAPI coverage,
health and metrics, and every bad-input case (clear JSON error, no state change)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest

from ctid.api.openapi import document
from ctid.api.rest import CallLike
from ctid.calls import Call, CallState, Direction, Leg, Role
from ctid.store.calls import CallRecord, LegRecord
from tests.test_api_server import T0, Harness, running


def make_call(call_id: str, tenant: str = "acme", state: CallState = CallState.CONNECTED,
              agent_channel: str | None = None) -> Call:
    call = Call(call_id=call_id, linkedid=f"{call_id}.1", direction=Direction.INBOUND, created_at=T0, tenant=tenant,
                service_line="acme-support" if tenant == "acme" else None, state=state,
                caller_number="+14155550123", caller_name="ALICE MARTIN", dnis="+18005550100")
    call.legs.append(Leg(f"PJSIP/trunk-{call_id}", f"{call_id}.1", f"{call_id}.1", Role.CALLER, call, T0))
    if agent_channel:
        call.legs.append(Leg(agent_channel, f"{call_id}.2", f"{call_id}.1", Role.AGENT, call, T0))
    return call


async def post(h: Harness, path: str, token: str = "sup", body: Any = None, data: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    kw: dict[str, Any] = {"data": data} if data is not None else {"json": body}
    async with h.session.post(h.url + path, headers={**h.auth(token), **(headers or {})}, **kw) as resp:
        return resp.status, await resp.json()


async def get(h: Harness, path: str, token: str = "sup") -> tuple[int, dict[str, Any]]:
    async with h.session.get(h.url + path, headers=h.auth(token)) as resp:
        return resp.status, await resp.json()


# --------------------------------------------------------------------------- commands


async def test_agent_commands_drive_the_state_and_publish_agent_state() -> None:
    async with running() as h:
        status, body = await post(h, "/api/v1/agents/1001/login", "agent-1001", {"device": "PJSIP/1001"})
        assert status == 200
        assert body["agent"]["state"] == "ready" and body["agent"]["device"] == "PJSIP/1001"
        status, body = await post(h, "/api/v1/agents/1001/pause", "agent-1001", {"reason": "lunch"})
        assert (status, body["agent"]["state"], body["agent"]["reason"]) == (200, "paused", "lunch")
        status, body = await post(h, "/api/v1/agents/1001/ready", "agent-1001")
        assert (status, body["agent"]["state"]) == (200, "ready")
        # The ACD's part (not built yet) puts the agent on a call and into wrap-up.
        h.registry.reserve("1001", "call-9", "support")
        h.registry.answer("1001", "call-9")
        h.registry.hangup("1001", "call-9")
        status, body = await post(h, "/api/v1/agents/1001/wrapup", "agent-1001",
                                  {"call_id": "call-9", "disposition": "sold", "notes": "fibre"})
        assert (status, body["agent"]["state"]) == (200, "ready")
        status, body = await post(h, "/api/v1/agents/1001/logout", "agent-1001")
        assert (status, body["agent"]["state"]) == (200, "logged_out")
        events = h.events()
        assert [e.data.get("state") for e in events if e.type == "agent.state"] == [
            "ready", "paused", "ready", "reserved", "on_call", "wrap_up", "ready", "logged_out"]
        [wrapup] = [e for e in events if e.type == "call.wrapup"]
        assert (wrapup.data["disposition"], wrapup.data["notes"], wrapup.data["completed_by"]) == (
            "sold", "fibre", "agent")


async def test_a_command_in_the_wrong_state_is_409_with_the_state() -> None:
    async with running() as h:
        h.registry.login("1001", "PJSIP/1001")
        h.registry.reserve("1001", "call-9")
        h.registry.answer("1001", "call-9")
        before = len(h.events())
        for command, body in (("ready", None), ("logout", None), ("pause", {"reason": "break"}),
                              ("login", {"device": "PJSIP/1001"}), ("wrapup", {"call_id": "call-9"})):
            status, reply = await post(h, f"/api/v1/agents/1001/{command}", "sup", body)
            assert status == 409, command
            assert (reply["error"]["code"], reply["error"]["state"]) == ("wrong_state", "on_call")
        assert len(h.events()) == before
        assert h.registry.get("1001").state.value == "on_call"


BAD_BODIES: list[tuple[str, bytes, int, str]] = [
    ("login", b"{not json", 400, "bad_json"),
    ("login", b"\xff\xfe", 400, "bad_json"),
    ("login", b'["PJSIP/1001"]', 400, "bad_request"),
    ("login", b"{}", 400, "bad_request"),
    ("login", b'{"device": 1001}', 400, "bad_request"),
    ("login", b'{"device": "PJSIP/1001", "extra": 1}', 400, "bad_request"),
    ("login", b'{"device": "PJSIP/1001&PJSIP/1002"}', 400, "bad_request"),
    ("login", b'{"device": "PJSIP/1001\\r\\nAction: Originate"}', 400, "bad_request"),
    ("pause", b'{"reason": "nap"}', 400, "bad_request"),
    ("pause", b"", 400, "bad_request"),
    ("wrapup", b'{"call_id": "a b"}', 400, "bad_request"),
    ("ready", b'{"now": true}', 400, "bad_request"),
]


@pytest.mark.parametrize(("command", "body", "status", "code"), BAD_BODIES)
async def test_bad_bodies_get_a_json_error_and_change_nothing(command: str, body: bytes, status: int,
                                                              code: str) -> None:
    async with running() as h:
        if command != "login":
            h.registry.login("1001", "PJSIP/1001")
        state, before = h.registry.get("1001").state, len(h.events())
        got, reply = await post(h, f"/api/v1/agents/1001/{command}", "sup", data=body)
        assert (got, reply["error"]["code"]) == (status, code)
        assert reply["error"]["message"]
        assert h.registry.get("1001").state is state
        assert len(h.events()) == before


async def test_a_body_over_max_message_bytes_is_413() -> None:
    async with running({"max_message_bytes": 2048}) as h:
        status, reply = await post(h, "/api/v1/agents/1001/login", "sup",
                                   data=json.dumps({"device": "x" * 5000}).encode())
        assert (status, reply["error"]["code"]) == (413, "too_large")
        assert h.registry.get("1001").state.value == "logged_out"


async def test_unknown_agent_route_and_method_are_json_errors() -> None:
    async with running() as h:
        status, reply = await post(h, "/api/v1/agents/9999/ready")
        assert (status, reply["error"]["code"]) == (404, "not_found")
        status, reply = await get(h, "/api/v1/nothing-here")
        assert (status, reply["error"]["code"]) == (404, "not_found")
        async with h.session.get(h.url + "/api/v1/agents/1001/ready", headers=h.auth("sup")) as resp:
            assert resp.status == 405
            assert "POST" in resp.headers["Allow"]
            assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_the_device_must_be_a_known_endpoint_when_a_list_is_given() -> None:
    async with running(known_endpoints=lambda: {"1001"}) as h:
        status, reply = await post(h, "/api/v1/agents/1001/login", "sup", {"device": "PJSIP/1002"})
        assert (status, reply["error"]["code"], reply["error"]["field"]) == (400, "bad_request", "device")
        status, _ = await post(h, "/api/v1/agents/1001/login", "sup", {"device": "PJSIP/1001"})
        assert status == 200


# --------------------------------------------------------------------------- lists


async def test_calls_lists_active_calls_with_their_shape_and_scope() -> None:
    async with running() as h:
        h.calls.extend([make_call("a1", agent_channel="PJSIP/1001-00000001"),
                        make_call("a2", state=CallState.QUEUED), make_call("g1", tenant="globex")])
        status, body = await get(h, "/api/v1/calls")
        assert status == 200
        assert [c["call_id"] for c in body["calls"]] == ["a1", "a2"]
        a1 = body["calls"][0]
        assert a1["caller"] == {"number": "+14155550123", "name": "ALICE MARTIN", "e164": "+14155550123"}
        assert (a1["state"], a1["direction"], a1["dnis"], a1["tenant"], a1["created_at"]) == (
            "connected", "inbound", "+18005550100", "acme", "2026-12-01T09:00:00.000Z")
        assert [leg["role"] for leg in a1["legs"]] == ["caller", "agent"]
        _, body = await get(h, "/api/v1/calls?state=queued")
        assert [c["call_id"] for c in body["calls"]] == ["a2"]
        _, body = await get(h, "/api/v1/calls", "admin")
        assert [c["call_id"] for c in body["calls"]] == ["a1", "a2", "g1"]
        _, body = await get(h, "/api/v1/calls", "agent-1001")
        assert body["calls"] == [], "not logged in to the device yet"
        h.registry.login("1001", "PJSIP/1001")
        _, body = await get(h, "/api/v1/calls", "agent-1001")
        assert [c["call_id"] for c in body["calls"]] == ["a1"], "an agent sees the calls on its device"
        h.registry.reserve("1001", "a2", "support")
        _, body = await get(h, "/api/v1/calls", "agent-1001")
        assert [(c["call_id"], c["agent_id"]) for c in body["calls"]] == [("a1", None), ("a2", "1001")]
        status, body = await get(h, "/api/v1/calls?state=sleeping")
        assert (status, body["error"]["code"]) == (400, "bad_request")
        status, body = await get(h, "/api/v1/calls?limit=0")
        assert status == 400


async def test_ended_calls_come_from_the_store() -> None:
    record = CallRecord(call_id="e1", tenant="acme", direction="inbound", state="ended", created_at=T0,
                        ended_at=T0 + timedelta(seconds=30), hangup_by="caller", caller_number="anonymous",
                        legs=(LegRecord("PJSIP/trunk-1", "e1.1", "caller", T0),))
    other = CallRecord(call_id="e2", tenant="globex", direction="outbound", state="ended", created_at=T0)
    asked: list[int] = []

    async def ended(limit: int) -> Sequence[CallLike]:
        asked.append(limit)
        return [record, other]

    async with running(ended_calls=ended) as h:
        status, body = await get(h, "/api/v1/calls?state=ended&limit=5")
        assert status == 200
        [call] = body["calls"]
        assert (call["call_id"], call["state"], call["hangup_by"], call["ended_at"]) == (
            "e1", "ended", "caller", "2026-12-01T09:00:30.000Z")
        assert call["caller"] == {"number": "anonymous", "name": None, "e164": None}
        assert asked
    async with running() as h:
        status, body = await get(h, "/api/v1/calls?state=ended")
        assert (status, body["error"]["code"]) == (503, "unavailable")


async def test_queues_lists_configured_queues_with_placeholder_stats() -> None:
    async with running() as h:
        _, body = await get(h, "/api/v1/queues")
        assert body == {"queues": [{"queue_id": "support", "tenant": "acme", "name": "Support",
                                    "stats": {"waiting": None, "longest_wait_s": None, "agents_by_state": None,
                                              "service_level_today": None}}]}
        _, body = await get(h, "/api/v1/queues", "admin")
        assert [q["queue_id"] for q in body["queues"]] == ["support", "sales"]


# --------------------------------------------------------------------------- events


async def test_events_replay_is_scoped_like_the_websocket() -> None:
    async with running() as h:
        h.registry.login("1001", "PJSIP/1001")                     # 1 acme/1001
        h.publish("call.offered", "acme", agent_id="1001")         # 2
        h.publish("call.offered", "acme", agent_id="1002")         # 3
        h.publish("queue.stats", "acme", queue="support", call_id=None)  # 4
        h.publish("call.started", "globex")                        # 5
        h.registry.login("2001", "PJSIP/2001")                     # 6 globex/2001
        expect = {"agent-1001": [1, 2], "sup": [1, 2, 3, 4], "int": [1, 2, 3, 4], "sup-globex": [5, 6],
                  "agent-2001": [6], "admin": [1, 2, 3, 4, 5, 6]}
        for token, seqs in expect.items():
            status, body = await get(h, "/api/v1/events?after_seq=0", token)
            assert status == 200
            assert [e["seq"] for e in body["events"]] == seqs, token
        _, body = await get(h, "/api/v1/events?after_seq=1&limit=2", "admin")
        assert ([e["seq"] for e in body["events"]], body["last_seq"], body["more"]) == ([2, 3], 3, True)
        _, body = await get(h, "/api/v1/events?after_seq=3", "admin")
        assert ([e["seq"] for e in body["events"]], body["last_seq"], body["more"]) == ([4, 5, 6], 6, False)
        _, body = await get(h, "/api/v1/events?types=agent.state", "admin")
        assert [e["seq"] for e in body["events"]] == [1, 6]
        _, body = await get(h, "/api/v1/events?tenant=globex", "admin")
        assert [e["seq"] for e in body["events"]] == [5, 6]
        first = body["events"][0]
        assert set(first) == {"v", "seq", "id", "ts", "type", "tenant", "call_id", "agent_id", "queue", "data"}


@pytest.mark.parametrize("query", ["after_seq=-1", "after_seq=x", "limit=0", "limit=1001", "types=call.nope"])
async def test_events_bad_queries_are_400(query: str) -> None:
    async with running() as h:
        status, body = await get(h, f"/api/v1/events?{query}")
        assert (status, body["error"]["code"]) == (400, "bad_request")


async def test_events_replay_failure_is_503() -> None:
    async with running() as h:
        async def broken(*args: Any, **kw: Any) -> list[Any]:
            raise RuntimeError("database is down")

        h.bus.replay = broken  # type: ignore[method-assign]
        status, body = await get(h, "/api/v1/events")
        assert (status, body["error"]["code"]) == (503, "unavailable")


# --------------------------------------------------------------------------- openapi, health, metrics


async def test_openapi_describes_every_route_and_nothing_else() -> None:
    async with running() as h:
        async with h.session.get(h.url + "/api/v1/openapi.json") as resp:
            assert resp.status == 200
            doc = await resp.json()
        assert doc == json.loads(json.dumps(document()))
        assert doc["openapi"].startswith("3.1")
        served = {(route.method.lower(), route.resource.canonical) for route in h.server.app.router.routes()
                  if route.resource is not None}
        described = {(method, path) for path, ops in doc["paths"].items() for method in ops}
        assert served == described
        refs = {v for v in _walk(doc) if isinstance(v, str) and v.startswith("#/components/schemas/")}
        assert {r.rsplit("/", 1)[1] for r in refs} <= set(doc["components"]["schemas"])
        assert "placeholder" in json.dumps(doc["components"]["schemas"]["Queue"]).lower()


def _walk(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [x for v in node.values() for x in _walk(v)]
    if isinstance(node, list):
        return [x for v in node for x in _walk(v)]
    return [node]


async def test_healthz_is_200_only_with_ami_logged_in_and_fastagi_listening() -> None:
    async with running() as h:
        async with h.session.get(h.url + "/healthz") as resp:
            assert resp.status == 200
            body = await resp.json()
        assert (body["status"], body["reasons"]) == ("ok", [])
        assert {"ami", "agi", "db", "broker", "event_lag"} <= set(body)
        h.health["ami"] = {"pbx1": {"state": "connecting", "last_error": "refused"}, "pbx2": {"state": "logged_in"}}
        h.health["agi"] = {"listening": False}
        async with h.session.get(h.url + "/healthz") as resp:
            assert resp.status == 503
            body = await resp.json()
        assert body["reasons"] == ["AMI link pbx1 is connecting", "FastAGI is not listening"]
        assert body["ami"]["pbx1"]["last_error"] == "refused"
        h.health.clear()
        async with h.session.get(h.url + "/healthz") as resp:
            assert resp.status == 503
            assert (await resp.json())["reasons"] == ["no AMI link", "FastAGI is not listening"]


async def test_healthz_is_503_when_the_health_report_fails() -> None:
    async with running() as h:
        h.health_error = RuntimeError("boom")
        async with h.session.get(h.url + "/healthz") as resp:
            assert resp.status == 503
            body = await resp.json()
        assert body["status"] == "unavailable"
        assert body["reasons"] == ["no AMI link", "FastAGI is not listening"]


async def test_metrics_serves_the_given_registry_in_prometheus_text() -> None:
    async with running() as h:
        ws = await h.ws("sup")
        await ws.send_json({"op": "subscribe", "req_id": 1})
        await ws.receive(timeout=5)
        async with h.session.get(h.url + "/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
        assert "ctid_ws_clients 1.0" in text
        assert "ctid_ws_streaming_clients 1.0" in text
        assert "ctid_ws_slow_client_drops_total 0.0" in text
