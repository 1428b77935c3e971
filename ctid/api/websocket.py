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
    serialised once; the hub encodes it and builds its websocket frame once, appends
    it to the log of each audience (the connections with the same principal and
    filters) that may see the event and wants it, and returns. The hub's pump then
    writes the frames to the sockets, a bounded number of connections per loop
    iteration, all the events a connection has not had yet in one write (see
    :class:`EventHub`). A connection that is caught up gets them on its socket
    directly; one that is not (its resume replay is running, or its queue is not
    empty) gets them through its bounded send queue (``APIConfig.ws_queue``), which
    its own writer task drains, so a slow client only fills its own queue. A client is
    slow when its queue is full, when more than ``ws_queue`` events wait for it in the
    log, or when more than ``ws_queue`` KiB sit unsent on its socket: the hub drops it
    at once: it leaves the index, and its connection is closed with 1008 (the close
    frame goes out after what was already written; if the client does not answer
    within the close timeout its TCP connection is aborted).

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

__all__ = ["HEARTBEAT_S", "PUMP_CHUNK", "REPLAY_PAGE", "Connection", "EventHub", "Filters", "ReplayBus",
           "WebsocketEndpoint"]

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
    #: The hub's group this connection streams in (while ``streaming``).
    audience: _Audience | None = field(default=None, repr=False)
    #: Position in the audience's log of the next event to send (see :class:`EventHub`).
    cursor: int = 0
    #: Unsent bytes in the socket's buffer above which the client is slow.
    max_unsent: int = field(init=False)
    _socket: asyncio.Transport | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(self.queue_size)
        self.closing = asyncio.get_running_loop().create_future()
        self.max_unsent = self.queue_size * 1024
        writer = getattr(self.ws, "_writer", None)  # set by prepare(): the connection's transport
        self._socket = getattr(writer, "transport", None)

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
        if not self.released.is_set() or self.queue.qsize():
            return None
        transport = self._socket
        if transport is None or transport.is_closing():
            return None
        return transport

    def deliver(self, batch: list[_Queued]) -> int | None:
        """Hand over events one by one (the hub's path for a connection that is not
        caught up, or whose resume replay overlaps the batch): the ones the replay sent
        already are skipped. Returns how many were handed over; None when the client is
        slow (its queue overflowed, or too much is unsent on its socket)."""
        transport = self.transport()
        handed = 0
        for seq, data, frame in batch:
            if transport is None:
                if not self.push(seq, data):
                    return None
            elif seq > self.floor:
                if transport.get_write_buffer_size() > self.max_unsent:
                    return None
                transport.write(frame)
            else:
                continue
            handed += 1
        return handed

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


#: An event on its way out: (seq, payload, the websocket frame of it).
_Queued = tuple[int, bytes, bytes]
_AudienceKey = tuple[Principal, Filters]
#: Connections the hub writes to before it lets the loop run other work again.
PUMP_CHUNK: Final = 256


class _Audience:
    """The connections that see exactly the same events (same principal, same filters),
    and the log of the events offered to them that some member may still need:
    ``log[i]`` is the event at position ``base + i``."""

    __slots__ = ("base", "filters", "log", "mark", "members", "principal")

    def __init__(self, principal: Principal, filters: Filters) -> None:
        self.principal = principal
        self.filters = filters
        self.members: dict[Connection, None] = {}  # insertion-ordered set
        self.log: list[_Queued] = []
        self.base = 0
        self.mark = 0  # the end of the log when the current rotation started

    def wants(self, event: Event) -> bool:
        return self.principal.sees(event) and self.filters.match(event)

    @property
    def end(self) -> int:
        return self.base + len(self.log)


class EventHub:
    """The websocket fan-out: one bus sink, indexed by scope so an event visits only
    the connections that may see it.

    Connections are grouped by scope (admins; a tenant; an agent), and within a scope
    by audience: the connections with the same principal and filters, which see the
    same events. :meth:`offer` decides once per audience whether it wants the event,
    appends it to the audience's log, and returns; it never touches a socket.

    The sockets are written by the pump: rotations over the members of the audiences
    with events logged, :data:`PUMP_CHUNK` connections per loop iteration
    (``call_soon``), so the loop never stops for longer than that many writes, whatever
    the number of clients. A visit writes the connection every event of its audience's
    log past its cursor, in one ``transport.write``. When the loop keeps up that is one
    event, sent at once; when a rotation over thousands of sockets takes longer than
    the gap between events, the events offered meanwhile share one write, so the
    number of socket writes per second stays near what the machine can do instead of
    growing with the event rate, and an event waits about one rotation at most (the
    time between two visits of a connection). A rotation starts when an event is
    offered and another follows while events came in during the last one; at its end,
    the log entries every member has passed are dropped."""

    name = "websocket"

    def __init__(self) -> None:
        self._open: set[Connection] = set()
        self._admins: dict[_AudienceKey, _Audience] = {}
        self._tenants: dict[str, dict[_AudienceKey, _Audience]] = {}
        self._agents: dict[str, dict[_AudienceKey, _Audience]] = {}
        self._streaming: dict[Connection, None] = {}
        self._active: dict[_Audience, None] = {}  # audiences whose log is not empty
        self._ring: list[Connection] = []  # the current rotation (members join it at the next one)
        self._pos = 0  # the next connection of the ring to visit
        self._offered = False  # an event came in during the current rotation
        self._pump: asyncio.Handle | None = None
        self.slow_drops = 0
        self.delivered = 0
        self.writes = 0

    def __len__(self) -> int:
        return len(self._open)

    @property
    def streaming(self) -> int:
        return len(self._streaming)

    def offer(self, event: Event, payload: str) -> None:
        """Called by the bus for each event, in ``seq`` order; never blocks.

        The payload is encoded once, and the websocket frame built once, for every
        client; the pump writes it out, starting in this loop iteration."""
        item: _Queued | None = None
        for scope in self._scopes(event):
            for audience in scope.values():
                if not audience.wants(event):
                    continue
                if item is None:
                    data = payload.encode("utf-8")
                    item = (event.seq, data, _text_frame(data))
                audience.log.append(item)
                self._active[audience] = None
        if item is not None:
            self._offered = True
            if self._pump is None:
                self._pump = asyncio.get_running_loop().call_soon(self._pump_step)
        return None

    def _pump_step(self) -> None:
        """Visit the next :data:`PUMP_CHUNK` connections of the rotation."""
        self._pump = None
        if self._pos == 0:  # a rotation starts: the members of the audiences with events logged
            self._ring = [conn for active in self._active for conn in active.members]
            for active in self._active:
                active.mark = active.end
            self._offered = False
        ring, start = self._ring, self._pos
        stop = min(len(ring), start + PUMP_CHUNK)
        dropped: list[Connection] = []
        # Neighbours in the ring mostly share an audience and a cursor: one join for them.
        last: tuple[_Audience | None, int, int] = (None, 0, 0)
        batch: list[_Queued] = []
        blob = b""
        delivered = writes = 0
        for index in range(start, stop):
            conn = ring[index]
            audience = conn.audience
            if audience is None:  # stopped streaming
                continue
            cursor, end = conn.cursor, audience.end
            if cursor >= end:
                continue
            if end - cursor > conn.queue_size:
                dropped.append(conn)
                continue
            if last != (audience, cursor, end):
                last = (audience, cursor, end)
                batch = audience.log[cursor - audience.base:]
                blob = batch[0][2] if len(batch) == 1 else b"".join([frame for _, _, frame in batch])
            conn.cursor = end
            transport = conn.transport()
            if transport is not None and conn.floor < batch[0][0]:
                if transport.get_write_buffer_size() > conn.max_unsent:
                    dropped.append(conn)
                    continue
                transport.write(blob)
                delivered += len(batch)
                writes += 1
                continue
            handed = conn.deliver(batch)
            if handed is None:
                dropped.append(conn)
            else:
                delivered += handed
        self.delivered += delivered
        self.writes += writes
        self._pos = stop
        for conn in dropped:
            self._drop_slow(conn)
        if stop < len(ring):
            self._pump = asyncio.get_running_loop().call_soon(self._pump_step)
            return
        # The rotation is over: every member has passed its audience's mark.
        self._pos = 0
        self._ring = []
        for audience in list(self._active):
            del audience.log[:max(0, audience.mark - audience.base)]
            audience.base = max(audience.base, audience.mark)
            if not audience.log:
                del self._active[audience]
        if self._offered:
            self._pump = asyncio.get_running_loop().call_soon(self._pump_step)

    def catch_up(self, conn: Connection) -> None:
        """Hand ``conn`` now what its audience logged for it and the pump has not sent
        yet: before a reply, so that it never overtakes an event offered before it."""
        audience = conn.audience
        if audience is None or conn.cursor >= audience.end:
            return
        batch = audience.log[conn.cursor - audience.base:]
        conn.cursor = audience.end
        handed = conn.deliver(batch)
        if handed is None:
            self._drop_slow(conn)
        else:
            self.delivered += handed

    def _scopes(self, event: Event) -> list[dict[_AudienceKey, _Audience]]:
        scopes = [self._admins]
        if event.tenant is not None and event.tenant in self._tenants:
            scopes.append(self._tenants[event.tenant])
        if event.agent_id is not None and event.agent_id in self._agents:
            scopes.append(self._agents[event.agent_id])
        return scopes

    def register(self, conn: Connection) -> None:
        self._open.add(conn)

    def unregister(self, conn: Connection) -> None:
        self.stop_stream(conn)
        self._open.discard(conn)

    def start_stream(self, conn: Connection) -> None:
        """From now on, events ``conn`` may see (and its filters select) are queued for it."""
        principal = conn.principal
        assert principal is not None, "only authenticated connections stream"
        scope = self._scope_of(principal)
        key = (principal, conn.filters)
        audience = scope.get(key)
        if audience is None:
            audience = scope[key] = _Audience(principal, conn.filters)
        audience.members[conn] = None
        conn.audience = audience
        conn.cursor = audience.end  # what was offered before now is not for ``conn``
        conn.streaming = True
        self._streaming[conn] = None

    def refilter(self, conn: Connection, filters: Filters) -> None:
        """New filters for ``conn``: for the events offered from now on (those offered
        before go out under the old ones)."""
        if not conn.streaming:
            conn.filters = filters
            return
        self.catch_up(conn)
        if not conn.streaming:  # dropped as slow on the way
            return
        self.stop_stream(conn)
        conn.filters = filters
        self.start_stream(conn)

    def stop_stream(self, conn: Connection) -> None:
        audience = conn.audience
        if not conn.streaming or audience is None:
            return
        conn.streaming = False
        conn.audience = None
        self._streaming.pop(conn, None)
        audience.members.pop(conn, None)
        if audience.members:
            return
        self._active.pop(audience, None)
        principal = audience.principal
        scope = self._scope_of(principal)
        scope.pop((principal, audience.filters), None)
        if not scope and scope is not self._admins:
            if principal.role is Role.AGENT:
                self._agents.pop(principal.agent_id or "", None)
            else:
                self._tenants.pop(principal.tenant or "", None)

    def _scope_of(self, principal: Principal) -> dict[_AudienceKey, _Audience]:
        """The principal's scope in the index (created empty if it has none)."""
        if principal.role is Role.ADMIN:
            return self._admins
        if principal.role is Role.AGENT:
            return self._agents.setdefault(principal.agent_id or "", {})
        return self._tenants.setdefault(principal.tenant or "", {})

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
        self._hub.catch_up(conn)  # e.g. the agent.state a command published goes before its ack
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
        self._hub.refilter(conn, self._filters(obj, principal))
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
