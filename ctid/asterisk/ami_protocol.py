"""Sans-I/O Asterisk Manager Interface (AMI) protocol: bytes in, typed messages out.

Theory of operation
-------------------
An AMI connection carries, after one greeting line (``Asterisk Call Manager/11.0.0\\r\\n``,
*not* followed by a blank line), a stream of messages. Each message is a block of
``Key: Value`` lines separated by CRLF and terminated by an empty line, i.e. the block
ends in ``\\r\\n\\r\\n``. The first header says what the message is: ``Event:``,
``Response:`` (a reply to an action) or ``Action:`` (what a client sends; the simulator
parses those with the same code).

:class:`AMIParser` owns the receive buffer and has two states::

    AWAIT_GREETING --(line "Asterisk Call Manager/x")--> MESSAGES
    MESSAGES       --(block ending in CRLF CRLF)------> MESSAGES   (emits a Message)

Framing is done on *bytes*: a block is decoded only once it is complete, so a UTF-8
character split across TCP reads is never damaged (panoramisk decoded each chunk with
``errors="ignore"`` and silently lost such characters). A block that is not valid UTF-8
or has no recognisable first header becomes a :class:`Malformed` item carrying the raw
bytes and the reason; the parser then carries on with the next block, so one bad frame
never desynchronises the stream. Header lines are split lazily, on first access (most
events are never read past their name); a line without a colon found then is dropped
and listed in :attr:`Message.defects`. A block larger
than ``max_message_bytes`` without a terminator is a fatal :class:`AMIProtocolError`
(the peer is not speaking AMI).

Quirks of Asterisk 22 that the parser keeps rather than "fixes" (see the captures in
``tests/fixtures/asterisk22``):

* Repeated keys keep every value, in order (``Output:`` lines of ``Command``,
  ``ChanVariable: NAME=value`` lines, ``Variable:`` lines of ``Status``).
* Two-channel events prefix the second channel's variables (``DestChanVariable``,
  ``ParkeeChanVariable``); ``OriginateResponse`` uses ``ChanVariable(<channel>)``.
  :meth:`Message.chan_variables` understands all three forms.
* The ``Park`` response ends a value with a bare LF (``Park successful\\n``); the value is
  kept verbatim.
* Lines of the form ``Key:`` (nothing after the colon) have an empty value.

:class:`ActionTracker` correlates responses to actions by ``ActionID``. A response that
starts an EventList (``EventList: start``) keeps the action open; the events that carry
the same ActionID are collected until the event with ``EventList: Complete``. Events
with an ActionID that is not an open list (``OriginateResponse`` of an async Originate,
for example) are ordinary events and are passed on for dispatch.

Everything here is pure and synchronous; ``ctid.asterisk.ami`` is the asyncio side.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from ctid.asterisk.safety import AMIValueError, check_ami_value

__all__ = [
    "AMIParser",
    "AMIProtocolError",
    "AMIValueError",
    "ActionCompletion",
    "ActionTracker",
    "Greeting",
    "Malformed",
    "Message",
    "MessageKind",
    "build_action",
    "serialize",
]

TERMINATOR = b"\r\n\r\n"
GREETING_PREFIX = "Asterisk Call Manager/"


class AMIProtocolError(Exception):
    """The byte stream cannot be AMI at all (no greeting, runaway message)."""


class MessageKind(enum.Enum):
    EVENT = "Event"
    RESPONSE = "Response"
    ACTION = "Action"


class Message:
    """One AMI message with its headers in wire order.

    ``name`` is the event name, the response status (``Success``, ``Error``,
    ``Goodbye``, ``Follows``) or the action name. Lookups with :meth:`get` return the
    first value of a key; :meth:`get_all` returns every value of a repeated key.

    Messages from the parser are *lazy*: framing, decoding and the name are done at
    once, the headers are split into pairs only when first read. At 1,000+ events/s
    most events (VarSet, CEL, ...) are never read past their name, and this keeps
    ingest cheap. A header line without a colon is recorded in :attr:`defects` (and
    dropped) when the headers are split; the AMI client logs it.
    """

    __slots__ = ("_first", "_headers", "_raw", "_repeated", "defects_", "kind", "name")

    def __init__(self, kind: MessageKind, headers: list[tuple[str, str]]) -> None:
        self.kind = kind
        self.name = headers[0][1]
        self._raw: str | None = None
        self.defects_: list[str] | None = None
        self._index(headers)

    @classmethod
    def _lazy(cls, kind: MessageKind, name: str, raw: str) -> Message:
        message = cls.__new__(cls)
        message.kind = kind
        message.name = name
        message._raw = raw
        message._headers = None
        message._first = None
        message._repeated = None
        message.defects_ = None
        return message

    def _index(self, headers: list[tuple[str, str]]) -> None:
        first: dict[str, str] = {}
        repeated: set[str] | None = None
        for key, value in headers:
            if key in first:
                if repeated is None:
                    repeated = set()
                repeated.add(key)
            else:
                first[key] = value
        self._headers: list[tuple[str, str]] | None = headers
        self._first: dict[str, str] | None = first
        self._repeated: set[str] | None = repeated

    def _parse(self) -> dict[str, str]:
        raw = self._raw
        assert raw is not None
        headers: list[tuple[str, str]] = []
        append = headers.append
        defects: list[str] | None = None
        for line in raw.split("\r\n"):
            key, sep, value = line.partition(": ")
            if not sep:
                if line.endswith(":"):
                    key, value = line[:-1], ""
                else:
                    if defects is None:
                        defects = []
                    defects.append(f"line without 'Key: value': {line[:60]!r}")
                    continue
            append((key, value))
        self.defects_ = defects
        self._index(headers)
        assert self._first is not None
        return self._first

    @property
    def headers(self) -> list[tuple[str, str]]:
        if self._headers is None:
            self._parse()
        assert self._headers is not None
        return self._headers

    @property
    def defects(self) -> list[str]:
        """Problems found when the headers were split (forces the split)."""
        if self._headers is None:
            self._parse()
        return self.defects_ or []

    @property
    def parsed(self) -> bool:
        return self._headers is not None

    @property
    def raw(self) -> str | None:
        """The decoded block as received (None for messages built in code)."""
        return self._raw

    def may_contain(self, text: str) -> bool:
        """A cheap pre-filter that never splits the headers: False only when ``text``
        appears nowhere in the message as received. Messages built in code answer True."""
        raw = self._raw
        return raw is None or text in raw

    @classmethod
    def event(cls, name: str, fields: Iterable[tuple[str, str]] = ()) -> Message:
        return cls(MessageKind.EVENT, [("Event", name), *fields])

    @classmethod
    def response(cls, status: str, fields: Iterable[tuple[str, str]] = ()) -> Message:
        return cls(MessageKind.RESPONSE, [("Response", status), *fields])

    @classmethod
    def action(cls, name: str, fields: Iterable[tuple[str, str]] = ()) -> Message:
        return cls(MessageKind.ACTION, [("Action", name), *fields])

    @property
    def is_event(self) -> bool:
        return self.kind is MessageKind.EVENT

    @property
    def is_response(self) -> bool:
        return self.kind is MessageKind.RESPONSE

    @property
    def action_id(self) -> str | None:
        raw = self._raw
        if self._first is None and raw is not None:
            # Cheap pre-check: most events carry no ActionID, so do not split them.
            if "\r\nActionID: " not in raw and "\r\nActionID:\r\n" not in raw:
                return None
        return self.get("ActionID")

    def get(self, key: str, default: str | None = None) -> str | None:
        """First value of ``key``. Exact case first, then case-insensitive (AMI keys are)."""
        first = self._first
        if first is None:
            first = self._parse()
        value = first.get(key)
        if value is not None:
            return value
        lowered = key.lower()
        for k, v in first.items():
            if k.lower() == lowered:
                return v
        return default

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def get_all(self, key: str) -> list[str]:
        """Every value of ``key`` in wire order (empty list when absent)."""
        lowered = key.lower()
        return [v for k, v in self.headers if k.lower() == lowered]

    def chan_variables(self, prefix: str = "ChanVariable") -> dict[str, str]:
        """Channel variables exported by manager.conf ``channelvars``.

        ``prefix`` selects the channel block: ``ChanVariable`` (the main channel),
        ``DestChanVariable`` (Dial events), ``ParkeeChanVariable`` (parking). The
        ``ChanVariable(<channel>)`` form of ``OriginateResponse`` is accepted for the
        plain prefix.
        """
        out: dict[str, str] = {}
        paren = prefix + "("
        for key, value in self.headers:
            if key == prefix or (key.startswith(paren) and key.endswith(")")):
                name, _, val = value.partition("=")
                out.setdefault(name, val)
        return out

    def to_dict(self) -> dict[str, str]:
        """First value of each key (for logs and debugging)."""
        first = self._first if self._first is not None else self._parse()
        return dict(first)

    def __repr__(self) -> str:
        return f"Message({self.kind.value}={self.name!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self.kind is other.kind and self.headers == other.headers

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class Greeting:
    """The first line of the connection, e.g. ``Asterisk Call Manager/11.0.0``."""

    line: str

    @property
    def version(self) -> str:
        return self.line[len(GREETING_PREFIX):]


@dataclass(frozen=True, slots=True)
class Malformed:
    """A block that could not be parsed. The stream continues after it."""

    raw: bytes
    reason: str


Item = Greeting | Message | Malformed

_KINDS = {"Event": MessageKind.EVENT, "Response": MessageKind.RESPONSE, "Action": MessageKind.ACTION}


class _State(enum.Enum):
    AWAIT_GREETING = 1
    MESSAGES = 2


_PREFIXES = (("Event: ", MessageKind.EVENT), ("Response: ", MessageKind.RESPONSE),
             ("Action: ", MessageKind.ACTION))


def parse_block(raw: bytes) -> Message | Malformed:
    """Frame one complete block (without its terminating empty line) into a message.

    Decoding and the message type are checked here; the header lines are split lazily
    (see :class:`Message`).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Malformed(raw, f"invalid UTF-8 at byte {exc.start}")
    end = text.find("\r\n")
    first = text if end < 0 else text[:end]
    for prefix, kind in _PREFIXES:
        if first.startswith(prefix):
            return Message._lazy(kind, first[len(prefix):], text)
    key, sep, _ = first.partition(":")
    kind_ = _KINDS.get(key.strip())
    if kind_ is None or not sep:
        return Malformed(raw, f"unknown message type {first[:40]!r}")
    message = Message._lazy(kind_, first[len(key) + 1:].strip(), text)
    return message


class AMIParser:
    """Incremental AMI parser. Feed bytes with :meth:`feed`; it returns the items completed.

    ``expect_greeting=False`` is for the server side (the simulator reads actions,
    which have no greeting).
    """

    def __init__(self, *, expect_greeting: bool = True, max_message_bytes: int = 1 << 20) -> None:
        self._buffer = bytearray()
        self._state = _State.AWAIT_GREETING if expect_greeting else _State.MESSAGES
        self._max = max_message_bytes

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Item]:
        buf = self._buffer
        buf += data
        out: list[Item] = []
        start = 0
        if self._state is _State.AWAIT_GREETING:
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 1024:
                    raise AMIProtocolError("no AMI greeting in the first 1024 bytes")
                return out
            line = bytes(buf[:end]).decode("utf-8", "replace")
            if not line.startswith(GREETING_PREFIX):
                raise AMIProtocolError(f"unexpected greeting {line[:80]!r}")
            out.append(Greeting(line))
            self._state = _State.MESSAGES
            start = end + 2
        find = buf.find
        while True:
            end = find(TERMINATOR, start)
            if end < 0:
                break
            if end > start:
                out.append(parse_block(bytes(buf[start:end])))
            start = end + 4
        if start:
            del buf[:start]
        if len(buf) > self._max:
            raise AMIProtocolError(f"message exceeds {self._max} bytes without a terminator")
        return out


def serialize(message: Message) -> bytes:
    """Frame a message for the wire. Every key and value is checked for CR/LF/NUL."""
    parts: list[str] = []
    for key, value in message.headers:
        check_ami_value(key, "header name")
        check_ami_value(value, key)
        parts.append(f"{key}: {value}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("utf-8")


def build_action(
    name: str,
    action_id: str | None = None,
    fields: Mapping[str, str | Iterable[str]] | Iterable[tuple[str, str]] = (),
) -> Message:
    """Build an action message. A mapping value that is a list repeats the key
    (``Variable:`` lines of Originate)."""
    headers: list[tuple[str, str]] = [("Action", name)]
    if action_id is not None:
        headers.append(("ActionID", action_id))
    items: Iterable[tuple[str, str | Iterable[str]]]
    items = fields.items() if isinstance(fields, Mapping) else fields
    for key, value in items:
        if isinstance(value, str):
            headers.append((key, value))
        else:
            headers.extend((key, v) for v in value)
    message = Message(MessageKind.ACTION, headers)
    serialize(message)  # validate now, so the caller sees the error, not the writer
    return message


@dataclass(slots=True)
class ActionCompletion:
    """A finished action: its response, and the list events if it was an EventList."""

    action_id: str
    response: Message
    events: list[Message] = field(default_factory=list)
    complete: Message | None = None

    @property
    def ok(self) -> bool:
        return self.response.name in ("Success", "Goodbye", "Follows")


class ActionTracker:
    """Correlates responses and EventList events with pending actions by ActionID.

    :meth:`feed` returns ``(completions, passthrough)``: actions that finished with this
    message, and the message itself when it is not part of an action (to be dispatched
    as an event, or logged as an unmatched response).
    """

    def __init__(self) -> None:
        self._pending: set[str] = set()
        self._lists: dict[str, ActionCompletion] = {}

    @property
    def collecting(self) -> bool:
        """True while an EventList is open (events may then belong to an action)."""
        return bool(self._lists)

    def register(self, action_id: str) -> None:
        if action_id in self._pending or action_id in self._lists:
            raise ValueError(f"ActionID {action_id!r} is already pending")
        self._pending.add(action_id)

    def forget(self, action_id: str) -> None:
        """Stop tracking (timeout or cancellation); later replies become passthrough."""
        self._pending.discard(action_id)
        self._lists.pop(action_id, None)

    def pending(self) -> Iterator[str]:
        yield from self._pending
        yield from self._lists

    def clear(self) -> list[str]:
        """Drop everything (link lost) and return the ActionIDs that were open."""
        ids = [*self._pending, *self._lists]
        self._pending.clear()
        self._lists.clear()
        return ids

    def feed(self, message: Message) -> tuple[list[ActionCompletion], Message | None]:
        action_id = message.action_id
        if action_id is None:
            return [], message
        if message.kind is MessageKind.RESPONSE and action_id in self._pending:
            self._pending.discard(action_id)
            completion = ActionCompletion(action_id, message)
            if message.name == "Success" and (message.get("EventList") or "").lower() == "start":
                self._lists[action_id] = completion
                return [], None
            return [completion], None
        if message.kind is MessageKind.EVENT:
            collecting = self._lists.get(action_id)
            if collecting is not None:
                if (message.get("EventList") or "").lower() == "complete":
                    del self._lists[action_id]
                    collecting.complete = message
                    return [collecting], None
                collecting.events.append(message)
                return [], None
        return [], message
