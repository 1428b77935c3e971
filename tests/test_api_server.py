"""The API server's lifetime, and the harness the other ``test_api_*`` modules share.

Everything here is real: the aiohttp server on 127.0.0.1 port 0, the event bus
(``ctid.events.bus.EventBus``, memory only), the agent registry, and aiohttp client
sessions and websockets. The clock is injected.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter

from ctid.agents import AgentRegistry
from ctid.api import ApiServer
from ctid.api.auth import hash_secret
from ctid.api.rest import CallLike
from ctid.config import Config, parse
from ctid.events.bus import EventBus
from ctid.events.schema import Event

PIN = "pin-Q9x7406"
PIN_HASH = hash_secret(PIN)
TOKENS = {
    "admin": "tok-admin-7c1d0e",
    "sup": "tok-supervisor-acme-55aa",
    "sup-globex": "tok-supervisor-globex-9911",
    "int": "tok-integration-acme-1234",
    "agent-1001": "tok-agent-1001-beef",
    "agent-2001": "tok-agent-2001-cafe",
}
TOKEN_SCOPES: dict[str, dict[str, Any]] = {
    "admin": {"role": "admin"},
    "sup": {"role": "supervisor", "tenant": "acme"},
    "sup-globex": {"role": "supervisor", "tenant": "globex"},
    "int": {"role": "integration", "tenant": "acme"},
    "agent-1001": {"role": "agent", "tenant": "acme", "agent_id": "1001"},
    "agent-2001": {"role": "agent", "tenant": "globex", "agent_id": "2001"},
}
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_config(api: dict[str, Any] | None = None, extra_tokens: Sequence[dict[str, Any]] = ()) -> Config:
    tokens = [{"name": name, "token_sha256": sha256(TOKENS[name]), **scope} for name, scope in TOKEN_SCOPES.items()]
    return parse({
        "http": {"bind": "127.0.0.1", "port": 0},
        "tenants": [{"id": "acme"}, {"id": "globex"}],
        "agents": [
            {"id": "1001", "tenant": "acme", "name": "Ana", "pin_hash": PIN_HASH, "skills": {"lang:en": 7}},
            {"id": "1002", "tenant": "acme", "name": "Bo"},
            {"id": "2001", "tenant": "globex", "name": "Cy", "pin_hash": PIN_HASH},
        ],
        "queues": [{"id": "support", "tenant": "acme", "name": "Support"},
                   {"id": "sales", "tenant": "globex", "name": "Sales"}],
        "tokens": [*tokens, *extra_tokens],
        "api": api or {},
    }, env={})


class Clock:
    """The injected clock: moves only when told."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class HookedBus(EventBus):
    """The real bus, with hooks that run inside ``replay``: ``before_read`` publishes
    events that the replay then returns *and* that the client's live queue got
    (overlap), ``after_read`` publishes events that only the live queue gets."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(None, config=make_config().events, clock=clock)
        self.before_read: Callable[[], None] | None = None
        self.after_read: Callable[[], None] | None = None
        self.replays = 0

    async def replay(self, after_seq: int, *, limit: int = 1000, tenant: str | None = None,
                     agent_id: str | None = None, types: Collection[str] | None = None,
                     call_id: str | None = None) -> list[Event]:
        self.replays += 1
        before, self.before_read = self.before_read, None
        after, self.after_read = self.after_read, None
        if before is not None:
            before()
        result = await super().replay(after_seq, limit=limit, tenant=tenant, agent_id=agent_id, types=types,
                                      call_id=call_id)
        if after is not None:
            after()
        return result


@dataclass
class Harness:
    server: ApiServer
    bus: HookedBus
    registry: AgentRegistry
    clock: Clock
    session: aiohttp.ClientSession
    calls: list[CallLike]
    health: dict[str, Any]
    metrics: CollectorRegistry
    url: str
    sockets: list[aiohttp.ClientWebSocketResponse] = field(default_factory=list)
    #: When set, the health callable raises it.
    health_error: Exception | None = None

    def report(self) -> dict[str, Any]:
        if self.health_error is not None:
            raise self.health_error
        return self.health

    @staticmethod
    def auth(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKENS.get(name, name)}"}

    async def ws(self, token: str | None = None, **kw: Any) -> aiohttp.ClientWebSocketResponse:
        headers = self.auth(token) if token else {}
        ws: aiohttp.ClientWebSocketResponse = await self.session.ws_connect(self.url + "/ws", headers=headers, **kw)
        self.sockets.append(ws)
        return ws

    def publish(self, type: str = "call.offered", tenant: str | None = "acme", agent_id: str | None = None,
                queue: str | None = None, call_id: str | None = "c1", data: dict[str, Any] | None = None) -> Event:
        return self.bus.publish(Event(type=type, tenant=tenant, ts=self.clock(), data=data or {}, call_id=call_id,
                                      agent_id=agent_id, queue=queue))

    def events(self) -> list[Event]:
        return [item.event for item in self.bus._buffer]


@asynccontextmanager
async def running(api: dict[str, Any] | None = None, *, extra_tokens: Sequence[dict[str, Any]] = (),
                  env: dict[str, str] | None = None, **kw: Any) -> AsyncIterator[Harness]:
    clock = Clock()
    config = make_config(api, extra_tokens)
    bus = HookedBus(clock)
    await bus.start()
    registry = AgentRegistry(config.agents, bus.publish, clock)
    calls: list[CallLike] = []
    health: dict[str, Any] = {"ami": {"pbx1": {"state": "logged_in"}}, "agi": {"listening": True, "port": 4573},
                              "db": {"ok": True}, "broker": None, "event_lag": 0}
    metrics = CollectorRegistry()
    holder: list[Harness] = []
    server = ApiServer(config, bus, registry, lambda: list(calls), lambda: holder[0].report(), metrics,
                       env=env or {}, clock=clock, **kw)
    await server.start()
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
    harness = Harness(server, bus, registry, clock, session, calls, health, metrics, f"http://127.0.0.1:{server.port}")
    holder.append(harness)
    try:
        async with asyncio.timeout(60):
            yield harness
    finally:
        for ws in harness.sockets:
            await ws.close()
        await session.close()
        await server.stop()
        await bus.stop()


async def recv(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> dict[str, Any]:
    """The next JSON message (fails on a close or after ``timeout``)."""
    msg = await ws.receive(timeout=timeout)
    assert msg.type is aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg.type} {msg.data!r} {msg.extra!r}"
    result: dict[str, Any] = msg.json()
    return result


async def request(ws: aiohttp.ClientWebSocketResponse, op: str, req_id: object = 1, **fields: Any) -> dict[str, Any]:
    """Send one op and return its ack or error (pushed events before it are skipped)."""
    await ws.send_json({"op": op, "req_id": req_id, **fields})
    while True:
        msg = await recv(ws)
        if msg.get("type") in ("ack", "error") and msg.get("req_id") == req_id:
            return msg


async def close_code(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10.0) -> int | None:
    """Read until the server closes; return its close code."""
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type is aiohttp.WSMsgType.CLOSE:
            return int(msg.data)  # the code the server sent (close_code may say 1006 once it hung up)
        if msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            return ws.close_code


# --------------------------------------------------------------------------- lifetime tests


async def test_server_listens_on_a_free_port_and_joins_the_bus() -> None:
    async with running() as h:
        assert h.server.port and h.server.port > 0
        assert h.server.hub in h.bus.sinks
        async with h.session.get(h.url + "/healthz") as resp:
            assert resp.status == 200
    assert h.server.hub not in h.bus.sinks


async def test_stop_closes_websockets_with_going_away() -> None:
    clock = Clock()
    config = make_config()
    bus = HookedBus(clock)
    await bus.start()
    registry = AgentRegistry(config.agents, bus.publish, clock)
    server = ApiServer(config, bus, registry, list, dict, CollectorRegistry(), env={}, clock=clock,
                       close_timeout=0.5)
    await server.start()
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"http://127.0.0.1:{server.port}/ws", headers=Harness.auth("sup"))
        assert (await request(ws, "subscribe"))["type"] == "ack"
        async with asyncio.timeout(10):
            await server.stop()
        assert await close_code(ws) == aiohttp.WSCloseCode.GOING_AWAY
    await bus.stop()


async def test_restart_with_the_same_metrics_registry() -> None:
    clock = Clock()
    config = make_config()
    bus = HookedBus(clock)
    await bus.start()
    metrics = CollectorRegistry()
    Counter("ctid_daemon_things", "A metric of the daemon's own", registry=metrics).inc()
    registry = AgentRegistry(config.agents, bus.publish, clock)
    for _ in range(2):
        server = ApiServer(config, bus, registry, list, dict, metrics, env={}, clock=clock)
        await server.start()
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
            text = await resp.text()
        await server.stop()
        assert "ctid_daemon_things_total 1.0" in text
        assert "ctid_ws_clients 0.0" in text
    await bus.stop()


async def test_port_in_use_is_an_error_and_leaves_nothing_running() -> None:
    async with running() as h:
        base = make_config()
        config = base.model_copy(update={"http": base.http.model_copy(update={"port": h.server.port})})
        other = ApiServer(config, h.bus, h.registry, list, dict, CollectorRegistry(), env={}, clock=h.clock)
        with pytest.raises(OSError):
            await other.start()
        assert other.hub not in h.bus.sinks
