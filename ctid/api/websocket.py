"""The websocket at ``/ws``: live events for desktops, resume without gaps, agent commands.

The protocol is documented for client authors in ``docs/websocket.md``. In short:
every client message is ``{"op": ..., "req_id": ..., ...}`` and gets exactly one
``{"type": "ack", "req_id": ..., ...}`` or ``{"type": "error", "req_id": ...,
"error": {"code", "message"}}``; server pushes are event envelopes
(``ctid.events.schema``). Nothing is pushed until the client sends ``subscribe``
(live from now) or ``resume`` (everything after a ``seq`` it saw, then live).

Fan-out
    :class:`EventHub` is the one sink this module adds to the bus. The bus calls
    :meth:`EventHub.offer` synchronously, in ``seq`` order, with the payload it
    serialised once; the hub appends that same string to the bounded send queue
    (``APIConfig.ws_queue``) of each connection that may see the event and wants it,
    and returns. Each connection has its own writer task that drains its queue, so a
    slow client only fills its own queue. When a queue is full the hub drops the
    client at once: it leaves the index, and its connection is closed with 1008
    (the close frame goes out after what was already written; if the client does not
    answer within the close timeout its TCP connection is aborted).

Resume without a gap or a duplicate
    The connection joins the hub *first*, so every event published from then on is
    queued for it, while its writer is held. Then it replays from the bus, page by
    page, everything after ``after_seq`` that it may see, up to at least the bus's
    ``last_seq`` at the moment it joined. Events published during the replay may be
    both replayed and queued; the writer, once released, drops queued events whose
    ``seq`` is not above the last replayed one. So the client receives each event
    once, in ``seq`` order. (This relies on the bus's ``replay`` including events
    not yet committed to the outbox.)

Scope (:class:`ctid.api.auth.Principal`): an agent receives only events that carry its
``agent_id`` (its pops, its state); supervisors and integrations every event of their
tenant; admins everything. Filters from ``subscribe``/``resume`` narrow that further,
never widen it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from ctid.agents import AgentRegistry
from ctid.api.auth import Authenticator, AuthError, Principal, Role
from ctid.api.commands import CALL_OPS, COMMANDS, AgentCommands, ApiError, CallCommands
from ctid.asterisk.safety import UnsafeValueError, check_id
from ctid.config import APIConfig, QueueConfig
from ctid.events.schema import EVENT_TYPES, Event, format_ts

__all__ = ["HEARTBEAT_S", "REPLAY_PAGE", "Connection", "EventHub", "Filters", "ReplayBus", "WebsocketEndpoint"]

log = structlog.get_logger(__name__)

HEARTBEAT_S: Final = 30.0
#: Events asked of ``bus.replay`` at a time during a resume.
REPLAY_PAGE: Final = 1000
#: aiohttp closes the connection (1009) on frames above this many times
#: ``max_message_bytes``; frames between the two get a JSON ``too_large`` error.
_HARD_FRAME_FACTOR: Final = 4
_MAX_REQ_ID: Final = 128

Clock = Callable[[], datetime]


class ReplayBus(Protocol):
    """What the API needs from ``ctid.events.bus.EventBus``."""

    def add_sink(self, sink: EventHub) -> None: ...

    def remove_sink(self, sink: EventHub) -> None: ...

    async def replay(self, after_seq: int, *, limit: int = 1000, tenant: str | None = None,
                     agent_id: str | None = None, types: list[str] | None = None,
                     call_id: str | None = None) -> list[Event]: ...

    @property
    def last_seq(self) -> int: ...


def _dumps(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Filters:
    """What a client asked for, inside its scope. None: no restriction."""

    types: frozenset[str] | None = None
    queues: frozenset[str] | None = None
    agent_ids: frozenset[str] | None = None

    def match(self, event: Event) -> bool:
        return ((self.types is None or event.type in self.types)
                and (self.queues is None or event.queue in self.queues)
                and (self.agent_ids is None or event.agent_id in self.agent_ids))

    def as_json(self) -> dict[str, list[str] | None]:
        return {name: None if value is None else sorted(value)
                for name, value in (("types", self.types), ("queues", self.queues), ("agent_ids", self.agent_ids))}


@dataclass(eq=False)
class Connection:
    """One websocket client: who it is, what it wants, and its bounded send queue."""

    ws: web.WebSocketResponse
    queue_size: int
    client: str
    principal: Principal | None = None
    filters: Filters = Filters()
    streaming: bool = False
    #: Queued events with a ``seq`` up to this were replayed already (resume).
    floor: int = 0
    queue: asyncio.Queue[tuple[int, bytes]] = field(init=False)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when the connection must close: (code, reason).
    closing: asyncio.Future[tuple[int, bytes]] = field(init=False)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    expiry: asyncio.TimerHandle | None = None

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(self.queue_size)
        self.closing = asyncio.get_running_loop().create_future()

    def wants(self, event: Event) -> bool:
        return self.principal is not None and self.principal.sees(event) and self.filters.match(event)

    def push(self, seq: int, payload: bytes) -> bool:
        """Queue an event without waiting; False when the queue is full."""
        try:
            self.queue.put_nowait((seq, payload))
        except asyncio.QueueFull:
            return False
        return True

    def transport(self) -> asyncio.Transport | None:
        """The socket to write frames on directly, when the fast path may be used: the
        connection is streaming live (not replaying), nothing is queued before this
        event, and the socket is open. None sends the event through the queue."""
        if not self.released.is_set() or not self.queue.empty():
            return None
        writer = getattr(self.ws, "_writer", None)
        transport = getattr(writer, "transport", None)
        if transport is None or transport.is_closing():
            return None
        return transport  # type: ignore[no-any-return]

    def close_soon(self, code: int, reason: bytes) -> None:
        if not self.closing.done():
            self.closing.set_result((code, reason))

    async def write_loop(self) -> None:
        await self.released.wait()
        while True:
            seq, payload = await self.queue.get()
            if seq <= self.floor:
                continue  # already sent by the resume replay
            try:
                await self.ws.send_frame(payload, WSMsgType.TEXT)
            except ConnectionError:
                return


def _text_frame(data: bytes) -> bytes:
    """An unmasked, final text frame (RFC 6455 5.2): server frames are the same bytes
    for every client."""
    n = len(data)
    if n < 126:
        return bytes((0x81, n)) + data
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + data
    return struct.pack("!BBQ", 0x81, 127, n) + data


class EventHub:
    """The websocket fan-out: one bus sink, indexed by scope so an event visits only
    the connections that may see it."""

    name = "websocket"

    def __init__(self) -> None:
        self._open: set[Connection] = set()
        self._admins: set[Connection] = set()
        self._tenants: dict[str, set[Connection]] = {}
        self._agents: dict[str, set[Connection]] = {}
        self.slow_drops = 0
        self.delivered = 0

    def __len__(self) -> int:
        return len(self._open)

    @property
    def streaming(self) -> int:
        return len(self._admins) + sum(map(len, self._tenants.values())) + sum(map(len, self._agents.values()))

    def offer(self, event: Event, payload: str) -> None:
        """Called by the bus for each event, in ``seq`` order; never blocks.

        The payload is encoded once, and the websocket frame built once, for every
        client. A client that is streaming live with nothing queued gets the frame
        written to its socket at once (no task switch per client per event); the others
        get it through their bounded queue. A client is slow, and closed with 1008, when
        its queue is full or its socket holds more than ``queue_size`` KiB unsent."""
        dropped: list[Connection] = []
        data = payload.encode("utf-8")
        frame: bytes | None = None
        for group in self._groups(event):
            for conn in group:
                if not conn.wants(event):
                    continue
                transport = conn.transport()
                if transport is not None:
                    if transport.get_write_buffer_size() > conn.queue_size * 1024:
                        dropped.append(conn)
                        continue
                    if frame is None:
                        frame = _text_frame(data)
                    transport.write(frame)
                    self.delivered += 1
                elif conn.push(event.seq, data):
                    self.delivered += 1
                else:
                    dropped.append(conn)
        for conn in dropped:
            self._drop_slow(conn)
        return None

    def _groups(self, event: Event) -> list[set[Connection]]:
        groups = [self._admins]
        if event.tenant is not None and event.tenant in self._tenants:
            groups.append(self._tenants[event.tenant])
        if event.agent_id is not None and event.agent_id in self._agents:
            groups.append(self._agents[event.agent_id])
        return groups

    def register(self, conn: Connection) -> None:
        self._open.add(conn)

    def unregister(self, conn: Connection) -> None:
        self.stop_stream(conn)
        self._open.discard(conn)

    def start_stream(self, conn: Connection) -> None:
        """From now on, events ``conn`` may see are queued for it."""
        principal = conn.principal
        assert principal is not None, "only authenticated connections stream"
        conn.streaming = True
        self._group_of(principal).add(conn)

    def stop_stream(self, conn: Connection) -> None:
        if not conn.streaming or conn.principal is None:
            return
        conn.streaming = False
        principal = conn.principal
        group = self._group_of(principal)
        group.discard(conn)
        if not group and group is not self._admins:
            if principal.role is Role.AGENT:
                self._agents.pop(principal.agent_id or "", None)
            else:
                self._tenants.pop(principal.tenant or "", None)

    def _group_of(self, principal: Principal) -> set[Connection]:
        if principal.role is Role.ADMIN:
            return self._admins
        if principal.role is Role.AGENT:
            return self._agents.setdefault(principal.agent_id or "", set())
        return self._tenants.setdefault(principal.tenant or "", set())

    def _drop_slow(self, conn: Connection) -> None:
        self.stop_stream(conn)
        self.slow_drops += 1
        log.warning("ws.slow_client_dropped", client=conn.client,
                    principal=conn.principal.name if conn.principal else None, queue=conn.queue_size)
        conn.close_soon(WSCloseCode.POLICY_VIOLATION, b"slow consumer: send queue overflowed")

    async def close_all(self, timeout: float) -> None:
        """Close every connection with 1001 and wait (bounded) until their handlers end."""
        conns = list(self._open)
        for conn in conns:
            conn.close_soon(WSCloseCode.GOING_AWAY, b"server shutting down")
        if conns:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    for conn in conns:
                        await conn.finished.wait()


class WebsocketEndpoint:
    """The ``GET /ws`` handler."""

    def __init__(self, *, auth: Authenticator, bus: ReplayBus, hub: EventHub, registry: AgentRegistry,
                 commands: AgentCommands, api: APIConfig, queues: list[QueueConfig], clock: Clock,
                 auth_timeout: float = 5.0, close_timeout: float = 5.0, calls: CallCommands | None = None) -> None:
        self._auth = auth
        self._calls = calls
        self._bus = bus
        self._hub = hub
        self._registry = registry
        self._commands = commands
        self._max_bytes = api.max_message_bytes
        self._queue_size = api.ws_queue
        self._queues = {q.id: q for q in queues}
        self._clock = clock
        self.auth_timeout = auth_timeout
        self.close_timeout = close_timeout

    async def handle(self, request: web.Request) -> web.StreamResponse:
        principal: Principal | None = None
        header = request.headers.get("Authorization")
        if header is not None:
            try:
                principal = self._auth.bearer(header)
            except AuthError as exc:
                raise ApiError(401, "unauthorized", str(exc)) from None
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, compress=False, timeout=self.close_timeout,
                                   max_msg_size=self._max_bytes * _HARD_FRAME_FACTOR)
        if not ws.can_prepare(request).ok:
            raise ApiError.bad_request("GET /ws expects a websocket upgrade")
        await ws.prepare(request)
        conn = Connection(ws, self._queue_size, request.remote or "unknown")
        if principal is not None:
            self._authenticated(conn, principal)
        self._hub.register(conn)
        reader = asyncio.create_task(self._read_loop(conn), name="ws-reader")
        writer = asyncio.create_task(conn.write_loop(), name="ws-writer")
        try:
            waiters: set[asyncio.Future[Any]] = {reader, writer, conn.closing}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._hub.unregister(conn)
            if conn.expiry is not None:
                conn.expiry.cancel()
            for task in (reader, writer):
                task.cancel()
            for task in (reader, writer):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            code, reason = conn.closing.result() if conn.closing.done() else (WSCloseCode.OK, b"")
            await self._close(ws, request, code, reason)
            conn.finished.set()
        return ws

    async def _close(self, ws: web.WebSocketResponse, request: web.Request, code: int, reason: bytes) -> None:
        # close() waits (``close_timeout``) for the client's close frame; a stalled
        # client never sends it, and asyncio would keep its unsent buffer forever on a
        # plain transport close, so a policy close ends with an abort.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.close_timeout + 1):
                await ws.close(code=code, message=reason, drain=False)
        if code == WSCloseCode.POLICY_VIOLATION and request.transport is not None:
            request.transport.abort()

    def _authenticated(self, conn: Connection, principal: Principal) -> None:
        conn.principal = principal
        if principal.expires_at is not None:
            delay = max(0.0, (principal.expires_at - self._clock()).total_seconds())
            conn.expiry = asyncio.get_running_loop().call_later(
                delay, conn.close_soon, WSCloseCode.POLICY_VIOLATION, b"session expired")
        log.info("ws.authenticated", client=conn.client, principal=principal.name, role=principal.role.value)

    # -- reading -------------------------------------------------------------------------

    async def _read_loop(self, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.auth_timeout
        ws = conn.ws
        while True:
            timeout: float | None = None
            if conn.principal is None:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    await self._auth_timed_out(conn)
                    return
            try:
                msg = await ws.receive(timeout=timeout)
            except TimeoutError:
                await self._auth_timed_out(conn)
                return
            if msg.type is WSMsgType.TEXT:
                await self._on_text(conn, msg.data)
            elif msg.type is WSMsgType.BINARY:
                await self._error(conn, None, ApiError.bad_request("text frames only: JSON messages"))
            else:  # CLOSE, CLOSING, CLOSED, ERROR (a frame over the hard limit)
                return
            if conn.closing.done():
                return

    async def _auth_timed_out(self, conn: Connection) -> None:
        await self._error(conn, None, ApiError(401, "unauthorized",
                                               f"not authenticated within {self.auth_timeout:g} s"))
        conn.close_soon(WSCloseCode.POLICY_VIOLATION, b"authentication timeout")

    async def _send(self, conn: Connection, obj: Mapping[str, Any]) -> None:
        with contextlib.suppress(ConnectionError):
            await conn.ws.send_str(_dumps(obj))

    async def _ack(self, conn: Connection, req_id: object, op: str, **fields: Any) -> None:
        await self._send(conn, {"type": "ack", "req_id": req_id, "op": op, **fields})

    async def _error(self, conn: Connection, req_id: object, error: ApiError) -> None:
        await self._send(conn, {"type": "error", "req_id": req_id, "error": error.error()})

    async def _on_text(self, conn: Connection, data: str) -> None:
        if len(data) > self._max_bytes or len(data.encode("utf-8")) > self._max_bytes:
            await self._error(conn, None, ApiError(413, "too_large",
                                                   f"message larger than {self._max_bytes} bytes"))
            return
        try:
            obj = json.loads(data)
        except ValueError as exc:
            await self._error(conn, None, ApiError(400, "bad_json", f"malformed JSON: {exc}"))
            return
        if not isinstance(obj, dict):
            await self._error(conn, None, ApiError.bad_request("a message is a JSON object"))
            return
        req_id = obj.get("req_id")
        if not _valid_req_id(req_id):
            await self._error(conn, None, ApiError.bad_request(
                f"req_id is required: a string (at most {_MAX_REQ_ID} characters) or an integer", field="req_id"))
            return
        op = obj.get("op")
        try:
            if not isinstance(op, str):
                raise ApiError.bad_request("op is required (a string)", field="op")
            principal = conn.principal
            if op == "auth":
                await self._op_auth(conn, req_id, obj)
                return
            if principal is None:
                if op not in _OPS:
                    raise ApiError(400, "unknown_op", f"unknown op {op!r}")
                raise ApiError(401, "unauthorized", "send {\"op\": \"auth\"} first")
            if principal.expired(self._clock()):
                conn.close_soon(WSCloseCode.POLICY_VIOLATION, b"session expired")
                raise ApiError(401, "unauthorized", "session expired")
            if op == "subscribe":
                await self._op_subscribe(conn, req_id, obj, principal)
            elif op == "resume" and "call_id" not in obj:  # with call_id: resume a held call
                await self._op_resume(conn, req_id, obj, principal)
            elif op in COMMANDS:
                await self._op_command(conn, req_id, op, obj, principal)
            elif op in CALL_OPS:
                await self._op_call(conn, req_id, op, obj, principal)
            else:
                raise ApiError(400, "unknown_op", f"unknown op {op!r} (one of {', '.join(_OPS)})")
        except ApiError as exc:
            await self._error(conn, req_id, exc)

    # -- ops ---------------------------------------------------------------------------------

    async def _op_auth(self, conn: Connection, req_id: object, obj: Mapping[str, Any]) -> None:
        if conn.principal is not None:
            raise ApiError.bad_request("already authenticated")
        token = obj.get("token")
        if not isinstance(token, str) or not token:
            raise ApiError.bad_request("auth: 'token' is required (a string)", field="token")
        try:
            principal = self._auth.authenticate(token)
        except AuthError as exc:
            log.warning("ws.auth_failed", client=conn.client, reason=str(exc))
            await self._error(conn, req_id, ApiError(401, "unauthorized", str(exc)))
            conn.close_soon(WSCloseCode.POLICY_VIOLATION, b"authentication failed")
            return
        self._authenticated(conn, principal)
        await self._ack(conn, req_id, "auth", **_whoami(principal))

    def _filters(self, obj: Mapping[str, Any], principal: Principal) -> Filters:
        types = _str_set(obj, "types")
        if types is not None:
            unknown = sorted(types - EVENT_TYPES)
            if unknown:
                raise ApiError.bad_request(f"unknown event type {unknown[0]!r}", field="types")
        queues = _str_set(obj, "queues")
        for queue_id in sorted(queues or ()):
            queue = self._queues.get(queue_id)
            if queue is None:
                raise ApiError.bad_request(f"unknown queue {queue_id!r}", field="queues")
            if not principal.may_read_tenant(queue.tenant):
                raise ApiError.forbidden(f"queue {queue_id!r} is not in your tenant")
        agent_ids = _str_set(obj, "agent_ids")
        for agent_id in sorted(agent_ids or ()):
            if principal.role is Role.AGENT and agent_id != principal.agent_id:
                raise ApiError.forbidden("an agent may subscribe only to itself")
            if agent_id not in self._registry:
                raise ApiError.bad_request(f"unknown agent {agent_id!r}", field="agent_ids")
            if not principal.sees_agent(agent_id, self._registry.get(agent_id).tenant):
                raise ApiError.forbidden(f"agent {agent_id!r} is not in your tenant")
        return Filters(types, queues, agent_ids)

    async def _op_subscribe(self, conn: Connection, req_id: object, obj: Mapping[str, Any],
                            principal: Principal) -> None:
        _only(obj, "subscribe", {"types", "queues", "agent_ids"})
        conn.filters = self._filters(obj, principal)
        if not conn.streaming:
            self._hub.start_stream(conn)
            conn.released.set()
        await self._ack(conn, req_id, "subscribe", last_seq=self._bus.last_seq, filters=conn.filters.as_json())

    async def _op_resume(self, conn: Connection, req_id: object, obj: Mapping[str, Any],
                         principal: Principal) -> None:
        _only(obj, "resume", {"after_seq", "types", "queues", "agent_ids"})
        after_seq = obj.get("after_seq")
        if not isinstance(after_seq, int) or isinstance(after_seq, bool) or after_seq < 0:
            raise ApiError.bad_request("resume: 'after_seq' is required (an integer >= 0)", field="after_seq")
        if conn.streaming:
            raise ApiError(409, "already_streaming", "the stream has started; reconnect to resume")
        filters = self._filters(obj, principal)
        conn.filters = filters
        # Join the live stream first (writer held), then replay: see the module docstring.
        mark = self._bus.last_seq
        self._hub.start_stream(conn)
        tenant = None if principal.role is Role.ADMIN else principal.tenant
        agent_id = principal.agent_id if principal.role is Role.AGENT else None
        if agent_id is None and filters.agent_ids is not None and len(filters.agent_ids) == 1:
            agent_id = next(iter(filters.agent_ids))
        types = sorted(filters.types) if filters.types is not None else None
        after, replayed = after_seq, 0
        try:
            while True:
                page = await self._bus.replay(after, limit=REPLAY_PAGE, tenant=tenant, agent_id=agent_id, types=types)
                for event in page:
                    if event.seq > after_seq and conn.wants(event):
                        await conn.ws.send_str(event.to_json())
                        replayed += 1
                if page:
                    after = max(after, page[-1].seq)
                if len(page) < REPLAY_PAGE or after >= mark:
                    break
        except ConnectionError:
            conn.close_soon(WSCloseCode.GOING_AWAY, b"")
            return
        except Exception:
            log.exception("ws.replay_failed", client=conn.client, after_seq=after_seq)
            self._hub.stop_stream(conn)
            while not conn.queue.empty():
                conn.queue.get_nowait()
            raise ApiError(503, "unavailable", "replay failed; try resume again") from None
        conn.floor = after if after > after_seq else 0
        await self._ack(conn, req_id, "resume", replayed=replayed, last_seq=max(after, mark),
                        filters=filters.as_json())
        conn.released.set()

    async def _op_command(self, conn: Connection, req_id: object, op: str, obj: Mapping[str, Any],
                          principal: Principal) -> None:
        agent_id = obj.get("agent_id", principal.agent_id)
        if not isinstance(agent_id, str):
            raise ApiError.bad_request(f"{op}: 'agent_id' is required (a string)", field="agent_id")
        try:
            check_id(agent_id, "agent_id")
        except UnsafeValueError as exc:
            raise ApiError.bad_request(str(exc), field="agent_id") from None
        params = {k: v for k, v in obj.items() if k not in ("op", "req_id", "agent_id")}
        agent = self._commands.run(principal, op, agent_id, params)
        await self._ack(conn, req_id, op, agent=agent.snapshot())


    async def _op_call(self, conn: Connection, req_id: object, op: str, obj: Mapping[str, Any],
                       principal: Principal) -> None:
        """Call control: ``{"op": "hold", "call_id": ...}``; ``dial`` takes ``agent_id``
        (default: the agent itself) and ``number``."""
        if self._calls is None:
            raise ApiError(503, "unavailable", "call control is not available")
        key = "agent_id" if op == "dial" else "call_id"
        target = obj.get(key, principal.agent_id if op == "dial" else None)
        if not isinstance(target, str) or not target:
            raise ApiError.bad_request(f"{op}: {key!r} is required (a string)", field=key)
        params = {k: v for k, v in obj.items() if k not in ("op", "req_id", key)}
        result = await self._calls.run(principal, op, target, params)
        await self._ack(conn, req_id, op, **result)


_OPS: Final = tuple(dict.fromkeys(("auth", "subscribe", "resume", *COMMANDS, *CALL_OPS)))


def _whoami(principal: Principal) -> dict[str, Any]:
    return {"role": principal.role.value, "tenant": principal.tenant, "agent_id": principal.agent_id,
            "expires_at": None if principal.expires_at is None else format_ts(principal.expires_at)}


def _valid_req_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and 0 < len(value) <= _MAX_REQ_ID


def _only(obj: Mapping[str, Any], op: str, allowed: set[str]) -> None:
    unknown = sorted(set(obj) - allowed - {"op", "req_id"})
    if unknown:
        raise ApiError.bad_request(f"{op}: unknown field {unknown[0]!r}", field=unknown[0])


def _str_set(obj: Mapping[str, Any], name: str) -> frozenset[str] | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(value) > 1000:
        raise ApiError.bad_request(f"{name!r} must be a list of strings", field=name)
    return frozenset(value)
