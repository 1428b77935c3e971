"""The thin asyncio FastAGI server: sockets around the sans-I/O ``agi_protocol``.

How the pieces fit:

- :class:`FastAGIServer` listens (default ``127.0.0.1:4573``). For each connection
  an :class:`asyncio.Protocol` feeds received bytes to an
  :class:`~ctid.asterisk.agi_protocol.AGIConnection` and turns its events into
  future results; no parsing happens here.
- Each session runs in **one task** owned by the server. The task waits for the
  environment (bounded by ``env_timeout``, so a client that sends half a header
  or nothing blocks nobody), routes by script path (``agi://ctid:4573/inbound`` ->
  ``routes["inbound"]``), binds ``agi_channel``, ``uniqueid`` and ``call_id`` with
  ``structlog.contextvars`` for every log line of that call, and awaits
  ``handler(session)``.
- :class:`AGISession` is the handler's API: ``await session.send_command("STREAM
  FILE", "prompt", "")`` returns an :data:`AGIResult`; arguments are quoted with
  ``safety.agi_quote``. ``511`` raises :class:`AGIHangup`, other non-200 codes raise
  :class:`AGICommandError`. Commands are serialised (AGI is one at a time).

Lifetimes (measured on Asterisk 22, see ``tests/fixtures/asterisk22/agi``):

- By default Asterisk never closes the socket after ``HANGUP`` and the channel
  lives until we close. So the server closes the socket as soon as the handler
  returns, raises or is cancelled; and when ``HANGUP`` arrives (hangup or
  Redirect) it gives the handler ``hangup_grace`` seconds, then closes the socket
  and cancels it. Commands sent after ``HANGUP`` still go to Asterisk (variable
  commands still work on a dead channel).
- With ``AGIEXITONHANGUP=yes`` Asterisk sends ``HANGUP`` twice and closes: EOF is
  handled at any point; an outstanding or later command raises :class:`AGIHangup`.
- :meth:`FastAGIServer.stop` stops listening, closes every session, cancels the
  handlers and waits for them (bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, Literal, cast

import structlog

from ctid.asterisk.agi_protocol import (
    EOF,
    AGIConnection,
    AGIEnvironment,
    AGIProtocolError,
    AGIReply,
    AGIStateError,
    HangupLine,
)
from ctid.asterisk.safety import InvalidId, agi_command, check_id

__all__ = [
    "AGICommandError",
    "AGICommandTimeout",
    "AGIError",
    "AGIHangup",
    "AGIResult",
    "AGISession",
    "FastAGIServer",
    "Handler",
]

logger = structlog.get_logger(__name__)

AGIResult = AGIReply
"""The typed result of one command: ``code``, ``result``, ``data``, ``extras``, ``raw``."""

Handler = Callable[["AGISession"], Awaitable[None]]


class _Default(enum.Enum):
    """Sentinel type: "use the server's command_timeout" (None means no timeout)."""

    COMMAND_TIMEOUT = "COMMAND_TIMEOUT"


_DEFAULT: Final = _Default.COMMAND_TIMEOUT


class AGIError(Exception):
    """Base class of the errors a FastAGI handler sees."""


class AGIHangup(AGIError):
    """The channel is dead for this command (``511``) or the connection is gone.

    ``result`` is the ``511`` reply, or None when the connection closed.
    """

    def __init__(self, message: str, result: AGIResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class AGICommandError(AGIError):
    """Asterisk answered a command with a code other than 200 or 511."""

    def __init__(self, command: str, result: AGIResult) -> None:
        first_line = result.raw.split("\n", 1)[0]
        super().__init__(f"{command} failed: {first_line}")
        self.command = command
        self.result = result


class AGICommandTimeout(AGIError, TimeoutError):
    """No reply within the command timeout; the session is closed (it cannot resync)."""


class _SessionProtocol(asyncio.Protocol):
    """Socket callbacks for one session: bytes -> AGIConnection -> futures and flags.

    Callbacks never bind structlog contextvars (they run in the loop's context,
    not the session task's); they log with an explicitly bound logger.
    """

    def __init__(self, server: FastAGIServer) -> None:
        self._server = server
        self._conn = AGIConnection(
            max_env_bytes=server.max_env_bytes, max_line_bytes=server.max_line_bytes
        )
        self._transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.environment: asyncio.Future[AGIEnvironment] = loop.create_future()
        self._reply: asyncio.Future[AGIReply] | None = None
        self.hangup_event = asyncio.Event()
        self.closed_event = asyncio.Event()
        self.failure: BaseException | None = None
        self.task: asyncio.Task[None] | None = None
        self._grace_timer: asyncio.TimerHandle | None = None
        self.grace_expired = False
        self._closed_by_us = False
        self.log = logger

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Duck-typed, not isinstance(transport, asyncio.Transport): uvloop's transports
        # do not subclass it (that assert broke every FastAGI session under uvloop). A
        # stream server's transport is always a read-write one.
        if not callable(getattr(transport, "write", None)):  # pragma: no cover - not a stream
            raise TypeError(f"FastAGI needs a stream transport, got {type(transport).__name__}")
        self._transport = cast(asyncio.Transport, transport)
        self.log = logger.bind(peer=transport.get_extra_info("peername"))
        self.task = self._server._spawn_session(self)

    def data_received(self, data: bytes) -> None:
        try:
            self._conn.receive_data(data)
        except AGIStateError:  # pragma: no cover - transports stop reading at EOF
            return
        self._drain()

    def eof_received(self) -> bool:
        self._conn.receive_eof()
        self._drain()
        return False  # close our side too: nothing more can be exchanged

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_closed(exc)

    # -- events ----------------------------------------------------------------

    def _drain(self) -> None:
        try:
            for event in self._conn.events():
                self._dispatch(event)
        except AGIProtocolError as exc:
            self.log.warning("agi.protocol_error", error=str(exc))
            self._fail(exc)
            self.close()

    def _dispatch(self, event: AGIEnvironment | AGIReply | HangupLine | EOF) -> None:
        if isinstance(event, AGIEnvironment):
            if not self.environment.done():
                self.environment.set_result(event)
        elif isinstance(event, AGIReply):
            if self._reply is not None and not self._reply.done():
                self._reply.set_result(event)
        elif isinstance(event, HangupLine):
            self._on_hangup("HANGUP line")
        else:
            self._fail(AGIHangup("Asterisk closed the FastAGI connection"))
            self._on_hangup("EOF")

    def _on_hangup(self, why: str) -> None:
        first = not self.hangup_event.is_set()
        self.hangup_event.set()
        if first:
            self.log.info("agi.hangup", reason=why, grace_s=self._server.hangup_grace)
            self._start_grace()

    def _start_grace(self) -> None:
        if self._grace_timer is None and self.task is not None and not self.task.done():
            self._grace_timer = self._loop.call_later(
                self._server.hangup_grace, self._on_grace_expired
            )

    def _on_grace_expired(self) -> None:
        # Release the channel first, whatever the handler does with the cancel.
        self.grace_expired = True
        self.close()
        if self.task is not None and not self.task.done():
            self.log.info("agi.hangup_grace_expired")
            self.task.cancel(msg="FastAGI hangup grace expired")

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        if not self.environment.done():
            self.environment.set_exception(exc)
            # The session task may be gone (stop()); never leave it unretrieved.
            self.environment.exception()
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(exc)

    def _mark_closed(self, exc: Exception | None) -> None:
        if self.closed_event.is_set():
            return
        self.closed_event.set()
        self._fail(AGIHangup("FastAGI connection closed") if exc is None else AGIHangup(str(exc)))
        if not self._closed_by_us:
            # Asterisk (or the network) dropped us without EOF: same as a hangup.
            self._on_hangup("connection lost")

    # -- used by AGISession and the server ---------------------------------------

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._closed_by_us = True
            self._transport.close()

    @property
    def _closing(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def cancel_grace_timer(self) -> None:
        if self._grace_timer is not None:
            self._grace_timer.cancel()

    @property
    def hung_up(self) -> bool:
        return self.hangup_event.is_set()

    @property
    def usable(self) -> bool:
        return self.failure is None and not self._closing

    def send(self, line: str) -> asyncio.Future[AGIReply]:
        """Frame and write one command; the future gets its reply (or the failure)."""
        if self.failure is not None:
            raise AGIHangup(f"FastAGI connection is gone: {self.failure}") from self.failure
        if self._closing:
            raise AGIHangup("FastAGI connection closed")
        try:
            data = self._conn.send_command(line)
        except AGIStateError as exc:
            raise AGIHangup(f"cannot send: {exc}") from exc
        reply: asyncio.Future[AGIReply] = self._loop.create_future()
        self._reply = reply
        assert self._transport is not None
        self._transport.write(data)
        return reply


class AGISession:
    """What a route handler gets: the environment plus a command API.

    ``hung_up`` becomes True (and ``hangup_event`` is set) on the first ``HANGUP``
    line or when the connection closes. A hangup also starts the server's
    ``hangup_grace`` countdown, after which the handler is cancelled.
    """

    def __init__(
        self,
        protocol: _SessionProtocol,
        env: AGIEnvironment,
        call_id: str | None,
        command_timeout: float | None,
    ) -> None:
        self._protocol = protocol
        self.environment = env
        self.call_id = call_id
        self.command_timeout = command_timeout
        self._lock = asyncio.Lock()

    # -- environment shortcuts ---------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        return self.environment.env

    @property
    def script(self) -> str:
        return self.environment.script

    @property
    def query(self) -> dict[str, list[str]]:
        return self.environment.query

    @property
    def args(self) -> list[str]:
        return self.environment.args

    @property
    def channel(self) -> str | None:
        return self.environment.channel

    @property
    def uniqueid(self) -> str | None:
        return self.environment.uniqueid

    # -- hangup state ------------------------------------------------------------

    @property
    def hung_up(self) -> bool:
        return self._protocol.hung_up

    @property
    def hangup_event(self) -> asyncio.Event:
        return self._protocol.hangup_event

    @property
    def closed(self) -> bool:
        return not self._protocol.usable

    # -- commands ----------------------------------------------------------------

    async def send_command(
        self,
        command: str,
        *args: str | int,
        timeout: float | Literal[_Default.COMMAND_TIMEOUT] | None = _DEFAULT,
    ) -> AGIResult:
        """Send ``command`` with each of ``args`` quoted; return the 200 result.

        ``command`` is the upper-case command word(s) (``"GET VARIABLE"``); pass
        argument values plain (``""`` for none: it is sent as ``""``). Raises
        :class:`AGIHangup` on ``511`` or a closed connection,
        :class:`AGICommandError` on any other non-200 code,
        :class:`AGICommandTimeout` when no reply comes within ``timeout`` (default:
        the server's ``command_timeout``), and ``safety.AGIValueError`` for an
        unsafe argument (nothing is sent then). Concurrent calls are serialised.
        """
        line = agi_command(command, *(self._argument(arg) for arg in args))
        limit = self.command_timeout if timeout is _DEFAULT else timeout
        async with self._lock:
            reply_future = self._protocol.send(line)
            try:
                async with asyncio.timeout(limit):
                    reply = await reply_future
            except TimeoutError:
                raise AGICommandTimeout(
                    f"{command} got no reply within {limit} s; session closed"
                ) from None
            finally:
                if not reply_future.done() or reply_future.cancelled():
                    # Abandoned wait (timeout or cancel): the late reply would be
                    # taken for the next command's, so the session cannot go on.
                    reply_future.cancel()
                    self._protocol.close()
        if reply.code == 200:
            return reply
        if reply.code == 511:
            raise AGIHangup(f"{command}: {reply.data or 'channel is dead'}", reply)
        raise AGICommandError(command, reply)

    @staticmethod
    def _argument(arg: str | int) -> str:
        if isinstance(arg, bool) or not isinstance(arg, str | int):
            raise TypeError(f"AGI arguments are str or int, not {type(arg).__name__}")
        return str(arg)

    async def get_variable(self, name: str) -> str | None:
        """``GET VARIABLE``: the value, or None when the variable is unset."""
        reply = await self.send_command("GET VARIABLE", name)
        return reply.data if reply.result == "1" else None

    async def set_variable(self, name: str, value: str) -> None:
        """``SET VARIABLE``; works on a dead channel too."""
        await self.send_command("SET VARIABLE", name, value)


class FastAGIServer:
    """A FastAGI listener that routes each session to a handler by script path.

    ``routes`` maps a script path (``"inbound"`` for ``agi://ctid:4573/inbound?x=1``)
    to ``async def handler(session: AGISession) -> None``; ``default_route``
    handles unknown paths (without one they are logged and closed).
    ``env_timeout`` bounds the wait for the environment block, ``command_timeout``
    the wait for each reply (None: no bound), ``hangup_grace`` how long a handler
    may run on after ``HANGUP`` before it is cancelled and the socket closed.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 4573,
        routes: Mapping[str, Handler] | None = None,
        *,
        default_route: Handler | None = None,
        env_timeout: float = 5.0,
        command_timeout: float | None = 300.0,
        hangup_grace: float = 2.0,
        stop_timeout: float = 5.0,
        max_env_bytes: int = 16384,
        max_line_bytes: int = 8192,
    ) -> None:
        self.host = host
        self._port = port
        self.routes: dict[str, Handler] = dict(routes or {})
        self.default_route = default_route
        self.env_timeout = env_timeout
        self.command_timeout = command_timeout
        self.hangup_grace = hangup_grace
        self.stop_timeout = stop_timeout
        self.max_env_bytes = max_env_bytes
        self.max_line_bytes = max_line_bytes
        self._server: asyncio.Server | None = None
        self._sessions: dict[asyncio.Task[None], _SessionProtocol] = {}
        self._stopping = False

    @property
    def port(self) -> int:
        """The bound port (the real one after ``start()`` with ``port=0``)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("FastAGIServer already started")
        loop = asyncio.get_running_loop()
        self._stopping = False
        self._server = await loop.create_server(
            lambda: _SessionProtocol(self), self.host, self._port
        )
        logger.info("agi.listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        """Stop listening, close every session, cancel the handlers, wait (bounded)."""
        server, self._server = self._server, None
        self._stopping = True
        if server is not None:
            server.close()
        sessions = dict(self._sessions)
        for task, protocol in sessions.items():
            protocol.close()
            task.cancel(msg="FastAGI server stopping")
        if sessions:
            _, pending = await asyncio.wait(list(sessions), timeout=self.stop_timeout)
            for task in pending:
                logger.error("agi.session_did_not_stop", task=task.get_name())
        if server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.stop_timeout):
                    await server.wait_closed()
        logger.info("agi.stopped")

    async def __aenter__(self) -> FastAGIServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- sessions ----------------------------------------------------------------

    def _spawn_session(self, protocol: _SessionProtocol) -> asyncio.Task[None]:
        task = asyncio.create_task(self._run_session(protocol), name="fastagi-session")
        self._sessions[task] = protocol
        task.add_done_callback(self._session_done)
        if self._stopping:
            protocol.close()
            task.cancel(msg="FastAGI server stopping")
        return task

    def _session_done(self, task: asyncio.Task[None]) -> None:
        protocol = self._sessions.pop(task, None)
        if protocol is not None:
            protocol.cancel_grace_timer()
            protocol.close()
        if not task.cancelled() and task.exception() is not None:  # pragma: no cover
            logger.error("agi.session_crashed", exc_info=task.exception())

    def _route(self, script: str) -> Handler | None:
        return self.routes.get(script.lstrip("/"), self.default_route)

    async def _run_session(self, protocol: _SessionProtocol) -> None:
        try:
            try:
                async with asyncio.timeout(self.env_timeout):
                    env = await protocol.environment
            except TimeoutError:
                protocol.log.warning("agi.env_timeout", timeout_s=self.env_timeout)
                return
            except (AGIProtocolError, AGIHangup) as exc:
                protocol.log.warning("agi.env_failed", error=str(exc))
                return
            handler = self._route(env.script)
            if handler is None:
                protocol.log.warning("agi.no_route", script=env.script, channel=env.channel)
                return
            call_id = _call_id(env)
            session = AGISession(protocol, env, call_id, self.command_timeout)
            with structlog.contextvars.bound_contextvars(
                agi_channel=env.channel, uniqueid=env.uniqueid, call_id=call_id
            ):
                await self._run_handler(handler, session, protocol)
        finally:
            protocol.close()

    async def _run_handler(
        self, handler: Handler, session: AGISession, protocol: _SessionProtocol
    ) -> None:
        logger.info("agi.session_start", script=session.script)
        task = asyncio.current_task()
        try:
            await handler(session)
        except asyncio.CancelledError:
            # Swallow only our own grace cancel; a stop() or outer cancel goes on.
            if protocol.grace_expired and task is not None and task.uncancel() == 0:
                logger.info("agi.handler_cancelled_after_hangup")
                return
            raise
        except AGIHangup as exc:
            logger.info("agi.handler_ended_by_hangup", error=str(exc))
        except Exception:
            logger.exception("agi.handler_failed")
        else:
            if protocol.grace_expired and task is not None and task.cancelling():
                # The handler swallowed our grace cancel and returned: consume it.
                task.uncancel()
            logger.info("agi.session_end", hung_up=session.hung_up)


def _call_id(env: AGIEnvironment) -> str | None:
    """``call_id`` from the query string, a ``call_id=`` argument, or the env."""
    candidate = env.query_value("call_id")
    if candidate is None:
        for arg in env.args:
            key, sep, value = arg.partition("=")
            if sep and key == "call_id":
                candidate = value
                break
    if candidate is None:
        candidate = env.env.get("agi_call_id")
    if candidate is None:
        return None
    try:
        return check_id(candidate, "call_id")
    except InvalidId:
        logger.warning("agi.invalid_call_id", channel=env.channel)
        return None
