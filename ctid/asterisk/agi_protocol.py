"""Sans-I/O FastAGI: bytes from Asterisk in, typed events out; command lines out.

This module never touches a socket. ``ctid.asterisk.agi`` owns the asyncio side:
it feeds every received chunk to :meth:`AGIConnection.receive_data`, drains
:meth:`AGIConnection.next_event`, and writes what :meth:`AGIConnection.send_command`
returns. Everything that affects the protocol state lives in this one file
(the h11 rule), so every framing edge case has a plain unit test
(``tests/test_agi_protocol.py`` replays the real Asterisk 22 captures).

Theory of operation
-------------------
A FastAGI session is one TCP connection that Asterisk opens when the dialplan runs
``AGI(agi://host:port/script?query,arg1,arg2)``. Everything is ``\\n``-terminated
lines (we also accept ``\\r\\n``):

1. Asterisk sends the *environment*: ``agi_key: value`` lines ending with an empty
   line. ``agi_network_script`` carries the script path *and* the query string
   verbatim (Asterisk does not parse it), dialplan arguments arrive as
   ``agi_arg_1..N``. We parse both into :class:`AGIEnvironment`.
2. Then the server drives: it sends one command line and waits for exactly one
   reply (``200 result=1 (data)``, ``510 ...``, ``511 ...``, or the multi-line
   ``520-...`` usage block closed by ``520 End of proper usage.``). AGI is strictly
   one command at a time; sending a second one while a reply is outstanding is a
   local bug and raises :class:`CommandPendingError`.
3. Out of band, Asterisk writes ``HANGUP`` when the channel is hung up *or
   redirected* (any soft hangup). It is never a reply: it arrives after the reply
   of the interrupted command, between commands while the server is idle, or
   after the server's EOF, and it may come twice (``AGIEXITONHANGUP=yes``). It
   yields :class:`HangupLine` and does not change the state. After it, Asterisk
   still answers commands (variable commands with ``200``, channel commands with
   ``511``).
4. By default Asterisk never closes the socket itself after ``HANGUP``: the
   server must. With ``AGIEXITONHANGUP=yes`` it closes right after the HANGUPs.
   An EOF between commands or while a command is outstanding is a normal end
   (:class:`EOF`); an EOF inside the environment, inside a usage block, or in the
   middle of a line is a truncated message and raises :class:`AGIProtocolError`.

Lines are decoded as UTF-8 only once complete, so a character split across reads
survives; invalid UTF-8, NUL bytes, an oversized line or environment, an
unsolicited reply or an unknown line raise :class:`AGIProtocolError`. After an
error the connection is dead: every later ``next_event()`` raises it again.

State table (remote lines and local actions; anything absent is an error)::

    state           input                     next state       event
    --------------  ------------------------  ---------------  --------------
    ENVIRONMENT     "agi_x: value"            ENVIRONMENT      -
    ENVIRONMENT     ""  (end of environment)  IDLE             AGIEnvironment
    IDLE            send_command()            AWAITING_REPLY   - (bytes out)
    IDLE            "HANGUP"                  IDLE             HangupLine
    IDLE            EOF                       CLOSED           EOF
    AWAITING_REPLY  "HANGUP"                  AWAITING_REPLY   HangupLine
    AWAITING_REPLY  "NNN ..."                 IDLE             AGIReply
    AWAITING_REPLY  "NNN-..."                 IN_USAGE         -
    AWAITING_REPLY  EOF                       CLOSED           EOF
    IN_USAGE        any other line            IN_USAGE         -
    IN_USAGE        "NNN ..." (same code)     IDLE             AGIReply
    CLOSED          -                         CLOSED           EOF (again)
    any             protocol violation        ERROR            raises
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import parse_qs, urlsplit

from ctid.asterisk.safety import check_agi_line

__all__ = [
    "EOF",
    "NEED_DATA",
    "TRANSITIONS",
    "AGIConnection",
    "AGIEnvironment",
    "AGIProtocolError",
    "AGIReply",
    "AGIStateError",
    "CommandPendingError",
    "Event",
    "HangupLine",
    "State",
]


# --------------------------------------------------------------------------- errors


class AGIProtocolError(Exception):
    """Asterisk (or whatever connected) broke the FastAGI framing or order."""


class AGIStateError(Exception):
    """The local side used the connection in a state that does not allow it."""


class CommandPendingError(AGIStateError):
    """A command was sent while the previous one still waits for its reply."""


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class AGIEnvironment:
    """The environment block that opens every FastAGI session.

    ``script`` is the path part of ``agi_network_script`` (``"inbound"`` for
    ``agi://ctid:4573/inbound?line=support``), ``query`` its parsed query string
    (values are lists, as a key may repeat) and ``args`` the ``agi_arg_N`` values
    in order. ``env`` keeps every raw ``agi_*`` line.
    """

    env: dict[str, str]
    script: str
    query: dict[str, list[str]]
    args: list[str]

    @property
    def channel(self) -> str | None:
        return self.env.get("agi_channel")

    @property
    def uniqueid(self) -> str | None:
        return self.env.get("agi_uniqueid")

    def query_value(self, name: str) -> str | None:
        """The first value of query parameter ``name``, or None."""
        values = self.query.get(name)
        return values[0] if values else None


@dataclass(frozen=True)
class AGIReply:
    """The reply to one command.

    ``200 result=1 (+1555)`` gives ``code=200, result="1", data="+1555"``;
    ``200 result=-1 endpos=20160`` gives ``extras={"endpos": "20160"}``;
    ``200 result= (timeout)`` gives ``result="", data="timeout"``. A reply without
    ``result=`` (``510 Invalid or unknown command``) has ``result=None`` and its
    text in ``data``; a ``520-`` usage block has the usage lines in ``data``.
    ``raw`` is the reply as received (lines joined with ``\\n``).
    """

    code: int
    result: str | None
    data: str | None
    raw: str
    extras: Mapping[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.code == 200

    @property
    def result_int(self) -> int | None:
        """``result`` as an int, or None when it is absent, empty or not a number."""
        if self.result is None:
            return None
        try:
            return int(self.result)
        except ValueError:
            return None


@dataclass(frozen=True)
class HangupLine:
    """The out-of-band ``HANGUP`` line (hangup or redirect); never a reply."""


@dataclass(frozen=True)
class EOF:
    """Asterisk closed its side of the connection at a message boundary."""


Event = AGIEnvironment | AGIReply | HangupLine | EOF


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA
"""Returned by :meth:`AGIConnection.next_event` when more bytes are needed."""


# --------------------------------------------------------------------------- state


class State(enum.Enum):
    ENVIRONMENT = "ENVIRONMENT"
    IDLE = "IDLE"
    AWAITING_REPLY = "AWAITING_REPLY"
    IN_USAGE = "IN_USAGE"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


Input = Literal[
    "env_line",
    "env_end",
    "send_command",
    "hangup",
    "reply",
    "usage_start",
    "usage_line",
    "usage_end",
    "eof",
]

TRANSITIONS: Final[Mapping[tuple[State, Input], State]] = {
    (State.ENVIRONMENT, "env_line"): State.ENVIRONMENT,
    (State.ENVIRONMENT, "env_end"): State.IDLE,
    (State.IDLE, "send_command"): State.AWAITING_REPLY,
    (State.IDLE, "hangup"): State.IDLE,
    (State.IDLE, "eof"): State.CLOSED,
    (State.AWAITING_REPLY, "hangup"): State.AWAITING_REPLY,
    (State.AWAITING_REPLY, "reply"): State.IDLE,
    (State.AWAITING_REPLY, "usage_start"): State.IN_USAGE,
    (State.AWAITING_REPLY, "eof"): State.CLOSED,
    (State.IN_USAGE, "usage_line"): State.IN_USAGE,
    (State.IN_USAGE, "usage_end"): State.IDLE,
}

_REMOTE_ERRORS: Final[Mapping[tuple[State, Input], str]] = {
    (State.ENVIRONMENT, "eof"): "connection closed before the environment block ended",
    (State.IN_USAGE, "eof"): "connection closed inside a multi-line usage reply",
    (State.IDLE, "reply"): "unsolicited reply: no command is outstanding",
    (State.IDLE, "usage_start"): "unsolicited reply: no command is outstanding",
}


_ENV_KEY_RE: Final = re.compile(r"agi_[A-Za-z0-9_]{1,64}")
_ARG_KEY_RE: Final = re.compile(r"agi_arg_([1-9][0-9]{0,3})")
_REPLY_RE: Final = re.compile(r"(?P<code>[0-9]{3})(?:(?P<sep>[ -])(?P<text>.*))?", re.DOTALL)
_EXTRA: Final = r"[A-Za-z_][A-Za-z0-9_]*=\S*"
_TAIL_WITH_DATA_RE: Final = re.compile(rf"\((?P<data>.*)\)(?P<extras>(?: {_EXTRA})*)", re.DOTALL)
_TAIL_EXTRAS_ONLY_RE: Final = re.compile(rf"{_EXTRA}(?: {_EXTRA})*")
_MAX_QUERY_FIELDS: Final = 64


def _parse_extras(text: str) -> dict[str, str]:
    extras: dict[str, str] = {}
    for item in text.split():
        key, _, value = item.partition("=")
        extras[key] = value
    return extras


def _parse_reply(code: int, text: str, raw: str) -> AGIReply:
    if not text.startswith("result="):
        return AGIReply(code=code, result=None, data=text or None, raw=raw)
    result, _, tail = text[len("result=") :].partition(" ")
    if not tail:
        return AGIReply(code=code, result=result, data=None, raw=raw)
    # Greedy: the data is up to the last ")" that is followed only by key=value
    # extras, so a variable value containing parentheses stays whole.
    with_data = _TAIL_WITH_DATA_RE.fullmatch(tail)
    if with_data is not None:
        return AGIReply(
            code=code,
            result=result,
            data=with_data.group("data"),
            raw=raw,
            extras=_parse_extras(with_data.group("extras")),
        )
    if _TAIL_EXTRAS_ONLY_RE.fullmatch(tail):
        return AGIReply(code=code, result=result, data=None, raw=raw, extras=_parse_extras(tail))
    return AGIReply(code=code, result=result, data=tail, raw=raw)


def _script_and_query(env: Mapping[str, str]) -> tuple[str, dict[str, list[str]]]:
    raw = env.get("agi_network_script")
    if raw is None:
        # No path in the URL: Asterisk omits agi_network_script. Fall back to
        # agi_request, which carries the whole URL.
        parts = urlsplit(env.get("agi_request", ""))
        raw = parts.path.lstrip("/") + ("?" + parts.query if parts.query else "")
    script, _, query_string = raw.partition("?")
    # Asterisk passes the query verbatim (trace 11), and the dialplan puts raw values
    # such as an E.164 DNIS in it: a literal '+' is a plus, never a form-encoded space.
    query_string = query_string.replace("+", "%2B")
    try:
        query = parse_qs(
            query_string, keep_blank_values=True, max_num_fields=_MAX_QUERY_FIELDS
        )
    except ValueError as exc:
        raise AGIProtocolError(f"agi_network_script query string rejected: {exc}") from None
    return script, query


def _arguments(env: Mapping[str, str]) -> list[str]:
    numbered: dict[int, str] = {}
    for key, value in env.items():
        match = _ARG_KEY_RE.fullmatch(key)
        if match is not None:
            numbered[int(match.group(1))] = value
    if sorted(numbered) != list(range(1, len(numbered) + 1)):
        raise AGIProtocolError("agi_arg_N lines are not numbered 1..N")
    return [numbered[n] for n in range(1, len(numbered) + 1)]


# --------------------------------------------------------------------------- connection


class AGIConnection:
    """One FastAGI session, server side, without I/O.

    Feed bytes with :meth:`receive_data` / :meth:`receive_eof`, pull events with
    :meth:`next_event` (or :meth:`events`), and frame commands with
    :meth:`send_command`. ``max_env_bytes`` bounds the environment block (and a
    multi-line usage reply); ``max_line_bytes`` bounds any single line.
    """

    def __init__(self, max_env_bytes: int = 16384, max_line_bytes: int = 8192) -> None:
        if max_env_bytes < 1 or max_line_bytes < 1:
            raise ValueError("limits must be positive")
        self.max_env_bytes = max_env_bytes
        self.max_line_bytes = max_line_bytes
        self._state = State.ENVIRONMENT
        self._buffer = bytearray()
        self._scan_from = 0  # bytes of _buffer already known to hold no b"\n"
        self._their_eof = False
        self._error: AGIProtocolError | None = None
        self._env: dict[str, str] = {}
        self._env_bytes = 0
        self._usage_code = 0
        self._usage_lines: list[str] = []
        self._usage_bytes = 0
        self._pending: str | None = None
        self.hangups_received = 0

    # -- introspection ---------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def pending_command(self) -> str | None:
        """The command line that waits for its reply, if any."""
        return self._pending

    @property
    def hung_up(self) -> bool:
        """True once a ``HANGUP`` line has been parsed."""
        return self.hangups_received > 0

    @property
    def their_eof(self) -> bool:
        return self._their_eof

    # -- input -----------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from Asterisk; parsing happens in :meth:`next_event`."""
        if self._their_eof:
            raise AGIStateError("receive_data() after receive_eof()")
        self._buffer += data

    def receive_eof(self) -> None:
        """Record that Asterisk closed its side; pending lines are still parsed."""
        self._their_eof = True

    # -- output ----------------------------------------------------------------

    def send_command(self, line: str) -> bytes:
        """Validate and frame one command line (``\\n`` appended).

        Raises :class:`CommandPendingError` while a reply is outstanding,
        :class:`AGIStateError` before the environment is parsed or after EOF or an
        error, and ``AGIValueError`` (from ``safety``) for an unsafe line.
        """
        if self._state in (State.AWAITING_REPLY, State.IN_USAGE):
            raise CommandPendingError(
                f"AGI is one command at a time; {self._pending!r} still waits for its reply"
            )
        if self._state is State.ENVIRONMENT:
            raise AGIStateError("cannot send a command before the environment is parsed")
        if self._state is State.CLOSED:
            raise AGIStateError("cannot send a command: Asterisk closed the connection")
        if self._state is State.ERROR:
            raise AGIStateError("cannot send a command: the connection failed") from self._error
        check_agi_line(line)
        self._transition("send_command")
        self._pending = line
        return line.encode("utf-8") + b"\n"

    # -- events ----------------------------------------------------------------

    def next_event(self) -> Event | Literal[_NeedData.NEED_DATA]:
        """Return the next event, or :data:`NEED_DATA`. Raises :class:`AGIProtocolError`.

        Each call consumes at most one line plus whatever lines complete a
        multi-line message, so the work per call is bounded.
        """
        if self._error is not None:
            raise self._error
        if self._state is State.CLOSED:
            return EOF()
        try:
            return self._next_event()
        except AGIProtocolError as exc:
            self._state = State.ERROR
            self._error = exc
            self._pending = None
            raise

    def events(self) -> Iterator[Event]:
        """Drain every event available now; stops at :data:`NEED_DATA` or after EOF."""
        while True:
            event = self.next_event()
            if event is NEED_DATA:
                return
            yield event
            if isinstance(event, EOF):
                return

    # -- internals -------------------------------------------------------------

    def _transition(self, what: Input) -> None:
        key = (self._state, what)
        new_state = TRANSITIONS.get(key)
        if new_state is None:
            if what == "send_command":  # pragma: no cover - send_command checks first
                raise AGIStateError(f"cannot send a command in state {self._state.name}")
            message = _REMOTE_ERRORS.get(key, f"unexpected {what} in state {self._state.name}")
            raise AGIProtocolError(message)
        self._state = new_state

    def _next_event(self) -> Event | Literal[_NeedData.NEED_DATA]:
        # Bounded: every iteration consumes one line; only lines that do not
        # produce an event (environment lines, usage lines) loop again.
        while True:
            line = self._read_line()
            if line is None:
                if not self._their_eof:
                    return NEED_DATA
                if self._buffer:
                    raise AGIProtocolError("connection closed in the middle of a line")
                self._transition("eof")
                self._pending = None
                return EOF()
            event = self._handle_line(line)
            if event is not None:
                return event

    def _read_line(self) -> str | None:
        newline = self._buffer.find(b"\n", self._scan_from)
        if newline < 0:
            # Refuse an oversized line as soon as it is too long, not at its end:
            # a peer that never sends "\n" must not grow the buffer forever.
            self._scan_from = len(self._buffer)
            self._check_limits(len(self._buffer) + 1)
            return None
        line_bytes = newline + 1
        self._check_limits(line_bytes)
        raw = bytes(self._buffer[:newline])
        del self._buffer[:line_bytes]
        self._scan_from = 0
        if self._state is State.ENVIRONMENT:
            self._env_bytes += line_bytes
        elif self._state is State.IN_USAGE:
            self._usage_bytes += line_bytes
            if self._usage_bytes > self.max_env_bytes:
                raise AGIProtocolError(f"usage reply longer than {self.max_env_bytes} bytes")
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if b"\0" in raw:
            raise AGIProtocolError("line contains a NUL byte")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AGIProtocolError(f"line is not valid UTF-8 (byte {exc.start})") from None

    def _check_limits(self, line_bytes: int) -> None:
        """``line_bytes`` counts the ``\n`` (for a partial line: at least one more)."""
        if line_bytes > self.max_line_bytes:
            raise AGIProtocolError(f"line longer than {self.max_line_bytes} bytes")
        if self._state is State.ENVIRONMENT and self._env_bytes + line_bytes > self.max_env_bytes:
            raise AGIProtocolError(f"environment longer than {self.max_env_bytes} bytes")

    def _handle_line(self, line: str) -> Event | None:
        if self._state is State.ENVIRONMENT:
            return self._handle_env_line(line)
        if self._state is State.IN_USAGE:
            return self._handle_usage_line(line)
        if line == "HANGUP":
            self._transition("hangup")
            self.hangups_received += 1
            return HangupLine()
        match = _REPLY_RE.fullmatch(line)
        if match is None:
            raise AGIProtocolError(f"unexpected line from Asterisk: {line[:60]!r}")
        code = int(match.group("code"))
        if match.group("sep") == "-":
            self._transition("usage_start")
            self._usage_code = code
            self._usage_lines = [line]
            self._usage_bytes = len(line.encode("utf-8")) + 1
            return None
        self._transition("reply")
        self._pending = None
        return _parse_reply(code, match.group("text") or "", line)

    def _handle_env_line(self, line: str) -> Event | None:
        if line == "":
            self._transition("env_end")
            env = dict(self._env)
            script, query = _script_and_query(env)
            return AGIEnvironment(env=env, script=script, query=query, args=_arguments(env))
        key, sep, value = line.partition(": ")
        if not sep and line.endswith(":"):
            key, value = line[:-1], ""
        elif not sep:
            raise AGIProtocolError(f"environment line is not 'agi_key: value': {line[:60]!r}")
        if not _ENV_KEY_RE.fullmatch(key):
            raise AGIProtocolError(f"environment key is not agi_*: {key[:60]!r}")
        if key in self._env:
            raise AGIProtocolError(f"environment key {key} repeated")
        self._transition("env_line")
        self._env[key] = value
        return None

    def _handle_usage_line(self, line: str) -> Event | None:
        self._usage_lines.append(line)
        if not line.startswith(f"{self._usage_code} "):
            self._transition("usage_line")
            return None
        self._transition("usage_end")
        self._pending = None
        lines, self._usage_lines = self._usage_lines, []
        return AGIReply(
            code=self._usage_code,
            result=None,
            data="\n".join(lines[1:-1]) or None,
            raw="\n".join(lines),
        )
