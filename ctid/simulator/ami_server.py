"""AMI server of the simulator, byte-faithful to the Asterisk 22 captures.

Wire behaviour and where it comes from (``tests/fixtures/asterisk22``):

* greeting ``Asterisk Call Manager/11.0.0\\r\\n`` with no blank line after it (all);
* before login every action but ``Login`` gets ``Response: Error`` / ``Message:
  Permission denied``; a bad secret gets ``Authentication failed`` and the server
  closes the socket; nothing else is answered (01b);
* a good login: ``Authentication accepted``, then ``FullyBooted`` (written straight to
  the session, never with ``SystemName``) and the security event ``SuccessfulAuth`` (01);
* responses are ``Response``, ``ActionID`` (only when the action had one, echoed
  verbatim, 01's ``bad id with spaces/&%``), then the action's own headers;
* the unknown-action error text and its ``RequestBadFormat`` event (01);
* EventLists: ``EventList: start`` + ``Message``, items carrying the ActionID,
  ``<X>Complete`` with ``EventList: Complete`` and ``ListItems: N`` (01, 13);
* **read classes** (``manager.c`` ``process_events``): an event's ``Privilege:`` names
  its classes, followed by ``all`` (which is no class of its own: Asterisk prints it for
  every event). A logged-in session gets the event only if *every* one of those classes
  is both in its user's ``read`` (:class:`~ctid.simulator.config.AMIUser`, by default
  ``system,call,agent,user`` as in the sample ``asterisk-conf/manager.conf``) and in the
  ``Events:`` header of its Login (``on``/absent: every class, ``off``: none, else a
  list of class names; unknown names are ignored, numeric masks are not simulated). So
  ``VarSet`` (``dialplan,all``) never reaches a user without ``dialplan`` read,
  whatever its ``Events:``; the login's ``FullyBooted`` needs ``system`` in both, and
  ``SuccessfulAuth``/``RequestBadFormat`` need ``security``. Responses and EventList
  items (``CoreShowChannel``, ``Status``, ``DeviceStateChange`` of
  ``DeviceStateList`` ...) are answers to the session's own action and are never
  filtered;
* with ``systemname`` every queued event gets ``SystemName:`` as its third line (18);
* ``Logoff`` -> ``Goodbye`` / ``Thanks for all the fish.`` and close;
* queue members as app_queue keeps them: ``QueueStatus``/``QueueSummary`` lists,
  ``QueueAdd`` (a dynamic member, ``QueueMemberAdded``; "Already there"),
  ``QueueRemove`` (dynamic members only: "Member not dynamic", "Not there";
  ``QueueMemberRemoved``) and ``QueuePause`` (``QueueMemberPause``).

Each session has one writer task fed by a bounded queue, so responses and events keep
their order; it is also where the fault toggles of :mod:`ctid.simulator.faults` act on
the bytes. Call control actions are delegated to the :class:`~ctid.simulator.pbx.PBX`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ctid.asterisk.ami_protocol import AMIParser, AMIProtocolError, Message, serialize
from ctid.simulator.channels import Channel, Fields, Location
from ctid.simulator.config import AMI_CLASSES, AMIUser, QueueConfig, QueueMember
from ctid.simulator.faults import AMIFaults

if TYPE_CHECKING:
    from ctid.simulator.pbx import PBX

log = logging.getLogger("ctid.simulator.ami")

GREETING = b"Asterisk Call Manager/11.0.0\r\n"
UNKNOWN = "Invalid/unknown command: {}. Use Action: ListCommands to show available commands."
_CLOSE = b""
_EVENTS_ON = frozenset({"on", "yes", "true", "y", "t", "all"})
_EVENTS_OFF = frozenset({"off", "no", "false", "n", "f", "0"})


class Session:
    """One AMI connection."""

    def __init__(self, server: AMIServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, number: int) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.number = number
        self.authenticated = False
        self.username = ""
        #: read classes of the user ∩ classes of the Login's ``Events:`` (set at login).
        self.event_classes: frozenset[str] = frozenset()
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=server.queue_limit)
        self.closed = False
        self.sent_bytes = 0
        self.started = time.time()
        peer = writer.get_extra_info("peername") or ("127.0.0.1", 0)
        self.remote = f"IPV4/TCP/{peer[0]}/{peer[1]}"

    # -- output ---------------------------------------------------------------------
    def send(self, msg: Message) -> None:
        self.send_bytes(serialize(msg))

    def send_bytes(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            # Asterisk drops a session that cannot keep up (writetimeout).
            log.warning("AMI session %d too slow; closing", self.number)
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.queue.put_nowait(_CLOSE)
            except asyncio.QueueFull:
                self.writer.close()

    def wants(self, privilege: str) -> bool:
        """Whether an event with this ``Privilege:`` value goes to this session."""
        return self.authenticated and privilege_classes(privilege) <= self.event_classes

    async def write_loop(self) -> None:
        faults = self.server.faults
        try:
            while True:
                data = await self.queue.get()
                if data is _CLOSE or data == b"":
                    break
                limit = faults.drop_threshold(self.number)
                if limit is not None and self.sent_bytes + len(data) >= limit:
                    cut = max(0, limit - self.sent_bytes)
                    self.writer.write(data[:cut])
                    self.sent_bytes += cut
                    await self.writer.drain()
                    break
                await self._write_with_faults(data, faults)
                self.sent_bytes += len(data)
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            self.writer.close()

    async def _write_with_faults(self, data: bytes, faults: AMIFaults) -> None:
        pieces = [data]
        if faults.split_utf8:
            pieces = _split_inside_utf8(data)
        if faults.write_chunk:
            chunked: list[bytes] = []
            for piece in pieces:
                chunked += [piece[i:i + faults.write_chunk] for i in range(0, len(piece), faults.write_chunk)]
            pieces = chunked
        for i, piece in enumerate(pieces):
            self.writer.write(piece)
            await self.writer.drain()
            if len(pieces) > 1 and i < len(pieces) - 1:
                await asyncio.sleep(faults.write_pause or 0.005)


_PRIVILEGES: dict[str, frozenset[str]] = {}


def privilege_classes(privilege: str) -> frozenset[str]:
    """The classes of a ``Privilege:`` value (``"dialplan,all"`` -> ``{"dialplan"}``)."""
    classes = _PRIVILEGES.get(privilege)
    if classes is None:  # a handful of distinct values: parsed once each
        classes = frozenset(c.strip() for c in privilege.lower().split(",")) - {"all", ""}
        _PRIVILEGES[privilege] = classes
    return classes


def _split_inside_utf8(data: bytes) -> list[bytes]:
    """Split the bytes inside every multi-byte UTF-8 character."""
    pieces: list[bytes] = []
    start = 0
    for i, byte in enumerate(data):
        if byte >= 0xC0:  # lead byte of a multi-byte sequence: cut right after it
            pieces.append(data[start:i + 1])
            start = i + 1
    pieces.append(data[start:])
    return [p for p in pieces if p]


class AMIServer:
    """asyncio TCP server speaking AMI 11.0.0 on 127.0.0.1. ``users``: the manager.conf
    users by name (secret and ``read`` classes)."""

    def __init__(self, pbx: PBX, *, users: Mapping[str, AMIUser], host: str = "127.0.0.1", port: int = 0,
                 systemname: str | None = None, faults: AMIFaults | None = None,
                 queue_limit: int = 50000) -> None:
        self.pbx = pbx
        self.users = users
        self.host = host
        self._port = port
        self.systemname = systemname
        self.faults = faults or AMIFaults()
        self.queue_limit = queue_limit
        self.sessions: list[Session] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._session_no = 0
        self.started = time.time()
        self.actions: dict[str, Callable[[Session, Message], None]] = {
            "ping": self.a_ping, "logoff": self.a_logoff, "coresettings": self.a_coresettings,
            "corestatus": self.a_corestatus, "command": self.a_command,
            "queuestatus": self.a_queuestatus, "queuesummary": self.a_queuesummary,
            "status": self.a_status, "coreshowchannels": self.a_coreshowchannels,
            "devicestatelist": self.a_devicestatelist, "extensionstate": self.a_extensionstate,
            "extensionstatelist": self.a_extensionstatelist,
            "originate": self.a_originate, "redirect": self.a_redirect, "bridge": self.a_bridge,
            "blindtransfer": self.a_blindtransfer, "atxfer": self.a_atxfer, "hangup": self.a_hangup,
            "setvar": self.a_setvar, "getvar": self.a_getvar, "mixmonitor": self.a_mixmonitor,
            "stopmixmonitor": self.a_stopmixmonitor, "userevent": self.a_userevent,
            "queuepause": self.a_queuepause, "queueadd": self.a_queueadd, "queueremove": self.a_queueremove,
            "login": self.a_login_again,
        }

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("AMI server not started")
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connect, self.host, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for s in list(self.sessions):
            s.close()
            s.writer.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if self._server is not None:
            await self._server.wait_closed()

    def _spawn(self, coro: object, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- events ---------------------------------------------------------------------
    def broadcast(self, msg: Message) -> None:
        """Send an event to every session that wants its class (adds SystemName)."""
        privilege = msg.get("Privilege") or ""
        if self.systemname:
            headers = list(msg.headers)
            headers.insert(2, ("SystemName", self.systemname))
            msg = Message(msg.kind, headers)
        data: bytes | None = None
        for s in self.sessions:
            if s.wants(privilege):
                if data is None:
                    data = serialize(msg)
                s.send_bytes(data)

    # -- connection -----------------------------------------------------------------
    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._session_no += 1
        session = Session(self, reader, writer, self._session_no)
        self.sessions.append(session)
        session.send_bytes(GREETING)
        writer_task = self._spawn(session.write_loop(), f"ami-writer-{session.number}")
        parser = AMIParser(expect_greeting=False)
        try:
            while not session.closed:
                if self.faults.read_pause:
                    await asyncio.sleep(self.faults.read_pause)
                data = await reader.read(4096)
                if not data:
                    break
                try:
                    items = parser.feed(data)
                except AMIProtocolError:
                    break
                for item in items:
                    if isinstance(item, Message):
                        self._dispatch(session, item)
                    if session.closed:
                        break
        except (ConnectionError, OSError):
            pass
        finally:
            session.close()
            if session in self.sessions:
                self.sessions.remove(session)
            try:
                await asyncio.wait_for(asyncio.shield(writer_task), timeout=2.0)
            except (TimeoutError, asyncio.CancelledError, Exception):
                writer.close()

    # -- responses --------------------------------------------------------------------
    def respond(self, s: Session, action: Message, status: str, fields: Fields = (),  # type: ignore[assignment]
                message: str | None = None) -> None:
        headers: Fields = []
        aid = action.get("ActionID")
        if aid is not None:
            headers.append(("ActionID", aid))
        if message is not None:
            headers.append(("Message", message))
        headers.extend(fields)
        s.send(Message.response(status, headers))

    def error(self, s: Session, action: Message, message: str) -> None:
        self.respond(s, action, "Error", message=message)

    def _list(self, s: Session, action: Message, message: str, items: list[tuple[str, Fields]],
              complete: str, extra_complete: Fields = ()) -> None:  # type: ignore[assignment]
        """Send an EventList; honours ``eventlist_cut_after``."""
        aid = action.get("ActionID")
        head: Fields = [("EventList", "start")]
        self.respond(s, action, "Success", head, message=message) if False else None
        headers: Fields = []
        if aid is not None:
            headers.append(("ActionID", aid))
        headers += [("EventList", "start"), ("Message", message)]
        s.send(Message.response("Success", headers))
        cut = self.faults.eventlist_cut_after
        for n, (name, fields) in enumerate(items):
            if cut is not None and n >= cut:
                s.close()
                return
            s.send(Message.event(name, fields))
        done: Fields = []
        if aid is not None:
            done.append(("ActionID", aid))
        done += [("EventList", "Complete"), ("ListItems", str(len(items))), *extra_complete]
        s.send(Message.event(complete, done))

    def _dispatch(self, s: Session, action: Message) -> None:
        name = action.name.lower()
        if not s.authenticated:
            if name == "login":
                self.a_login(s, action)
            elif name == "logoff":
                self.a_logoff(s, action)
            else:
                self.error(s, action, "Permission denied")
            return
        handler = self.actions.get(name)
        if handler is None:
            self.error(s, action, UNKNOWN.format(action.name))
            self.broadcast(Message.event("RequestBadFormat", [
                ("Privilege", "security,all"), ("EventTV", _tv()), ("Severity", "Error"),
                ("Service", "AMI"), ("EventVersion", "1"), ("SessionID", f"0x{id(s):x}"),
                ("LocalAddress", f"IPV4/TCP/127.0.0.1/{self.port}"), ("RemoteAddress", s.remote),
                ("RequestType", f"Action: {action.name}"), ("SessionTV", _tv(s.started)),
                ("AccountID", s.username),
            ]))
            return
        try:
            handler(s, action)
        except Exception as exc:  # a simulator bug must not kill the session silently
            log.exception("AMI action %s failed", action.name)
            self.pbx.errors.append(f"AMI {action.name}: {exc!r}")
            self.error(s, action, f"Simulator error: {exc}")

    # -- login ------------------------------------------------------------------------
    def a_login(self, s: Session, a: Message) -> None:
        user = a.get("Username") or ""
        account = self.users.get(user)
        if account is None or account.secret != (a.get("Secret") or ""):
            self.error(s, a, "Authentication failed")
            s.close()
            return
        s.authenticated = True
        s.username = user
        s.event_classes = account.read & _events_header(a.get("Events"))
        self.respond(s, a, "Success", message="Authentication accepted")
        if s.wants("system,all"):
            uptime = str(int(time.time() - self.started))
            s.send(Message.event("FullyBooted", [("Privilege", "system,all"), ("Uptime", uptime),
                                                 ("LastReload", uptime), ("Status", "Fully Booted")]))
        self.broadcast(Message.event("SuccessfulAuth", [
            ("Privilege", "security,all"), ("EventTV", _tv()), ("Severity", "Informational"),
            ("Service", "AMI"), ("EventVersion", "1"), ("AccountID", user),
            ("SessionID", f"0x{id(s):x}"), ("LocalAddress", f"IPV4/TCP/127.0.0.1/{self.port}"),
            ("RemoteAddress", s.remote), ("UsingPassword", "0"), ("SessionTV", _tv(s.started)),
        ]))

    def a_login_again(self, s: Session, a: Message) -> None:
        self.respond(s, a, "Success", message="Authentication accepted")

    def a_logoff(self, s: Session, a: Message) -> None:
        self.respond(s, a, "Goodbye", message="Thanks for all the fish.")
        s.close()

    # -- simple actions -----------------------------------------------------------------
    def a_ping(self, s: Session, a: Message) -> None:
        if self.faults.silent_ping:
            return
        self.respond(s, a, "Success", [("Ping", "Pong"), ("Timestamp", f"{time.time():.6f}")])

    def a_coresettings(self, s: Session, a: Message) -> None:
        self.respond(s, a, "Success", [
            ("AMIversion", "11.0.0"), ("AsteriskVersion", "22.11.0-rc1"),
            ("SystemName", self.systemname or ""), ("CoreMaxCalls", "0"),
            ("CoreMaxLoadAvg", "0.000000"), ("CoreRunUser", ""), ("CoreRunGroup", ""),
            ("CoreMaxFilehandles", "0"), ("CoreRealTimeEnabled", "No"), ("CoreCDRenabled", "Yes"),
            ("CoreHTTPenabled", "No"), ("SoundsSearchCustomDir", "No"),
        ])

    def a_corestatus(self, s: Session, a: Message) -> None:
        started = datetime.fromtimestamp(self.started, UTC)
        self.respond(s, a, "Success", [
            ("CoreStartupDate", started.strftime("%Y-%m-%d")), ("CoreStartupTime", started.strftime("%H:%M:%S")),
            ("CoreReloadDate", started.strftime("%Y-%m-%d")), ("CoreReloadTime", started.strftime("%H:%M:%S")),
            ("CoreCurrentCalls", str(len(self.pbx.channels))), ("CoreProcessedCalls", str(self.pbx._uid_seq)),
        ])

    def a_command(self, s: Session, a: Message) -> None:
        cmd = (a.get("Command") or "").strip()
        out = []
        if cmd == "core show version":
            out = ["Asterisk 22.11.0-rc1 built by ctid-simulator"]
        elif cmd == "core show channels count":
            out = [f"{len(self.pbx.channels)} active channels"]
        self.respond(s, a, "Success", [("Output", line) for line in out], message="Command output follows")

    def a_extensionstate(self, s: Session, a: Message) -> None:
        exten, ctx = a.get("Exten") or "", a.get("Context") or ""
        hint = self.pbx.hints.get((ctx, exten), "")
        status, text = self.pbx.extension_state(hint) if hint else (-1, "Unknown")
        self.respond(s, a, "Success", [("Exten", exten), ("Context", ctx), ("Hint", hint),
                                       ("Status", str(status)), ("StatusText", text)], message="Extension Status")

    # -- list actions ---------------------------------------------------------------------
    def a_queuestatus(self, s: Session, a: Message) -> None:
        aid = a.get("ActionID")
        tail: Fields = [("ActionID", aid)] if aid is not None else []
        want = a.get("Queue")
        items: list[tuple[str, Fields]] = []
        for q in self.pbx.queues.values():
            if want and q.name != want:
                continue
            callers = self.pbx.queue_callers.get(q.name, [])
            items.append(("QueueParams", [
                ("Queue", q.name), ("Max", "0"), ("Strategy", q.strategy), ("Calls", str(len(callers))),
                ("Holdtime", str(q.holdtime)), ("TalkTime", str(q.talktime)), ("Completed", str(q.completed)),
                ("Abandoned", str(q.abandoned)), ("ServiceLevel", "0"), ("ServicelevelPerf", "0.0"),
                ("ServicelevelPerf2", "0.0"), ("Weight", "0"), *tail]))
            for m in q.members:
                in_call = any(c.endpoint == m.interface.partition("/")[2] and c.state == 6
                              for c in self.pbx.channels.values())
                status = "2" if in_call else "1"
                items.append(("QueueMember", [
                    ("Queue", q.name), ("Name", m.name), ("Location", m.interface),
                    ("StateInterface", m.interface), ("Membership", m.membership), ("Penalty", str(m.penalty)),
                    ("CallsTaken", str(m.calls_taken)), ("LastCall", str(m.last_call)), ("LastPause", "0"),
                    ("LoginTime", str(int(self.started))), ("InCall", "1" if in_call else "0"),
                    ("Status", status), ("Paused", "1" if m.paused else "0"),
                    ("PausedReason", m.paused_reason), ("Wrapuptime", str(int(q.wrapuptime))), *tail]))
            for pos, c in enumerate(callers, 1):
                items.append(("QueueEntry", [
                    ("Queue", q.name), ("Position", str(pos)), ("Channel", c.name), ("Uniqueid", c.uniqueid),
                    ("CallerIDNum", c.caller_num), ("CallerIDName", c.caller_name),
                    ("ConnectedLineNum", "unknown"), ("ConnectedLineName", "unknown"),
                    ("Wait", str(int(self.pbx.clock.now() - (c.queue_joined or c.created)))),
                    ("Priority", "0"), *tail]))
        self._list(s, a, "Queue status will follow", items, "QueueStatusComplete")

    def a_queuesummary(self, s: Session, a: Message) -> None:
        """``LoggedIn``: members whose device is not unavailable; ``Available``: of those,
        the ones not paused and not in a call; ``HoldTime``/``TalkTime``: the queue's
        exponential averages; ``LongestHoldTime``: the longest wait of a caller now
        waiting (01, 07)."""
        aid = a.get("ActionID")
        tail: Fields = [("ActionID", aid)] if aid is not None else []
        want = a.get("Queue")
        now = self.pbx.clock.now()
        items: list[tuple[str, Fields]] = []
        for q in self.pbx.queues.values():
            if want and q.name != want:
                continue
            logged_in = [m for m in q.members
                         if self.pbx.device_states.get(m.interface, "UNAVAILABLE") not in ("UNAVAILABLE", "INVALID")]
            avail = sum(1 for m in logged_in if self.pbx._member_available(m))
            callers = self.pbx.queue_callers.get(q.name, [])
            longest = max((int(now - c.queue_joined) for c in callers if c.queue_joined is not None), default=0)
            items.append(("QueueSummary", [
                ("Queue", q.name), ("LoggedIn", str(len(logged_in))), ("Available", str(avail)),
                ("Callers", str(len(callers))), ("HoldTime", str(q.holdtime)),
                ("TalkTime", str(q.talktime)), ("LongestHoldTime", str(longest)), *tail]))
        self._list(s, a, "Queue summary will follow", items, "QueueSummaryComplete")

    def a_status(self, s: Session, a: Message) -> None:
        aid = a.get("ActionID")
        name = a.get("Channel")
        if name:
            chan = self.pbx.find_channel(name)
            if chan is None:
                self.error(s, a, "No such channel")
                return
            chans = [chan]
        else:
            chans = list(self.pbx.channels.values())
        wanted = [v.strip() for v in (a.get("Variables") or "").split(",") if v.strip()]
        items: list[tuple[str, Fields]] = []
        now = self.pbx.clock.now()
        for c in chans:
            fields: Fields = [("Privilege", "Call"), *c.snapshot(),
                              ("Type", c.tech), ("DNID", c.dnid),
                              ("EffectiveConnectedLineNum", c.connected_num),
                              ("EffectiveConnectedLineName", c.connected_name), ("TimeToHangup", "0"),
                              ("BridgeID", c.bridge.uniqueid if c.bridge else ""),
                              ("Application", c.application), ("Data", c.app_data),
                              ("Nativeformats", "(ulaw)"), ("Readformat", "ulaw"), ("Readtrans", ""),
                              ("Writeformat", "ulaw"), ("Writetrans", ""), ("Callgroup", "0"),
                              ("Pickupgroup", "0"), ("Seconds", str(int(now - c.created)))]
            for v in wanted:
                val = c.get_var(v)
                fields.append(("Variable", f"{v}={'(null)' if val is None else val}"))
            if aid is not None:
                fields.append(("ActionID", aid))
            items.append(("Status", fields))
        self._list(s, a, "Channel status will follow", items, "StatusComplete",
                   [("Items", str(len(items)))])

    def a_coreshowchannels(self, s: Session, a: Message) -> None:
        aid = a.get("ActionID")
        head: Fields = [("ActionID", aid)] if aid is not None else []
        now = self.pbx.clock.now()
        items: list[tuple[str, Fields]] = []
        for c in self.pbx.channels.values():
            secs = int(now - c.created)
            items.append(("CoreShowChannel", [
                *head, *c.snapshot(), ("Application", c.application), ("ApplicationData", c.app_data),
                ("Duration", f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}"),
                ("BridgeId", c.bridge.uniqueid if c.bridge else "")]))
        self._list(s, a, "Channels will follow", items, "CoreShowChannelsComplete")

    def a_extensionstatelist(self, s: Session, a: Message) -> None:
        """Every hint, in dialplan order, as an ``ExtensionStatus`` item with the ActionID
        first (07b)."""
        aid = a.get("ActionID")
        head: Fields = [("ActionID", aid)] if aid is not None else []
        items: list[tuple[str, Fields]] = []
        for (ctx, exten), hint in self.pbx.hints.items():
            status, text = self.pbx.extension_state(hint)
            items.append(("ExtensionStatus", [*head, ("Exten", exten), ("Context", ctx), ("Hint", hint),
                                              ("Status", str(status)), ("StatusText", text)]))
        self._list(s, a, "Extension Statuses will follow", items, "ExtensionStateListComplete")

    def a_devicestatelist(self, s: Session, a: Message) -> None:
        aid = a.get("ActionID")
        head: Fields = [("ActionID", aid)] if aid is not None else []
        items = [("DeviceStateChange", [*head, ("Device", d), ("State", st)])
                 for d, st in self.pbx.device_states.items()]
        self._list(s, a, "Device State Changes will follow", items, "DeviceStateListComplete")

    # -- call control -----------------------------------------------------------------------
    def _chan(self, s: Session, a: Message, key: str = "Channel") -> Channel | None:
        name = a.get(key)
        if not name:
            self.error(s, a, "No channel specified")
            return None
        chan = self.pbx.find_channel(name)
        if chan is None:
            self.error(s, a, "No such channel")
        return chan

    def a_hangup(self, s: Session, a: Message) -> None:
        chan = self._chan(s, a)
        if chan is None:
            return
        cause = int(a.get("Cause") or 16)
        self.respond(s, a, "Success", message="Channel Hungup")
        self.pbx.soft_hangup(chan, cause)

    def a_redirect(self, s: Session, a: Message) -> None:
        name = a.get("Channel")
        if not name:
            self.error(s, a, "Channel not specified")
            return
        chan = self.pbx.find_channel(name)
        if chan is None:
            self.error(s, a, f"Channel does not exist: {name}")
            return
        exten, ctx = a.get("Exten") or "", a.get("Context") or chan.context
        prio = self.pbx.dialplan.resolve_priority(ctx, exten, a.get("Priority") or "1")
        if not exten or prio is None:
            self.error(s, a, "Invalid priority" if exten else "Exten not specified")
            return
        extra = None
        extra_name = a.get("ExtraChannel")
        if extra_name:
            extra = self.pbx.find_channel(extra_name)
            if extra is None:
                self.error(s, a, f"ExtraChannel does not exist: {extra_name}")
                return
            if a.get("ExtraContext") and not a.get("ExtraExten"):
                self.error(s, a, "ExtraExten not specified")
                return
            if a.get("ExtraContext") and not a.get("ExtraPriority"):
                self.error(s, a, "ExtraPriority not specified")
                return
        if extra is not None:
            xctx = a.get("ExtraContext") or ctx
            xexten = a.get("ExtraExten") or exten
            xprio = self.pbx.dialplan.resolve_priority(xctx, xexten, a.get("ExtraPriority") or "1") or 1
            self.respond(s, a, "Success", message="Dual Redirect successful")
            # Both legs leave the bridge before either is "kicked" by the other (15).
            for c in (extra, chan):
                c._bridge_owner_redirect = True  # type: ignore[attr-defined]
            self.pbx.redirect(extra, Location(xctx, xexten, xprio))
            self.pbx.redirect(chan, Location(ctx, exten, prio))
            return
        self.respond(s, a, "Success", message="Redirect successful")
        self.pbx.redirect(chan, Location(ctx, exten, prio))

    def a_bridge(self, s: Session, a: Message) -> None:
        c1 = self._chan(s, a, "Channel1")
        if c1 is None:
            return
        c2 = self._chan(s, a, "Channel2")
        if c2 is None:
            return
        self.respond(s, a, "Success", message="Channels have been bridged")
        self.pbx.bridge_channels(c1, c2)

    def a_blindtransfer(self, s: Session, a: Message) -> None:
        chan = self._chan(s, a)
        if chan is None:
            return
        bridge = chan.bridge
        if bridge is None or len(bridge.channels) != 2:
            self.error(s, a, "Transfer failed")
            return
        ctx = a.get("Context") or chan.context
        exten = a.get("Exten") or ""
        other = next(iter(bridge.others(chan)))
        self.respond(s, a, "Success", message="Transfer succeeded")
        self.pbx.emit_chan("Unhold", chan)
        self.pbx.emit("BlindTransfer", "call,all", [
            ("Result", "Success"), *chan.snapshot("Transferer", with_vars=False),
            *other.snapshot("Transferee", with_vars=False), *bridge.block(),
            ("IsExternal", "Yes"), ("Context", ctx), ("Extension", exten)])
        # The transferer leaves and is hung up; the transferee runs the target.
        self.pbx.blind_transfer(chan, other, Location(ctx, exten, 1))

    def a_atxfer(self, s: Session, a: Message) -> None:
        """Asterisk 22 ``Atxfer``: the features.conf ``atxfer`` code and ``Exten`` are
        queued on the transferer as DTMF (06c); ``Context`` becomes TRANSFER_CONTEXT."""
        name = a.get("Channel")
        if not name:
            self.error(s, a, "No channel specified")
            return
        exten = a.get("Exten")
        if not exten:
            self.error(s, a, "No extension specified")
            return
        chan = self.pbx.find_channel(name)
        if chan is None:
            self.error(s, a, "Channel specified does not exist")
            return
        code = self.pbx.features.atxfer
        if not code:
            self.error(s, a, "No attended transfer feature code found")
            return
        self.respond(s, a, "Success", message="Atxfer successfully queued")
        context = a.get("Context")
        if context:
            self.pbx.set_var(chan, "TRANSFER_CONTEXT", context)
        self.pbx.atxfer(chan, code, exten)

    def a_setvar(self, s: Session, a: Message) -> None:
        var = a.get("Variable")
        if not var:
            self.error(s, a, "No variable specified")
            return
        chan = None
        if a.get("Channel"):
            chan = self._chan(s, a)
            if chan is None:
                return
        self.pbx.set_var(chan, var, a.get("Value") or "")
        self.respond(s, a, "Success", message="Variable Set")

    def a_getvar(self, s: Session, a: Message) -> None:
        var = a.get("Variable")
        if not var:
            self.error(s, a, "No variable specified")
            return
        chan = None
        if a.get("Channel"):
            chan = self._chan(s, a)
            if chan is None:
                return
        if chan is None:
            value = self.pbx.globals.get(var, "")
        elif "(" in var or var.startswith("${"):
            value = self.pbx.resolve(chan, var)
        else:
            value = self.pbx.resolve(chan, var)
        self.respond(s, a, "Success", [("Variable", var), ("Value", value)])

    def a_mixmonitor(self, s: Session, a: Message) -> None:
        chan = self._chan(s, a)
        if chan is None:
            return
        filename = a.get("File") or f"{chan.uniqueid}.wav"
        self.respond(s, a, "Success")
        self.pbx.set_var(chan, "MIXMONITOR_FILENAME", filename)
        self.pbx._mixmonitors[chan.name] = filename
        self.pbx.emit_chan("MixMonitorStart", chan)

    def a_stopmixmonitor(self, s: Session, a: Message) -> None:
        chan = self._chan(s, a)
        if chan is None:
            return
        if self.pbx._mixmonitors.pop(chan.name, None) is None:
            self.error(s, a, "Could not stop MixMonitor")
            return
        self.respond(s, a, "Success")
        self.pbx.emit_chan("MixMonitorStop", chan)

    def a_userevent(self, s: Session, a: Message) -> None:
        """manager.c action_userevent: ``Event Sent``, then a ``UserEvent`` event (class
        user) with ``UserEvent: <name>`` first and every other header of the action, in
        its order, ``ActionID`` included; only ``Action`` and ``UserEvent`` are left out."""
        fields: Fields = [("UserEvent", a.get("UserEvent") or "")]
        fields += [(k, v) for k, v in a.headers if k.lower() not in ("action", "userevent")]
        self.respond(s, a, "Success", message="Event Sent")
        self.pbx.emit("UserEvent", "user,all", fields)  # recorded and fanned out like any event

    def _member_event(self, name: str, queue: QueueConfig, m: QueueMember) -> None:
        """``QueueMemberPause`` / ``Added`` / ``Removed``: app_queue's member snapshot."""
        self.pbx.emit(name, "agent,all", [
            ("Queue", queue.name), ("MemberName", m.name), ("Interface", m.interface),
            ("StateInterface", m.interface), ("Membership", m.membership),
            ("Penalty", str(m.penalty)), ("CallsTaken", str(m.calls_taken)),
            ("LastCall", str(m.last_call)), ("LastPause", "0"), ("LoginTime", "0"),
            ("InCall", "0"), ("Status", "1"), ("Paused", "1" if m.paused else "0"),
            ("PausedReason", m.paused_reason), ("Ringinuse", "0"), ("Wrapuptime", "0")])

    def a_queueadd(self, s: Session, a: Message) -> None:
        """app_queue's ``QueueAdd``: a dynamic member (``Paused`` optional), or its errors."""
        queue = self.pbx.queues.get(a.get("Queue") or "")
        interface = a.get("Interface") or ""
        if queue is None or not interface:
            self.error(s, a, "Unable to add interface to queue: No such queue" if queue is None
                       else "'Interface' not specified.")
            return
        if any(m.interface == interface for m in queue.members):
            self.error(s, a, "Unable to add interface: Already there")
            return
        paused = (a.get("Paused") or "").lower() in ("true", "yes", "1")
        member = QueueMember(interface, a.get("MemberName") or interface, paused=paused, membership="dynamic",
                             paused_reason=(a.get("Reason") or "") if paused else "")
        queue.members.append(member)
        self._member_event("QueueMemberAdded", queue, member)
        self.respond(s, a, "Success", message="Added interface to queue")

    def a_queueremove(self, s: Session, a: Message) -> None:
        """app_queue's ``QueueRemove``: only dynamic members can go ("Member not dynamic")."""
        queue = self.pbx.queues.get(a.get("Queue") or "")
        if queue is None:
            self.error(s, a, "Unable to remove interface from queue: No such queue")
            return
        member = next((m for m in queue.members if m.interface == a.get("Interface")), None)
        if member is None:
            self.error(s, a, "Unable to remove interface: Not there")
        elif member.membership != "dynamic":
            self.error(s, a, "Member not dynamic")
        else:
            queue.members.remove(member)
            self._member_event("QueueMemberRemoved", queue, member)
            self.respond(s, a, "Success", message="Removed interface from queue")

    def a_queuepause(self, s: Session, a: Message) -> None:
        iface = a.get("Interface") or ""
        paused = (a.get("Paused") or "").lower() in ("true", "yes", "1")
        found = False
        for q in self.pbx.queues.values():
            if a.get("Queue") and q.name != a.get("Queue"):
                continue
            for m in q.members:
                if m.interface == iface:
                    m.paused, m.paused_reason, found = paused, (a.get("Reason") or "") if paused else "", True
                    self._member_event("QueueMemberPause", q, m)
        if not found:
            self.error(s, a, "Interface not found")
            return
        text = "Interface paused successfully" if paused else "Interface unpaused successfully"
        self.respond(s, a, "Success", message=text)

    def a_originate(self, s: Session, a: Message) -> None:
        channel = a.get("Channel")
        if not channel:
            self.error(s, a, "Channel not specified")
            return
        try:
            timeout = float(a.get("Timeout") or 30000) / 1000.0
            priority = int(a.get("Priority") or 1)
        except ValueError:
            self.error(s, a, "Invalid timeout or priority")
            return
        is_async = (a.get("Async") or "").lower() in ("true", "yes", "1")
        aid = a.get("ActionID")
        kwargs = dict(
            channel=channel, context=a.get("Context") or "", exten=a.get("Exten") or "",
            priority=priority, application=a.get("Application"), app_data=a.get("Data") or "",
            callerid=a.get("CallerID") or "", timeout=timeout, variables=a.get_all("Variable"),
            channel_id=a.get("ChannelId"), action_id=aid if is_async else "",
        )
        if is_async:
            self.respond(s, a, "Success", message="Originate successfully queued")
            self.pbx.spawn(self.pbx.originate(**kwargs), f"originate {channel}")  # type: ignore[arg-type]
            return

        async def sync() -> None:
            ok = await self.pbx.originate(**kwargs)  # type: ignore[arg-type]
            if ok:
                self.respond(s, a, "Success", message="Originate successfully queued")
            else:
                self.error(s, a, "Originate failed")

        self.pbx.spawn(sync(), f"originate-sync {channel}")


def _events_header(value: str | None) -> frozenset[str]:
    """The classes a Login's ``Events:`` asks for (``manager.c`` ``strings_to_mask``)."""
    events = (value or "").strip().lower()
    if not events or events in _EVENTS_ON:
        return AMI_CLASSES
    if events in _EVENTS_OFF:
        return frozenset()
    # A list of class names ("system,call"); "all" in it means every class.
    named = {c.strip() for c in events.split(",")}
    return AMI_CLASSES if "all" in named else frozenset(named) & AMI_CLASSES


def _tv(ts: float | None = None) -> str:
    dt = datetime.fromtimestamp(time.time() if ts is None else ts, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}+0000"
