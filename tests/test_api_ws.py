"""The websocket on a real server with real aiohttp clients: authentication, scope and
filters, agent commands, resume with no gap and no duplicate across a forced
disconnect, the slow-client policy, and every bad-input case."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from typing import Any

import aiohttp
import pytest

from ctid.api import websocket
from ctid.api.websocket import PUMP_CHUNK, REPLAY_PAGE
from ctid.events.schema import Event
from tests.test_api_server import PIN, TOKENS, Harness, close_code, recv, request, running, sha256


async def subscribed(h: Harness, token: str, **filters: Any) -> aiohttp.ClientWebSocketResponse:
    ws = await h.ws(token)
    ack = await request(ws, "subscribe", "sub", **filters)
    assert ack["type"] == "ack", ack
    return ws


async def seqs(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[int]:
    """The seq of the next ``count`` pushed events."""
    out: list[int] = []
    while len(out) < count:
        msg = await recv(ws)
        assert "seq" in msg, f"expected an event, got {msg}"
        out.append(msg["seq"])
    return out


async def marker(h: Harness, ws: aiohttp.ClientWebSocketResponse, tenant: str = "acme") -> list[int]:
    """Publish a marker event the client can see, and return the seqs received before it:
    proof that nothing else is on the way."""
    mark = h.publish("queue.stats", tenant, queue="support" if tenant == "acme" else "sales", call_id=None)
    got: list[int] = []
    while True:
        msg = await recv(ws)
        if msg.get("seq") == mark.seq:
            return got
        got.append(msg.get("seq", -1))


# --------------------------------------------------------------------------- authentication


async def test_auth_by_header_then_subscribe() -> None:
    async with running() as h:
        ws = await subscribed(h, "sup")
        event = h.publish("call.offered", "acme", agent_id="1001", queue="support")
        msg = await recv(ws)
        assert msg == event.envelope() | {"ts": msg["ts"]}
        assert msg["seq"] == event.seq


async def test_auth_by_first_message() -> None:
    async with running() as h:
        ws = await h.ws()
        ack = await request(ws, "auth", "a1", token=TOKENS["agent-1001"])
        assert ack == {"type": "ack", "req_id": "a1", "op": "auth", "role": "agent", "tenant": "acme",
                       "agent_id": "1001", "expires_at": None}
        assert (await request(ws, "subscribe", 2))["type"] == "ack"
        again = await request(ws, "auth", 3, token=TOKENS["admin"])
        assert again["error"]["code"] == "bad_request", "one identity per connection"


async def test_not_authenticated_in_time_is_closed_1008() -> None:
    async with running(auth_timeout=0.3) as h:
        ws = await h.ws()
        msg = await recv(ws)
        assert (msg["type"], msg["error"]["code"]) == ("error", "unauthorized")
        assert await close_code(ws) == aiohttp.WSCloseCode.POLICY_VIOLATION


async def test_a_wrong_token_in_the_auth_op_is_an_error_then_1008() -> None:
    async with running() as h:
        ws = await h.ws()
        await ws.send_json({"op": "auth", "req_id": 1, "token": "not-a-token"})
        msg = await recv(ws)
        assert (msg["req_id"], msg["error"]["code"]) == (1, "unauthorized")
        assert await close_code(ws) == aiohttp.WSCloseCode.POLICY_VIOLATION


async def test_a_wrong_token_in_the_header_refuses_the_upgrade() -> None:
    async with running() as h:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await h.ws("not-a-token")
        assert err.value.status == 401
        async with h.session.get(h.url + "/ws") as resp:
            assert resp.status == 400, "a plain GET is not an upgrade"
            assert (await resp.json())["error"]["code"] == "bad_request"


async def test_ops_before_auth_are_refused_without_closing() -> None:
    async with running() as h:
        ws = await h.ws()
        for op in ("subscribe", "ready", "resume"):
            reply = await request(ws, op, op, after_seq=0)
            assert reply["error"]["code"] == "unauthorized"
        assert (await request(ws, "auth", 9, token=TOKENS["sup"]))["type"] == "ack"


async def test_an_expired_session_closes_the_websocket() -> None:
    async with running({"session_ttl": 0.5}) as h:
        async with h.session.post(h.url + "/api/v1/auth/login", json={"agent_id": "1001", "secret": PIN}) as resp:
            token = (await resp.json())["token"]
        ws = await h.ws()
        ack = await request(ws, "auth", 1, token=token)
        assert ack["expires_at"] == "2026-12-01T09:00:00.500Z"
        assert (await request(ws, "subscribe", 2))["type"] == "ack"
        assert await close_code(ws) == aiohttp.WSCloseCode.POLICY_VIOLATION


# --------------------------------------------------------------------------- scope and filters


async def test_an_agent_gets_only_its_own_pops_and_state() -> None:
    async with running() as h:
        ws = await subscribed(h, "agent-1001")
        h.registry.login("1002", "PJSIP/1002")
        h.publish("call.offered", "acme", agent_id="1002")
        mine = h.publish("call.offered", "acme", agent_id="1001")
        h.publish("queue.stats", "acme", queue="support", call_id=None)
        h.publish("call.offered", "globex", agent_id="1001")  # the same id in another tenant is not this agent
        h.registry.login("1001", "PJSIP/1001")
        state = h.bus.last_seq
        h.publish("call.started", "acme")
        last = h.publish("call.ended", "acme", agent_id="1001")
        assert await seqs(ws, 3) == [mine.seq, state, last.seq]


async def test_a_supervisor_gets_its_whole_tenant_and_nothing_else() -> None:
    async with running() as h:
        sup = await subscribed(h, "sup")
        other = await subscribed(h, "sup-globex")
        admin = await subscribed(h, "admin")
        a = h.publish("call.offered", "acme", agent_id="1001")
        b = h.publish("call.started", "acme")
        c = h.publish("call.started", "globex")
        assert await marker(h, sup) == [a.seq, b.seq]
        assert await marker(h, other, "globex") == [c.seq]
        assert await seqs(admin, 5) == [a.seq, b.seq, c.seq, c.seq + 1, c.seq + 2]


async def test_subscribe_filters_narrow_the_stream() -> None:
    async with running() as h:
        ws = await h.ws("sup")
        ack = await request(ws, "subscribe", 1, types=["call.offered", "queue.stats"], queues=["support"])
        assert ack["filters"] == {"types": ["call.offered", "queue.stats"], "queues": ["support"], "agent_ids": None}
        h.publish("call.offered", "acme", queue="other")
        keep = h.publish("call.offered", "acme", queue="support")
        h.publish("call.started", "acme", queue="support")
        assert await marker(h, ws) == [keep.seq]
        ack = await request(ws, "subscribe", 2, agent_ids=["1002"])  # change filters while streaming
        assert ack["type"] == "ack"
        h.publish("call.offered", "acme", agent_id="1001")
        keep = h.publish("call.offered", "acme", agent_id="1002")
        got = await seqs(ws, 1)
        assert got == [keep.seq]


# --------------------------------------------------------------------------- commands


async def test_agent_commands_over_the_websocket() -> None:
    async with running() as h:
        ws = await h.ws("agent-1001")
        ack = await request(ws, "login", 1, device="PJSIP/1001")
        assert (ack["type"], ack["op"], ack["agent"]["state"], ack["agent"]["device"]) == (
            "ack", "login", "ready", "PJSIP/1001")
        ack = await request(ws, "pause", 2, reason="training")
        assert (ack["agent"]["state"], ack["agent"]["reason"]) == ("paused", "training")
        assert (await request(ws, "ready", 3))["agent"]["state"] == "ready"
        h.registry.reserve("1001", "call-7", "support")
        h.registry.answer("1001", "call-7")
        reply = await request(ws, "ready", 4)
        assert (reply["error"]["code"], reply["error"]["state"]) == ("wrong_state", "on_call")
        h.registry.hangup("1001", "call-7")
        ack = await request(ws, "wrapup", 5, call_id="call-7", disposition="resolved", notes="")
        assert ack["agent"]["state"] == "ready"
        sup = await h.ws("sup")
        ack = await request(sup, "pause", 6, agent_id="1001", reason="meeting")
        assert ack["agent"]["reason"] == "meeting"
        reply = await request(sup, "pause", 7, reason="meeting")
        assert (reply["error"]["code"], reply["error"]["field"]) == ("bad_request", "agent_id")
        assert [e.type for e in h.events()].count("call.wrapup") == 1


BAD_MESSAGES: list[tuple[str, Any, str]] = [
    ("malformed JSON", "{\"op\": \"ready\",", "bad_json"),
    ("not an object", "[1, 2]", "bad_request"),
    ("no req_id", {"op": "ready"}, "bad_request"),
    ("bool req_id", {"op": "ready", "req_id": True}, "bad_request"),
    ("no op", {"req_id": 1}, "bad_request"),
    ("unknown op", {"op": "hangup_everyone", "req_id": 1}, "unknown_op"),
    ("unknown field", {"op": "pause", "req_id": 1, "reason": "break", "for": "ever"}, "bad_request"),
    ("missing field", {"op": "pause", "req_id": 1}, "bad_request"),
    ("bad reason", {"op": "pause", "req_id": 1, "reason": "nap"}, "bad_request"),
    ("bad device", {"op": "login", "req_id": 1, "device": "PJSIP/1001&DAHDI/1"}, "bad_request"),
    ("wrong state", {"op": "wrapup", "req_id": 1, "call_id": "x"}, "wrong_state"),
    ("other agent", {"op": "ready", "req_id": 1, "agent_id": "1002"}, "forbidden"),
    ("unsafe agent id", {"op": "ready", "req_id": 1, "agent_id": "../1001"}, "bad_request"),
    ("other agent's stream", {"op": "subscribe", "req_id": 1, "agent_ids": ["1002"]}, "forbidden"),
    ("other tenant's queue", {"op": "subscribe", "req_id": 1, "queues": ["sales"]}, "forbidden"),
    ("unknown event type", {"op": "subscribe", "req_id": 1, "types": ["call.nope"]}, "bad_request"),
    ("types not a list", {"op": "subscribe", "req_id": 1, "types": "call.offered"}, "bad_request"),
    ("bad after_seq", {"op": "resume", "req_id": 1, "after_seq": -1}, "bad_request"),
    ("string after_seq", {"op": "resume", "req_id": 1, "after_seq": "5"}, "bad_request"),
]


@pytest.mark.parametrize(("case", "message", "code"), BAD_MESSAGES, ids=[c for c, _, _ in BAD_MESSAGES])
async def test_bad_input_is_a_clear_error_and_changes_nothing(case: str, message: Any, code: str) -> None:
    async with running() as h:
        h.registry.login("1002", "PJSIP/1002")
        ws = await h.ws("agent-1001")
        await request(ws, "login", "setup", device="PJSIP/1001")
        states = [a.snapshot() for a in h.registry]
        events = len(h.events())
        if isinstance(message, str):
            await ws.send_str(message)
        else:
            await ws.send_json(message)
        reply = await recv(ws)
        assert reply["type"] == "error"
        assert reply["error"]["code"] == code, reply
        assert reply["error"]["message"]
        if isinstance(message, dict) and case not in ("no req_id", "bool req_id"):
            assert reply["req_id"] == message.get("req_id")
        assert [a.snapshot() for a in h.registry] == states
        assert len(h.events()) == events
        assert (await request(ws, "ready", "after"))["type"] == "ack", "the connection is still usable"


async def test_an_integration_cannot_send_agent_commands() -> None:
    async with running() as h:
        ws = await h.ws("int")
        reply = await request(ws, "login", 1, agent_id="1001", device="PJSIP/1001")
        assert reply["error"]["code"] == "forbidden"
        assert h.registry.get("1001").state.value == "logged_out"


async def test_oversized_and_binary_frames() -> None:
    async with running({"max_message_bytes": 1024}) as h:
        ws = await h.ws("sup")
        await ws.send_json({"op": "subscribe", "req_id": 1, "types": ["call.offered"] * 200})
        reply = await recv(ws)
        assert (reply["type"], reply["error"]["code"]) == ("error", "too_large")
        await ws.send_bytes(b'{"op": "subscribe", "req_id": 2}')
        assert (await recv(ws))["error"]["code"] == "bad_request"
        assert (await request(ws, "subscribe", 3))["type"] == "ack"
        await ws.send_str("x" * 5000)  # past the hard limit (4 x max_message_bytes): aiohttp closes
        assert await close_code(ws) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


# --------------------------------------------------------------------------- resume


async def resume(ws: aiohttp.ClientWebSocketResponse, after_seq: int, req_id: object = "r",
                 **filters: Any) -> tuple[list[int], dict[str, Any]]:
    """Send resume; return the replayed seqs (everything before the ack) and the ack."""
    await ws.send_json({"op": "resume", "req_id": req_id, "after_seq": after_seq, **filters})
    replayed: list[int] = []
    while True:
        msg = await recv(ws)
        if msg.get("type") in ("ack", "error"):
            return replayed, msg
        replayed.append(msg["seq"])


async def test_resume_is_gap_free_across_a_forced_disconnect() -> None:
    async with running() as h:
        ws1 = await subscribed(h, "sup")
        first = [h.publish("call.started", "acme", call_id=f"c{i}").seq for i in range(3)]
        assert await seqs(ws1, 3) == first
        last_seen = first[-1]
        # The network drops: no close handshake.
        ws1.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        assert await close_code(ws1) != aiohttp.WSCloseCode.OK
        # Events go on while the client is away, for it and for others.
        away = []
        for i in range(6):
            tenant = "globex" if i % 3 == 2 else "acme"
            event = h.publish("call.offered", tenant, agent_id="1001" if i % 2 else None, call_id=f"d{i}")
            if tenant == "acme":
                away.append(event.seq)
        h.registry.login("1002", "PJSIP/1002")
        away.append(h.bus.last_seq)
        # During the replay: two events the replay also returns (overlap with the live
        # queue) and one published after the replay read (live only).
        overlap: list[int] = []
        late: list[int] = []
        h.bus.before_read = lambda: overlap.extend(h.publish("call.ended", "acme", call_id=f"o{i}").seq
                                                   for i in range(2))
        h.bus.after_read = lambda: late.append(h.publish("call.ended", "acme", call_id="late").seq)
        ws2 = await h.ws("sup")
        replayed, ack = await resume(ws2, last_seen)
        assert replayed == away + overlap, "everything after the last seen seq, in order"
        assert (ack["type"], ack["replayed"], ack["last_seq"]) == ("ack", len(away) + 2, overlap[-1])
        live = [h.publish("call.started", "acme", call_id="live").seq]
        received = await seqs(ws2, 2)
        assert received == late + live, "the live stream continues with no duplicate"
        assert await marker(h, ws2) == [], "and nothing else arrives"
        everything = first + replayed + received
        assert len(everything) == len(set(everything))
        assert everything == sorted(everything)
        expected = [e.seq for e in h.events() if e.tenant == "acme" and e.seq <= received[-1]]
        assert everything == expected, "exactly the tenant's events, no gap"


async def test_resume_for_an_agent_replays_only_its_own_events() -> None:
    async with running() as h:
        h.registry.login("1001", "PJSIP/1001")
        h.publish("call.offered", "acme", agent_id="1002")
        pop = h.publish("call.offered", "acme", agent_id="1001")
        h.publish("call.started", "acme")
        ws = await h.ws("agent-1001")
        replayed, ack = await resume(ws, 0)
        assert replayed == [1, pop.seq]
        assert ack["replayed"] == 2


async def test_resume_pages_through_a_long_replay() -> None:
    async with running({"ws_queue": 10}) as h:
        total = REPLAY_PAGE * 2 + 500
        for i in range(total):
            h.publish("call.started", "acme", call_id=f"c{i}")
        ws = await h.ws("sup")
        replayed, ack = await resume(ws, 0, types=["call.started"])
        assert replayed == list(range(1, total + 1))
        assert ack["replayed"] == total
        assert h.bus.replays == 3


async def test_resume_from_the_future_still_gets_the_live_stream() -> None:
    async with running() as h:
        h.publish("call.started", "acme")
        ws = await h.ws("sup")
        replayed, ack = await resume(ws, 500)
        assert (replayed, ack["replayed"]) == ([], 0)
        live = h.publish("call.started", "acme")
        assert await seqs(ws, 1) == [live.seq]


async def test_resume_once_streaming_is_refused() -> None:
    async with running() as h:
        ws = await subscribed(h, "sup")
        _, reply = await resume(ws, 0)
        assert reply["error"]["code"] == "already_streaming"


async def test_a_failed_replay_is_an_error_and_can_be_retried() -> None:
    async with running() as h:
        h.publish("call.started", "acme")

        def fail() -> None:
            raise RuntimeError("outbox unavailable")

        h.bus.before_read = fail
        ws = await h.ws("sup")
        _, reply = await resume(ws, 0)
        assert (reply["type"], reply["error"]["code"]) == ("error", "unavailable")
        replayed, ack = await resume(ws, 0, "again")
        assert (replayed, ack["type"]) == ([1], "ack")


# --------------------------------------------------------------------------- slow clients


async def test_a_slow_client_is_closed_1008_and_never_blocks_the_others() -> None:
    async with running({"ws_queue": 10}) as h:
        fast = await subscribed(h, "sup")
        slow = await subscribed(h, "admin")  # then never reads
        blob = "x" * 32768
        sent = 0
        while h.server.hub.slow_drops == 0:
            assert sent < 3000, "the slow client was never dropped"
            event = h.publish("call.offered", "acme", data={"blob": blob})
            sent += 1
            assert await seqs(fast, 1) == [event.seq], "the fast client keeps up, one event at a time"
        assert h.server.hub.slow_drops == 1
        after = [h.publish("call.offered", "acme", data={"n": i}).seq for i in range(3)]
        assert await seqs(fast, 3) == after, "the others keep receiving"
        # The slow client, reading at last, finds the policy close after what was written.
        assert await close_code(slow, timeout=20) == aiohttp.WSCloseCode.POLICY_VIOLATION
        async with h.session.get(h.url + "/metrics") as resp:
            assert "ctid_ws_slow_client_drops_total 1.0" in await resp.text()
        assert h.server.hub.streaming == 1


# --------------------------------------------------------------------------- fan-out bookkeeping, randomised

#: Who each token is (role, tenant, agent_id): the test's own model of scope.
FANOUT_PRINCIPALS: dict[str, tuple[str, str | None, str | None]] = {
    "admin": ("admin", None, None),
    "sup": ("supervisor", "acme", None),
    "sup-globex": ("supervisor", "globex", None),
    "int": ("integration", "acme", None),
    "agent-1001": ("agent", "acme", "1001"),
    "agent-1002": ("agent", "acme", "1002"),
    "agent-2001": ("agent", "globex", "2001"),
}
FANOUT_TOKENS = {**TOKENS, "agent-1002": "tok-agent-1002-f00d"}
FANOUT_TYPES = ("call.offered", "call.started", "call.ended", "queue.stats")
FANOUT_QUEUES = {None: ("support", "sales"), "acme": ("support",), "globex": ("sales",)}
FANOUT_AGENTS = {None: ("1001", "1002", "2001"), "acme": ("1001", "1002"), "globex": ("2001",)}
_Wanted = dict[str, list[str] | None]


def _fanout_sees(who: str, event: Event) -> bool:
    role, tenant, agent_id = FANOUT_PRINCIPALS[who]
    if role == "admin":
        return True
    if event.tenant != tenant:
        return False
    return role != "agent" or event.agent_id == agent_id


def _fanout_matches(filters: _Wanted, event: Event) -> bool:
    return all(filters[name] is None or value in (filters[name] or ())
               for name, value in (("types", event.type), ("queues", event.queue), ("agent_ids", event.agent_id)))


class _FanoutClient:
    """One websocket client: a reader task records every pushed seq in arrival order and
    settles the acks; ``history`` is what each ack said: from which seq on (``last_seq``
    + 1) which filters hold."""

    def __init__(self, name: int, who: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.name, self.who, self.ws = name, who, ws
        self.received: list[int] = []
        self.history: list[tuple[int, _Wanted]] = []
        self.filters: _Wanted = {}  # the last ones sent
        self.pending: dict[int, tuple[asyncio.Future[dict[str, Any]], _Wanted]] = {}
        self.closed_after: int | None = None  # bus.last_seq when the client left
        self.problems: list[str] = []
        self._req = 0
        self._sends: list[asyncio.Task[None]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                self.problems.append(f"unexpected frame {msg.type}")
                continue
            data = msg.json()
            if data.get("type") == "ack" and data.get("req_id") in self.pending:
                future, filters = self.pending.pop(data["req_id"])
                self.history.append((data["last_seq"], filters))
                future.set_result(data)
            elif "seq" in data:
                self.received.append(data["seq"])
            else:
                self.problems.append(f"unexpected message {data}")

    def subscribe(self, filters: _Wanted) -> asyncio.Future[dict[str, Any]]:
        """Send ``subscribe`` without waiting for its ack (the acks settle in order)."""
        self._req += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[self._req] = (future, filters)
        self.filters = filters
        body = {name: value for name, value in filters.items() if value is not None}
        self._sends.append(asyncio.create_task(self.ws.send_json({"op": "subscribe", "req_id": self._req, **body})))
        return future

    async def settled(self) -> None:
        async with asyncio.timeout(10):
            for send in self._sends:
                await send
            for future, _ in list(self.pending.values()):
                await future

    def expected(self, published: list[Event]) -> list[int]:
        """The seqs this client may see and asked for: each event under the filters of
        the last subscribe acknowledged before it was published."""
        out = []
        for event in published:
            if self.closed_after is not None and event.seq > self.closed_after:
                break
            filters = None
            for last_seq, wanted in self.history:
                if last_seq < event.seq:
                    filters = wanted
            if filters is not None and _fanout_sees(self.who, event) and _fanout_matches(filters, event):
                out.append(event.seq)
        return out


def _fanout_filters(rng: random.Random, who: str) -> _Wanted:
    role, tenant, agent_id = FANOUT_PRINCIPALS[who]

    def some(choices: tuple[str, ...]) -> list[str] | None:
        if rng.random() < 0.5:
            return None
        return sorted(rng.sample(choices, rng.randint(1, len(choices))))

    key = None if role == "admin" else tenant
    return {"types": some(FANOUT_TYPES), "queues": some(FANOUT_QUEUES[key]),
            "agent_ids": some((agent_id,) if agent_id is not None else FANOUT_AGENTS[key])}


@pytest.mark.parametrize(("seed", "pump_chunk"), [(20261201, PUMP_CHUNK), (7, 16)])
async def test_randomised_fanout_gives_each_client_exactly_its_events_in_order(
        monkeypatch: pytest.MonkeyPatch, seed: int, pump_chunk: int) -> None:
    """Clients of every kind of principal join, leave and change filters while events
    go through the real bus; each gets exactly the events it may see and asked for (the
    filters of its last acknowledged subscribe), in seq order, once. A small pump chunk
    makes every rotation span many loop iterations, so joins, leaves, refilters and new
    events land in the middle of rotations."""
    monkeypatch.setattr(websocket, "PUMP_CHUNK", pump_chunk)
    rng = random.Random(seed)
    extra = [{"name": "agent-1002", "role": "agent", "tenant": "acme", "agent_id": "1002",
              "token_sha256": sha256(FANOUT_TOKENS["agent-1002"])}]
    async with running(extra_tokens=extra) as h:
        hub = h.server.hub
        # Its own session: the harness's pools 100 connections, fewer than the clients.
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                        timeout=aiohttp.ClientTimeout(total=20))
        clients: list[_FanoutClient] = []
        published: list[Event] = []
        who_names = sorted(FANOUT_PRINCIPALS)

        async def join() -> _FanoutClient:
            who = rng.choice(who_names)
            ws = await session.ws_connect(h.url + "/ws", headers={"Authorization": f"Bearer {FANOUT_TOKENS[who]}"})
            client = _FanoutClient(len(clients), who, ws)
            clients.append(client)
            client.subscribe(_fanout_filters(rng, who))
            return client

        def publish() -> None:
            tenant = rng.choice(("acme", "acme", "globex", None))
            published.append(h.publish(rng.choice(FANOUT_TYPES), tenant,
                                       agent_id=rng.choice((None, "1001", "1002", "2001")),
                                       queue=rng.choice((None, "support", "sales")),
                                       call_id=f"c{len(published)}"))

        try:
            for _ in range(120):
                await join()
            for _ in range(1200):
                live = [c for c in clients if c.closed_after is None]
                action = rng.random()
                if action < 0.55:
                    for _ in range(rng.randint(1, 4)):
                        publish()
                elif action < 0.75:
                    client = rng.choice(live)
                    client.subscribe(_fanout_filters(rng, client.who))
                elif action < 0.85:
                    await join()
                elif action < 0.93 and len(live) > 60:
                    client = rng.choice(live)
                    await client.settled()  # its filters' boundaries are known
                    client.closed_after = h.bus.last_seq
                    await client.ws.close()
                for _ in range(rng.choice((0, 0, 1, 2, 5))):
                    await asyncio.sleep(0)  # let the server read, the pump write, in between
            live = [c for c in clients if c.closed_after is None]
            # A last subscribe (same filters) on each: its ack is written after every
            # event offered before it, so once it is in, nothing is still on the way.
            for client in live:
                client.subscribe(client.filters)
            for client in live:
                await client.settled()
            assert hub.streaming == len(live)
            assert hub.slow_drops == 0

            total = 0
            for client in clients:
                got, want = client.received, client.expected(published)
                assert not client.problems, (client.name, client.who, client.problems)
                assert len(got) == len(set(got)), f"client {client.name} ({client.who}): duplicates"
                assert got == sorted(got), f"client {client.name} ({client.who}): out of seq order"
                if client.closed_after is None:
                    assert got == want, f"client {client.name} ({client.who}): gap or extra events"
                else:
                    # It left: what it got is where the stream was when it closed, and at
                    # least everything offered before its last ack.
                    assert got == want[:len(got)], f"client {client.name} ({client.who}): wrong events"
                    acked = client.history[-1][0]
                    assert [s for s in want if s <= acked] == [s for s in got if s <= acked]
                total += len(got)
            assert len(clients) > 200 and len(published) > 1000
            assert sum(c.closed_after is not None for c in clients) > 50
            assert sum(len(c.history) > 2 for c in clients) > 50, "many clients changed filters"
            assert total > 10 * len(published), "the events reached many clients"
            assert {c.who for c in clients if c.received} == set(FANOUT_PRINCIPALS)
        finally:
            for client in clients:
                await client.ws.close()
                client.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await client.reader
            await session.close()
        # Every connection gone: the index holds no audience, scope or log any more.
        async with asyncio.timeout(10):
            while len(hub) or hub.streaming:  # noqa: ASYNC110 - the server's handlers unregister as they end
                await asyncio.sleep(0.01)
        assert (hub._admins, hub._tenants, hub._agents, hub._active) == ({}, {}, {}, {})
